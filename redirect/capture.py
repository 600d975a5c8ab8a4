"""The thin apply edge: read the kernel's state, compare, repair atomically.

``apply(plan, netns)`` reads what nodeagent currently has in the namespace,
compares it with the plan's rendering, and only when they differ loads the
rendering in ONE transaction (one nft batch, or ``iptables-restore --noflush``).
Applying twice changes nothing. Rules stay in place when the agent stops;
only ``cleanup`` removes them (fail closed: with no proxy listening, a
redirected connect is refused instead of bypassing the mesh).

Backends: ``nft`` (native table, the default), ``iptables-nft``,
``iptables-legacy``, or ``iptables`` meaning "detect which iptables backend
this namespace already uses" (the istio-cni failure mode we avoid).
nftables is driven in-process through libnftables inside the namespace
(``redirect.libnft``: no process per command); iptables commands, and nft when
libnftables is missing or a caller passes its own ``runner``, run inside the
namespace with nsenter (see ``redirect.netns``).
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Protocol, Sequence, TypeVar

from . import iptables, libnft, nft
from .netns import NetnsRef, check_netns, run_command, run_in_netns
from .plan import OWNER, CaptureError, CapturePlan, Family

OWNERS: tuple[str, ...] = nft.OWNERS  # nodeagent's tables/chain prefixes: in-pod/host plans, node plan

Backend = Literal["nft", "iptables-nft", "iptables-legacy"]
BACKENDS: tuple[Backend, ...] = ("nft", "iptables-nft", "iptables-legacy")
T = TypeVar("T")


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


# --- one read of a namespace ----------------------------------------------------

@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything apply/verify/cleanup need to know about a namespace, read at once.

    ``list tables`` says which of nodeagent's tables exist (each is then
    listed) and whether iptables-nft's nat tables exist (then ``list chains``,
    without rules, says whether they hold nodeagent's chains): a fresh pod
    costs one netlink dump, and foreign rules are never parsed.
    ``/proc/net/ip{,6}_tables_names`` (per namespace) lists the legacy
    iptables tables the kernel has loaded there: a legacy nat table that was
    never loaded cannot hold our rules, so the legacy backend is only read
    when it has been used in this namespace.
    """

    rulesets: Mapping[str, nft.Ruleset]  # by owner (``OWNERS``)
    legacy_tables: Mapping[Family, frozenset[str]]  # loaded legacy tables, per family

    @property
    def nft(self) -> nft.Ruleset:
        """The in-pod/host plans' owner (``nodeagent``)."""
        return self.rulesets[OWNER]

    def ruleset(self, owner: str) -> nft.Ruleset:
        return self.rulesets.get(owner) or nft.Ruleset({}, frozenset())

    def legacy_nat(self) -> tuple[Family, ...]:
        return tuple(f for f in ("ipv4", "ipv6") if iptables.TABLE in self.legacy_tables.get(f, ()))


LEGACY_NAMES: Mapping[Family, str] = {"ipv4": "ip_tables_names", "ipv6": "ip6_tables_names"}


def _legacy_tables_here() -> dict[Family, frozenset[str]]:
    # thread-self: /proc/self/net would show the main thread's namespace.
    out: dict[Family, frozenset[str]] = {}
    for family, name in LEGACY_NAMES.items():
        try:
            with open(f"/proc/thread-self/net/{name}") as fh:
                out[family] = frozenset(fh.read().split())
        except FileNotFoundError:  # legacy iptables not in this kernel: nothing to find
            out[family] = frozenset()
    return out


class _Session(Protocol):
    def list(self, what: str) -> str | None: ...  # JSON; None when the object does not exist

    def load(self, text: str) -> None: ...

    def legacy_tables(self) -> dict[Family, frozenset[str]]: ...


class _LibSession:
    """In-process libnftables, already inside the namespace (see redirect.libnft)."""

    def __init__(self, session: libnft.Session) -> None:
        self.session = session

    def list(self, what: str) -> str | None:
        try:
            return self.session.cmd(f"list {what}", json_output=True)
        except libnft.NftLibError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise

    def load(self, text: str) -> None:
        self.session.cmd(text)

    def legacy_tables(self) -> dict[Family, frozenset[str]]:
        return _legacy_tables_here()


