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


def select_capture(mode: str) -> Capture:
    """The backend for ``--capture MODE``; CaptureError says why one is unavailable."""
    import shutil

    def have(tool: str) -> bool:
        return shutil.which(tool) is not None or shutil.which(tool, path="/usr/sbin:/sbin") is not None

    if mode == "none":
        return NoCapture()
    if mode == "auto":
        mode = "nftables" if have("nft") else "iptables" if have("iptables") else ""
        if not mode:
            raise CaptureError("--capture auto: neither nft nor iptables is installed; install nftables "
                               "(Debian: apt-get install nftables) or run with --capture none")
    if mode in ("nftables", "iptables"):
        tool = "nft" if mode == "nftables" else "iptables"
        if not have(tool):
            raise CaptureError(f"--capture {mode}: the {tool} command is not installed")
        if not have("nsenter"):
            raise CaptureError(f"--capture {mode}: nsenter is not installed (Debian: util-linux)")
        from nodeagent.agent.netfilter import NetfilterCapture
        return NetfilterCapture("nft" if mode == "nftables" else "iptables")
    raise CaptureError(f"--capture {mode}: the eBPF capture backend is not wired into the agent yet; "
                       "use --capture nftables or iptables")


def capture_for_uninstall(mode: str) -> Capture | None:
    """The backend that removes what a previous run (recorded ``mode``) applied."""
    if mode in ("nftables", "iptables"):
        from nodeagent.agent.netfilter import NetfilterCapture
        return NetfilterCapture("nft" if mode == "nftables" else "iptables")
    return None
