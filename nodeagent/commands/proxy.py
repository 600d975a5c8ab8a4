"""`nodeagent proxy`: the shared L7 proxy as an explicit HTTP proxy for one workload.

Requests are routed by their Host header or absolute-form target (``curl -x``)
as if the workload named by ``--workload`` sent them; ``--forward`` adds a
listener bound to one service (HTTP or an opaque TCP relay, chosen from the
service port's protocol). Configuration comes from a directory of Istio YAML,
watched: changes apply to new requests without a restart.
"""
from __future__ import annotations

import argparse
import os
import sys

from nodeagent.cli import UserError
from nodeagent.configfiles import path_problem


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "proxy", help="run the L7 proxy as an explicit HTTP proxy for one workload",
        description="Run the shared L7 proxy as an explicit HTTP proxy: requests are routed by "
                    "their Host header or absolute URL (curl -x http://ADDR http://svc.ns.svc.cluster.local/) "
                    "with VirtualService/DestinationRule semantics, as if --workload sent them.",
    )
    p.add_argument("--config-dir", required=True, help="directory of Istio YAML (watched for changes)")
    p.add_argument("--listen", default="127.0.0.1:15001", help="HTTP proxy address (default 127.0.0.1:15001)")
    p.add_argument("--workload", required=True, metavar="NAMESPACE/NAME",
                   help="the sending workload: a WorkloadEntry in the config, or just namespace/name")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes sharing the listeners via SO_REUSEPORT (default: one per core)")
    p.add_argument("--metrics", default=None, metavar="ADDR:PORT",
                   help="serve Prometheus /metrics here (e.g. 127.0.0.1:15020; default: off)")
    p.add_argument("--access-log", action="store_true", help="print one JSON line per request/connection")
    p.add_argument("--forward", action="append", default=[], metavar="ADDR:PORT=HOST:PORT",
                   help="extra listener whose connections all go to service HOST:PORT (repeatable)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request head before 408 (default 10)")
    p.add_argument("--idle-timeout", type=float, default=300.0,
                   help="seconds a client connection may stay open with no request active "
                        "before it is closed (Envoy's connection idle_timeout; default 300)")
    p.add_argument("--stream-idle-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="seconds a request in flight may make no progress either way before it "
                        "ends (408, or a reset once the response began; Envoy's "
                        "stream_idle_timeout; 0: off; default 300)")
    p.set_defaults(func=cmd_proxy)


def parse_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UserError(f"{what} must be ADDRESS:PORT (e.g. 127.0.0.1:15001), got {text!r}")
    host = host.strip("[]")
    if int(port) > 65535:
        raise UserError(f"{what}: port {port} is out of range 0..65535")
    return host, int(port)


def cmd_proxy(args) -> int:
    from nodeagent.proxy.context import ListenerContext, WorkloadIdentity
    from nodeagent.proxy.runtime import Limits
    from nodeagent.proxy.server import ListenerSpec, ProxyConfig, run
    from nodeagent.proxy.snapshots import open_config

    namespace, sep, name = args.workload.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise UserError(f"--workload must be NAMESPACE/NAME (e.g. shop/frontend), got {args.workload!r}")
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    for flag, value in (("--header-timeout", args.header_timeout), ("--idle-timeout", args.idle_timeout),
                        ("--stream-idle-timeout", args.stream_idle_timeout)):
        if not value >= 0:  # also NaN
            raise UserError(f"{flag} must be a number of seconds >= 0, got {value}")
    listen = parse_address(args.listen, "--listen")
    metrics = parse_address(args.metrics, "--metrics") if args.metrics else None
    # the directory itself first: one line naming it and the reason (EACCES, ELOOP, not a directory)
    problem = path_problem(args.config_dir)
    if problem is not None:
        raise UserError(f"{args.config_dir}: {problem}")
    source = open_config(args.config_dir)  # raises UserError naming the file and field
    ref = source.workload(namespace, name)
    identity = WorkloadIdentity(
        namespace=namespace, name=name,
        service_account=ref.service_account if ref is not None else "default",
        labels=dict(ref.labels) if ref is not None else {},
    )
    listeners = [ListenerSpec(listen, ListenerContext("explicit", identity))]
    for spec in args.forward:
        local, eq, target = spec.partition("=")
        if not eq:
            raise UserError(f"--forward must be ADDR:PORT=HOST:PORT, got {spec!r}")
        listeners.append(ListenerSpec(
            parse_address(local, "--forward"),
            ListenerContext("forward", identity, fixed_destination=parse_address(target, "--forward target")),
        ))

    def ready(bound, metrics_addr) -> None:
        kinds = ["http"] + ["forward"] * len(args.forward)
        text = ", ".join(f"{h}:{p} ({k})" for (h, p), k in zip(bound, kinds))
        extra = f"; metrics on http://{metrics_addr[0]}:{metrics_addr[1]}/metrics" if metrics_addr else ""
        print(f"nodeagent proxy: listening on {text}{extra}; workers {args.workers}", file=sys.stderr, flush=True)

    config = ProxyConfig(
        listeners=listeners,
        snapshots=source.current,
        workers=args.workers,
        metrics=metrics,
        access_log=args.access_log,
        limits=Limits(header_timeout=args.header_timeout, idle_timeout=args.idle_timeout,
                      stream_idle_timeout=args.stream_idle_timeout),
        on_ready=ready,
        start_watch=source.start_watch,
    )
    try:
        return run(config)
    except OSError as exc:
        raise UserError(f"cannot open a listener: {exc.strerror or exc} (check --listen/--metrics/--forward)")