class _CliSession:
    """The ``nft`` binary through ``runner`` (fallback, or a caller-supplied runner)."""

    def __init__(self, netns: NetnsRef | None, runner: Runner) -> None:
        self.netns, self.runner = netns, runner

    def list(self, what: str) -> str | None:
        proc = _run(self.runner, self.netns, ["nft", "-j", "list", *what.split()], check=False)
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr:
                return None
            raise CaptureError(f"`nft list {what}` in {self.netns!r} failed: {proc.stderr.strip()}")
        return proc.stdout

    def load(self, text: str) -> None:
        _run(self.runner, self.netns, ["nft", "-f", "-"], input=text)

    def legacy_tables(self) -> dict[Family, frozenset[str]]:
        return run_in_netns(self.netns, _legacy_tables_here, timeout=TIMEOUT)


def _with_session(netns: NetnsRef | None, runner: Runner, fn: Callable[[_Session], T]) -> T:
    """Call ``fn`` with a session in ``netns``: libnftables in-process when possible."""
    if runner is run_command and libnft.available() and libnft.low_descriptor_free():
        if netns is not None:
            check_netns(netns)
        return libnft.run(netns, lambda s: fn(_LibSession(s)), timeout=TIMEOUT)
    return fn(_CliSession(netns, runner))


def _read(session: _Session) -> Snapshot:
    present = nft.parse_tables(session.list("tables") or "")
    # without the iptables-nft nat tables there can be no owned chains: skip that listing
    chains = (session.list("chains") or "") if nft.iptables_nft_holders(present) else None
    rulesets = {}
    for owner in OWNERS:
        tables = {}
        for fam in nft.TABLE_FAMILIES:
            if (fam, owner) in present:
                listing = session.list(f"table {fam} {owner}")  # None: deleted meanwhile
                state = nft.parse_state(listing, fam, owner) if listing is not None else None
                if state is not None:
                    tables[fam] = state
        xt: frozenset[str] = frozenset()
        if chains is not None:
            xt = nft.parse_owned_chains(chains, iptables.prefix_of(owner))
        rulesets[owner] = nft.Ruleset(tables, xt)
    return Snapshot(rulesets, session.legacy_tables())


def snapshot(netns: NetnsRef | None, *, runner: Runner = run_command) -> Snapshot:
    """Read what nodeagent has in ``netns`` (nft tables, iptables-nft chains, legacy tables loaded)."""
    return _with_session(netns, runner, _read)


def _nft_drift(plan: CapturePlan, snap: Snapshot) -> tuple[str, ...]:
    want = nft.desired_state(plan)
    tables = snap.ruleset(plan.owner).tables
    drift = list(nft.diff(want, tables.get(want.family)))
    for fam in nft.TABLE_FAMILIES:
        if fam != want.family and fam in tables:
            drift.append(f"stale table {fam} {plan.owner}")
    return tuple(drift)


# --- iptables --------------------------------------------------------------

def iptables_state(netns: NetnsRef | None, backend: Backend, family: Family = "ipv4", *,
                   runner: Runner = run_command, owner: str = OWNER) -> iptables.IptablesState:
    proc = _run(runner, netns, [_xt(backend, family, "save")])
    return iptables.parse_save(proc.stdout, iptables.prefix_of(owner))


def detect_backend(netns: NetnsRef | None, *, runner: Runner = run_command) -> Backend:
    """The iptables backend already in use in ``netns`` (iptables-nft when unsure)."""
    if netns is not None:
        check_netns(netns)
    # iptables-legacy-save dumps exactly the loaded tables: none loaded, nothing to read.
    loaded = run_in_netns(netns, _legacy_tables_here, timeout=TIMEOUT)["ipv4"]
    legacy = iptables_state(netns, "iptables-legacy", runner=runner) if loaded else iptables.EMPTY
    nftb = iptables_state(netns, "iptables-nft", runner=runner)
    return iptables.choose_backend(legacy, nftb)  # type: ignore[return-value]


def _restore(runner, netns, backend: Backend, family: Family, text: str) -> None:
    _run(runner, netns, [_xt(backend, family, "restore"), "--noflush", "-w", XTABLES_WAIT], input=text)


