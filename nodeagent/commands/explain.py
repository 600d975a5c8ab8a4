"""`nodeagent explain`: why a connection or request to a workload is allowed or denied.

Loads a configuration directory exactly as the agent does, then asks the same
pure functions the proxy calls: PeerAuthentication (is the transport
accepted?), AuthorizationPolicy (which policy and rule decide?) and, for an
HTTP request with a Host, routing (which VirtualService route and
destinations would it take?).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import random
import sys

from nodeagent.cli import UserError
from nodeagent.configfiles import load_paths
from policy.authz import (
    RBAC_DENIED_BODY, RBAC_DENIED_STATUS, RBAC_RESPONSE_FLAG, AuthorizationIndex, Connection, InvalidPath,
    Request, evaluate,
)
from policy.errors import format_diagnostics
from policy.peerauthn import accepts, resolve_mtls
from policy.principal import DEFAULT_TRUST_DOMAIN, PrincipalError, principal_of
from policy.routing import Reject, RequestAttrs, plan_request
from policy.snapshot import WorkloadRef, build_snapshot, split_authority

PLAINTEXT = "plaintext"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain", help="why a request to a workload is allowed or denied (and how it is routed)",
        description="Evaluate PeerAuthentication, AuthorizationPolicy and routing for one connection or "
                    "HTTP request, using the configuration in --config-dir. Without --method/--path/--host/"
                    "--header the traffic is plain TCP. See docs/security.md.")
    p.add_argument("--config-dir", required=True, help="directory of Istio YAML (as given to `nodeagent run`)")
    p.add_argument("--from", dest="source", required=True, metavar="NS/SA|PRINCIPAL|plaintext",
                   help="the caller: namespace/serviceaccount, a principal or spiffe:// ID, or 'plaintext'")
    p.add_argument("--to", dest="target", required=True, metavar="NS/NAME|ADDRESS[:PORT]",
                   help="the destination workload: a WorkloadEntry namespace/name, or its address")
    p.add_argument("--labels", metavar="K=V,...",
                   help="labels of a destination workload that is not a WorkloadEntry in --config-dir "
                        "(e.g. a Kubernetes pod); '' for none")
    p.add_argument("--port", type=int, help="destination workload (target) port")
    p.add_argument("--service-port", type=int, help="service port used for routing (default: from --host, "
                                                      "else --port)")
    p.add_argument("--method", help="HTTP method (makes the traffic HTTP)")
    p.add_argument("--path", help="HTTP path, with query if any (makes the traffic HTTP)")
    p.add_argument("--host", help="HTTP Host / :authority (makes the traffic HTTP; needed for routing)")
    p.add_argument("--header", action="append", default=[], metavar="NAME=VALUE",
                   help="HTTP request header (repeatable; makes the traffic HTTP)")
    p.add_argument("--source-ip", help="caller address (default: the caller's WorkloadEntry address, if any)")
    p.add_argument("--sni", help="TLS SNI the caller sent (on the tunnel; with --service, for tls routes)")
    p.add_argument("--service", metavar="HOST:PORT",
                   help="TCP only: the service the caller dialled (name or address, with port); shows the "
                        "VirtualService tcp/tls route the connection takes (tls routes read --sni)")
    p.add_argument("--root-namespace", default="istio-system", help="Istio root namespace (default istio-system)")
    p.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN,
                   help=f"trust domain for NS/SA callers (default {DEFAULT_TRUST_DOMAIN})")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_explain)


# --------------------------------------------------------------------------
# argument decoding


def _principal(source: str, trust_domain: str) -> str | None:
    if source == PLAINTEXT:
        return None
    try:
        if source.count("/") == 1:
            ns, sa = source.split("/")
            if not ns or not sa:
                raise PrincipalError("empty namespace or service account")
            return principal_of(f"{trust_domain}/ns/{ns}/sa/{sa}")
        return principal_of(source)
    except PrincipalError as exc:
        raise UserError(f"--from {source!r}: expected NAMESPACE/SERVICEACCOUNT, a principal "
                        f"(<trust-domain>/ns/<ns>/sa/<sa>), a spiffe:// ID or 'plaintext' ({exc})") from None


def _labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UserError(f"--labels: expected KEY=VALUE[,KEY=VALUE...], got {item!r}")
        out[k] = v
    return out


def _headers(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise UserError(f"--header: expected NAME=VALUE, got {item!r}")
        out.append((k.strip().lower(), v))
    return out


def _split_address(target: str) -> tuple[str, int | None] | None:
    """``10.0.0.1``, ``10.0.0.1:80``, ``fd00::1``, ``[fd00::1]:80`` -> (ip, port); None if not an address."""
    host, port = target, None
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif target.count(":") == 1:
        host, _, p = target.partition(":")
        if not p.isdigit():
            return None
        port = int(p)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, port


def _destination(snapshot, target: str, labels_arg: str | None):
    """(namespace, name, labels, address, port from target)."""
    addr = _split_address(target)
    if addr is not None:
        ip, port = addr
        wl = snapshot.workload_by_address(ip)
        if wl is not None:
            return wl.namespace, wl.name, dict(wl.labels), ip, port
        raise UserError(f"--to {target}: no WorkloadEntry has address {ip}; name the workload as "
                        f"NAMESPACE/NAME and describe it with --labels K=V,...")
    ns, sep, name = target.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise UserError(f"--to {target!r}: expected NAMESPACE/NAME or an IP address")
    for wl in snapshot.workloads:
        if (wl.namespace, wl.name) == (ns, name):
            if labels_arg is not None:
                raise UserError(f"--to {target}: is a WorkloadEntry (labels "
                                f"{_fmt_labels(wl.labels)}); drop --labels")
            return ns, name, dict(wl.labels), wl.address, None
    if labels_arg is None:
        known = ", ".join(sorted(f"{w.namespace}/{w.name}" for w in snapshot.workloads)) or "none"
        raise UserError(f"--to {target}: no WorkloadEntry {target} in the configuration (known: {known}); "
                        f"describe the workload with --labels K=V,... (use --labels '' for none)")
    return ns, name, _labels(labels_arg), None, None


def _source_workload(snapshot, principal: str | None) -> WorkloadRef | None:
    if principal is None:
        return None
    _, _, ns, _, sa = principal.split("/")
    for wl in snapshot.workloads:
        if wl.namespace == ns and wl.service_account == sa:
            return wl
    return WorkloadRef(name=sa, namespace=ns, service_account=sa, labels={}, address="")


def _fmt_labels(labels) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(none)"


# --------------------------------------------------------------------------
# the explanation


def explain(args) -> dict:
    res = load_paths([args.config_dir])
    if not res.ok:
        raise UserError(f"{args.config_dir}: the configuration does not load; fix these first:\n"
                        + format_diagnostics(res.errors))
    if res.warnings:
        print(format_diagnostics(res.warnings), file=sys.stderr)
    snapshot = build_snapshot(res.resources, root_namespace=args.root_namespace)
    principal = _principal(args.source, args.trust_domain)
    ns, name, labels, dst_ip, target_port = _destination(snapshot, args.target, args.labels)
    port = args.port if args.port is not None else target_port
    src_wl = _source_workload(snapshot, principal)
    source_ip = args.source_ip or (src_wl.address if src_wl is not None and src_wl.address else None)
    http = any(x is not None for x in (args.method, args.path, args.host)) or bool(args.header)

    conn = Connection(source_principal=principal, source_ip=source_ip, destination_ip=dst_ip,
                      destination_port=port, sni=args.sni)
    notes: list[str] = []
    if port is None:
        notes.append("no --port: rules on ports / destination.port cannot match")
    if source_ip is None:
        notes.append("no caller address (--source-ip): rules on ipBlocks / source.ip cannot match")

    out: dict = {
        "source": {"principal": principal, "mtls": principal is not None, "ip": source_ip},
        "destination": {"workload": f"{ns}/{name}", "labels": labels, "address": dst_ip, "port": port},
        "protocol": "HTTP" if http else "TCP",
    }

    mtls = resolve_mtls(snapshot, ns, labels, port, args.root_namespace)
    admitted = accepts(mtls.mode, principal is not None)
    out["peer_authentication"] = {"mode": mtls.mode, "policy": mtls.policy, "level": mtls.level,
                                  "reason": mtls.reason, "accepted": admitted}

    ps = AuthorizationIndex(snapshot, trust_domain=args.trust_domain).for_workload(ns, labels)
    out["policies"] = [{"name": p.name, "action": p.action, "source": p.source,
                        **({"provider": p.provider} if p.provider else {})} for p in ps.policies]
    out["skipped_policies"] = list(ps.skipped)
    # TCP is always decided once; HTTP per request only when a rule reads HTTP attributes
    out["decided_at"] = "request" if http and ps.needs_l7 else "connection"

    if http:
        try:
            req = Request(conn, host=args.host, method=args.method or "GET", path=args.path or "/",
                          headers=_headers(args.header))
        except InvalidPath as exc:
            raise UserError(f"--path {args.path!r}: {exc}; the proxy answers 400 before any policy") from None
        out["request"] = {"method": req.method, "host": req.host, "path": req.path, "headers": dict(req.headers)}
        verdict = evaluate(ps, req)
    else:
        verdict = evaluate(ps, conn)
    if not admitted:
        out["verdict"] = {"allowed": False, "policy": mtls.policy, "rule_index": None,
                          "reason": f"plaintext refused before authorization: {mtls.reason}",
                          "audited": []}
    else:
        out["verdict"] = {"allowed": verdict.allowed, "policy": verdict.policy, "rule_index": verdict.rule_index,
                          "reason": verdict.reason, "audited": list(verdict.audited)}
        if not verdict.allowed and http:
            out["verdict"]["response"] = {"status": RBAC_DENIED_STATUS, "body": RBAC_DENIED_BODY.decode(),
                                          "response_flags": RBAC_RESPONSE_FLAG}
    out["notes"] = notes + list(ps.notes_for(http))

    if http:
        out["route"] = _route(snapshot, args, req, src_wl, source_ip, port)
    elif args.service:
        out["route"] = _l4_route(snapshot, args.service, src_wl, args.sni)
    return out


def _l4_route(snapshot, service_arg: str, src_wl, sni: str | None) -> dict:
    """The VirtualService tcp/tls route of a TCP connection to ``service_arg`` (policy.l4routing)."""
    from policy import l4routing

    host, port = split_authority(service_arg)
    if not host or port is None:
        raise UserError(f"--service {service_arg!r}: expected HOST:PORT (a service name or address and the port)")
    ns = src_wl.namespace if src_wl is not None else "default"
    service = snapshot.resolve_host(service_arg, ns)
    sport = service.port(port) if service is not None else None
    if service is None:
        found = snapshot.service_by_address(host, port)
        if found is not None:
            service, sport = found
    if service is None or sport is None:
        return {"note": f"{service_arg} is no service port of the configuration: the bytes are passed "
                        f"through to it as they are"}
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        ip = next((a for a in service.addresses if _split_address(a) is not None), None)
    table = l4routing.l4_table(snapshot, service, sport.number, ns)
    tls_port = l4routing.is_tls_port(sport)
    cands = table.candidates(src_wl, ip, sni)
    first = cands[0]
    return {
        "l4": True, "service": service.host, "service_port": sport.number, "kind": first.kind,
        "virtual_service": first.virtual_service,
        "route": None if first.route_index is None else f"{first.kind}[{first.route_index}]",
        "destinations": [{"cluster": "outbound|%d|%s|%s" % (d.cluster.port, d.cluster.subset or "", d.cluster.host),
                          "weight": d.weight, "known": d.known} for d in cands],
        "sni": sni if tls_port else None,
        "reads_sni": tls_port and bool(table.tls),
    }


def _route(snapshot, args, req: Request, src_wl, source_ip, port) -> dict | None:
    if not req.host:
        return {"note": "no --host: the route cannot be resolved"}
    host_port = split_authority(req.host)[1]
    service_port = args.service_port or host_port or port
    if service_port is None:
        return {"note": "no --service-port/--port and no port in --host: the route cannot be resolved"}
    path = req.target   # the normalized path and query, as the proxy routes and forwards it
    attrs = RequestAttrs(method=req.method, scheme="http", authority=req.host, path=path,
                         headers=dict(req.headers), port=service_port, source=src_wl, source_ip=source_ip)
    plan = plan_request(snapshot, attrs, random.Random(0))
    if isinstance(plan, Reject):
        why = {"NR": "no route (unknown host, or no VirtualService rule matches)",
               "NC": "the route's destination names no known service/port/subset"}
        return {"reject": {"status": plan.status, "response_flags": plan.response_flags,
                           "reason": why.get(plan.response_flags, "answered locally (redirect or direct "
                                                                  "response)")}}
    out = {
        "virtual_service": plan.virtual_service, "route": plan.route_name,
        "service": plan.service.host, "service_port": plan.service_port,
        "destinations": [{"cluster": str(d.cluster), "weight": d.weight} for d in plan.destinations],
        "path": plan.path, "rewritten": plan.path != path, "authority": plan.authority,
        "timeout": plan.timeout,
    }
    if plan.retry is not None:
        out["retries"] = {"attempts": plan.retry.attempts, "per_try_timeout": plan.retry.per_try_timeout,
                          "retry_on": sorted(plan.retry.retry_on)}
    return out


def render_text(e: dict) -> str:
    lines: list[str] = []
    src = e["source"]
    who = src["principal"] or "plaintext caller"
    dst = e["destination"]
    what = "TCP connection"
    if e["protocol"] == "HTTP":
        r = e["request"]
        what = f"HTTP {r['method']} {r['host'] or ''}{r['path']}"
    lines.append(f"{what}")
    lines.append(f"  from {who}" + (f" ({src['ip']})" if src["ip"] else "")
                 + (" over mTLS" if src["mtls"] else " in plaintext"))
    lines.append(f"  to   {dst['workload']} (labels {_fmt_labels(dst['labels'])})"
                 + (f" {dst['address']}" if dst["address"] else "")
                 + (f" port {dst['port']}" if dst["port"] is not None else ""))
    pa = e["peer_authentication"]
    lines.append("")
    lines.append(f"PeerAuthentication: {pa['reason']} -> "
                 f"{'accepted' if pa['accepted'] else 'REFUSED (plaintext)'}")
    lines.append("")
    if e["policies"]:
        lines.append(f"AuthorizationPolicies for {dst['workload']} (decided per {e['decided_at']}):")
        for p in e["policies"]:
            extra = f" provider={p['provider']}" if p.get("provider") else ""
            lines.append(f"  {p['action']:<6} {p['name']}{extra}" + (f"  ({p['source']})" if p["source"] else ""))
    else:
        lines.append(f"AuthorizationPolicies for {dst['workload']}: none")
    for s in e["skipped_policies"]:
        lines.append(f"  skipped: {s}")
    v = e["verdict"]
    lines.append("")
    lines.append(f"Verdict: {'ALLOWED' if v['allowed'] else 'DENIED'}: {v['reason']}")
    if v.get("response"):
        resp = v["response"]
        lines.append(f"  the proxy answers {resp['status']} \"{resp['body']}\" "
                     f"(response flag {resp['response_flags']})")
    if v["audited"]:
        lines.append(f"  audited by: {', '.join(v['audited'])}")
    if e.get("route") is not None:
        rt = e["route"]
        lines.append("")
        if "note" in rt:
            lines.append(f"Route: {rt['note']}")
        elif rt.get("l4"):
            target = f"{rt['service']}:{rt['service_port']}"
            if rt["kind"] == "default":
                lines.append(f"Route: no tcp/tls route applies -> the service itself, {target}")
            else:
                lines.append(f"Route: VirtualService {rt['virtual_service']} {rt['route']} ({target})")
            for d in rt["destinations"]:
                lines.append(f"  {d['cluster']}  weight {d['weight']}"
                             + ("" if d["known"] else "  NO SUCH CLUSTER: closed with response flag NC"))
            if rt["reads_sni"]:
                lines.append(f"  the proxy reads the ClientHello's SNI first: "
                             + (f"{rt['sni']}" if rt["sni"] else "none given (--sni)"))
        elif "reject" in rt:
            rj = rt["reject"]
            lines.append(f"Route: answered {rj['status']} ({rj['response_flags']}): {rj['reason']}")
        else:
            vs = f"VirtualService {rt['virtual_service']}" if rt["virtual_service"] else "no VirtualService"
            lines.append(f"Route: {vs}, route {rt['route'] or '(unnamed)'} -> {rt['service']}:{rt['service_port']}")
            for d in rt["destinations"]:
                lines.append(f"  {d['cluster']}  weight {d['weight']}")
            if rt["rewritten"]:
                lines.append(f"  path rewritten to {rt['path']}")
            if rt["timeout"] is not None:
                lines.append(f"  timeout {rt['timeout']}s")
            if rt.get("retries"):
                lines.append(f"  retries {rt['retries']['attempts']} on {','.join(rt['retries']['retry_on'])}")
    if e["notes"]:
        lines.append("")
        lines.append("Notes:")
        lines.extend(f"  {n}" for n in e["notes"])
    return "\n".join(lines)


def cmd_explain(args) -> int:
    e = explain(args)
    if args.output == "json":
        print(json.dumps(e, indent=2, sort_keys=True))
    else:
        print(render_text(e))
    return 0
