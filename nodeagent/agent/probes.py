"""Node probes: TCP from the node's own sockets reaches enrolled pods uncaptured.

kubelet (and anything else running on the node itself) probes a pod from the
node's namespace. In-pod capture would send that connection to the proxy,
which refuses plaintext under STRICT PeerAuthentication, so the probe fails.
As Istio ambient does, the agent keeps ONE rule set in the node's (its own)
namespace, ``redirect.node_plan``: TCP that a LOCAL socket of the node opens
to an enrolled pod is SNATed to the link-local 169.254.7.127
(``CaptureConfig.probe_snat_v4``; IPv6 ``probe_snat_v6``), and every pod's
capture lets that source through (nftables/iptables ``in-skip-probes``, eBPF
``in_src``). Forwarded traffic (other pods, other nodes) carries no local
socket and is never rewritten; nor are the proxy's own sockets (mark 0x539).

``NodeProbes`` tracks the enrolled pods' addresses (``--ip``, else the
global addresses found in the pod's namespace) and re-applies the node plan
when they change (a no-op when nothing differs); with no pod left it removes
the node's table/chains. ``uninstall`` removes them whatever this process
knows. The node plan has its own table (``nodeagent-node``) and chains
(``NODEAGENT_NODE-POSTROUTING``), so it never touches a host-mode plan.
"""
from __future__ import annotations

import ipaddress
import logging
import shutil
import socket
from typing import Iterable

from redirect import CaptureConfig, cleanup, run_command, run_in_netns
from redirect import CaptureError as RedirectError
from redirect import apply as apply_plan
from redirect.plan import NODE_OWNER, node_plan

from nodeagent.agent.capture import CaptureError
from nodeagent.agent.workload import WorkloadSpec, netns_path

log = logging.getLogger("nodeagent.agent.probes")


def pod_view(path: str, snat: Iterable[str], ips: Iterable[str] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(global addresses of the namespace at ``path``, the SNAT addresses it has NO route to).

    Replies to a probe go to the SNAT address: the pod must route it back to
    the node (its default route via the node does, as on routed veths). Only
    the SNAT addresses of the pod's families (``ips``, else those found) are
    checked.
    """
    snat, ips = tuple(snat), tuple(ips)

    def look() -> tuple[tuple[str, ...], tuple[str, ...]]:
        addresses = tuple(sorted(_global_addresses(),
                                 key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a))))
        families = {ipaddress.ip_address(a).version for a in ips or addresses}
        unroutable = tuple(a for a in snat if ipaddress.ip_address(a).version in families and not _routable(a))
        return addresses, unroutable

    return run_in_netns(path, look, timeout=5.0)


def _global_addresses() -> set[str]:
    """The calling thread's network namespace's addresses that are not loopback or link-local
    (read from /proc/thread-self/net, which follows the thread's namespace; no netlink library:
    pyroute2 alone would add ~20 MiB to the agent)."""
    found: set[str] = set()
    try:
        with open("/proc/thread-self/net/if_inet6") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and parts[3] == "00":  # scope 00: global
                    found.add(str(ipaddress.IPv6Address(bytes.fromhex(parts[0]))))
    except FileNotFoundError:
        pass  # no IPv6 in this kernel or namespace
    with open("/proc/thread-self/net/fib_trie") as f:
        last = None
        for line in f:
            text = line.strip()
            if text.startswith("|-- "):
                last = text[4:]
            elif last is not None and text.startswith("/32 host LOCAL"):
                ip = ipaddress.IPv4Address(last)
                if not ip.is_loopback and not ip.is_link_local:
                    found.add(last)
    return found


def _routable(address: str) -> bool:
    """Whether the calling thread's namespace has a route to ``address`` (a UDP connect is a
    route lookup and sends nothing)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((address, 9))
        except OSError:
            return False
    return True


