"""A real mesh on one machine: nodes and pods as network namespaces, one
``nodeagent run`` per node, a CA service, small HTTP servers in the pods and
``curl`` as the client. ``make demo`` (nodeagent/demo.py), the e2e tests
(tests/e2e/) and the mesh benchmark (bench/mesh.py) all use this one
implementation.

Layout (see ``redirect.topology``): node N is a namespace holding its pods in
10.250.N.0/24; an extra "control" node (the last one) runs ``nodeagent ca
serve`` on its link address, reachable from every node. Service addresses
(ServiceEntry ``addresses``) are virtual, in 10.250.200.0/24: nothing listens
there; the pod's capture rules send the connection to the agent, which routes
it to an endpoint.

The configuration is the shipped sample (nodeagent/defaults/*.yaml) with only
the addresses rewritten: each WorkloadEntry's ``address`` becomes the IP of
the pod that plays it, each ServiceEntry's ``addresses`` a virtual service IP
(``mesh_config``). Every policy is kept as written.

Probes: each pod's default route goes via its node, so it routes replies to
the agent's probe SNAT address (169.254.7.127) back to the node, as a CNI's
routed veth does; ``lab.curl(NODE, url)`` is a kubelet-style probe (a socket
of the node itself) and reaches the application uncaptured.

The pod server is this module too: ``python -m nodeagent.meshlab serve
--name N --version V --port P [--status 503] [--call URL --call-host HOST]``
answers every request with one JSON line (its pod name, version, the request
it saw, and what its downstream call returned). It imports only the standard
library, so it starts fast.

Everything is bounded in time, and ``teardown`` (also on ``with`` exit, and
what the demo calls on Ctrl-C/SIGTERM) stops the agents and the CA, runs
``nodeagent uninstall`` for every node, kills every process started here and
deletes every namespace (hence every veth and every nft table in them) and the
temporary directory.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys

PY = sys.executable
SERVICE_NET = "10.250.200"
CA_PORT = 15012
ADMIN_PORT = 15000
METRICS_PORT = 15020
READY_PORT = 15021


# --------------------------------------------------------------------------
# the pod server (stdlib only)
# --------------------------------------------------------------------------

async def _read_request(reader: asyncio.StreamReader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    elif headers.get("content-length"):
        body = await reader.readexactly(int(headers["content-length"]))
    return method, target, version, headers, body


async def _call(url: str, host: str, headers: dict[str, str], timeout: float) -> dict:
    """One plain HTTP/1.1 GET (Connection: close) to ``url``; the pod's capture
    rules send it through the node agent like any application traffic."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or 80
    fwd = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}\r\n{fwd}Connection: close\r\n\r\n").encode()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, port), timeout)
        writer.write(request)
        data = await asyncio.wait_for(reader.read(-1), timeout)
        writer.close()
    except (OSError, asyncio.TimeoutError) as exc:
        return {"status": 0, "error": f"{type(exc).__name__}: {exc}"}
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return {"status": 0, "error": f"bad response: {head[:80]!r}"}
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    try:
        return {"status": status, "body": json.loads(body)}
    except ValueError:
        return {"status": status, "text": body.decode("utf-8", "replace")[:200]}


def serve(name: str, version: str, port: int, status: int = 200, call: str | None = None,
          call_host: str | None = None) -> None:
    async def handle(reader, writer):
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    method, target, http_version, headers, body = await _read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                    return
                reply: dict = {"pod": name, "version": version, "method": method, "path": target,
                               "peer": peer[0] if peer else None, "body_bytes": len(body),
                               "host": headers.get("host"),
                               "end_user": headers.get("end-user")}
                if call and status < 400:
                    fwd = {k: headers[k] for k in ("end-user", "x-request-id") if k in headers}
                    reply["call"] = await _call(call, call_host or "", fwd, 8.0)
                payload = (json.dumps(reply, separators=(",", ":")) + "\n").encode()
                reason = {200: "OK", 503: "Service Unavailable"}.get(status, "Status")
                keep = headers.get("connection", "").lower() != "close" and http_version == "HTTP/1.1"
                writer.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"%s\r\n" % (status, reason.encode(), len(payload),
                                          b"" if keep else b"connection: close\r\n") + payload)
                await writer.drain()
                if not keep:
                    return
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "0.0.0.0", port, backlog=1024, reuse_address=True)
        print(f"serving {name} ({version}) on :{port}", flush=True)
        async with server:
            await server.serve_forever()

    try:
        import uvloop  # noqa: F401  (faster when present; plain asyncio otherwise)
        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


