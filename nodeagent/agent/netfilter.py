"""The nftables / iptables capture backend: ``redirect/`` plans applied per workload.

A netns workload (a pod) gets the in-pod plan inside its own namespace. Cgroup
workloads share the agent's namespace: they are captured together by ONE host
plan, re-applied whenever the set changes, each cgroup's outbound traffic sent
to its own listener port (so the accepting listener names the workload).
``redirect.apply`` verifies before it writes, so re-applying is cheap and a
no-op when nothing drifted.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable

from redirect import BACKENDS, CaptureConfig, HostWorkload, apply as apply_plan, cleanup, host_plan, in_pod_plan
from redirect import CaptureError as RedirectError
from redirect import cgroup2_mount, netns_path, run_command

from nodeagent.agent.capture import CaptureError
from nodeagent.agent.workload import WorkloadSpec

HOST_PORT_BASE = 15100  # cgroup workloads' outbound listeners: 15100, 15101, ...


class NetfilterCapture:
    def __init__(self, backend: str, config: CaptureConfig | None = None, *, runner=run_command,
                 cgroup2_mount: str | None = None, host_port_base: int = HOST_PORT_BASE) -> None:
        if backend not in ("nft", "iptables"):
            raise CaptureError(f"netfilter backend must be nft or iptables, got {backend!r}")
        self.backend = backend
        self.mode = "nftables" if backend == "nft" else "iptables"
        self.config = config or CaptureConfig()
        self.runner = runner
        self.cgroup2_mount = cgroup2_mount
        self.host_port_base = host_port_base
        self._cgroups: dict[str, WorkloadSpec] = {}
        self._ports: dict[str, int] = {}

    def host_port(self, spec: WorkloadSpec) -> int | None:
        """The outbound listener port of a cgroup workload (None for netns workloads)."""
        return self._ports.get(spec.target)

    def host_inbound_port(self) -> int:
        """Where the host plan sends inbound connections to cgroup workloads' declared ports."""
        return self.config.inbound_port

    def apply(self, spec: WorkloadSpec) -> None:
        try:
            if spec.kind == "netns":
                apply_plan(in_pod_plan(self.config), netns_path(spec.target), self.backend, runner=self.runner)
                return
            previous = self._cgroups.get(spec.target)
            self._cgroups[spec.target] = spec
            if spec.target not in self._ports:
                used = set(self._ports.values())
                self._ports[spec.target] = next(p for p in range(self.host_port_base, 65536) if p not in used)
            try:
                self._apply_host()
            except BaseException:
                if previous is None:
                    self._cgroups.pop(spec.target, None)
                    self._ports.pop(spec.target, None)
                else:
                    self._cgroups[spec.target] = previous
                raise
        except (RedirectError, TimeoutError) as exc:
            raise CaptureError(self._explain(spec, exc)) from None

    def remove(self, spec: WorkloadSpec) -> None:
        try:
            if spec.kind == "netns":
                path = netns_path(spec.target)
                if not os.path.exists(path):
                    return  # the namespace is gone, and its rules with it
                cleanup(path, runner=self.runner)
                return
            if self._cgroups.pop(spec.target, None) is None:
                self._cgroups_cleanup_if_empty()
                return
            self._ports.pop(spec.target, None)
            if self._cgroups:
                self._apply_host()
            else:
                cleanup(None, runner=self.runner)
        except (RedirectError, TimeoutError) as exc:
            raise CaptureError(self._explain(spec, exc)) from None

    def _explain(self, spec: WorkloadSpec, exc: Exception) -> str:
        """The backend's error, naming the workload and its netns or cgroup path. nft's own
        text for a cgroup that does not exist is "cgroupv2 path fails" under a caret line
        that points into the table, never at the cgroup: name the missing cgroup(s) instead."""
        if spec.kind == "netns":
            path = netns_path(spec.target)
            where = "" if path in str(exc) else f" in network namespace {path}"
            return f"{spec.ref}: {self.mode} capture{where}: {exc}"
        mount = (self.cgroup2_mount or "/sys/fs/cgroup").rstrip("/")
        wanted = {spec.target: spec, **self._cgroups}
        missing = [(target, other) for target, other in sorted(wanted.items())
                   if not os.path.isdir(mount + target)]
        if missing:
            gone = "; ".join(f"cgroup {mount}{target} of {other.namespace}/{other.name} does not exist"
                             for target, other in missing)
            return (f"{spec.ref}: {self.mode} host capture not applied: {gone} (the host table names every "
                    f"enrolled cgroup; start the service, or unenroll it) [{self.mode}: {str(exc).splitlines()[0]}]")
        return f"{spec.ref}: {self.mode} host capture for cgroup {mount}{spec.target}: {exc}"

    def _cgroups_cleanup_if_empty(self) -> None:
        # Removing a cgroup workload this process never applied (after a restart,
        # from the persisted applied set): with no cgroup left, drop the host table.
        if not self._cgroups:
            cleanup(None, runner=self.runner)

    def _apply_host(self) -> None:
        workloads = [
            HostWorkload(name=_host_name(spec), cgroup=spec.target.lstrip("/"), outbound_port=self._ports[target],
                         inbound_port=self.config.inbound_port, inbound_ports=spec.ports)
            for target, spec in sorted(self._cgroups.items())
        ]
        if self.cgroup2_mount is None:
            self.cgroup2_mount = cgroup2_mount()
        plan = host_plan(workloads, self.config, cgroup2_mount=self.cgroup2_mount)
        apply_plan(plan, None, self.backend, runner=self.runner)

    def sweep(self, keep: Iterable[WorkloadSpec]) -> list[str]:
        # Leftovers are found through the agent's persisted applied set (see
        # Reconciler.full_resync); scanning every namespace on the node would touch
        # namespaces nodeagent never owned. `nodeagent uninstall --all-netns` does that scan.
        return []


def _host_name(spec: WorkloadSpec) -> str:
    digest = hashlib.sha256(spec.target.encode()).hexdigest()[:8]
    return f"{spec.name[:31]}-{digest}"


def sweep_all_netns(backend_names=BACKENDS, runner=run_command) -> list[str]:
    """Remove nodeagent's rules from every named namespace and the host's (uninstall)."""
    removed = []
    candidates: list[str | None] = [None]
    for directory in ("/var/run/netns", "/run/netns"):
        if os.path.isdir(directory):
            candidates += [os.path.join(directory, n) for n in sorted(os.listdir(directory))]
    seen: set[tuple[int, int]] = set()
    for path in candidates:
        if path is not None:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
        try:
            backends = cleanup(path, tuple(backend_names), runner=runner)
        except (RedirectError, TimeoutError) as exc:
            raise CaptureError(f"{path or 'host namespace'}: {exc}") from None
        if backends:
            removed.append(f"{path or 'host namespace'} ({', '.join(backends)})")
    return removed
