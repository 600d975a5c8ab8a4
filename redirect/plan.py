"""Capture plans: which netfilter rules a network namespace needs, as plain data.

A plan is built once per (namespace, configuration) and never mutated. It is a
tuple of backend-neutral ``Rule`` objects; ``redirect.nft`` and
``redirect.iptables`` render the same rules to their own text, so both
backends always say the same thing.

Two modes:

- in-pod: the pod's network namespace is the workload. Inside it, outbound TCP
  is redirected to the proxy's outbound listener (15001) and inbound TCP to the
  inbound plaintext listener (15006); the mTLS tunnel port (15008) is accepted
  as is. The proxy's own sockets (mark 0x539), loopback traffic, excluded
  ports/CIDRs and the node's health probes are not captured.
- host: processes grouped by cgroup v2 are the workloads, all in one namespace
  (usually the host's). Outbound TCP of each cgroup goes to that workload's own
  listener port, so the listener that accepts tells the proxy who is calling;
  inbound TCP to a workload's declared ports goes to its inbound listener.

Everything here is pure: no I/O, errors are ``CaptureError`` with a message
that names the field and says what to do.
"""
from __future__ import annotations

import hashlib
import ipaddress
import posixpath
import re
from dataclasses import dataclass, field, fields
from typing import Literal, Sequence

OWNER = "nodeagent"
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
TUNNEL_PORT = 15008
PROXY_MARK = 0x539
MARK_MASK = 0xFFF
# Istio's SNAT address for kubelet probes when the node has no address on the pod's veth.
ISTIO_PROBE_SOURCE = "169.254.7.127"

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")
_TAG_MAX = 48  # nft comments hold at most 128 characters: keep workload tags short


def _tag(name: str) -> str:
    """A workload's part of a rule name: the name, or a cut name plus its hash if long."""
    if len(name) <= _TAG_MAX:
        return name
    return name[:_TAG_MAX - 9] + "~" + hashlib.sha256(name.encode()).hexdigest()[:8]

Hook = Literal["output", "prerouting"]
Action = Literal["return", "redirect"]
Family = Literal["ipv4", "ipv6"]
HOOKS: tuple[Hook, ...] = ("prerouting", "output")


class CaptureError(ValueError):
    """A capture configuration or apply problem; the message is the whole story."""


def _port(where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise CaptureError(f"{where} must be a TCP port 1..65535, got {value!r}")
    return value


def _ports(where: str, values: Sequence[int]) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)):
        raise CaptureError(f"{where} must be a list of ports, got {values!r}")
    return tuple(sorted({_port(f"{where}[{i}]", v) for i, v in enumerate(values)}))


def _cidrs(where: str, values: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)):
        raise CaptureError(f"{where} must be a list of addresses or CIDRs, got {values!r}")
    nets = []
    for i, value in enumerate(values):
        try:
            net = ipaddress.ip_network(str(value), strict=True)
        except ValueError as exc:
            loose = None
            try:
                loose = ipaddress.ip_network(str(value), strict=False)
            except ValueError:
                pass
            hint = f"; did you mean {loose}?" if loose is not None else ""
            raise CaptureError(f"{where}[{i}]: {value!r} is not an address or CIDR ({exc}){hint}") from None
        nets.append(net)
    nets = sorted(set(nets), key=lambda n: (n.version, n.network_address, n.prefixlen))
    return tuple(n.with_prefixlen for n in nets)


