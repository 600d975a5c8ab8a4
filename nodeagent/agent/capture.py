"""Capture backends as the agent sees them: one small protocol, one adapter each.

``apply`` and ``remove`` are idempotent and raise ``CaptureError`` with a
message a user can act on; ``sweep`` removes whatever nodeagent left behind
for targets it no longer holds. The adapters over ``redirect/`` and ``bpf/``
live next to this protocol; ``none`` is the honest mode for explicit-proxy
nodes: workloads are enrolled (identity, admin, endpoints) but no traffic is
redirected.
"""
from __future__ import annotations

from typing import Iterable, Protocol

from nodeagent.agent.workload import WorkloadSpec


class CaptureError(Exception):
    pass


class Capture(Protocol):
    mode: str

    def apply(self, spec: WorkloadSpec) -> None: ...

    def remove(self, spec: WorkloadSpec) -> None: ...

    def sweep(self, keep: Iterable[WorkloadSpec]) -> list[str]: ...


class NoCapture:
    """``--capture none``: nothing is redirected; applications use the proxy explicitly."""

    mode = "none"

    def apply(self, spec: WorkloadSpec) -> None:
        return None

    def remove(self, spec: WorkloadSpec) -> None:
        return None

    def sweep(self, keep: Iterable[WorkloadSpec]) -> list[str]:
        return []


def select_capture(mode: str, bpf_pin_dir: str | None = None, config=None) -> Capture:
    """The backend for ``--capture MODE``; CaptureError says why one is unavailable.

    ``auto``: eBPF when this host can run it (enrolling is a map update: the
    fastest), else nftables, else iptables, with one log line saying why eBPF
    was skipped. An explicit ``ebpf`` also prepares missing kernel headers.
    ``config``: ``redirect.CaptureConfig`` (excluded ports/CIDRs, probe sources).
    Every mode but ``none`` also keeps the node's probe SNAT (``nodeagent.agent.probes``):
    TCP from the node's own sockets to enrolled pods reaches them uncaptured.
    """
    import shutil

    def have(tool: str) -> bool:
        return shutil.which(tool) is not None or shutil.which(tool, path="/usr/sbin:/sbin") is not None

    if mode == "none":
        return NoCapture()
    if mode == "auto":
        from nodeagent.agent.ebpf import auto_backend

        backend = auto_backend(bpf_pin_dir, config)
        if backend is not None:
            return backend
        mode = "nftables" if have("nft") else "iptables" if have("iptables") else ""
        if not mode:
            raise CaptureError("--capture auto: eBPF is unavailable (see above) and neither nft nor iptables "
                               "is installed; install nftables (Debian: apt-get install nftables)")
    if mode in ("nftables", "iptables"):
        tool = "nft" if mode == "nftables" else "iptables"
        if not have(tool):
            raise CaptureError(f"--capture {mode}: the {tool} command is not installed")
        if not have("nsenter"):
            raise CaptureError(f"--capture {mode}: nsenter is not installed (Debian: util-linux)")
        from nodeagent.agent.probes import netfilter_capture
        return netfilter_capture("nft" if mode == "nftables" else "iptables", config)
    if mode == "ebpf":
        from nodeagent.agent.ebpf import EbpfBackend
        backend = EbpfBackend(bpf_pin_dir, config=config, prepare_headers=True) if bpf_pin_dir \
            else EbpfBackend(config=config, prepare_headers=True)
        backend.start()
        return backend
    raise CaptureError(f"--capture must be one of auto, nftables, iptables, ebpf, none; got {mode!r}")


def capture_for_uninstall(mode: str, bpf_pin_dir: str | None = None) -> Capture | None:
    """The backend that removes what a previous run (recorded ``mode``) applied."""
    if mode == "ebpf":
        from nodeagent.agent.ebpf import EbpfBackend
        return EbpfBackend(bpf_pin_dir) if bpf_pin_dir else EbpfBackend()
    if mode in ("nftables", "iptables"):
        from nodeagent.agent.probes import netfilter_capture
        return netfilter_capture("nft" if mode == "nftables" else "iptables")
    return None
