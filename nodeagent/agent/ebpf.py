"""The eBPF capture backend: ``bpf.loader.EbpfCapture`` as the agent's Capture.

Enrolling is a map update (the programs are attached once at the cgroup v2
root and stay attached across agent restarts through pinned links). eBPF mode
captures OUTBOUND connects (cgroup/connect4/6, SO_ORIGINAL_DST answered by
the getsockopt program): a pod's outbound connections go to the proxy's
listener on 127.0.0.1:15001 inside its namespace, a cgroup's to 127.0.0.1 at
its own port. Inbound (docs/ebpf.md): TCP arriving at a pod is steered by a
per-netns sk_lookup program to the 15006 listener the data plane opened in
that namespace (found among this process's sockets); the tunnel port 15008
is accepted directly; SO_ORIGINAL_DST answers as with nftables. On a kernel
without it (``loader.inbound_problem``) pods are captured outbound only.

Node probes: as with nftables, TCP from the node's own sockets to an enrolled
pod is SNATed to 169.254.7.127 by the node plan (``nodeagent.agent.probes``,
nftables in the node's namespace, iptables when nft is missing), and each
pod's sk_lookup program lets that source through (``in_src``), with any
``--probe-sources``.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

from bpf.inbound import InboundConfig
from bpf.loader import DEFAULT_PIN_DIR, EbpfCapture, EbpfError, EbpfUnavailable, Excludes
from bpf.netns import netns_cookie

from nodeagent.agent.capture import CaptureError
from nodeagent.agent.netfilter import HOST_PORT_BASE
from nodeagent.agent.probes import NodeProbes, node_backend
from nodeagent.agent.workload import WorkloadSpec, netns_path
from redirect.plan import OUTBOUND_PORT, CaptureConfig

log = logging.getLogger("nodeagent.agent.ebpf")


class EbpfBackend:
    mode = "ebpf"

    def __init__(self, pin_dir: str = DEFAULT_PIN_DIR, host_port_base: int = HOST_PORT_BASE, *,
                 config: CaptureConfig | None = None, prepare_headers: bool = False) -> None:
        self.pin_dir = pin_dir
        self.loader = EbpfCapture(pin_dir, prepare_headers=prepare_headers)
        config = config or CaptureConfig()
        # The same settings as the nftables/iptables plans (redirect.CaptureConfig).
        self.excludes = Excludes(config.exclude_outbound_ports, config.exclude_cidrs)
        # probe sources: the node's probe SNAT addresses and --probe-sources
        self.inbound = InboundConfig(exclude_ports=config.exclude_inbound_ports,
                                     probe_sources=config.inbound_exempt_sources, tunnel_port=config.tunnel_port)
        probe_backend = node_backend() if config.probe_snat else None
        self.probes = NodeProbes(config, probe_backend) if probe_backend else None
        self._probe_problem = None if self.probes or not config.probe_snat else \
            "neither nft nor iptables is installed: probes from the node to pods are captured (no probe SNAT)"
        self.host_port_base = host_port_base
        self._ports: dict[str, int] = {}
        self._cookies: dict[str, int] = {}

    def start(self) -> None:
        try:
            self.loader.start()
        except (EbpfUnavailable, EbpfError) as exc:
            raise CaptureError(f"--capture ebpf: {exc}") from None
        if self.loader.inbound_problem:
            log.warning("--capture ebpf: pods are captured outbound only: %s",
                        self.loader.inbound_problem.splitlines()[0])

    def close(self) -> None:
        self.loader.close()  # the pinned programs and maps stay: capture holds while the agent restarts

    def problems(self) -> list[str]:
        """Lasting limits of this backend on this host (shown in /healthz)."""
        out = [self._probe_problem] if self._probe_problem else []
        if self.loader.inbound_problem:
            out.append(f"eBPF inbound capture is off, pods are captured outbound only: "
                       f"{self.loader.inbound_problem.splitlines()[0]}")
        return out

    def host_port(self, spec: WorkloadSpec) -> int | None:
        return self._ports.get(spec.target)

    def apply(self, spec: WorkloadSpec) -> None:
        try:
            if spec.kind == "netns":
                path = netns_path(spec.target)
                enrollment = self.loader.enroll_netns(path, proxy_port=OUTBOUND_PORT, excludes=self.excludes)
                self._cookies[spec.target] = enrollment.key
                if self.loader.inbound_problem is None:
                    # the data plane's 15006 listeners in that netns
                    self.loader.enroll_inbound(path, config=self.inbound)
                if self.probes is not None:
                    self.probes.add(spec)
                return
            if spec.target not in self._ports:
                used = set(self._ports.values())
                self._ports[spec.target] = next(p for p in range(self.host_port_base, 65536) if p not in used)
            self.loader.enroll_cgroup(spec.target.lstrip("/"), self._ports[spec.target], excludes=self.excludes)
        except (EbpfError, OSError, ValueError) as exc:
            raise CaptureError(f"{spec.ref}: {exc}") from None

    def remove(self, spec: WorkloadSpec) -> None:
        try:
            if spec.kind == "netns":
                cookie = self._cookies.pop(spec.target, None)
                path = netns_path(spec.target)
                if cookie is None and os.path.exists(path):
                    cookie = netns_cookie(path)
                if cookie is not None:
                    self.loader.unenroll_netns(cookie)
                # else: the namespace is gone and this process never knew its cookie; sweep() removes it
                if self.probes is not None:
                    self.probes.discard(spec)
                return
            self._ports.pop(spec.target, None)
            try:
                self.loader.unenroll_cgroup(spec.target.lstrip("/"))
            except EbpfError:
                pass  # the cgroup is gone: sweep() drops its entry by id
        except (EbpfError, OSError) as exc:
            raise CaptureError(f"{spec.ref}: {exc}") from None

    def sweep(self, keep: Iterable[WorkloadSpec]) -> list[str]:
        """Drop map entries of namespaces/cgroups nodeagent no longer holds (gone pods)."""
        if self.probes is not None:
            try:
                self.probes.verify()  # the node's probe SNAT, once per full resync
            except CaptureError as exc:
                log.warning("%s", exc)
        keep_netns, keep_cgroups = set(), set()
        for spec in keep:
            try:
                if spec.kind == "netns":
                    keep_netns.add(self._cookies.get(spec.target) or netns_cookie(netns_path(spec.target)))
                else:
                    keep_cgroups.add(self.loader.cgroup_id(spec.target.lstrip("/")))
            except (EbpfError, OSError):
                continue  # gone: its entry (if any) is stale too
        removed = []
        try:
            for enrollment in self.loader.enrollments():
                if enrollment.kind == "netns" and enrollment.key not in keep_netns:
                    self.loader.unenroll_netns(enrollment.key)
                    removed.append(f"netns cookie {enrollment.key}")
                elif enrollment.kind == "cgroup" and enrollment.key not in keep_cgroups:
                    self.loader.unenroll_cgroup(enrollment.key)
                    removed.append(f"cgroup id {enrollment.key}")
        except (EbpfError, OSError) as exc:
            raise CaptureError(f"bpf sweep: {exc}") from None
        return removed

    def uninstall(self) -> None:
        """Detach the programs and remove every pin (``nodeagent uninstall``)."""
        try:
            self.loader.cleanup()
        except (EbpfError, OSError) as exc:
            raise CaptureError(f"bpf cleanup of {self.pin_dir}: {exc}") from None
        if self.probes is not None:
            self.probes.uninstall()


def auto_backend(pin_dir: str | None = None, config: CaptureConfig | None = None) -> EbpfBackend | None:
    """``--capture auto`` with eBPF first: a started EbpfBackend, or None after ONE
    warning line saying why eBPF cannot work here (the caller then uses nftables)."""
    backend = EbpfBackend(pin_dir, config=config) if pin_dir else EbpfBackend(config=config)
    try:
        backend.start()
    except CaptureError as exc:
        reason = str(exc).removeprefix("--capture ebpf: ")
        log.warning("capture: eBPF unavailable, using nftables: %s", reason.splitlines()[0])
        if "\n" in reason:
            log.debug("capture: eBPF failure in full: %s", reason)
        return None
    return backend
