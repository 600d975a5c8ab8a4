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
global addresses found in the pod's namespace). The first change, and any
after a failed write, applies the whole node plan (read, compare, one atomic
load; other backends swept); after that, with nftables, a pod's addresses are
single elements added to or deleted from the table's named sets (one small
transaction, no read: O(1) per enroll instead of reloading every pod's
address). ``verify()``, once per full resync, reads and compares the whole
table and repairs any drift. With no pod left it removes the node's
table/chains. ``uninstall`` removes them whatever this process knows. The
node plan has its own table (``nodeagent-node``) and chains
(``NODEAGENT_NODE-POSTROUTING``), so it never touches a host-mode plan.

The iptables backend re-applies the whole plan on every change (iptables has
no sets, and one rule per address is compared in order; see docs/capture.md).
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
from redirect.capture import update_elements
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
    return run_in_netns(path, pod_view_here, snat, ips, timeout=5.0)


def pod_view_here(snat: Iterable[str], ips: Iterable[str] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``pod_view`` of the CALLING THREAD's network namespace (for a caller already inside the pod's)."""
    snat, ips = tuple(snat), tuple(ips)
    addresses = tuple(sorted(_global_addresses(),
                             key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a))))
    families = {ipaddress.ip_address(a).version for a in ips or addresses}
    unroutable = tuple(a for a in snat if ipaddress.ip_address(a).version in families and not _routable(a))
    return addresses, unroutable


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
        # The usable addresses the node's table held after this process's last successful
        # write, or None (no table, or unknown): then the next change applies the full plan.
        self._installed: set[str] | None = None
        self._plan = None  # the node plan last applied in full: its table and set names, for element updates
        self._families = {ipaddress.ip_network(a).version for a in self.config.probe_snat}
        self._views: dict[str, PodVisit] = {}  # pod_view read during another visit to the pod (visit())

    @property
    def enabled(self) -> bool:
        return bool(self.config.probe_snat)

    def addresses(self) -> tuple[str, ...]:
        return tuple(sorted({a for addrs in self._pods.values() for a in addrs}))

    def visit(self, spec: WorkloadSpec) -> "PodVisit | None":
        """For a caller about to enter the pod's namespace anyway (the listeners): a
        ``PodVisit`` to call there, which reads what ``add`` needs (``pod_view``) and so
        saves ``add`` a visit of its own; the caller closes it once ``add`` has run.
        None when ``add`` needs nothing from the pod."""
        if spec.kind != "netns" or not self.enabled or (spec.target in self._pods and spec.ips):
            return None
        look = PodVisit(self, spec, [a.split("/")[0] for a in self.config.probe_snat])
        self._views[spec.target] = look
        return look

    def add(self, spec: WorkloadSpec) -> None:
        """Take in a netns workload's addresses and update the node plan (idempotent)."""
        if spec.kind != "netns" or not self.enabled:
            return
        addresses = tuple(spec.ips)
        seen = self._views.pop(spec.target, None)
        if spec.target not in self._pods or not addresses:
            if seen is not None and seen.ran and seen.spec == spec:
                view, error = seen.view, seen.error
            else:
                try:
                    view, error = pod_view(netns_path(spec.target),
                                           [a.split("/")[0] for a in self.config.probe_snat], addresses), None
                except Exception as exc:  # noqa: BLE001 -- narrowed below
                    view, error = None, exc
            if error is not None:
                if isinstance(error, (RedirectError, OSError, TimeoutError, ImportError)):  # NetnsError: pod gone
                    raise CaptureError(f"{spec.ref}: cannot read the pod's addresses for probe SNAT: {error}") from None
                raise error
            found, unroutable = view
            addresses = addresses or found
            for address in unroutable:
                log.warning("%s: the pod has no route to the probe address %s: probes from the node reach it but "
                            "its replies cannot return; give the pod a default route via the node", spec.ref, address)
        if not addresses:
            log.warning("%s: no IP address (--ip) and none found in %s: probes from the node to it are captured",
                        spec.ref, spec.target)
        previous = self._pods.get(spec.target)
        if previous == addresses and not self._dirty:
            return  # a full resync re-applying a known pod: nothing changed (verify() repairs drift)
        self._pods[spec.target] = addresses
        self._update(spec.target, previous or (), addresses)

    def discard(self, spec: WorkloadSpec) -> None:
        if spec.kind != "netns":
            return
        self._views.pop(spec.target, None)
        previous = self._pods.pop(spec.target, None)
        if previous is None and not self._dirty:
            return
        self._update(spec.target, previous or (), ())

    def verify(self) -> None:
        """Read the node's rules and repair any drift (the full read-compare-load; once per
        full resync rather than once per pod)."""
        if self._pods or self._dirty:
            self.sync()

    def _update(self, target: str, before: tuple[str, ...], after: tuple[str, ...]) -> None:
        """The node's rules after pod ``target``'s addresses went from ``before`` to ``after``:
        single set elements when the table is known to hold every other pod's (nft; O(1)
        in the number of pods), else the full plan."""
        installed = self._installed
        if self.backend != "nft" or self._dirty or installed is None or self._plan is None:
            self.sync()
            return
        after_usable = self._usable(after)
        add = [a for a in after_usable if a not in installed]
        delete = [a for a in self._usable(before) if a not in after_usable and a in installed
                  and not any(a in addrs for other, addrs in self._pods.items() if other != target)]
        if len(installed) + len(add) - len(delete) <= 0:
            self.sync()  # no pod address left: the table goes
            return
        self._dirty = True
        try:
            # the last full plan names the table and the sets; their members are not used
            update_elements(self._plan, self.netns, add=add, delete=delete, runner=self.runner)
        except (RedirectError, TimeoutError, OSError) as exc:
            # the table, a set or an element to delete is gone (drift), or the write failed:
            # the full read-compare-load repairs whatever differs
            log.info("node probe SNAT: updating the pod addresses in place failed (%s); re-applying the node "
                     "table", exc)
            self.sync()
            return
        installed.difference_update(delete)
        installed.update(add)
        self._dirty = False

    def sync(self) -> None:
        """Make the node's table/chains match the pods held (removed when none)."""
        self._dirty = True
        self._installed = self._plan = None
        try:
            usable = self._usable(self.addresses())
            if usable:
                # Other backends are swept once: the node's namespace may hold iptables-legacy
                # tables (not ours), and reading them costs two iptables-save runs per enroll.
                plan = node_plan(usable, self.config)
                apply_plan(plan, self.netns, self.backend, runner=self.runner, sweep=not self._swept)
                self._swept = True
                self._installed, self._plan = set(usable), plan
            else:
                cleanup(self.netns, runner=self.runner, owners=(NODE_OWNER,))
        except (RedirectError, TimeoutError, OSError) as exc:
            raise CaptureError(f"node probe SNAT: {exc}") from None
        self._dirty = False

    def _usable(self, addresses: Iterable[str]) -> list[str]:
        return [a for a in addresses if ipaddress.ip_address(a).version in self._families]

    def uninstall(self) -> None:
        """Remove the node's probe SNAT whatever this process holds (uninstall, mode switch)."""
        self._pods.clear()
        self._views.clear()
        self._swept = False
        self._installed = self._plan = None
        self._dirty = True
        try:
            cleanup(self.netns, runner=self.runner, owners=(NODE_OWNER,))
        except (RedirectError, TimeoutError, OSError) as exc:
            raise CaptureError(f"node probe SNAT cleanup: {exc}") from None
        self._dirty = False


class PodVisit:
    """``pod_view`` read by whoever is inside the pod's namespace (see ``NodeProbes.visit``)."""

    __slots__ = ("probes", "spec", "snat", "ran", "view", "error")

    def __init__(self, probes: NodeProbes, spec: WorkloadSpec, snat: list[str]) -> None:
        self.probes, self.spec, self.snat = probes, spec, snat
        self.ran = False
        self.view: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self.error: BaseException | None = None

    def __call__(self) -> None:
        """Run in the pod's namespace. Never raises: an error is raised by ``NodeProbes.add``."""
        try:
            self.view = pod_view_here(self.snat, self.spec.ips)
        except Exception as exc:  # noqa: BLE001 -- add() turns it into the CaptureError that explains it
            self.error = exc
        self.ran = True

    def close(self) -> None:
        """Drop the result if ``add`` did not use it (a later add reads the pod afresh)."""
        if self.probes._views.get(self.spec.target) is self:
            del self.probes._views[self.spec.target]


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

        def pod_visit(self, spec: WorkloadSpec):
            """What to do inside the pod's namespace during the listeners' visit (``NodeProbes.visit``)."""
            return self.probes.visit(spec)

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