def _serve_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m nodeagent.meshlab serve")
    p.add_argument("--name", required=True)
    p.add_argument("--version", default="v1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--status", type=int, default=200, help="answer every request with this status")
    p.add_argument("--call", help="URL to GET for every request (a downstream service)")
    p.add_argument("--call-host", help="Host header for --call")
    a = p.parse_args(argv)
    serve(a.name, a.version, a.port, a.status, a.call, a.call_host)
    return 0


# --------------------------------------------------------------------------
# configuration: the shipped sample with the netns addresses
# --------------------------------------------------------------------------

DEFAULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "defaults")


class WorkloadDef:
    """A WorkloadEntry of the sample, i.e. one pod to run."""

    __slots__ = ("name", "namespace", "labels", "service_account", "port", "service")

    def __init__(self, name, namespace, labels, service_account, port, service=None):
        self.name, self.namespace, self.labels = name, namespace, dict(labels)
        self.service_account, self.port, self.service = service_account, port, service

    @property
    def version(self) -> str:
        return self.labels.get("version", "v1")


def load_documents(source_dir: str = DEFAULTS_DIR) -> list[tuple[str, dict]]:
    """(file name, document) for every YAML document of the directory, in order."""
    import yaml

    docs = []
    for fname in sorted(os.listdir(source_dir)):
        if fname.endswith((".yaml", ".yml")):
            with open(os.path.join(source_dir, fname)) as fh:
                docs.extend((fname, d) for d in yaml.safe_load_all(fh) if d)
    return docs


def sample_workloads(docs) -> dict[str, WorkloadDef]:
    """The WorkloadEntries of the sample, keyed by name, each with the service
    (ServiceEntry name) whose workloadSelector picks it."""
    selectors = []
    for _, d in docs:
        if d.get("kind") == "ServiceEntry":
            sel = ((d.get("spec") or {}).get("workloadSelector") or {}).get("labels") or {}
            selectors.append((d["metadata"]["name"], d["metadata"].get("namespace", "default"), sel))
    out = {}
    for _, d in docs:
        if d.get("kind") != "WorkloadEntry":
            continue
        meta, spec = d["metadata"], d.get("spec") or {}
        ns = meta.get("namespace", "default")
        labels = spec.get("labels") or {}
        ports = spec.get("ports") or {}
        service = next((n for n, sns, sel in selectors
                        if sns == ns and sel and all(labels.get(k) == v for k, v in sel.items())), None)
        out[meta["name"]] = WorkloadDef(meta["name"], ns, labels, spec.get("serviceAccount") or "default",
                                        int(next(iter(ports.values()), 80)), service)
    return out


def service_ports(docs) -> dict[str, tuple[str, int]]:
    """ServiceEntry name -> (first host, first port number)."""
    out = {}
    for _, d in docs:
        if d.get("kind") == "ServiceEntry":
            spec = d.get("spec") or {}
            out[d["metadata"]["name"]] = (spec["hosts"][0], int(spec["ports"][0]["number"]))
    return out


def mesh_config(docs, pod_ips: dict[str, str], service_ips: dict[str, str]) -> tuple[str, list[str]]:
    """The sample rewritten for the namespaces: WorkloadEntry ``address`` ->
    the IP of the pod of that name (entries with no pod are left out, and
    listed); ServiceEntry ``addresses`` -> its virtual IP. Nothing else changes."""
    import copy

    import yaml

    out, dropped = [], []
    for fname, doc in docs:
        d = copy.deepcopy(doc)
        kind, name = d.get("kind"), d.get("metadata", {}).get("name")
        if kind == "WorkloadEntry":
            if name not in pod_ips:
                dropped.append(f"WorkloadEntry {name} ({fname})")
                continue
            d["spec"]["address"] = pod_ips[name]
        elif kind == "ServiceEntry" and name in service_ips:
            d["spec"]["addresses"] = [service_ips[name]]
        out.append(d)
    header = ("# Generated by nodeagent.meshlab from nodeagent/defaults/*.yaml: only WorkloadEntry\n"
              "# addresses (pod IPs) and ServiceEntry addresses (virtual IPs) were rewritten.\n")
    return header + yaml.safe_dump_all(out, sort_keys=False), dropped


