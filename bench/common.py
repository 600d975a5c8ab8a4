"""What the benchmarks share: CPU time of a process, wrk, the HAProxy configurations, certificates,
ports and processes.

- ``cpu_times(pid)``: (user, system) CPU seconds from /proc/PID/stat (utime, stime);
  ``cpu_seconds`` their sum; ``per_request`` turns before/after samples of several processes
  into microseconds per request (user, system, both, and per process);
  ``context_switches(pid)``: (voluntary, involuntary) context switches of its threads.
- ``wrk(...)``: Debian's wrk, ``-t1 --latency``, run here or through ``run`` (a pod's exec),
  parsed into req/s, requests, p50 and p99 (ms) and errors.
- ``upstream_cfg`` (an HAProxy answering ``200 ok`` itself, not Python-bound), ``edge_cfg`` and
  ``ingress_cfg`` (plain HTTP in -> TLS 1.3 with client certificates, verified both ways -> plain
  HTTP out), all ``nbthread 1``; ``make_certs`` writes the ca.pem, server.pem and client.pem they read.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- CPU time ---------------------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` so far (utime, stime of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    user, system = cpu_times(pid)
    return user + system


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of all threads of ``pid`` so far
    (/proc/PID/task/*/status). Involuntary ones are preemptions: on a machine with fewer
    cores than busy processes they say how often the proxy was put aside mid-work."""
    vol = invol = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        invol += int(line.split()[1])
        except FileNotFoundError:  # a thread that just exited
            pass
    return vol, invol


def per_request(before: Sequence[tuple[float, float]], after: Sequence[tuple[float, float]],
                requests: int) -> dict:
    """CPU microseconds per request between two ``cpu_times`` samples of the same processes:
    ``user_us``, ``sys_us``, ``cpu_us`` (all processes together) and ``per_proxy`` [(user, sys)]."""
    n = max(1, requests)
    split = [((a[0] - b[0]) * 1e6 / n, (a[1] - b[1]) * 1e6 / n) for a, b in zip(after, before)]
    user, system = sum(u for u, _ in split), sum(s for _, s in split)
    return {"user_us": user, "sys_us": system, "cpu_us": user + system, "per_proxy": split}


# ---- wrk --------------------------------------------------------------------------------------


def wrk_argv(url: str, seconds: float, connections: int, host: str | None = None) -> list[str]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url]
    if host:
        cmd[1:1] = ["-H", f"Host: {host}"]
    return cmd


def parse_wrk(out: str, who: str = "bench", socket_errors: bool = True) -> dict:
    """req/s, requests, p50 and p99 (ms), errors: non-2xx/3xx answers, plus wrk's socket errors
    (connect, read, write, timeout) unless ``socket_errors`` is false."""
    def latency(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m is None:
            raise SystemExit(f"{who}: no {pct}% latency in wrk output:\n{out}")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    requests = re.search(r"(\d+) requests in", out)
    if rps is None or requests is None:
        raise SystemExit(f"{who}: no request count in wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors and sock:
        errors += sum(map(int, sock.groups()))
    return {"rps": float(rps.group(1)), "requests": int(requests.group(1)),
            "p50": latency("50"), "p99": latency("99"), "errors": errors}


def _run_here(argv: list[str], timeout: float, who: str) -> str:
    url = argv[-1]
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=timeout).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"{who}: wrk against {url} failed ({exc.returncode}): "
                         f"{(exc.stderr or exc.stdout).strip()[:500]}")
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{who}: wrk against {url} did not finish within {timeout:.0f} s")


def wrk(url: str, seconds: float, connections: int, host: str | None = None, *, who: str = "bench",
        run: Callable[[list[str], float], str] | None = None, socket_errors: bool = True) -> dict:
    """One wrk run (``-t1 --latency``), parsed (``parse_wrk``). ``run(argv, timeout) -> stdout``
    runs it elsewhere (in a pod); by default it runs here. Either way it gets ``seconds + 30`` s."""
    argv = wrk_argv(url, seconds, connections, host)
    out = run(argv, seconds + 30) if run is not None else _run_here(argv, seconds + 30, who)
    return parse_wrk(out, who, socket_errors)


# ---- HAProxy ----------------------------------------------------------------------------------