def _family_of(cidr: str) -> Family:
    return "ipv4" if ipaddress.ip_network(cidr).version == 4 else "ipv6"


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """Capture settings shared by every workload of a node (Istio's names in comments)."""

    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PORT
    tunnel_port: int = TUNNEL_PORT
    proxy_mark: int = PROXY_MARK
    mark_mask: int = MARK_MASK
    exclude_outbound_ports: tuple[int, ...] = ()  # excludeOutboundPorts
    exclude_inbound_ports: tuple[int, ...] = ()  # excludeInboundPorts
    exclude_cidrs: tuple[str, ...] = ()  # excludeOutboundIPRanges
    node_probe_sources: tuple[str, ...] = ()  # kubelet probe source (veth IP, or 169.254.7.127)
    ipv6: bool = True

    def __post_init__(self) -> None:
        for name in ("outbound_port", "inbound_port", "tunnel_port"):
            _port(f"capture.{name}", getattr(self, name))
        listeners = (self.outbound_port, self.inbound_port, self.tunnel_port)
        if len(set(listeners)) != 3:
            raise CaptureError(
                f"capture: outbound_port, inbound_port and tunnel_port must differ, got {listeners}")
        for name in ("proxy_mark", "mark_mask"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 0xFFFFFFFF:
                raise CaptureError(f"capture.{name} must be a 32-bit non-zero integer, got {value!r}")
        if self.proxy_mark & self.mark_mask != self.proxy_mark:
            raise CaptureError(
                f"capture.proxy_mark {self.proxy_mark:#x} has bits outside mark_mask {self.mark_mask:#x}")
        set_ = object.__setattr__
        set_(self, "exclude_outbound_ports", _ports("capture.exclude_outbound_ports", self.exclude_outbound_ports))
        set_(self, "exclude_inbound_ports", _ports("capture.exclude_inbound_ports", self.exclude_inbound_ports))
        set_(self, "exclude_cidrs", _cidrs("capture.exclude_cidrs", self.exclude_cidrs))
        set_(self, "node_probe_sources", _cidrs("capture.node_probe_sources", self.node_probe_sources))
        if self.tunnel_port in self.exclude_inbound_ports:
            raise CaptureError(
                f"capture.exclude_inbound_ports: {self.tunnel_port} is the tunnel port, which is never captured")
        if not self.ipv6:
            v6 = [c for c in self.exclude_cidrs + self.node_probe_sources if _family_of(c) == "ipv6"]
            if v6:
                raise CaptureError(f"capture: IPv6 addresses {v6} given but ipv6 is off; remove them or set ipv6")


@dataclass(frozen=True, slots=True)
class HostWorkload:
    """A host-mode workload: the processes of one cgroup v2 group.

    ``cgroup`` is the path relative to the cgroup v2 root (as in
    /proc/PID/cgroup's ``0::`` line, without the leading slash), e.g.
    ``system.slice/web.service``.
    """

    name: str
    cgroup: str
    outbound_port: int
    inbound_ports: tuple[int, ...] = ()
    inbound_port: int = INBOUND_PORT

    def __post_init__(self) -> None:
        where = f"workload {self.name!r}"
        if not _NAME.fullmatch(self.name or ""):
            raise CaptureError(
                f"host workload name {self.name!r} must be 1-200 characters of letters, digits, '.', '_', '-'")
        path = posixpath.normpath("/" + str(self.cgroup)).strip("/")
        if not path or any(part in ("..", ".") for part in str(self.cgroup).split("/")) or '"' in path:
            raise CaptureError(
                f"{where}: cgroup {self.cgroup!r} must be a path below the cgroup v2 root, e.g. system.slice/web.service")
        object.__setattr__(self, "cgroup", path)
        _port(f"{where}: outbound_port", self.outbound_port)
        _port(f"{where}: inbound_port", self.inbound_port)
        object.__setattr__(self, "inbound_ports", _ports(f"{where}: inbound_ports", self.inbound_ports))

    @property
    def cgroup_level(self) -> int:
        """Depth of the cgroup below the v2 root (nft ``socket cgroupv2 level``)."""
        return len(self.cgroup.split("/"))


@dataclass(frozen=True, slots=True)
class Rule:
    """One netfilter rule in nodeagent's nat chains, backend-neutral.

    All given matches must hold (AND); address tuples are sets (OR). ``family``
    is set when the rule only makes sense for one address family.
    """

    name: str
    hook: Hook
    action: Action
    to_port: int | None = None
    family: Family | None = None
    mark: tuple[int, int] | None = None  # (value, mask)
    iif: str | None = None
    oif: str | None = None
    saddrs: tuple[str, ...] = ()
    daddrs: tuple[str, ...] = ()
    tcp: bool = False
    dports: tuple[int, ...] = ()
    cgroup: str | None = None  # relative to the cgroup v2 root
    cgroup_level: int | None = None

    @property
    def digest(self) -> str:
        """Short content hash: a changed rule gets a new comment, so drift is visible."""
        text = repr(tuple(getattr(self, f.name) for f in fields(self)))
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    @property
    def comment(self) -> str:
        return f"{OWNER}:{self.name}:{self.digest}"


@dataclass(frozen=True, slots=True)
class CapturePlan:
    """The complete set of nodeagent rules for ONE network namespace."""

    mode: Literal["in-pod", "host"]
    rules: tuple[Rule, ...]
    ipv6: bool = True
    cgroup2_mount: str = "/sys/fs/cgroup"
    workloads: tuple[HostWorkload, ...] = field(default=())

    def rules_for(self, hook: Hook, family: Family | None = None) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules
                     if r.hook == hook and (family is None or r.family in (None, family)))

    @property
    def families(self) -> tuple[Family, ...]:
        return ("ipv4", "ipv6") if self.ipv6 else ("ipv4",)


