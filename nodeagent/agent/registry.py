"""The workload registry state machine and the capture retry set.

Pure (after ztunnel's ``inpod`` state machine): enrolling the same target with
the same spec again is a no-op, a changed spec is an update, and a second
workload may not claim a netns/cgroup, a name or an IP that another holds.
Workloads whose capture failed to apply sit in a retry set with exponential
backoff; the reconcile loop asks which are due. Time is passed in.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterator

from nodeagent.agent.workload import SpecError, WorkloadSpec, spec_from_json

STATE_VERSION = 1


class EnrollConflict(Exception):
    """Another workload already holds what this enrollment claims."""


class Outcome(str, Enum):
    ADDED = "added"
    UNCHANGED = "unchanged"
    UPDATED = "updated"
    REMOVED = "removed"
    ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class Change:
    outcome: Outcome
    spec: WorkloadSpec | None  # the workload now enrolled (None after unenroll/absent)
    previous: WorkloadSpec | None  # what was enrolled before (None when added/absent)


class Registry:
    """Enrolled workloads keyed by (kind, target)."""

    def __init__(self, specs: tuple[WorkloadSpec, ...] = ()) -> None:
        self._by_key: dict[tuple[str, str], WorkloadSpec] = {}
        for spec in specs:
            self.enroll(spec)

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[WorkloadSpec]:
        return iter(sorted(self._by_key.values(), key=lambda s: (s.namespace, s.name, s.kind, s.target)))

    def get(self, kind: str, target: str) -> WorkloadSpec | None:
        return self._by_key.get((kind, target))

    def find(self, namespace: str, name: str) -> WorkloadSpec | None:
        for spec in self._by_key.values():
            if (spec.namespace, spec.name) == (namespace, name):
                return spec
        return None

    def by_ip(self, ip: str) -> WorkloadSpec | None:
        for spec in self._by_key.values():
            if ip in spec.ips:
                return spec
        return None

    def check(self, spec: WorkloadSpec) -> WorkloadSpec | None:
        """Raise EnrollConflict if ``spec`` cannot be enrolled; return what it replaces."""
        current = self._by_key.get(spec.key)
        if current is not None and (current.namespace, current.name) != (spec.namespace, spec.name):
            raise EnrollConflict(
                f"{spec.kind} {spec.target} is already enrolled as {current.namespace}/{current.name}; "
                f"unenroll it before enrolling {spec.namespace}/{spec.name} there"
            )
        for other in self._by_key.values():
            if other.key == spec.key:
                continue
            if (other.namespace, other.name) == (spec.namespace, spec.name):
                raise EnrollConflict(
                    f"workload {spec.namespace}/{spec.name} is already enrolled on {other.kind} {other.target}; "
                    f"unenroll that first (one workload, one {other.kind})"
                )
            shared = sorted(set(other.ips) & set(spec.ips))
            if shared:
                raise EnrollConflict(
                    f"IP {shared[0]} is already held by workload {other.namespace}/{other.name} "
                    f"({other.kind} {other.target})"
                )
        return current

    def enroll(self, spec: WorkloadSpec) -> Change:
        current = self.check(spec)
        if current == spec:
            return Change(Outcome.UNCHANGED, spec, current)
        self._by_key[spec.key] = spec
        return Change(Outcome.ADDED if current is None else Outcome.UPDATED, spec, current)

    def unenroll(self, kind: str, target: str) -> Change:
        current = self._by_key.pop((kind, target), None)
        if current is None:
            return Change(Outcome.ABSENT, None, None)
        return Change(Outcome.REMOVED, None, current)

    def undo(self, change: Change) -> None:
        """Revert ``change`` (the persist step failed)."""
        key = (change.spec or change.previous).key
        if change.previous is None:
            self._by_key.pop(key, None)
        else:
            self._by_key[key] = change.previous

    # -- the state file -------------------------------------------------

    def dumps(self, extra: dict[str, Any] | None = None) -> str:
        document = {"version": STATE_VERSION, **(extra or {}), "workloads": [s.to_json() for s in self]}
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    @classmethod
    def loads(cls, text: str, source: str) -> tuple["Registry", dict[str, Any]]:
        """Parse a state file; errors name the file and the entry."""
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StateFileError(f"{source}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
            raise StateFileError(f"{source}: unsupported state file (expected version {STATE_VERSION})")
        raw = document.get("workloads")
        if not isinstance(raw, list):
            raise StateFileError(f"{source}: 'workloads' must be a list")
        registry = cls()
        for index, item in enumerate(raw):
            try:
                registry.enroll(spec_from_json(item))
            except (SpecError, EnrollConflict) as exc:
                raise StateFileError(f"{source}: workloads[{index}]: {exc}") from None
        extra = {k: v for k, v in document.items() if k not in ("version", "workloads")}
        return registry, extra


class StateFileError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class RetryEntry:
    attempts: int
    next_at: float
    last_error: str
    since: float


class RetrySet:
    """Workloads whose capture failed, with exponential backoff (base doubling, capped)."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base = base
        self.cap = cap
        self._entries: dict[tuple[str, str], RetryEntry] = {}

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, str]) -> RetryEntry | None:
        return self._entries.get(key)

    def failed(self, key: tuple[str, str], error: str, now: float) -> RetryEntry:
        previous = self._entries.get(key)
        attempts = 1 if previous is None else previous.attempts + 1
        delay = min(self.cap, self.base * (2 ** (attempts - 1)))
        entry = RetryEntry(attempts, now + delay, error, previous.since if previous else now)
        self._entries[key] = entry
        return entry

    def succeeded(self, key: tuple[str, str]) -> None:
        self._entries.pop(key, None)

    forget = succeeded

    def due(self, now: float) -> list[tuple[str, str]]:
        return sorted(k for k, e in self._entries.items() if e.next_at <= now)

    def next_due(self) -> float | None:
        return min((e.next_at for e in self._entries.values()), default=None)

    def items(self) -> list[tuple[tuple[str, str], RetryEntry]]:
        return sorted(self._entries.items())
