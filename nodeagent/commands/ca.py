"""`nodeagent ca ...`: the certificate authority (embedded root, CA service,
node credentials, placement registry, revocation, root rotation).

Private keys are written to 0600 files and never printed or logged.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path

from nodeagent.cli import UserError
from nodeagent.identity import certs
from nodeagent.identity.ca import (DEFAULT_NODE_CREDENTIAL_DAYS, NODE_CERT_FILE, NODE_KEY_FILE, ROOTS_FILE,
                                   CADirectory, issue_node_credential)
from nodeagent.identity.errors import CAError
from nodeagent.identity.spiffe import DEFAULT_TRUST_DOMAIN, InvalidSpiffeId, SpiffeId


def register(sub: argparse._SubParsersAction) -> None:
    ca = sub.add_parser("ca", help="certificate authority: roots, CA service, node credentials, placement",
                        description="The mesh CA. See docs/identity.md.")
    cmds = ca.add_subparsers(dest="ca_command", metavar="CA_COMMAND")
    cmds.required = True

    p = cmds.add_parser("init", help="create the CA directory and its root (once; refuses to overwrite)")
    _dir(p)
    p.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN,
                   help=f"SPIFFE trust domain (default {DEFAULT_TRUST_DOMAIN})")
    p.add_argument("--leaf-lifetime", type=float, default=24.0,
                   help="longest workload certificate lifetime the CA signs, hours (default 24)")
    p.set_defaults(func=cmd_init)

    p = cmds.add_parser("serve", help="run the CA service for several nodes (HTTPS, mutual TLS)")
    _dir(p)
    p.add_argument("--listen", required=True, metavar="ADDR:PORT", help="address to listen on, e.g. 0.0.0.0:15012")
    p.add_argument("--hostname", action="append", default=[],
                   help="extra DNS name or IP address the agents use to reach the CA (repeatable)")
    p.set_defaults(func=cmd_serve)

    p = cmds.add_parser("node-credential", help="issue a node's client certificate for the CA service")
    _dir(p)
    p.add_argument("--node", required=True, help="node name (becomes spiffe://<td>/node/<NAME>)")
    p.add_argument("--out", required=True, type=Path,
                   help=f"directory to write {NODE_KEY_FILE} (0600), {NODE_CERT_FILE}, {ROOTS_FILE}")
    p.add_argument("--days", type=float, default=DEFAULT_NODE_CREDENTIAL_DAYS,
                   help=f"validity in days (default {DEFAULT_NODE_CREDENTIAL_DAYS})")
    p.add_argument("--replace", action="store_true", help="overwrite an existing credential (rotation)")
    p.set_defaults(func=cmd_node_credential)

    for name, func, text in (("place", cmd_place, "allow a node to obtain a workload identity"),
                             ("unplace", cmd_unplace, "withdraw a workload identity from a node")):
        p = cmds.add_parser(name, help=text)
        _dir(p)
        p.add_argument("--node", required=True)
        p.add_argument("--namespace", required=True)
        p.add_argument("--service-account", required=True)
        p.set_defaults(func=func)

    p = cmds.add_parser("revoke", help="revoke a certificate serial or a whole identity")
    _dir(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--serial", help="certificate serial, hex")
    what.add_argument("--identity", help="SPIFFE ID, spiffe://<td>/ns/<ns>/sa/<sa> or .../node/<name>")
    p.set_defaults(func=cmd_revoke)

    p = cmds.add_parser("unrevoke", help="lift the revocation of an identity (serials stay revoked)")
    _dir(p)
    p.add_argument("--identity", required=True, help="SPIFFE ID")
    p.set_defaults(func=cmd_unrevoke)

    p = cmds.add_parser("rotate-root", help="add a new root; the bundle serves old and new")
    _dir(p)
    p.add_argument("--activate-after", type=float, default=0.0, metavar="SECONDS",
                   help="keep signing with the old root this long, so every agent fetches the new "
                        "bundle before any leaf of the new root exists (default 0)")
    p.set_defaults(func=cmd_rotate_root)

    p = cmds.add_parser("retire-root", help="drop the old root after a rotation")
    _dir(p)
    p.add_argument("--force", action="store_true",
                   help="retire even if certificates signed by the old root may still be valid")
    p.set_defaults(func=cmd_retire_root)

    p = cmds.add_parser("status", help="show roots, placements and revocations")
    _dir(p)
    p.set_defaults(func=cmd_status)


def _dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", required=True, type=Path, help="CA directory")


def _open(args) -> CADirectory:
    try:
        return CADirectory(args.dir)
    except CAError as exc:
        raise UserError(str(exc)) from None


def _fmt(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def cmd_init(args) -> int:
    try:
        ca = CADirectory.init(args.dir, trust_domain=args.trust_domain,
                              max_leaf_lifetime=args.leaf_lifetime * 3600)
    except CAError as exc:
        raise UserError(str(exc)) from None
    root = ca.roots()[0]
    print(f"created CA for trust domain {ca.trust_domain} in {args.dir}")
    print(f"root {root.name}: sha256 {certs.fingerprint(root.certificate)} (key in "
          f"{args.dir / 'roots' / (root.name + '.key')}, mode 0600)")
    return 0


def cmd_serve(args) -> int:
    from nodeagent.identity.server import CAServer
    ca = _open(args)
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UserError(f"--listen {args.listen!r}: expected ADDR:PORT, e.g. 0.0.0.0:15012")
    host = host.strip("[]")
    server = CAServer(ca, host=host, port=int(port), hostnames=tuple(args.hostname))

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await server.start()
        except OSError as exc:
            raise UserError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
        print(f"CA service for {ca.trust_domain} on {server.url}", flush=True)
        try:
            await stop.wait()
        finally:
            await server.stop()

    try:
        asyncio.run(serve())
    except CAError as exc:
        raise UserError(str(exc)) from None
    return 0


def cmd_node_credential(args) -> int:
    ca = _open(args)
    try:
        issued = issue_node_credential(ca, args.node, args.out, days=args.days, replace=args.replace)
    except CAError as exc:
        raise UserError(str(exc)) from None
    print(f"issued {issued.identity} serial {certs.serial_hex(issued.serial)} valid until "
          f"{_fmt(issued.not_after)}")
    print(f"wrote {args.out / NODE_KEY_FILE} (0600), {args.out / NODE_CERT_FILE}, {args.out / ROOTS_FILE}; "
          "copy them to the node once (see docs/identity.md)")
    return 0


def cmd_place(args) -> int:
    ca = _open(args)
    try:
        changed = ca.place(args.node, args.namespace, args.service_account)
    except CAError as exc:
        raise UserError(str(exc)) from None
    print(f"{args.namespace}/{args.service_account} {'placed' if changed else 'was already placed'} "
          f"on node {args.node}")
    return 0


def cmd_unplace(args) -> int:
    ca = _open(args)
    try:
        changed = ca.unplace(args.node, args.namespace, args.service_account)
    except CAError as exc:
        raise UserError(str(exc)) from None
    print(f"{args.namespace}/{args.service_account} {'removed from' if changed else 'was not placed on'} "
          f"node {args.node}")
    return 0


def cmd_revoke(args) -> int:
    ca = _open(args)
    try:
        if args.serial is not None:
            serial = certs.parse_serial(args.serial)
            rl = ca.revoke_serial(serial)
            known = [e for e in ca.issued() if e["serial"] == certs.serial_hex(serial)]
            what = f"serial {certs.serial_hex(serial)}" + (f" ({known[0]['identity']})" if known else
                                                          " (not in this CA's issuance log)")
        else:
            identity = SpiffeId.parse(args.identity)
            rl = ca.revoke_identity(identity)
            what = f"identity {identity}"
    except (CAError, certs.CertificateError, InvalidSpiffeId) as exc:
        raise UserError(str(exc)) from None
    print(f"revoked {what}; revocation list version {rl.version} (agents refuse it from their next poll)")
    return 0


def cmd_unrevoke(args) -> int:
    ca = _open(args)
    try:
        rl = ca.unrevoke_identity(SpiffeId.parse(args.identity))
    except (CAError, InvalidSpiffeId) as exc:
        raise UserError(str(exc)) from None
    print(f"{args.identity} is no longer revoked; revocation list version {rl.version}")
    return 0


def cmd_rotate_root(args) -> int:
    ca = _open(args)
    try:
        root = ca.rotate_root(now=time.time(), activate_after=args.activate_after)
    except CAError as exc:
        raise UserError(str(exc)) from None
    print(f"added {root.name} (sha256 {certs.fingerprint(root.certificate)}); the trust bundle now has "
          f"{len(ca.roots())} roots; new certificates are signed by it from {_fmt(root.active_from)}")
    print("retire the old root with `nodeagent ca retire-root` once no certificate it signed is in use")
    return 0


def cmd_retire_root(args) -> int:
    ca = _open(args)
    try:
        names = ca.retire_root(now=time.time(), force=args.force)
    except CAError as exc:
        raise UserError(str(exc)) from None
    print(f"retired {', '.join(names)}; the trust bundle now has only {ca.active_root(time.time()).name}")
    return 0


def cmd_status(args) -> int:
    ca = _open(args)
    now = time.time()
    try:
        active = ca.active_root(now)
        print(f"trust domain {ca.trust_domain}; leaf lifetime cap {ca.max_leaf_lifetime / 3600:g} h")
        for root in ca.roots():
            state = "signing" if root.name == active.name else (
                "pending" if root.active_from > now else "trusted, not signing")
            print(f"  {root.name}: {state}; sha256 {certs.fingerprint(root.certificate)}; "
                  f"expires {_fmt(certs.not_after(root.certificate))}")
        for node, pairs in sorted(ca.placements().items()):
            print(f"  node {node}: " + ", ".join(f"{ns}/{sa}" for ns, sa in sorted(pairs)))
        rl = ca.revocation_list()
        print(f"  revocations v{rl.version}: {len(rl.serials)} serials, {len(rl.identities)} identities")
    except CAError as exc:
        raise UserError(str(exc)) from None
    return 0