# --------------------------------------------------------------------------
# the lab
# --------------------------------------------------------------------------

class LabError(Exception):
    """Something in the lab failed; the message says what and where (agent logs included)."""


class Curl:
    __slots__ = ("status", "body", "exit_code", "error")

    def __init__(self, status, body, exit_code, error):
        self.status, self.body, self.exit_code, self.error = status, body, exit_code, error

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"Curl(status={self.status}, exit={self.exit_code}, body={self.body[:120]!r}, error={self.error!r})"


class Sniffer:
    """Every frame on one interface of a namespace, read with ``socket(AF_PACKET)``
    in a background thread (no tcpdump), for a bounded time."""

    ETH_P_ALL = 0x0003

    def __init__(self, netns: str, iface: str, limit_s: float = 15.0) -> None:
        self.netns, self.iface, self.limit_s = netns, iface, limit_s
        self.frames: list[bytes] = []
        self._stop = None
        self._thread = None
        self._sock = None

    def __enter__(self) -> "Sniffer":
        import socket
        import threading

        from redirect.netns import run_in_netns

        def make():
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(self.ETH_P_ALL))
            sock.bind((self.iface, 0))
            return sock

        self._sock = run_in_netns(self.netns, make)
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import socket
        import time

        deadline = time.monotonic() + self.limit_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.frames.append(self._sock.recv(65535))
            except socket.timeout:
                continue
            except OSError:
                return

    def __exit__(self, *exc) -> None:
        import time

        time.sleep(0.1)  # frames already on the wire when the caller is done
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()

    def contains(self, marker: bytes) -> bool:
        return any(marker in f for f in self.frames)

    def tcp_ports(self) -> set[int]:
        """Every TCP port (source or destination) of the IPv4 frames seen."""
        ports = set()
        for f in self.frames:
            if len(f) < 34 or f[12:14] != b"\x08\x00" or f[23] != 6:
                continue
            ihl = (f[14] & 0x0F) * 4
            tcp = 14 + ihl
            if len(f) >= tcp + 4:
                ports.add(int.from_bytes(f[tcp:tcp + 2], "big"))
                ports.add(int.from_bytes(f[tcp + 2:tcp + 4], "big"))
        return ports


class LabPod:
    __slots__ = ("name", "node", "ip", "namespace", "service_account", "labels", "port", "server", "enrolled")

    def __init__(self, name, node, ip, namespace, service_account, labels, port):
        self.name, self.node, self.ip, self.namespace = name, node, ip, namespace
        self.service_account, self.labels, self.port = service_account, dict(labels), port
        self.server = None
        self.enrolled = False