def _cleanup_iptables(snap: Snapshot, netns, backends: Sequence[Backend], runner,
                      owners: Sequence[str] = OWNERS) -> list[Backend]:
    """Remove the ``owners``' chains/jumps from the iptables ``backends`` the snapshot says hold any."""
    removed: list[Backend] = []
    for backend in backends:
        if backend == "nft":
            continue
        for family in ("ipv4", "ipv6"):
            holders = [o for o in owners
                       if family in (snap.ruleset(o).iptables_nft if backend == "iptables-nft"
                                     else frozenset(snap.legacy_nat()))]
            if not holders:
                continue
            saved = _run(runner, netns, [_xt(backend, family, "save")]).stdout
            for owner in holders:
                text = iptables.render_cleanup(iptables.parse_save(saved, iptables.prefix_of(owner)))
                if text is not None:
                    _restore(runner, netns, backend, family, text)
                    if backend not in removed:
                        removed.append(backend)
    return removed


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
        return _nft_drift(plan, snapshot(netns, runner=runner))
    drift: list[str] = []
    for family in plan.families:
        state = iptables_state(netns, chosen, family, runner=runner, owner=plan.owner)
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

    nft: one read (see ``Snapshot``), then, only if something differs, one
    atomic load; the other backends are read only when that read shows they
    can hold nodeagent's chains.
    """
    chosen = _resolve(backend, netns, runner)
    others = tuple(b for b in BACKENDS if b != chosen)
    if chosen == "nft":
        def body(session: _Session) -> tuple[Snapshot, tuple[str, ...]]:
            snap = _read(session)
            found = _nft_drift(plan, snap)
            if found:
                session.load(nft.render(plan))
            return snap, found

        snap, drift = _with_session(netns, runner, body)
        removed = tuple(_cleanup_iptables(snap, netns, others, runner, (plan.owner,))) if sweep else ()
        return ApplyResult(chosen, bool(drift) or bool(removed), drift, removed)
    drift_list: list[str] = []
    for family in plan.families:
        state = iptables_state(netns, chosen, family, runner=runner, owner=plan.owner)
        found_xt = iptables.diff(iptables.desired_state(plan, family), state)
        if found_xt:
            drift_list += [f"{_xt(chosen, family, 'save')}: {d}" for d in found_xt]
            _restore(runner, netns, chosen, family, iptables.render_restore(plan, family, state))
    removed = cleanup(netns, others, runner=runner, owners=(plan.owner,)) if sweep else ()
    return ApplyResult(chosen, bool(drift_list) or bool(removed), tuple(drift_list), removed)


def update_elements(plan: CapturePlan, netns: NetnsRef | None, *, add: Sequence[str] = (),
                    delete: Sequence[str] = (), runner: Runner = run_command) -> bool:
    """Add and delete single addresses in the plan's nft named sets (``Rule.daddr_set``),
    in ONE transaction, without reading or reloading the table (nft backend only).
    Only the plan's table and set names count, not the members it lists: a caller
    may pass the plan it last applied in full.

    For a table that ``apply`` installed: the rest of it is not read, so other drift
    is repaired by the next ``apply``/``verify`` (a full resync). The whole batch
    fails, changing nothing, when the table or a set is gone or an address to
    delete is not in its set: the caller then re-applies the full plan. Adding an
    address the set holds already is not an error. False when there was nothing to do.
    """
    text = nft.render_elements(plan, add, delete)
    if not text:
        return False
    _with_session(netns, runner, lambda session: session.load(text))
    return True


def cleanup(netns: NetnsRef | None, backends: Sequence[Backend] = BACKENDS, *,
            runner: Runner = run_command, owners: Sequence[str] = OWNERS) -> tuple[Backend, ...]:
    """Remove everything nodeagent added in ``netns`` (and nothing else).

    ``owners`` limits it to some of nodeagent's tables/chains (``OWNERS``: the
    in-pod/host plans' ``nodeagent``, the node plan's ``nodeagent-node``).
    Returns the backends that held nodeagent rules.
    """
    owners = tuple(owners)

    def body(session: _Session) -> tuple[Snapshot, bool]:
        snap = _read(session)
        held = tuple(o for o in owners if snap.ruleset(o).tables)
        if "nft" in backends and held:
            session.load(nft.render_cleanup(held))
            return snap, True
        return snap, False

    snap, nft_removed = _with_session(netns, runner, body)
    removed: list[Backend] = ["nft"] if nft_removed else []
    removed += _cleanup_iptables(snap, netns, backends, runner, owners)
    return tuple(b for b in BACKENDS if b in removed)
