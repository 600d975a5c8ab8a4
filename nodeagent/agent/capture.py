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


def select_capture(mode: str, state_dir) -> Capture:
    """The backend for ``--capture MODE``; CaptureError says why one is unavailable."""
    if mode == "none":
        return NoCapture()
    raise CaptureError(
        f"--capture {mode}: the kernel capture backends are not wired into this build yet; "
        "run with --capture none (explicit proxy only) for now"
    )


def uninstall_backends() -> list[Capture]:
    """Every backend that may have left rules behind (uninstall removes all of them)."""
    return []