class MeshLab:
    """Nodes, pods, agents and a CA service in network namespaces; see the module doc."""

    def __init__(self, *, capture: str = "nftables", timeout: float = 20.0, keep_dir: bool = False,
                 log=None) -> None:
        import tempfile

        from redirect.topology import Topology

        if os.geteuid() != 0:
            raise LabError("the mesh lab needs root (network namespaces and nftables)")
        self.capture = capture
        self.timeout = timeout
        self.log = log or (lambda msg: None)
        self.dir = tempfile.mkdtemp(prefix="nodeagent-meshlab-")
        # eBPF capture: each node agent pins its maps and links in a directory of its own.
        self.pin_root = "/sys/fs/bpf/" + os.path.basename(self.dir)
        self.keep_dir = keep_dir
        self.topo = Topology(timeout=10.0)
        self.pods: dict[str, LabPod] = {}
        self.nodes: list[str] = []
        self.agents: dict[str, object] = {}  # node -> Popen
        self.ca_proc = None
        self.ca_node = None
        self.ca_dir = os.path.join(self.dir, "ca")
        self.config_dir = os.path.join(self.dir, "config")
        os.makedirs(self.config_dir)
        self.repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self._torn_down = False
        self._logs: list = []  # open log files of the processes started here
        self._agent_log: dict[str, str] = {}  # node -> log file name of its current agent

    # -- context ---------------------------------------------------------

    def __enter__(self) -> "MeshLab":
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    # -- processes ---------------------------------------------------------

    def cli(self, *args: str, timeout: float | None = None, check: bool = True):
        """``nodeagent ARGS``. ``uninstall --state-dir`` of a node runs in that node's
        namespace, as on a real node: it also removes the node's own rules (probe SNAT)."""
        import subprocess

        from redirect.netns import netns_command

        argv = [PY, "-m", "nodeagent", *args]
        if args[:1] == ("uninstall",):
            node = next((n for n in self.nodes if self.state_dir(n) in args), None)
            if node is not None:
                argv = netns_command(self.topo.netns(node), argv)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=timeout or self.timeout, cwd=self.repo)
        except subprocess.TimeoutExpired:
            raise LabError(f"`nodeagent {' '.join(args)}` took longer than {timeout or self.timeout} s") from None
        if check and proc.returncode != 0:
            raise LabError(f"`nodeagent {' '.join(args)}` failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
        return proc

    def _wait(self, what: str, fn, timeout: float | None = None, interval: float = 0.05):
        import time

        deadline = time.monotonic() + (timeout or self.timeout)
        last = None
        while time.monotonic() < deadline:
            try:
                value = fn()
            except LabError:
                raise  # a process died: no point waiting
            except Exception as exc:  # noqa: BLE001 - retried until the deadline, then reported
                last = exc
                value = None
            if value:
                return value
            time.sleep(interval)
        raise LabError(f"timed out after {timeout or self.timeout} s waiting for {what}"
                       + (f" (last error: {last})" if last else ""))

    # -- building ------------------------------------------------------------

    def build(self, nodes: list[str]) -> None:
        """The node namespaces, then a control namespace running the CA service."""
        for node in nodes:
            self.topo.add_node(node)
            self.nodes.append(node)
        self.ca_node = "control"
        ca = self.topo.add_node(self.ca_node)
        self.ca_address = ca.link_address
        self.cli("ca", "init", "--dir", self.ca_dir)
        self._cli_parallel("ca node-credential", [
            (node, ["ca", "node-credential", "--dir", self.ca_dir, "--node", node, "--out", self.credential_dir(node)])
            for node in nodes])
        log = self._log_file("ca.log")
        self.ca_proc = self.topo.spawn(self.ca_node, [PY, "-m", "nodeagent", "ca", "serve", "--dir", self.ca_dir,
                                                      "--listen", f"{self.ca_address}:{CA_PORT}"],
                                       stdout=log, stderr=log, cwd=self.repo)
        self._wait("the CA service", lambda: self._ca_up())
        self.log(f"CA service on https://{self.ca_address}:{CA_PORT} (namespace {self.topo.netns(self.ca_node)})")

    def _ca_up(self) -> bool:
        if self.ca_proc.poll() is not None:
            raise LabError(f"the CA service exited ({self.ca_proc.returncode}):\n{self._read('ca.log')}")
        return "CA service for" in self._read("ca.log")

    def credential_dir(self, node: str) -> str:
        return os.path.join(self.dir, f"cred-{node}")

    def state_dir(self, node: str) -> str:
        return os.path.join(self.dir, f"state-{node}")

    def add_pod(self, node: str, name: str, *, namespace: str, service_account: str = "default",
                labels: dict | None = None, port: int = 0) -> LabPod:
        pod = self.topo.add_pod(node, name)
        lp = LabPod(name, node, pod.ip, namespace, service_account, labels or {}, port)
        self.pods[name] = lp
        return lp

    def write_config(self, text: str) -> None:
        path = os.path.join(self.config_dir, "mesh.yaml")
        with open(path + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(path + ".tmp", path)

    def start_server(self, pod: LabPod, *, version: str | None = None, status: int = 200,
                     call: str | None = None, call_host: str | None = None):
        argv = [PY, "-m", "nodeagent.meshlab", "serve", "--name", pod.name,
                "--version", version or pod.labels.get("version", "v1"), "--port", str(pod.port),
                "--status", str(status)]
        if call:
            argv += ["--call", call, "--call-host", call_host or ""]
        log = self._log_file(f"server-{pod.name}.log")
        pod.server = self.topo.spawn(pod.name, argv, stdout=log, stderr=log, cwd=self.repo)
        return pod.server

    def wait_servers(self) -> None:
        for pod in self.pods.values():
            if pod.server is not None:
                self._wait(f"the server in pod {pod.name}",
                           lambda p=pod: self._server_up(p), timeout=self.timeout)

    def _server_up(self, pod: LabPod) -> bool:
        if pod.server.poll() is not None:
            raise LabError(f"the server of pod {pod.name} exited:\n{self._read(f'server-{pod.name}.log')}")
        return "serving" in self._read(f"server-{pod.name}.log")

    def _log_file(self, name: str):
        fh = open(os.path.join(self.dir, name), "w")
        self._logs.append(fh)
        return fh

    def _read(self, name: str) -> str:
        try:
            with open(os.path.join(self.dir, name)) as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    # -- agents ------------------------------------------------------------

    def start_agent(self, node: str, *, capture: str | None = None, wait: bool = True):
        import time

        logname = f"agent-{node}-{time.monotonic_ns()}.log"
        log = self._log_file(logname)
        argv = [PY, "-m", "nodeagent", "run", "--node", node, "--config-dir", self.config_dir,
                "--state-dir", self.state_dir(node), "--capture", capture or self.capture,
                "--ca-url", f"https://{self.ca_address}:{CA_PORT}", "--node-credential", self.credential_dir(node),
                "--admin", f"127.0.0.1:{ADMIN_PORT}", "--metrics", f"0.0.0.0:{METRICS_PORT}",
                "--readiness", f"127.0.0.1:{READY_PORT}"]
        if (capture or self.capture) in ("ebpf", "auto"):
            argv += ["--bpf-pin-dir", self.pin_dir(node)]
        proc = self.topo.spawn(node, argv, stdout=log, stderr=log, cwd=self.repo,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._agent_log[node] = logname
        self.agents[node] = proc
        if wait:
            self.wait_ready(node)
        return proc

    def pin_dir(self, node: str) -> str:
        return f"{self.pin_root}-{node}"

    def agent_log(self, node: str) -> str:
        """The log of the node's most recent agent process."""
        return self._read(self._agent_log[node]) if node in self._agent_log else ""

    def wait_ready(self, node: str, timeout: float | None = None) -> dict:
        def ready():
            proc = self.agents[node]
            if proc.poll() is not None:
                raise LabError(f"agent on {node} exited ({proc.returncode}):\n{self.agent_log(node)[-3000:]}")
            status, body = self.http(node, READY_PORT, "/healthz/ready")
            return json.loads(body) if status == 200 else None

        try:
            return self._wait(f"agent {node} ready", ready, timeout)
        except LabError as exc:
            raise LabError(f"{exc}\nagent log:\n{self.agent_log(node)[-3000:]}") from None

    def stop_agent(self, node: str) -> int:
        import signal
        import subprocess

        proc = self.agents.pop(node, None)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc is not None else 0
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            return -9

    def http(self, node: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET http://127.0.0.1:PORT/PATH inside a node's namespace (the agent's faces)."""
        import urllib.error
        import urllib.request

        from redirect.netns import run_in_netns

        def get():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        return run_in_netns(self.topo.netns(node), get, timeout=timeout + 2)

    def admin(self, node: str, path: str) -> dict:
        status, body = self.http(node, ADMIN_PORT, path)
        if status != 200:
            raise LabError(f"admin {path} on {node}: HTTP {status}: {body[:300]}")
        return json.loads(body)

    def metrics(self, node: str) -> list[tuple[str, dict, float]]:
        """The agent's Prometheus metrics: (name, labels, value) samples."""
        from prometheus_client.parser import text_string_to_metric_families

        status, body = self.http(node, METRICS_PORT, "/metrics")
        if status != 200:
            raise LabError(f"metrics on {node}: HTTP {status}")
        return [(s.name, dict(s.labels), s.value)
                for fam in text_string_to_metric_families(body) for s in fam.samples]

    def count(self, node: str, metric: str, **labels: str) -> float:
        """Sum of a metric's samples on a node whose labels include ``labels``."""
        return sum(v for name, lab, v in self.metrics(node)
                   if name == metric and all(lab.get(k) == want for k, want in labels.items()))

    def enroll(self, pod: LabPod) -> str:
        labels = ",".join(f"{k}={v}" for k, v in pod.labels.items())
        out = self.cli("enroll", "--netns", self.topo.netns(pod.name), "--name", pod.name,
                       "--namespace", pod.namespace, "--service-account", pod.service_account,
                       "--labels", labels, "--ip", pod.ip, "--state-dir", self.state_dir(pod.node)).stdout
        pod.enrolled = True
        return out.strip()

    def _cli_parallel(self, what: str, jobs: list[tuple[object, list[str]]]) -> None:
        """Run several ``nodeagent`` commands at once (one process each), all bounded."""
        import subprocess

        procs = [(key, subprocess.Popen([PY, "-m", "nodeagent", *argv], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, cwd=self.repo))
                 for key, argv in jobs]
        errors = []
        for key, proc in procs:
            try:
                out, err = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                errors.append(f"{key}: took longer than {self.timeout} s")
                continue
            if proc.returncode != 0:
                errors.append(f"{key}: {err.strip() or out.strip()}")
        if errors:
            raise LabError(f"{what} failed: " + "; ".join(errors))

    def place_all(self, pods) -> None:
        """``nodeagent ca place`` for every pod's identity on its node (in parallel; the CA dir is locked)."""
        wanted = sorted({(pod.node, pod.namespace, pod.service_account) for pod in pods})
        self._cli_parallel("ca place", [
            (f"{ns}/{sa} on {node}", ["ca", "place", "--dir", self.ca_dir, "--node", node, "--namespace", ns,
                                      "--service-account", sa]) for node, ns, sa in wanted])

    def enroll_all(self, pods) -> None:
        """``nodeagent enroll`` for several pods at once."""
        pods = list(pods)
        self._cli_parallel("enroll", [
            (pod.name, ["enroll", "--netns", self.topo.netns(pod.name), "--name", pod.name,
                        "--namespace", pod.namespace, "--service-account", pod.service_account,
                        "--labels", ",".join(f"{k}={v}" for k, v in pod.labels.items()),
                        "--ip", pod.ip, "--state-dir", self.state_dir(pod.node)]) for pod in pods])
        for pod in pods:
            pod.enrolled = True

    def wait_certificates(self, node: str, timeout: float | None = None) -> None:
        """Every enrolled workload of the node holds a certificate from the CA service."""
        want = {f"spiffe://cluster.local/ns/{p.namespace}/sa/{p.service_account}"
                for p in self.pods.values() if p.node == node and p.enrolled}

        def have():
            certs = self.admin(node, "/certs")["certificates"]
            valid = {c["identity"] for c in certs if c.get("state") == "valid"}
            return want <= valid

        self._wait(f"certificates on {node}", have, timeout)

    # -- traffic -------------------------------------------------------------

    def exec(self, ns: str, argv, timeout: float | None = None, check: bool = False):
        return self.topo.exec(ns, argv, timeout=timeout or self.timeout, check=check)

    def curl(self, pod: str, url: str, *, host: str | None = None, headers: dict | None = None,
             method: str | None = None, data: str | None = None, count: int = 1,
             max_time: float = 5.0) -> list[Curl]:
        """``curl`` run inside pod ``pod``'s namespace; ``count`` requests on one
        connection (keep-alive). Returns one Curl per request."""
        sep = "@@nodeagent-meshlab@@"
        argv = ["curl", "-sS", "--max-time", str(max_time), "-w", f"\n{sep}%{{http_code}}\n"]
        if host:
            argv += ["-H", f"Host: {host}"]
        for k, v in (headers or {}).items():
            argv += ["-H", f"{k}: {v}"]
        if method:
            argv += ["-X", method]
        if data is not None:
            argv += ["--data-binary", data]
        argv += [url] * count
        proc = self.exec(pod, argv, timeout=max_time * count + 5)
        results = []
        chunks = proc.stdout.split(f"\n{sep}")
        for chunk in chunks[1:]:
            code, _, rest = chunk.partition("\n")
            results.append([int(code) if code.isdigit() else 0, None])
        bodies = [chunks[0]] + [c.partition("\n")[2] for c in chunks[1:-1]]
        for r, body in zip(results, bodies):
            r[1] = body
        out = [Curl(status, body, proc.returncode, proc.stderr.strip()) for status, body in results]
        while len(out) < count:  # curl stopped early (connection refused, reset, timeout)
            out.append(Curl(0, "", proc.returncode, proc.stderr.strip()))
        return out

    def sniff(self, node: str, peer: str, limit_s: float = 15.0) -> Sniffer:
        """A Sniffer on ``node``'s link to node ``peer`` (e.g. node2's ``nl1``)."""
        return Sniffer(self.topo.netns(node), f"nl{self.topo.nodes[peer].index}", limit_s)

    def send_udp(self, pod: str, address: str, port: int, payload: bytes) -> None:
        """One UDP datagram from inside a pod (UDP is never captured: plaintext on the wire)."""
        import socket

        from redirect.netns import run_in_netns

        def send():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(payload, (address, port))

        run_in_netns(self.topo.netns(pod), send)

    def nft_tables(self, ns: str) -> list[str]:
        proc = self.exec(ns, ["nft", "list", "tables"], check=True)
        return [line.strip() for line in proc.stdout.splitlines() if line.strip()]

    # -- teardown ------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Stop agents and the CA, uninstall every node's capture, kill every
        process, delete every namespace and the temp dir. Idempotent; returns
        what could not be cleaned (empty when everything went)."""
        import shutil
        import signal
        import subprocess

        if self._torn_down:
            return []
        self._torn_down = True
        problems = []
        try:
            for node in list(self.agents):
                try:
                    self.stop_agent(node)
                except Exception as exc:  # noqa: BLE001 - keep tearing down
                    problems.append(f"agent {node}: {exc}")
            if self.ca_proc is not None and self.ca_proc.poll() is None:
                self.ca_proc.send_signal(signal.SIGTERM)
                try:
                    self.ca_proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            for node in self.nodes:
                if os.path.exists(os.path.join(self.state_dir(node), "workloads.json")):
                    try:
                        proc = self.cli("uninstall", "--state-dir", self.state_dir(node), check=False)
                    except LabError as exc:
                        problems.append(f"uninstall {node}: {exc}")
                        continue
                    if proc.returncode != 0:
                        problems.append(f"uninstall {node}: {proc.stderr.strip()}")
        finally:
            # Whatever failed above, the namespaces (and every process, veth and
            # rule in them) and the temporary directory go.
            try:
                self.topo.teardown()
            except Exception as exc:  # noqa: BLE001
                problems.append(str(exc))
            for fh in self._logs:
                fh.close()
            self._logs.clear()
            if not self.keep_dir:
                shutil.rmtree(self.dir, ignore_errors=True)
                if os.path.exists(self.dir):
                    problems.append(f"{self.dir} could not be removed")
        return problems


# --------------------------------------------------------------------------
# the shop on two nodes
# --------------------------------------------------------------------------

# Which node runs which WorkloadEntry of the sample. Callers and callees sit
# on different nodes, so every hop the demo and the tests drive crosses the
# node link (and the mTLS tunnel).
SHOP_PLACEMENT = {
    "productpage-v1": "node1", "ratings-v1": "node1", "catalog-v1a": "node1",
    "reviews-v1": "node2", "reviews-v2": "node2", "reviews-v3": "node2",
    "catalog-v1b": "node2", "catalog-v2": "node2",
}
# Extra pods that are not in the sample: an enrolled client in the shop
# namespace with its own service account, and a pod of another namespace that
# is never enrolled (plaintext, no identity).
SHOP_CLIENT = ("client", "node1", "shop", "shop-client")
SHOP_OUTSIDER = ("outsider", "node1", "legacy", "default")
# Downstream calls, as bookinfo: productpage -> reviews; reviews v2/v3 -> ratings.
SHOP_CALLS = {"productpage": "reviews", "reviews-v2": "ratings", "reviews-v3": "ratings"}


class Shop:
    """The shop sample running in a MeshLab."""

    def __init__(self, lab: MeshLab, docs, workloads, services, service_ips, dropped):
        self.lab, self.docs, self.workloads = lab, docs, workloads
        self.services, self.service_ips, self.dropped = services, service_ips, dropped

    def url(self, service: str, path: str = "/") -> tuple[str, str]:
        """(URL on the service's virtual IP, Host header) for a ServiceEntry name."""
        host, port = self.services[service]
        return f"http://{self.service_ips[service]}:{port}{path}", f"{host}:{port}"

    def curl(self, pod: str, service: str, path: str = "/", **kw) -> list[Curl]:
        url, host = self.url(service, path)
        return self.lab.curl(pod, url, host=host, **kw)


def start_shop(lab: MeshLab, *, placement: dict[str, str] | None = None, failing: tuple[str, ...] = ("catalog-v1b",),
               source_dir: str = DEFAULTS_DIR) -> Shop:
    """Build node1/node2 (+ the CA), the sample's workloads as pods, a client
    and an outsider pod; generate the config; start the agents; enroll;
    start the servers (``failing`` ones answer 503)."""
    import time

    placement = placement or SHOP_PLACEMENT
    docs = load_documents(source_dir)
    workloads = sample_workloads(docs)
    services = service_ports(docs)
    started = time.monotonic()
    lab.build(sorted(set(placement.values())))
    for name, node in placement.items():
        wd = workloads.get(name)
        if wd is None:
            raise LabError(f"placement names {name!r}, which is not a WorkloadEntry of {source_dir}")
        lab.add_pod(node, name, namespace=wd.namespace, service_account=wd.service_account,
                    labels=wd.labels, port=wd.port)
    for name, node, ns, sa in (SHOP_CLIENT, SHOP_OUTSIDER):
        lab.add_pod(node, name, namespace=ns, service_account=sa, labels={"app": name})
    service_ips = {name: f"{SERVICE_NET}.{i + 1}" for i, name in enumerate(sorted(services))}
    text, dropped = mesh_config(docs, {n: lab.pods[n].ip for n in placement}, service_ips)
    lab.write_config(text)
    shop = Shop(lab, docs, workloads, services, service_ips, dropped)
    enrolled = [p for p in lab.pods.values() if p.name != SHOP_OUTSIDER[0]]
    lab.place_all(enrolled)
    lab.log(f"topology: {len(lab.nodes)} nodes, {len(lab.pods)} pods; config generated "
            f"({time.monotonic() - started:.1f} s)")
    for node in lab.nodes:
        lab.start_agent(node, wait=False)
    for node in lab.nodes:
        lab.wait_ready(node)
    lab.enroll_all(enrolled)
    for node in lab.nodes:
        lab.wait_certificates(node)
    for name in placement:
        pod = lab.pods[name]
        app = pod.labels.get("app", "")
        call = SHOP_CALLS.get(name) or SHOP_CALLS.get(app)
        url = host = None
        if call:
            url, host = shop.url(call, f"/{call}")
        lab.start_server(pod, status=503 if name in failing else 200, call=url, call_host=host)
    lab.wait_servers()
    lab.log(f"mesh up: agents ready, {len(enrolled)} workloads enrolled with certificates from the CA service, "
            f"servers answering ({time.monotonic() - started:.1f} s)")
    return shop


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        sys.exit(_serve_main(sys.argv[2:]))
    print("usage: python -m nodeagent.meshlab serve --name N --port P [...]", file=sys.stderr)
    sys.exit(2)
