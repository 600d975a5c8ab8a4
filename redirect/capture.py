"""The thin apply edge: read the kernel's state, compare, repair atomically.

``apply(plan, netns)`` reads what nodeagent currently has in the namespace,
compares it with the plan's rendering, and only when they differ loads the
rendering in ONE transaction (``nft -f`` or ``iptables-restore --noflush``).
Applying twice changes nothing. Rules stay in place when the agent stops;
only ``cleanup`` removes them (fail closed: with no proxy listening, a
redirected connect is refused instead of bypassing the mesh).

Backends: ``nft`` (native table, the default), ``iptables-nft``,
``iptables-legacy``, or ``iptables`` meaning "detect which iptables backend
this namespace already uses" (the istio-cni failure mode we avoid).
Commands run inside the namespace with nsenter (see ``redirect.netns``);
tests can pass another ``runner`` with the same signature.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

from . import iptables, nft
from .netns import NetnsRef, run_command
from .plan import OWNER, CaptureError, CapturePlan, Family

Backend = Literal["nft", "iptables-nft", "iptables-legacy"]
BACKENDS: tuple[Backend, ...] = ("nft", "iptables-nft", "iptables-legacy")


class Runner(Protocol):
    """Runs one command in a namespace (``redirect.netns.run_command`` is the real one)."""

    def __call__(self, netns: NetnsRef | None, argv: list[str], *, input: str | None, timeout: float,
                 check: bool) -> subprocess.CompletedProcess[str]: ...


TIMEOUT = 10.0
XTABLES_WAIT = "5"  # seconds to wait for the (host-wide) xtables lock


@dataclass(frozen=True, slots=True)
class ApplyResult:
    backend: Backend
    changed: bool
    drift: tuple[str, ...]  # what differed before the repair (empty: already in sync)
    removed_from: tuple[Backend, ...] = ()  # other backends that still held nodeagent rules


def _run(runner: Runner, netns: NetnsRef | None, argv: Sequence[str], *, input: str | None = None,
         check: bool = True):
    return runner(netns, list(argv), input=input, timeout=TIMEOUT, check=check)


def _xt(backend: Backend, family: Family, tool: str) -> str:
    prefix = "ip6tables" if family == "ipv6" else "iptables"
    variant = backend.split("-", 1)[1]
    return f"{prefix}-{variant}-{tool}"  # e.g. ip6tables-legacy-save


# --- nft -----------------------------------------------------------------

def nft_state(netns: NetnsRef | None, family: str, *, runner: Runner = run_command) -> nft.TableState | None:
    proc = _run(runner, netns, ["nft", "-j", "list", "table", family, OWNER], check=False)
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return None
        raise CaptureError(f"`nft list table {family} {OWNER}` in {netns!r} failed: {proc.stderr.strip()}")
    return nft.parse_state(proc.stdout, family)


def _nft_drift(plan: CapturePlan, netns, runner) -> tuple[str, ...]:
    want = nft.desired_state(plan)
    drift = list(nft.diff(want, nft_state(netns, want.family, runner=runner)))
    for fam in nft.TABLE_FAMILIES:
        if fam != want.family and nft_state(netns, fam, runner=runner) is not None:
            drift.append(f"stale table {fam} {OWNER}")
    return tuple(drift)


# --- iptables --------------------------------------------------------------

def iptables_state(netns: NetnsRef | None, backend: Backend, family: Family = "ipv4", *,
                   runner: Runner = run_command) -> iptables.IptablesState:
    proc = _run(runner, netns, [_xt(backend, family, "save")])
    return iptables.parse_save(proc.stdout)


def detect_backend(netns: NetnsRef | None, *, runner: Runner = run_command) -> Backend:
    """The iptables backend already in use in ``netns`` (iptables-nft when unsure)."""
    legacy = iptables_state(netns, "iptables-legacy", runner=runner)
    nftb = iptables_state(netns, "iptables-nft", runner=runner)
    return iptables.choose_backend(legacy, nftb)  # type: ignore[return-value]


def _restore(runner, netns, backend: Backend, family: Family, text: str) -> None:
    _run(runner, netns, [_xt(backend, family, "restore"), "--noflush", "-w", XTABLES_WAIT], input=text)


# --- the edge ----------------------------------------------------------------

def _resolve(backend: str, netns, runner) -> Backend:
    if backend == "iptables":
        return detect_backend(netns, runner=runner)
    if backend not in BACKENDS:
        raise CaptureError(f"capture backend {backend!r} is unknown; use one of nft, iptables, "
                           "iptables-nft, iptables-legacy")
    return backend  # type: ignore[return-value]


def verify(plan: CapturePlan, netns: NetnsRef | None, backend: str = "nft", *,
           runner: Runner = run_command) -> tuple[str, ...]:
    """Differences between the kernel and the plan in ``netns`` (empty: in sync)."""
    chosen = _resolve(backend, netns, runner)
    if chosen == "nft":
        return _nft_drift(plan, netns, runner)
    drift: list[str] = []
    for family in plan.families:
        state = iptables_state(netns, chosen, family, runner=runner)
        drift += [f"{_xt(chosen, family, 'save')}: {d}"
                  for d in iptables.diff(iptables.desired_state(plan, family), state)]
    return tuple(drift)


def apply(plan: CapturePlan, netns: NetnsRef | None, backend: str = "nft", *,
          sweep: bool = True, runner: Runner = run_command) -> ApplyResult:
    """Make the namespace's capture rules equal the plan; a no-op when they already are.

    With ``sweep`` (the default) nodeagent rules left in the OTHER backends
    (e.g. after switching from iptables-legacy to nft) are removed too, so two
    backends never capture at once; a periodic resync that knows the backend
    did not change may pass ``sweep=False`` to save the extra reads.
    """
    chosen = _resolve(backend, netns, runner)
    if chosen == "nft":
        drift = _nft_drift(plan, netns, runner)
        if drift:
            _run(runner, netns, ["nft", "-f", "-"], input=nft.render(plan))
    else:
        drift_list: list[str] = []
        for family in plan.families:
            state = iptables_state(netns, chosen, family, runner=runner)
            found = iptables.diff(iptables.desired_state(plan, family), state)
            if found:
                drift_list += [f"{_xt(chosen, family, 'save')}: {d}" for d in found]
                _restore(runner, netns, chosen, family, iptables.render_restore(plan, family, state))
        drift = tuple(drift_list)
    removed = cleanup(netns, tuple(b for b in BACKENDS if b != chosen), runner=runner) if sweep else ()
    return ApplyResult(chosen, bool(drift) or bool(removed), drift, removed)


def cleanup(netns: NetnsRef | None, backends: Sequence[Backend] = BACKENDS, *,
            runner: Runner = run_command) -> tuple[Backend, ...]:
    """Remove everything nodeagent added in ``netns`` (and nothing else).

    Returns the backends that held nodeagent rules.
    """
    removed: list[Backend] = []
    for backend in backends:
        if backend == "nft":
            if any(nft_state(netns, fam, runner=runner) is not None for fam in nft.TABLE_FAMILIES):
                _run(runner, netns, ["nft", "-f", "-"], input=nft.render_cleanup())
                removed.append(backend)
            continue
        for family in ("ipv4", "ipv6"):
            text = iptables.render_cleanup(iptables_state(netns, backend, family, runner=runner))
            if text is not None:
                _restore(runner, netns, backend, family, text)
                if backend not in removed:
                    removed.append(backend)
    return tuple(removed)