class NodeProbes:
    """The node plan for the pods this process has applied (see the module doc)."""

    def __init__(self, config: CaptureConfig | None = None, backend: str = "nft", *, runner=run_command,
                 netns: str | None = None) -> None:
        self.config = config or CaptureConfig()
        self.backend = backend
        self.runner = runner
        self.netns = netns  # None: the agent's own namespace, i.e. the node's
        self._pods: dict[str, tuple[str, ...]] = {}
        self._swept = False  # the first apply also removes our rules from the other backends
        self._dirty = True  # the node's rules may differ from self._pods (never applied, or failed)

    @property
    def enabled(self) -> bool:
        return bool(self.config.probe_snat)

    def addresses(self) -> tuple[str, ...]:
        return tuple(sorted({a for addrs in self._pods.values() for a in addrs}))

    def add(self, spec: WorkloadSpec) -> None:
        """Take in a netns workload's addresses and re-apply the node plan (idempotent)."""
        if spec.kind != "netns" or not self.enabled:
            return
        addresses = tuple(spec.ips)
        if spec.target not in self._pods or not addresses:
            path = netns_path(spec.target)
            try:
                found, unroutable = pod_view(path, [a.split("/")[0] for a in self.config.probe_snat], addresses)
            except (RedirectError, OSError, TimeoutError, ImportError) as exc:  # NetnsError: the pod is gone
                raise CaptureError(f"{spec.ref}: cannot read the pod's addresses for probe SNAT: {exc}") from None
            addresses = addresses or found
            for address in unroutable:
                log.warning("%s: the pod has no route to the probe address %s: probes from the node reach it but "
                            "its replies cannot return; give the pod a default route via the node", spec.ref, address)
        if not addresses:
            log.warning("%s: no IP address (--ip) and none found in %s: probes from the node to it are captured",
                        spec.ref, spec.target)
        if self._pods.get(spec.target) == addresses and not self._dirty:
            return  # a full resync re-applying a known pod: nothing changed (verify() repairs drift)
        self._pods[spec.target] = addresses
        self.sync()

    def discard(self, spec: WorkloadSpec) -> None:
        if spec.kind != "netns":
            return
        if self._pods.pop(spec.target, None) is None and not self._dirty:
            return
        self.sync()

    def verify(self) -> None:
        """Re-apply the node's rules from what this process holds (repairs drift; once per full
        resync rather than once per pod)."""
        if self._pods or self._dirty:
            self.sync()

    def sync(self) -> None:
        """Make the node's table/chains match the pods held (removed when none)."""
        self._dirty = True
        try:
            usable = self._usable(self.addresses())
            if usable:
                # Other backends are swept once: the node's namespace may hold iptables-legacy
                # tables (not ours), and reading them costs two iptables-save runs per enroll.
                apply_plan(node_plan(usable, self.config), self.netns, self.backend, runner=self.runner,
                           sweep=not self._swept)
                self._swept = True
            else:
                cleanup(self.netns, runner=self.runner, owners=(NODE_OWNER,))
        except (RedirectError, TimeoutError, OSError) as exc:
            raise CaptureError(f"node probe SNAT: {exc}") from None
        self._dirty = False

    def _usable(self, addresses: tuple[str, ...]) -> list[str]:
        families = {ipaddress.ip_network(a).version for a in self.config.probe_snat}
        return [a for a in addresses if ipaddress.ip_address(a).version in families]

    def uninstall(self) -> None:
        """Remove the node's probe SNAT whatever this process holds (uninstall, mode switch)."""
        self._pods.clear()
        self._swept = False
        try:
            cleanup(self.netns, runner=self.runner, owners=(NODE_OWNER,))
        except (RedirectError, TimeoutError, OSError) as exc:
            raise CaptureError(f"node probe SNAT cleanup: {exc}") from None


def node_backend() -> str | None:
    """The netfilter backend for the node plan when capture itself is not netfilter (eBPF)."""
    def have(tool: str) -> bool:
        return shutil.which(tool) is not None or shutil.which(tool, path="/usr/sbin:/sbin") is not None

    if have("nft"):
        return "nft"
    if have("iptables") and have("nsenter"):
        return "iptables"
    return None


def netfilter_capture(backend: str, config: CaptureConfig | None = None):
    """``NetfilterCapture`` that also keeps the node's probe SNAT (``--capture nftables|iptables``)."""
    from nodeagent.agent.netfilter import NetfilterCapture

    class ProbingNetfilterCapture(NetfilterCapture):
        __doc__ = NetfilterCapture.__doc__

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.probes = NodeProbes(self.config, self.backend, runner=self.runner)

        def apply(self, spec: WorkloadSpec) -> None:
            super().apply(spec)
            if spec.kind == "netns":
                self.probes.add(spec)

        def remove(self, spec: WorkloadSpec) -> None:
            super().remove(spec)
            if spec.kind == "netns":
                self.probes.discard(spec)
            elif self.probes.addresses():
                # a host plan's removal may have cleaned the node's namespace: put the SNAT back
                self.probes.sync()

        def sweep(self, keep):
            leftovers = super().sweep(keep)
            self.probes.verify()
            return leftovers

    return ProbingNetfilterCapture(backend, config)
