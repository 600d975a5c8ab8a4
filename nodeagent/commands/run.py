"""`nodeagent run` (the daemon) and the commands that talk to it through its
enrollment socket: `enroll`, `unenroll`, `workloads`; and `uninstall`.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

from nodeagent.cli import UserError

DEFAULT_STATE_DIR = "/var/lib/nodeagent"
CAPTURE_MODES = ("nftables", "iptables", "ebpf", "auto", "none")
DEFAULT_CAPTURE = "nftables"  # issue #5: nftables is the default; eBPF is opt-in (--capture ebpf or auto)
# Kubernetes node names are DNS-1123 subdomains (k8s.io/apimachinery IsDNS1123Subdomain:
# dot-separated lower-case alphanumeric runs with inner '-', 253 characters at most).
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run the node agent (capture, proxy, identities, enrollment socket)",
                         description="Run the node agent. Admin API on --admin (localhost), Prometheus "
                                     "metrics on --metrics, readiness at /healthz/ready on --readiness; "
                                     "enrollment socket <state-dir>/agent.sock.")
    run.add_argument("--node", default=os.environ.get("NODE_NAME") or os.uname().nodename.lower(),
                     help="this node's name, a DNS-1123 subdomain as Kubernetes node names "
                          "(default: $NODE_NAME, else the host name in lower case)")
    run.add_argument("--config-dir", type=Path, help="directory of Istio YAML to load and watch")
    _state_dir(run)
    run.add_argument("--capture", choices=CAPTURE_MODES, default=DEFAULT_CAPTURE,
                     help="how traffic is captured: nftables (the default), iptables, ebpf, auto (eBPF when "
                          "this host can run it, else nftables, else iptables), none (explicit proxy only: "
                          "nothing is redirected)")
    run.add_argument("--ca-url", help="URL of `nodeagent ca serve` (default: an embedded CA in the state dir)")
    run.add_argument("--node-credential", type=Path,
                     help="directory with this node's key and certificate for --ca-url")
    run.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default cluster.local)")
    run.add_argument("--admin", default="127.0.0.1:15000",
                     help="admin API address, a loopback address (default 127.0.0.1:15000)")
    run.add_argument("--admin-allow-remote", action="store_true",
                     help="allow a non-loopback --admin address; the admin API has no authentication and "
                          "shows the config, the workloads and certificate metadata")
    run.add_argument("--metrics", default="0.0.0.0:15020", help="Prometheus metrics address (default 0.0.0.0:15020)")
    run.add_argument("--readiness", default="0.0.0.0:15021",
                     help="readiness address, path /healthz/ready (default 0.0.0.0:15021)")
    run.add_argument("--exclude-outbound-ports", default="", metavar="PORT,...",
                     help="outbound destination ports never captured (Istio's excludeOutboundPorts)")
    run.add_argument("--exclude-inbound-ports", default="", metavar="PORT,...",
                     help="inbound ports never captured: straight to the application (excludeInboundPorts)")
    run.add_argument("--exclude-outbound-cidrs", default="", metavar="CIDR,...",
                     help="outbound destinations never captured (excludeOutboundIPRanges)")
    run.add_argument("--probe-sources", default="", metavar="CIDR,...",
                     help="extra sources never captured inbound (node probes need no flag: they are SNATed to 169.254.7.127, which every pod exempts)")
    run.add_argument("--bpf-pin-dir", default="/sys/fs/bpf/nodeagent",
                     help="where --capture ebpf pins its maps and links (default /sys/fs/bpf/nodeagent)")
    run.add_argument("--enroll-cert-wait", type=float, default=2.0, metavar="SECONDS",
                     help="how long an enrollment waits for the workload's certificate before it answers "
                          "(default 2; the certificate keeps being requested after that)")
    run.add_argument("--resync-interval", type=float, default=60.0,
                     help="seconds between full capture resyncs (default 60)")
    run.add_argument("--access-log", nargs="?", const="-", default=None, metavar="PATH|-",
                     help="write the proxy's JSON access log, one line per request or TCP connection: "
                          "appended to PATH, or stdout with - or no value (default: off)")
    run.set_defaults(func=cmd_run)

    enroll = sub.add_parser("enroll", help="enroll a workload (a netns or a cgroup) with the running agent")
    _target(enroll)
    enroll.add_argument("--name", required=True, help="workload name (the pod name)")
    enroll.add_argument("--namespace", required=True, help="Kubernetes namespace of the workload")
    enroll.add_argument("--service-account", default="default", help="service account (the identity)")
    enroll.add_argument("--labels", default="", help="labels, k=v,k2=v2")
    enroll.add_argument("--ip", action="append", default=[], help="workload IP address (repeatable)")
    enroll.add_argument("--ports", default="",
                        help="--cgroup only: host TCP ports the workload serves, 8080,9090 (their inbound "
                             "connections go through the proxy)")
    enroll.add_argument("--wait", action="store_true",
                        help="accept a netns/cgroup that does not exist yet: the workload is enrolled (and gets "
                             "its identity) now, and captured when the target appears (exit 3 until then); "
                             "without it such an enrollment is refused")
    enroll.add_argument("--json", action="store_true", help="print the agent's reply as JSON")
    _state_dir(enroll)
    enroll.set_defaults(func=cmd_enroll)

    unenroll = sub.add_parser("unenroll", help="unenroll a workload (its capture rules are removed)")
    _target(unenroll, workload=True)
    _state_dir(unenroll)
    unenroll.set_defaults(func=cmd_unenroll)

    workloads = sub.add_parser("workloads", help="list the workloads enrolled with the running agent")
    workloads.add_argument("--json", action="store_true", help="print JSON")
    _state_dir(workloads)
    workloads.set_defaults(func=cmd_workloads)

    uninstall = sub.add_parser("uninstall", help="remove every capture rule nodeagent installed, and its state")
    _state_dir(uninstall)
    uninstall.add_argument("--keep-state", action="store_true", help="remove the rules but keep the state dir")
    uninstall.add_argument("--all-netns", action="store_true",
                           help="also sweep every named network namespace and the host's for nodeagent rules")
    uninstall.set_defaults(func=cmd_uninstall)


def _state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=Path(os.environ.get("NODEAGENT_STATE_DIR", DEFAULT_STATE_DIR)),
                        help=f"agent state directory (default $NODEAGENT_STATE_DIR or {DEFAULT_STATE_DIR})")


def _target(parser: argparse.ArgumentParser, workload: bool = False) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--netns", help="network namespace: a name in /var/run/netns or a path (/proc/PID/ns/net)")
    group.add_argument("--cgroup", help="cgroup v2 path (e.g. /system.slice/web.service)")
    if workload:
        group.add_argument("--workload", metavar="NAMESPACE/NAME", help="the workload by name (CNI DEL without a netns)")


def _kind_target(args: argparse.Namespace) -> tuple[str, str]:
    return ("netns", args.netns) if args.netns else ("cgroup", args.cgroup)


# -- the daemon --------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    from nodeagent.agent.admin import parse_listen
    from nodeagent.agent.agent import Agent, AgentOptions, AgentSetupError
    from nodeagent.agent.capture import select_capture
    from nodeagent.agent.capture import CaptureError
    from nodeagent.agent.registry import StateFileError
    from nodeagent.agent.server import SocketInUse

    check_node_name(args.node)
    try:
        options = AgentOptions(
            node=args.node, state_dir=args.state_dir, config_dir=args.config_dir,
            trust_domain=args.trust_domain, ca_url=args.ca_url, node_credential=args.node_credential,
            admin=parse_listen(args.admin, "--admin"), metrics=parse_listen(args.metrics, "--metrics"),
            readiness=parse_listen(args.readiness, "--readiness"), resync_interval=args.resync_interval,
            cert_wait=args.enroll_cert_wait, access_log=args.access_log,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    check_admin_address(options.admin, args.admin_allow_remote)
    if args.config_dir is not None and not args.config_dir.is_dir():
        raise UserError(f"--config-dir {args.config_dir} is not a directory")
    from nodeagent.identity.spiffe import InvalidSpiffeId, check_trust_domain
    try:
        check_trust_domain(args.trust_domain)
    except InvalidSpiffeId as exc:
        raise UserError(f"--trust-domain: {exc}") from None
    if args.resync_interval <= 0:
        raise UserError("--resync-interval must be positive")
    if args.enroll_cert_wait < 0:
        raise UserError("--enroll-cert-wait must be 0 or more seconds")

    capture_config = _capture_config(args)

    async def main() -> None:
        capture = select_capture(args.capture, args.bpf_pin_dir, capture_config)
        agent = Agent(options, capture)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    try:
        from nodeagent.proxy.server import new_event_loop

        # uvloop, as the proxy workers use: the asyncio default loop costs ~1.5x the CPU per request.
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(main())
    except (StateFileError, SocketInUse, CaptureError, AgentSetupError) as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(str(exc)) from None
    return 0


def check_node_name(node: str) -> None:
    """--node must be a Kubernetes node name: a lower-case DNS-1123 subdomain."""
    if not node or len(node) > 253 or not _NODE_NAME.match(node):
        raise UserError(f"--node {node!r} is not a valid node name: use lower-case letters, digits, '-' and '.' "
                        "(a DNS-1123 subdomain, as Kubernetes node names: each dot-separated part starts and ends "
                        "with a letter or digit; 253 characters at most), e.g. --node worker-1")


def check_admin_address(admin: tuple[str, int], allow_remote: bool) -> None:
    """The admin API is for this host only (it shows the config, the workloads and
    certificate metadata, without authentication): a loopback address, unless allowed."""
    host = admin[0]
    if allow_remote or ipaddress.ip_address(host).is_loopback:
        return
    raise UserError(f"--admin {host}:{admin[1]} is not a loopback address: the admin API has no authentication "
                    "and shows the config, the workloads and certificate metadata; use 127.0.0.1 (or ::1), "
                    "or pass --admin-allow-remote to expose it on purpose")


def _capture_config(args: argparse.Namespace):
    """redirect.CaptureConfig from the --exclude-*/--probe-sources flags (validated there)."""
    from redirect import CaptureConfig, CaptureError as RedirectError

    def items(text: str) -> list[str]:
        return [item.strip() for item in text.split(",") if item.strip()]

    def ports(flag: str, text: str) -> tuple[int, ...]:
        try:
            return tuple(int(item) for item in items(text))
        except ValueError:
            raise UserError(f"{flag} must be a comma-separated list of port numbers, got {text!r}") from None

    try:
        return CaptureConfig(exclude_outbound_ports=ports("--exclude-outbound-ports", args.exclude_outbound_ports),
                             exclude_inbound_ports=ports("--exclude-inbound-ports", args.exclude_inbound_ports),
                             exclude_cidrs=tuple(items(args.exclude_outbound_cidrs)),
                             node_probe_sources=tuple(items(args.probe_sources)))
    except RedirectError as exc:
        raise UserError(str(exc)) from None


# -- clients of the enrollment socket ------------------------------------------

def _call(args: argparse.Namespace, message: dict) -> dict:
    from nodeagent.agent.server import SOCKET_NAME, AgentClient, AgentNotRunning

    client = AgentClient(args.state_dir / SOCKET_NAME, args.state_dir)
    try:
        reply = client.call(message)
    except AgentNotRunning as exc:
        raise UserError(str(exc)) from None
    if not reply.get("ok"):
        raise UserError(reply.get("error") or "the agent refused the request without a reason")
    return reply


def cmd_enroll(args: argparse.Namespace) -> int:
    from nodeagent.agent.protocol import enroll_request
    from nodeagent.agent.workload import SpecError, parse_labels, parse_ports, spec_from_json

    kind, target = _kind_target(args)
    try:
        spec = spec_from_json({"kind": kind, "target": target, "name": args.name, "namespace": args.namespace,
                               "service_account": args.service_account, "labels": parse_labels(args.labels),
                               "ips": args.ip, "ports": parse_ports(args.ports)})
    except SpecError as exc:
        raise UserError(f"enroll: {exc}") from None
    reply = _call(args, enroll_request(spec.to_json(), wait=args.wait))
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        print(f"{reply['result']}: {spec.namespace}/{spec.name} on {kind} {spec.target} as {reply['identity']} "
              f"(capture {reply['capture']}, certificate {reply['certificate']}, {reply['elapsed_ms']:.1f} ms: "
              f"registry {reply['registry_ms']:.1f}, capture {reply['capture_ms']:.1f})")
    if reply.get("certificate") == "pending":
        print(f"nodeagent: warning: no certificate for {reply['identity']} yet (the agent keeps asking the CA): "
              f"{reply.get('certificate_error', '')}", file=sys.stderr)
    if reply.get("capture") == "pending":
        print(f"nodeagent: enrolled, but capture is not applied yet (the agent retries): "
              f"{reply.get('capture_error', '')}", file=sys.stderr)
        return 3
    return 0


def cmd_unenroll(args: argparse.Namespace) -> int:
    from nodeagent.agent.protocol import unenroll_request

    if args.workload:
        namespace, sep, name = args.workload.partition("/")
        if not sep or not namespace or not name:
            raise UserError(f"--workload must be NAMESPACE/NAME, got {args.workload!r}")
        what = f"workload {args.workload}"
        reply = _call(args, {"op": "unenroll", "namespace": namespace, "name": name})
    else:
        kind, target = _kind_target(args)
        what = f"{kind} {target}"
        reply = _call(args, unenroll_request(kind, target))
    if reply["result"] == "absent":
        print(f"not enrolled: {what} (nothing to do)")
    else:
        print(f"removed: {what}")
    if reply.get("capture_error"):
        print(f"nodeagent: capture rules not removed yet (the agent retries): {reply['capture_error']}",
              file=sys.stderr)
        return 3
    return 0


def cmd_workloads(args: argparse.Namespace) -> int:
    reply = _call(args, {"op": "list"})
    workloads = reply["workloads"]
    if args.json:
        print(json.dumps(workloads, indent=2, sort_keys=True))
        return 0
    if not workloads:
        print("no workloads enrolled")
        return 0
    rows = [("NAMESPACE", "NAME", "KIND", "TARGET", "IPS", "CAPTURE", "CERT", "IDENTITY")]
    for w in workloads:
        rows.append((w["namespace"], w["name"], w["kind"], w["target"], ",".join(w["ips"]) or "-",
                     w["capture"], w["certificate"], w["identity"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


# -- uninstall -------------------------------------------------------------------

def cmd_uninstall(args: argparse.Namespace) -> int:
    from nodeagent.agent.agent import applied_from_state
    from nodeagent.agent.capture import CaptureError, capture_for_uninstall
    from nodeagent.agent.persist import STATE_FILE, load_registry
    from nodeagent.agent.registry import StateFileError
    from nodeagent.agent.server import SOCKET_NAME, socket_alive

    state_dir: Path = args.state_dir
    if socket_alive(state_dir / SOCKET_NAME):
        raise UserError(f"an agent is running on {state_dir / SOCKET_NAME}; stop it first "
                        "(systemctl stop nodeagent, or delete the DaemonSet)")
    if not (state_dir / STATE_FILE).exists() and not args.all_netns:
        raise UserError(f"no nodeagent state in {state_dir} (no {STATE_FILE}); pass the agent's --state-dir, "
                        "or --all-netns to sweep every network namespace for nodeagent rules")
    specs: dict = {}
    mode = "none"
    pin_dir = None
    if (state_dir / STATE_FILE).exists():
        try:
            registry, extra = load_registry(state_dir)
            for spec in [*registry, *applied_from_state(extra, state_dir)]:
                specs[spec.key] = spec
            mode = str(extra.get("capture", "none"))
            pin_dir = extra.get("bpf_pin_dir")
        except StateFileError as exc:
            raise UserError(f"{exc}; fix or remove the file, or use --all-netns") from None
    failures = 0
    backend = capture_for_uninstall(mode, pin_dir)
    if backend is not None and hasattr(backend, "uninstall"):
        # eBPF: detaching the programs and removing the pinned maps drops every enrollment at once.
        try:
            backend.uninstall()
            print(f"detached the eBPF programs and removed {backend.pin_dir}")
        except CaptureError as exc:
            failures += 1
            print(f"nodeagent: {exc}", file=sys.stderr)
    elif backend is not None:
        for spec in specs.values():
            try:
                backend.remove(spec)
                print(f"removed {mode} capture of {spec.ref}")
            except CaptureError as exc:
                failures += 1
                print(f"nodeagent: {spec.ref}: {exc}", file=sys.stderr)
    if args.all_netns:
        from nodeagent.agent.netfilter import sweep_all_netns
        try:
            for where in sweep_all_netns():
                print(f"removed leftover capture in {where}")
        except CaptureError as exc:
            failures += 1
            print(f"nodeagent: sweep: {exc}", file=sys.stderr)
    if failures:
        raise UserError(f"{failures} removal(s) failed (see above); state kept in {state_dir} so you can retry")
    print(f"capture removed for {len(specs)} workload(s) (mode {mode})")
    if args.keep_state or not (state_dir / STATE_FILE).exists():
        return 0
    resolved = state_dir.resolve()
    if resolved in (Path("/"), Path.home()):
        raise UserError(f"refusing to delete {resolved}")
    shutil.rmtree(resolved)
    print(f"removed state dir {state_dir}")
    return 0