_DEFAULTS = """defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""


def upstream_cfg(*binds: str) -> str:
    """An HAProxy answering ``200 ok`` itself on each ``host:port`` of ``binds``."""
    lines = "".join(f"    bind {b}\n" for b in binds)
    return ("global\n    nbthread 1\n" + _DEFAULTS + "frontend upstream\n" + lines
            + "    http-request return status 200 content-type text/plain string ok\n")


def edge_cfg(listen: str, server: str, certs: str | os.PathLike, sni: str | None = None) -> str:
    """Plain HTTP on ``listen`` -> TLS 1.3 to ``server`` with certs/client.pem, verifying the server
    against certs/ca.pem (and its name against ``sni`` when given); keep-alive upstream."""
    check_name = f" sni str({sni})" if sni else ""
    return f"""global
    nbthread 1
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
{_DEFAULTS}    http-reuse always
frontend out
    bind {listen}
    default_backend next
backend next
    server s1 {server} ssl crt {certs}/client.pem ca-file {certs}/ca.pem verify required{check_name}
"""


def ingress_cfg(listen: str, server: str, certs: str | os.PathLike) -> str:
    """TLS 1.3 on ``listen`` with certs/server.pem, client certificates required (certs/ca.pem)
    -> plain HTTP to ``server``."""
    return f"""global
    nbthread 1
    ssl-default-bind-options ssl-min-ver TLSv1.3
{_DEFAULTS}    http-reuse always
frontend in
    bind {listen} ssl crt {certs}/server.pem ca-file {certs}/ca.pem verify required
    default_backend app
backend app
    server app {server}
"""


# ---- certificates -----------------------------------------------------------------------------


def make_certs(out: str | os.PathLike, *, server_name: str = "mesh-node2", ca_dir: str | os.PathLike | None = None) -> None:
    """ca.pem, server.pem and client.pem (certificate + key, mode 0600) in ``out``, ECDSA P-256.

    Without ``ca_dir``: a throwaway CA; both leaves carry the DNS name ``server_name`` (what an
    ``edge_cfg(sni=...)`` verifies). With ``ca_dir``: issued by the agents' embedded CA there
    (``nodeagent.identity``), so both paths of a bench use certificates of the same CA.
    """
    out = Path(out)
    if ca_dir is not None:
        pems = _embedded_ca_certs(Path(ca_dir), out)
    else:
        pems = _throwaway_certs(out, server_name)
    for who, pem in pems.items():
        path = out / f"{who}.pem"
        path.write_bytes(pem)
        path.chmod(0o600)


def _embedded_ca_certs(ca_dir: Path, out: Path) -> dict[str, bytes]:
    from nodeagent.identity import certs
    from nodeagent.identity.ca import CADirectory, LocalCA
    from nodeagent.identity.spiffe import SpiffeId

    directory = CADirectory(ca_dir)
    ca = LocalCA(directory)
    (out / "ca.pem").write_bytes(directory.trust_bundle(time.time()).pem)
    pems = {}
    for who in ("client", "server"):
        key = certs.generate_key()
        identity = SpiffeId.workload("bench", f"haproxy-{who}")
        issued = ca.sign_csr(certs.make_csr(key, identity), identity, 3600)
        pems[who] = certs.certs_to_pem((issued.certificate, *issued.chain)) + certs.key_to_pem(key)
    return pems


def _throwaway_certs(out: Path, server_name: str) -> dict[str, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("bench-ca")).issuer_name(name("bench-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pems = {}
    for who, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(f"mesh-{who}")).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        pems[who] = cert.public_bytes(serialization.Encoding.PEM) + pem_key(key)
    return pems


# ---- ports, processes, tools ------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0,
              who: str = "bench") -> None:
    """Until ``host:port`` accepts a connection; SystemExit when ``proc`` (the process that should
    listen) exits first or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{who}: {' '.join(map(str, proc.args[:4]))} exited with {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{who}: nothing listens on {host}:{port}")


def stop_all(procs: Sequence[subprocess.Popen], timeout: float) -> None:
    """SIGTERM to each still running process (last started first), then wait; SIGKILL after ``timeout``."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def missing_tool(tools: Sequence[str]) -> str | None:
    """The first of ``tools`` found neither on PATH nor in /usr/sbin:/sbin, or None."""
    for tool in tools:
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            return tool
    return None
