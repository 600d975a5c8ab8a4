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
- node: the node's own (host) namespace, next to in-pod capture. TCP that a
  LOCAL socket of the node (kubelet's health probes, anything the node itself
  runs) opens to an enrolled pod is SNATed to the link-local probe address
  169.254.7.127 (Istio ambient's), which every in-pod plan lets through
  uncaptured. Forwarded traffic (other pods, other nodes) has no local socket
  and is never rewritten; nor are the proxy's own sockets (mark 0x539).
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
# Istio ambient's link-local SNAT addresses for the node's probes (istio-cni HostProbeSNATAddress,
# HostProbeV6SNATAddress): node-originated TCP to an enrolled pod gets this source, which the pod's
# rules let through uncaptured.
ISTIO_PROBE_SOURCE = "169.254.7.127"
ISTIO_PROBE_SOURCE_V6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
# The node plan lives in its own table/chains, so it never touches a host-mode plan in the same namespace.
NODE_OWNER = "nodeagent-node"

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")
_TAG_MAX = 48  # nft comments hold at most 128 characters: keep workload tags short


def _tag(name: str) -> str:
    """A workload's part of a rule name: the name, or a cut name plus its hash if long."""
    if len(name) <= _TAG_MAX:
        return name
    return name[:_TAG_MAX - 9] + "~" + hashlib.sha256(name.encode()).hexdigest()[:8]

Hook = Literal["output", "prerouting", "postrouting"]
Action = Literal["return", "redirect", "snat"]
Family = Literal["ipv4", "ipv6"]
HOOKS: tuple[Hook, ...] = ("prerouting", "output")  # the in-pod and host plans' chains
NODE_HOOKS: tuple[Hook, ...] = ("postrouting",)  # the node plan's chain


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
    node_probe_sources: tuple[str, ...] = ()  # extra probe sources never captured inbound (e.g. the veth IP)
    # Source address the node plan gives node-originated TCP to enrolled pods (None: no SNAT for
    # that family); in-pod plans never capture it.
    probe_snat_v4: str | None = ISTIO_PROBE_SOURCE
    probe_snat_v6: str | None = ISTIO_PROBE_SOURCE_V6
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
        for name, version in (("probe_snat_v4", 4), ("probe_snat_v6", 6)):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                addr = ipaddress.ip_address(str(value))
            except ValueError:
                raise CaptureError(f"capture.{name}: {value!r} is not an IPv{version} address") from None
            if addr.version != version:
                raise CaptureError(f"capture.{name}: {value!r} is not an IPv{version} address")
            set_(self, name, str(addr))

    @property
    def probe_snat(self) -> tuple[str, ...]:
        """The SNAT addresses in use (IPv6 only with ipv6 on), as /32 and /128 networks."""
        out = []
        if self.probe_snat_v4:
            out.append(f"{self.probe_snat_v4}/32")
        if self.probe_snat_v6 and self.ipv6:
            out.append(f"{self.probe_snat_v6}/128")
        return tuple(out)

    @property
    def inbound_exempt_sources(self) -> tuple[str, ...]:
        """Sources an in-pod plan never captures inbound: the probe SNAT addresses and
        ``node_probe_sources`` (sorted, no duplicates)."""
        return _cidrs("capture.node_probe_sources", self.node_probe_sources + self.probe_snat)


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


_LATER_FIELDS = ("to_addr", "local_socket", "midstream", "socket_mark", "daddr_set")


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
    to_addr: str | None = None  # snat: the new source address
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
    local_socket: bool = False  # only packets of a local socket of this namespace (not forwarded ones)
    midstream: bool = False  # only TCP packets that cannot open a connection (anything but a bare SYN)
    socket_mark: tuple[int, int] | None = None  # (value, mask): the local socket the packet is for has this mark
    # nft: ``daddrs`` live in a named set of the table (``@daddr_set``), which single
    # elements can be added to and deleted from without reloading the table.
    # iptables has no sets: one rule per address, as without it.
    daddr_set: str | None = None

    @property
    def digest(self) -> str:
        """Short content hash: a changed rule gets a new comment, so drift is visible."""
        # Fields added later (see _LATER_FIELDS) count only when set, so the rules
        # that do not use them keep their digests (no drift on upgrade). The members
        # of a named set are the set's, not the rule's: adding one element leaves the
        # rule (and its comment) as it is.
        values = [() if f.name == "daddrs" and self.daddr_set else getattr(self, f.name)
                  for f in fields(self) if f.name not in _LATER_FIELDS]
        extra = {name: getattr(self, name) for name in _LATER_FIELDS if getattr(self, name) not in (None, False)}
        text = repr(tuple(values)) + (repr(sorted(extra.items())) if extra else "")
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    @property
    def comment(self) -> str:
        return f"{OWNER}:{self.name}:{self.digest}"


@dataclass(frozen=True, slots=True)
class CapturePlan:
    """One owner's set of nodeagent rules for ONE network namespace.

    ``owner`` names the nft table (and, upper-cased, the iptables chain
    prefix); ``hooks`` are its chains. The in-pod and host plans own
    ``nodeagent`` (prerouting, output); the node plan ``nodeagent-node``
    (postrouting), so a host namespace can hold a host plan and the node plan
    side by side, each replaced and removed on its own.
    """

    mode: Literal["in-pod", "host", "node"]
    rules: tuple[Rule, ...]
    ipv6: bool = True
    cgroup2_mount: str = "/sys/fs/cgroup"
    workloads: tuple[HostWorkload, ...] = field(default=())
    owner: str = OWNER
    hooks: tuple[Hook, ...] = HOOKS

    def rules_for(self, hook: Hook, family: Family | None = None) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules
                     if r.hook == hook and (family is None or r.family in (None, family)))

    @property
    def families(self) -> tuple[Family, ...]:
        return ("ipv4", "ipv6") if self.ipv6 else ("ipv4",)