def _exclusion_rules(config: CaptureConfig) -> list[Rule]:
    """Rules shared by both modes: what is never captured."""
    rules = [
        Rule("out-skip-proxy-mark", "output", "return", mark=(config.proxy_mark, config.mark_mask)),
        Rule("out-skip-loopback", "output", "return", oif="lo"),
    ]
    for fam, tag in (("ipv4", "4"), ("ipv6", "6")):
        cidrs = tuple(c for c in config.exclude_cidrs if _family_of(c) == fam)
        if cidrs:
            rules.append(Rule(f"out-skip-cidrs{tag}", "output", "return", family=fam, daddrs=cidrs))
    if config.exclude_outbound_ports:
        rules.append(Rule("out-skip-ports", "output", "return", tcp=True, dports=config.exclude_outbound_ports))
    for fam, tag in (("ipv4", "4"), ("ipv6", "6")):
        sources = tuple(c for c in config.node_probe_sources if _family_of(c) == fam)
        if sources:
            rules.append(Rule(f"in-skip-probes{tag}", "prerouting", "return", family=fam, saddrs=sources))
    rules.append(Rule("in-skip-loopback", "prerouting", "return", iif="lo"))
    rules.append(Rule("in-accept-tunnel", "prerouting", "return", tcp=True, dports=(config.tunnel_port,)))
    if config.exclude_inbound_ports:
        rules.append(Rule("in-skip-ports", "prerouting", "return", tcp=True, dports=config.exclude_inbound_ports))
    return rules


def in_pod_plan(config: CaptureConfig = CaptureConfig()) -> CapturePlan:
    """Rules for a pod's own network namespace (ambient-style in-pod capture)."""
    rules = _exclusion_rules(config)
    rules.append(Rule("out-redirect", "output", "redirect", to_port=config.outbound_port, tcp=True))
    rules.append(Rule("in-redirect", "prerouting", "redirect", to_port=config.inbound_port, tcp=True))
    return CapturePlan("in-pod", _ordered(rules), ipv6=config.ipv6)


def host_plan(workloads: Sequence[HostWorkload], config: CaptureConfig = CaptureConfig(), *,
              cgroup2_mount: str = "/sys/fs/cgroup") -> CapturePlan:
    """Rules for host-mode workloads (cgroups) sharing one network namespace.

    ``cgroup2_mount`` is where cgroup v2 is mounted (``/sys/fs/cgroup`` on
    unified hosts, ``/sys/fs/cgroup/unified`` on hybrid ones); nft resolves
    cgroup paths through it.
    """
    workloads = tuple(workloads)
    if not workloads:
        raise CaptureError("host mode: no workloads given; enrol at least one cgroup")
    seen_names: dict[str, HostWorkload] = {}
    seen_cgroups: dict[str, HostWorkload] = {}
    seen_ports: dict[int, HostWorkload] = {}
    reserved = {config.outbound_port, config.inbound_port, config.tunnel_port}
    for w in workloads:
        if w.name in seen_names:
            raise CaptureError(f"host mode: workload name {w.name!r} is enrolled twice")
        if w.cgroup in seen_cgroups:
            raise CaptureError(
                f"host mode: workloads {seen_cgroups[w.cgroup].name!r} and {w.name!r} share cgroup {w.cgroup!r}")
        if w.outbound_port in reserved or w.outbound_port in seen_ports:
            raise CaptureError(
                f"workload {w.name!r}: outbound_port {w.outbound_port} is already used by another listener")
        for p in w.inbound_ports:
            if p in reserved:
                raise CaptureError(f"workload {w.name!r}: inbound port {p} is one of the proxy's own ports")
            other = next((o for o in workloads if o is not w and p in o.inbound_ports), None)
            if other is not None:
                raise CaptureError(
                    f"workload {w.name!r}: inbound port {p} is also declared by workload {other.name!r}")
        seen_names[w.name] = seen_cgroups[w.cgroup] = seen_ports[w.outbound_port] = w
    if not cgroup2_mount.startswith("/"):
        raise CaptureError(f"host mode: cgroup2_mount must be an absolute path, got {cgroup2_mount!r}")
    rules = _exclusion_rules(config)
    for w in workloads:
        rules.append(Rule(f"out-redirect-{_tag(w.name)}", "output", "redirect", to_port=w.outbound_port,
                          tcp=True, cgroup=w.cgroup, cgroup_level=w.cgroup_level))
        if w.inbound_ports:
            inbound = [p for p in w.inbound_ports if p not in config.exclude_inbound_ports]
            if inbound:
                rules.append(Rule(f"in-redirect-{_tag(w.name)}", "prerouting", "redirect",
                                  to_port=w.inbound_port, tcp=True, dports=tuple(inbound)))
    return CapturePlan("host", _ordered(rules), ipv6=config.ipv6,
                       cgroup2_mount=posixpath.normpath(cgroup2_mount), workloads=workloads)


def _ordered(rules: list[Rule]) -> tuple[Rule, ...]:
    """Hook order is fixed (prerouting, output); order within a hook is as built."""
    names = [r.name for r in rules]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise CaptureError(f"capture plan: duplicate rule names {sorted(dup)}")
    return tuple(r for hook in HOOKS for r in rules if r.hook == hook)