def _exclusion_rules(config: CaptureConfig, probe_sources: tuple[str, ...]) -> list[Rule]:
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
        sources = tuple(c for c in probe_sources if _family_of(c) == fam)
        if sources:
            rules.append(Rule(f"in-skip-probes{tag}", "prerouting", "return", family=fam, saddrs=sources))
    rules.append(Rule("in-skip-loopback", "prerouting", "return", iif="lo"))
    rules.append(Rule("in-accept-tunnel", "prerouting", "return", tcp=True, dports=(config.tunnel_port,)))
    if config.exclude_inbound_ports:
        rules.append(Rule("in-skip-ports", "prerouting", "return", tcp=True, dports=config.exclude_inbound_ports))
    return rules


def in_pod_plan(config: CaptureConfig = CaptureConfig()) -> CapturePlan:
    """Rules for a pod's own network namespace (ambient-style in-pod capture).

    Inbound TCP from the probe SNAT addresses (``node_plan``) and from
    ``node_probe_sources`` reaches the application uncaptured.

    ``in-skip-proxy-socket``: nat sees a connection's first packet only, but a
    flow conntrack lost (``conntrack -F``, a capture switch from eBPF, an entry
    that expired) is picked up again on whatever packet comes next. When that
    is the peer's packet to one of the proxy's own marked sockets (the
    tunnel's client side, its plain upstream connections), the catch-all
    would redirect it to 15006 and reset the proxy's connection. It is left
    alone instead, but only when it cannot open a connection (not a bare SYN)
    and the socket it is for carries the proxy's mark: an application's
    sockets are unmarked, and a SYN is always captured.
    """
    rules = _exclusion_rules(config, config.inbound_exempt_sources)
    rules.append(Rule("in-skip-proxy-socket", "prerouting", "return", midstream=True,
                      socket_mark=(config.proxy_mark, config.mark_mask)))
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
    rules = _exclusion_rules(config, config.node_probe_sources)
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


def node_plan(pod_addresses: Sequence[str], config: CaptureConfig = CaptureConfig()) -> CapturePlan:
    """Rules for the node's own (host) namespace: probe SNAT towards enrolled pods.

    In nat ``postrouting``: the proxy's own sockets (mark) are left alone;
    then TCP to one of ``pod_addresses`` whose packet belongs to a LOCAL
    socket (iptables ``-m owner --socket-exists``, nft ``meta skuid``: the
    node's processes such as kubelet, never forwarded pod or node traffic) is
    SNATed to ``config.probe_snat_v4`` / ``probe_snat_v6``, which every in-pod
    plan lets through uncaptured. NAT runs on a connection's first packet, so
    only new connections are rewritten; replies are un-NATed by conntrack,
    which needs the pod to route the SNAT address back to the node (its
    default route via the node does).

    The SNAT rules name their addresses as a set (``daddr_set``, see
    ``node_set``): nft keeps them in a named set, so one pod is one element
    (``capture.update_elements``); iptables renders one rule per address.
    """
    if isinstance(pod_addresses, (str, bytes)):
        raise CaptureError(f"node plan: pod addresses must be a list, got {pod_addresses!r}")
    addresses = []
    for i, value in enumerate(pod_addresses):
        try:
            addr = ipaddress.ip_address(str(value))
        except ValueError:
            raise CaptureError(f"node plan: pod address [{i}] {value!r} is not an IP address") from None
        addresses.append(f"{addr}/{addr.max_prefixlen}")
    addresses = list(_cidrs("node plan: pod addresses", addresses))
    if not addresses:
        raise CaptureError("node plan: no pod addresses given; enrol a pod with its IP first")
    snat = {"ipv4": config.probe_snat_v4, "ipv6": config.probe_snat_v6 if config.ipv6 else None}
    if not any(snat[_family_of(a)] for a in addresses):
        raise CaptureError(f"node plan: probe SNAT is off for the families of {addresses} "
                           "(probe_snat_v4/probe_snat_v6 unset, or ipv6 off)")
    rules = [Rule("post-skip-proxy-mark", "postrouting", "return", mark=(config.proxy_mark, config.mark_mask))]
    for fam, tag in (("ipv4", "4"), ("ipv6", "6")):
        # A rule for every family with a SNAT address, even with no pod of that family
        # yet (nft: an empty set matches nothing; iptables: no rule), so a pod's
        # address is one element added to or deleted from the set (``node_set``).
        if snat[fam]:
            daddrs = tuple(a for a in addresses if _family_of(a) == fam)
            rules.append(Rule(f"post-probe-snat{tag}", "postrouting", "snat", to_addr=snat[fam], family=fam,
                              daddrs=daddrs, tcp=True, local_socket=True, daddr_set=node_set(fam)))
    return CapturePlan("node", _ordered(rules, NODE_HOOKS), ipv6=config.ipv6, owner=NODE_OWNER, hooks=NODE_HOOKS)


def node_set(family: Family) -> str:
    """The nft set of the node plan holding the enrolled pods' addresses of ``family``."""
    return "probe_pods4" if family == "ipv4" else "probe_pods6"


def _ordered(rules: list[Rule], hooks: tuple[Hook, ...] = HOOKS) -> tuple[Rule, ...]:
    """Hook order is fixed (prerouting, output); order within a hook is as built."""
    names = [r.name for r in rules]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise CaptureError(f"capture plan: duplicate rule names {sorted(dup)}")
    stray = [r.name for r in rules if r.hook not in hooks]
    if stray:
        raise CaptureError(f"capture plan: rules {stray} are not in the plan's chains {list(hooks)}")
    return tuple(r for hook in hooks for r in rules if r.hook == hook)
