"""The composition root: one ``Agent`` per node.

It owns the persisted workload registry, the capture reconciler, the
enrollment socket, and the admin / metrics / readiness servers, and wires the
config store (``nodeagent.store``), identities (``nodeagent.identity``), the
proxy runtime (``nodeagent.proxy``) and capture (``redirect``/``bpf``) into
them. Startup order: state-dir lock and registry -> enrollment socket -> HTTP
faces (readiness 503 meanwhile) -> config -> proxy runtime -> re-adoption of
every enrolled workload (listeners, then capture; idempotent) -> identities
(issued in the background; readiness waits for them) -> ready (HTTP 200 and
systemd READY=1). SIGTERM stops the servers and the proxy but leaves capture
in place: a stopped agent fails closed, and the next start re-adopts its
workloads without re-enrollment.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nodeagent.agent import protocol, sdnotify
from nodeagent.agent.admin import HttpFace, admin_routes, metrics_routes, readiness_routes, to_jsonable
from nodeagent.agent.capture import Capture
from nodeagent.agent.dataplane import DataPlane, DataPlaneCapture
from nodeagent.agent.persist import ensure_state_dir, load_registry, save_registry
from nodeagent.agent.reconciler import Clock, MonotonicClock, Reconciler
from nodeagent.agent.registry import Change, EnrollConflict, Outcome, RetrySet, StateFileError
from nodeagent.agent.server import SOCKET_NAME, EnrollmentServer
from nodeagent.agent.workload import SpecError, WorkloadSpec, merge_workloads, netns_path, spec_from_json, spiffe_id
from nodeagent.identity import CAError, CertificateManager, IdentityError, SpiffeId, create_manager
from nodeagent.identity import certs as x509certs
from nodeagent.store import ConfigStore
from nodeagent.identity.tls import TunnelTls
from nodeagent.proxy.tunnel import MeshTelemetry
from nodeagent.telemetry import AccessLog, IstioCollector
from policy.errors import ConfigError
from policy.snapshot import ConfigSnapshot, build_snapshot

log = logging.getLogger("nodeagent.agent")

# glibc malloc: mallopt() parameters and their default values (malloc(3), mallopt(3)).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MALLOC_THRESHOLD = 128 * 1024


def pin_malloc_thresholds() -> bool:
    """Fix glibc's trim and mmap thresholds at their defaults (128 KiB) for the process.

    Why: by default glibc raises both thresholds each time a large mmap()ed block is
    freed (up to 32 MiB / 64 MiB), after which a thread's arena keeps up to that much
    FREE memory instead of returning it to the kernel. libnftnl allocates and frees a
    2 MiB batch buffer for every nft command (nftnl_batch_free -> munmap, seen with
    gdb), which raises them to ~2 / ~4 MiB; the per-namespace worker threads' arenas
    then kept the freed space: measured with 100 enrolled pods (/tmp/rss.py), 48 of
    the 52 MiB of anonymous memory they added was free space glibc kept
    (malloc_info), ~0.47 MiB per pod. Pinned, it is returned: anon 87 ->
    43 MiB, enroll latency unchanged. Same effect as MALLOC_TRIM_THRESHOLD_=131072.
    False (and nothing done) where the C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, MALLOC_THRESHOLD)) and bool(mallopt(M_MMAP_THRESHOLD, MALLOC_THRESHOLD))


def _libc_malloc_trim():
    """glibc's malloc_trim(3), or None (another C library)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


MALLOC_TRIM = _libc_malloc_trim()
TRIM_AFTER = 1.0  # seconds without an enroll/unenroll before the C heaps are trimmed


def trim_malloc() -> bool:
    """Give the C heaps' free pages back to the kernel: glibc's malloc_trim(0) returns every
    whole free page of every arena (madvise), not only the top of each heap as the trim
    threshold does. Why: an enroll's transient work (the registry's JSON, libnftables' rule
    building, certificate issuance) runs in the executor's threads, each with its own arena;
    what they free stays resident in the middle of their heaps. Measured with 100 pods
    (docs/operations.md "Memory"): ~2.5 MiB of Rss, in 0.4 ms. False where there is no
    malloc_trim (not glibc) or nothing was returned."""
    return MALLOC_TRIM is not None and bool(MALLOC_TRIM(0))


@dataclass(frozen=True, slots=True)
class AgentOptions:
    node: str
    state_dir: Path
    config_dir: Path | None = None
    trust_domain: str = "cluster.local"
    ca_url: str | None = None
    node_credential: Path | None = None
    admin: tuple[str, int] = ("127.0.0.1", 15000)
    metrics: tuple[str, int] = ("0.0.0.0", 15020)
    readiness: tuple[str, int] = ("0.0.0.0", 15021)
    resync_interval: float = 60.0
    cert_wait: float = 2.0  # how long an enroll waits for the workload's certificate
    access_log: str | None = None  # JSON access log: a file path, "-" for stdout, None for off


class AgentSetupError(Exception):
    """The agent cannot start as configured; the message says what to change."""


class Readiness:
    """Named conditions; ready when every one holds."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self._conditions: dict[str, tuple[bool, str]] = {n: (False, "not yet") for n in names}

    def set(self, name: str, ok: bool, detail: str = "") -> None:
        self._conditions[name] = (ok, detail)

    @property
    def ready(self) -> bool:
        return all(ok for ok, _ in self._conditions.values())

    def view(self) -> dict[str, Any]:
        return {name: {"ok": ok, "detail": detail} for name, (ok, detail) in self._conditions.items()}


class Agent:
    def __init__(self, options: AgentOptions, capture: Capture, clock: Clock | None = None) -> None:
        pin_malloc_thresholds()
        self.options = options
        self.clock = clock or MonotonicClock()
        self.store = ConfigStore(options.config_dir)
        self._empty_snapshot = build_snapshot(())
        self.state_dir = ensure_state_dir(options.state_dir)
        self._lock_fd = _lock_state_dir(self.state_dir)
        self.registry, extra = load_registry(self.state_dir)
        try:
            self.identities: CertificateManager = create_manager(
                state_dir=self.state_dir, ca_url=options.ca_url, credential_dir=options.node_credential,
                trust_domain=options.trust_domain)
        except CAError as exc:
            raise AgentSetupError(f"identity: {exc}") from None
        for spec in self.registry:
            self.identities.add_workload(self._spiffe(spec))
        self.telemetry = MeshTelemetry()
        self._access_file = None
        self.plane = DataPlane(self.snapshot, self.telemetry, TunnelTls(self.identities), options.trust_domain,
                               self._local_identity, access_log=self._open_access_log(options.access_log))
        # Kernel capture feeds the proxy's per-workload listeners; `none` has neither.
        self.capture = capture if capture.mode == "none" else DataPlaneCapture(capture, self.plane)
        applied = applied_from_state(extra, self.state_dir)
        previous_mode = extra.get("capture")
        if previous_mode and previous_mode != self.capture.mode:
            applied = _switch_capture_mode(previous_mode, self.capture.mode, applied, extra.get("bpf_pin_dir"))
        self.reconciler = Reconciler(lambda: list(self.registry), self.capture, self.clock, RetrySet(),
                                     resync_interval=options.resync_interval, applied=applied)
        self._saved_applied = applied
        self.readiness = Readiness(("state", "config", "identities", "listeners"))
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._trim_timer: asyncio.TimerHandle | None = None
        self.trims = 0  # malloc trims done (admin/tests)
        self._announced = False
        self.started_at = time.time()
        self.socket_path = self.state_dir / SOCKET_NAME
        self.enrollment = EnrollmentServer(self.socket_path, self.handle_request)
        self.faces = [
            HttpFace("admin", admin_routes(self), *options.admin),
            HttpFace("metrics", metrics_routes(self), *options.metrics),
            HttpFace("readiness", readiness_routes(self), *options.readiness),
        ]
        self.metrics_registry = CollectorRegistry(auto_describe=True)
        self._m_enrolled = Gauge("nodeagent_workloads_enrolled", "Workloads enrolled on this node",
                                 registry=self.metrics_registry)
        self._m_pending = Gauge("nodeagent_workloads_capture_pending",
                                "Enrolled workloads whose capture is not applied (in the retry set)",
                                registry=self.metrics_registry)
        self._m_ready = Gauge("nodeagent_ready", "1 once the agent is ready", registry=self.metrics_registry)
        self._m_config = Gauge("nodeagent_config_version", "Version of the configuration snapshot in use",
                               registry=self.metrics_registry)
        self.metrics_registry.register(IstioCollector(self.telemetry.export))
        self._save()  # the state file exists from the first start (uninstall recognises the dir by it)

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        await self.enrollment.start()
        self._condition_met("state", f"{len(self.registry)} workload(s) re-adopted from {self.state_dir}")
        for face in self.faces:
            await face.start()
        self._load_config()
        self._tasks.append(asyncio.create_task(self.store.watch(self._config_changed, stop=self._stop),
                                               name="config-watch"))
        await self.plane.start()
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(None, self._reconcile, self.reconciler.step)
        attached = len(self.plane.attached)
        self._condition_met("listeners", f"proxy runtime up; capture {self.capture.mode}; "
                            + (f"listeners for {attached} workload(s)" if self.capture.mode != "none"
                               else "no transparent listeners (explicit proxy only)"))
        self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="reconcile"))
        self._tasks.append(asyncio.create_task(self.identities.run(self._stop), name="identities"))
        self._tasks.append(asyncio.create_task(self._await_identities(), name="identities-ready"))
        self._trim_later()
        interval = sdnotify.watchdog_interval()
        if interval is not None:
            self._tasks.append(asyncio.create_task(self._watchdog(interval), name="watchdog"))
        log.info("agent on node %s started: state %s, capture %s, admin %s:%d, readiness %s:%d, metrics %s:%d",
                 self.options.node, self.state_dir, self.capture.mode,
                 self.faces[0].host, self.faces[0].port, self.faces[2].host, self.faces[2].port,
                 self.faces[1].host, self.faces[1].port)

    def _open_access_log(self, where: str | None) -> AccessLog | None:
        """The proxy's JSON access log (one line per request or TCP connection): stdout
        for ``-``, else appended to the file (created 0640), line by line."""
        if where is None:
            return None
        if where == "-":
            return AccessLog(sys.stdout)
        try:
            fd = os.open(where, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise AgentSetupError(f"--access-log {where}: cannot open it for appending: "
                                  f"{exc.strerror or exc}") from None
        self._access_file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
        return AccessLog(self._access_file)

    def snapshot(self) -> ConfigSnapshot:
        """The config snapshot in use: the last good one (empty until one loads)."""
        return self.store.snapshot or self._empty_snapshot

    def _load_config(self) -> None:
        try:
            snapshot = self.store.load()
        except ConfigError as exc:
            detail = "; ".join(str(e) for e in exc.errors[:5])
            log.error("configuration in %s refused (fix it; the agent reloads it when it changes):\n%s",
                      self.store.describe(), "\n".join(str(e) for e in exc.errors))
            self.readiness.set("config", False, f"{self.store.describe()}: {detail}")
            return
        for warning in self.store.last_warnings:
            log.warning("%s", warning)
        self._config_changed(snapshot)

    def _config_changed(self, snapshot: ConfigSnapshot) -> None:
        self._m_config.set(snapshot.version)
        self._condition_met("config", f"version {snapshot.version}: {len(snapshot.resources)} object(s) "
                                      f"from {self.store.describe()}")

    def _condition_met(self, name: str, detail: str) -> None:
        self.readiness.set(name, True, detail)
        if self.readiness.ready and not self._announced:
            self._announced = True
            self._m_ready.set(1)
            sdnotify.notify(f"READY=1\nSTATUS=serving {len(self.registry)} workload(s)\nMAINPID={os.getpid()}")
            log.info("ready: %s", ", ".join(f"{n}: {c['detail']}" for n, c in self.readiness.view().items()))

    async def _await_identities(self) -> None:
        """Ready for identities once the trust bundle is in and every re-adopted
        workload holds a certificate (a startup gate: later enrollments show in /healthz)."""
        wanted = {self._spiffe(spec) for spec in self.registry}
        while True:
            missing = []
            try:
                self.identities.trust_bundle
            except IdentityError as exc:
                missing.append(str(exc))
            for identity in wanted:
                try:
                    self.identities.certificate(identity)
                except IdentityError as exc:
                    missing.append(str(exc))
            if not missing:
                self._condition_met("identities", f"trust bundle and {len(wanted)} certificate(s) issued")
                return
            self.readiness.set("identities", False, "; ".join(missing))
            await asyncio.sleep(0.05)

    async def _watchdog(self, interval: float) -> None:
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def run(self) -> None:
        """Start, serve until ``stop()``, then shut down."""
        try:
            await self.start()
            await self._stop.wait()
        finally:
            await self.close()

    def stop(self) -> None:
        self._stop.set()

    def _trim_later(self) -> None:
        """Trim the C heaps (trim_malloc) once TRIM_AFTER seconds pass without another call: after
        start-up, and after a burst of enrollments rather than after each of them. The trim runs
        in an executor thread, not on the event loop the proxy uses."""
        if MALLOC_TRIM is None or self._stop.is_set():
            return
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        self._trim_timer = asyncio.get_running_loop().call_later(TRIM_AFTER, self._trim)

    def _trim(self) -> None:
        self._trim_timer = None
        self.trims += 1
        asyncio.get_running_loop().run_in_executor(None, trim_malloc)

    async def close(self) -> None:
        sdnotify.notify("STOPPING=1")
        if self._trim_timer is not None:
            self._trim_timer.cancel()
            self._trim_timer = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.enrollment.close()
        await self.plane.close()
        backend = getattr(self.capture, "inner", self.capture)
        if hasattr(backend, "close"):
            backend.close()
        for face in self.faces:
            await face.close()
        if self._access_file is not None:
            self._access_file.close()
            self._access_file = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    async def _reconcile_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()  # before the step: a wake-up during it is not lost
            async with self._lock:
                wake_at = await loop.run_in_executor(None, self._reconcile, self.reconciler.step)
            self._update_gauges()
            delay = max(0.0, wake_at - self.clock.now())
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancel that races with its timeout, and this loop then never ends
            # (seen as an agent that ignored SIGTERM, about 1 stop in 5 under load).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    # -- enrollment ------------------------------------------------------

    async def handle_request(self, request: protocol.Request) -> dict[str, Any]:
        if request.op == "list":
            return protocol.ok(workloads=self.workloads_view()["enrolled"])
        if request.op == "enroll":
            return await self.enroll(request.spec, wait=request.wait)
        if request.workload is not None:
            spec = self.registry.find(*request.workload)
            if spec is None:
                return protocol.ok(result=Outcome.ABSENT.value)
            return await self.unenroll(*spec.key)
        return await self.unenroll(*request.key)

    async def enroll(self, spec: WorkloadSpec, wait: bool = False) -> dict[str, Any]:
        """Enroll (or update) a workload. Its netns/cgroup must exist unless ``wait``
        (the caller expects it to appear: it is then captured when it does)."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        if not wait:
            problem = target_problem(spec)
            if problem:
                held = self.registry.get(*spec.key)
                log.info("enroll %s refused: %s", spec.ref, problem)
                return protocol.error(
                    f"{problem}: {spec.namespace}/{spec.name} "
                    + ("stays enrolled from before (unenroll it if it is gone for good)" if held is not None
                       else "not enrolled, no identity issued")
                    + f". Check the {'name (`ip netns list`)' if spec.kind == 'netns' else 'path (systemctl status)'}"
                      ", or pass --wait to enroll it ahead: it is captured when it appears")
        async with self._lock:
            try:
                change = self.registry.enroll(spec)
            except EnrollConflict as exc:
                return protocol.error(str(exc))
            if change.outcome is not Outcome.UNCHANGED:
                error = await self._persist(change)
                if error:
                    return protocol.error(error)
            persisted = time.perf_counter()
            self._track_identities(change)
            status = self.reconciler.status_of(spec.key)
            if change.outcome is not Outcome.UNCHANGED or status.state == "pending":
                status = await loop.run_in_executor(None, self._reconcile, self.reconciler.sync_one, spec.key)
            captured = time.perf_counter()
        self._update_gauges()
        self._trim_later()
        self._wake.set()  # a failure scheduled a retry: let the loop pick the new wake time
        # The certificate is being issued meanwhile (the manager woke on add_workload):
        # wait for it, bounded, so the pod's first connection already has its identity.
        cert_error = await self._await_certificate(spec)
        log.info("enroll %s: %s, capture %s%s, certificate %s", spec.ref, change.outcome.value, status.state,
                 f" ({status.error})" if status.error else "", "pending" if cert_error else "issued")
        reply = protocol.ok(result=change.outcome.value, workload=spec.to_json(),
                            identity=spec.identity(self.options.trust_domain), capture=status.state,
                            certificate="pending" if cert_error else "issued",
                            elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
                            registry_ms=round((persisted - started) * 1000, 3),
                            capture_ms=round((captured - persisted) * 1000, 3))
        if status.error:
            reply["capture_error"] = status.error
        if cert_error:
            reply["certificate_error"] = cert_error
        return reply

    async def _await_certificate(self, spec: WorkloadSpec) -> str:
        """'' once the workload's certificate exists, else why not after ``cert_wait`` seconds."""
        identity = self._spiffe(spec)
        deadline = time.monotonic() + self.options.cert_wait
        while True:
            try:
                self.identities.certificate(identity)
                return ""
            except IdentityError as exc:
                if time.monotonic() >= deadline:
                    return str(exc)
            await asyncio.sleep(0.002)

    async def unenroll(self, kind: str, target: str) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        async with self._lock:
            change = self.registry.unenroll(kind, target)
            if change.outcome is Outcome.REMOVED:
                error = await self._persist(change)
                if error:
                    return protocol.error(error)
            self._track_identities(change)
            status = await loop.run_in_executor(None, self._reconcile, self.reconciler.sync_one, (kind, target))
        self._update_gauges()
        self._trim_later()
        log.info("unenroll %s %s: %s", kind, target, change.outcome.value)
        reply = protocol.ok(result=change.outcome.value)
        if status.error:
            reply["capture_error"] = status.error
        return reply

    def _local_identity(self, address: str) -> SpiffeId | None:
        """The identity of the workload enrolled here at ``address`` (the tunnel's MeshDirectory)."""
        spec = self.registry.by_ip(address)
        return self._spiffe(spec) if spec is not None else None

    def _spiffe(self, spec: WorkloadSpec) -> SpiffeId:
        return SpiffeId.workload(spec.namespace, spec.service_account, self.options.trust_domain)

    def _track_identities(self, change: Change) -> None:
        """The certificate manager holds exactly the identities of enrolled workloads."""
        if change.spec is not None:
            self.identities.add_workload(self._spiffe(change.spec))
        if change.previous is not None:
            old = self._spiffe(change.previous)
            if all(self._spiffe(s) != old for s in self.registry):
                self.identities.remove_workload(old)
                self.plane.tls.forget(old)

    async def _persist(self, change: Change) -> str:
        """Write the registry; on failure undo the change in memory and say why."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._save, change.spec)
        except OSError as exc:
            self.registry.undo(change)
            return f"cannot write the registry in {self.state_dir}: {exc.strerror or exc}; nothing changed"
        return ""

    def _save(self, about_to_apply: WorkloadSpec | None = None) -> None:
        applied = self.reconciler.applied_specs()
        extra: dict[str, Any] = {"node": self.options.node, "capture": self.capture.mode}
        pin_dir = getattr(getattr(self.capture, "inner", self.capture), "pin_dir", None)
        if pin_dir:
            extra["bpf_pin_dir"] = pin_dir
        if about_to_apply is not None and about_to_apply.key not in self.reconciler.applied:
            # Recorded before the rules go in (an intent): after a crash, whatever
            # may have been applied is found and removed or re-adopted; removal
            # is idempotent, so a superset is safe. Saves a second write per enroll.
            applied = sorted([*applied, about_to_apply], key=lambda s: s.key)
        save_registry(self.state_dir, self.registry, {**extra, "applied": [s.to_json() for s in applied]})
        self._saved_applied = applied

    def _reconcile(self, fn, *args):
        """Run a reconciler call (in a worker thread: capture may run nft) and
        persist the applied set when it changed."""
        result = fn(*args)
        if self.reconciler.applied_specs() != self._saved_applied:
            try:
                self._save()
            except OSError as exc:
                log.warning("cannot persist the applied capture set in %s: %s", self.state_dir, exc)
        return result

    def _update_gauges(self) -> None:
        self._m_enrolled.set(len(self.registry))
        self._m_pending.set(len(self.reconciler.retry))

    # -- views (admin API) -------------------------------------------------

    def _snapshot_workloads(self) -> tuple:
        return self.snapshot().workloads

    def workloads_view(self) -> dict[str, Any]:
        td = self.options.trust_domain
        enrolled = []
        for spec in self.registry:
            status = self.reconciler.status_of(spec.key)
            item = {**spec.to_json(), "identity": spec.identity(td), "capture": status.state}
            if status.error:
                item["capture_error"] = status.error
            try:
                self.identities.certificate(self._spiffe(spec))
                item["certificate"] = "valid"
            except IdentityError as exc:
                item["certificate"] = "missing"
                item["certificate_error"] = str(exc)
            enrolled.append(item)
        retry = []
        now = self.clock.now()
        for (kind, target), entry in self.reconciler.retry.items():
            retry.append({"kind": kind, "target": target, "attempts": entry.attempts,
                          "last_error": entry.last_error, "retry_in_s": round(max(0.0, entry.next_at - now), 3)})
        merged = [
            {"name": w.name, "namespace": w.namespace, "service_account": w.service_account,
             "identity": w.identity(td), "labels": dict(w.labels), "addresses": list(w.addresses),
             "ports": dict(w.ports), "sources": list(w.sources)}
            for w in merge_workloads(self._snapshot_workloads(), self.registry)
        ]
        return {"node": self.options.node, "capture_mode": self.capture.mode, "enrolled": enrolled,
                "retry": retry, "workloads": merged, "listeners": self.plane.listeners_view()}

    def config_dump_view(self) -> dict[str, Any]:
        snap = self.snapshot()
        resources = [
            {"kind": r.kind, "apiVersion": r.api_version, "namespace": r.namespace, "name": r.name,
             "source": f"{r.source.file}:{r.source.line}",
             "spec": to_jsonable(r.raw.get("spec")) if r.raw else to_jsonable(r.spec)}
            for r in snap.resources
        ]
        services = [
            {"host": svc.host, "namespace": svc.namespace, "addresses": list(svc.addresses),
             "ports": [{"number": p.number, "name": p.name, "protocol": p.protocol, "target_port": p.target_port}
                       for p in svc.ports],
             "resolution": svc.resolution, "location": svc.location, "endpoints": len(svc.endpoints)}
            for _, svc in sorted(snap.services.items())
        ]
        return {"version": snap.version, "source": self.store.describe(),
                "loaded": self.store.snapshot is not None,
                "rejected_change": [str(e) for e in self.store.last_errors],
                "resources": resources, "services": services}

    def certs_view(self) -> dict[str, Any]:
        now = time.time()
        identities = []
        for identity in sorted(self.identities.workloads, key=lambda i: i.uri):
            item: dict[str, Any] = {"identity": identity.uri}
            try:
                cert = self.identities.certificate(identity)
            except IdentityError as exc:
                item.update(state="missing", error=str(exc))
            else:
                item.update(state="valid", serial=x509certs.serial_hex(cert.serial),
                            not_before=_iso(cert.not_before), not_after=_iso(cert.not_after),
                            renew_at=_iso(cert.renew_at), expires_in_s=round(cert.not_after - now),
                            fingerprint=x509certs.fingerprint(cert.certificate), chain_length=len(cert.chain))
            identities.append(item)
        try:
            roots = [{"subject": r.subject.rfc4514_string(), "fingerprint": x509certs.fingerprint(r),
                      "not_after": _iso(x509certs.not_after(r))} for r in self.identities.trust_bundle.roots]
        except IdentityError as exc:
            roots = [{"error": str(exc)}]
        health = self.identities.health()
        return {"trust_domain": self.options.trust_domain, "ca": self.options.ca_url or "embedded",
                "status": health.status, "reason": health.reason, "certificates": identities,
                "trust_bundle": roots}

    def _endpoint_identity(self, address: str, endpoint) -> str | None:
        """The enrolled identity when the address is an enrolled workload's, else the WorkloadEntry's."""
        spec = self.registry.by_ip(address)
        if spec is not None:
            return spec.identity(self.options.trust_domain)
        workload = getattr(endpoint, "workload", None) if endpoint is not None else None
        sa = (workload.service_account if workload is not None else None) or getattr(endpoint, "service_account", None)
        namespace = workload.namespace if workload is not None else None
        if sa and namespace:
            return spiffe_id(self.options.trust_domain, namespace, sa)
        return None

    def endpoints_view(self) -> dict[str, Any]:
        snap = self.snapshot()
        services = []
        for host, svc in sorted(snap.services.items()):
            services.append({"host": host, "endpoints": [
                {"address": e.address, "labels": dict(e.labels), "ports": dict(e.ports), "weight": e.weight,
                 "workload": f"{e.workload.namespace}/{e.workload.name}" if e.workload else None,
                 "identity": self._endpoint_identity(e.address, e)}
                for e in svc.endpoints]})
        clusters = []
        runtime = self.plane.runtime
        if runtime is not None:
            now = runtime.loop.time()
            for state in list(runtime.clusters.values()):
                outlier = state.outlier.snapshot_state(now) if state.outlier is not None else {}
                clusters.append({
                    "cluster": str(state.key), "source_namespace": state.source_namespace,
                    "outlier_detection": state.outlier is not None,
                    "endpoints": [
                        {"id": cep.id, "address": cep.address, "port": cep.port, "weight": cep.weight,
                         "identity": self._endpoint_identity(cep.address, cep.endpoint),
                         "ejected": cep.id in state.ejected, "outlier": outlier.get(cep.id)}
                        for cep in state.endpoints],
                })
            clusters.sort(key=lambda c: (c["cluster"], c["source_namespace"]))
        return {"config_version": snap.version, "services": services, "clusters": clusters}

    def health_view(self) -> dict[str, Any]:
        health = self.reconciler.health()
        reasons = list(health.reasons)
        backend = getattr(self.capture, "inner", self.capture)
        reasons.extend(f"capture: {p}" for p in getattr(backend, "problems", lambda: [])())
        identity_health = self.identities.health()
        if not identity_health.ok:
            reasons.append(f"identities: {identity_health.reason}")
        if self.store.last_errors:
            serving = f"serving version {self.store.snapshot.version}" if self.store.snapshot else "no config loaded"
            reasons.append(f"config: the last change was refused ({len(self.store.last_errors)} error(s), "
                           f"see /config_dump); {serving}")
        return {"status": "OK" if not reasons else "Degraded", "reasons": reasons,
                "capture": health.status, "identities": identity_health.status, "ready": self.readiness.ready,
                "node": self.options.node, "uptime_s": round(time.time() - self.started_at, 3)}

    def readiness_view(self) -> tuple[bool, dict[str, Any]]:
        ready = self.readiness.ready
        return ready, {"ready": ready, "conditions": self.readiness.view()}

    def metrics_text(self) -> tuple[bytes, str]:
        return generate_latest(self.metrics_registry), CONTENT_TYPE_LATEST


CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3): the namespace type of an nsfs file (Linux 4.11+)


def target_problem(spec: WorkloadSpec) -> str:
    """'' when the workload's network namespace / cgroup exists, else what is wrong, naming the path."""
    if spec.kind == "netns":
        path = netns_path(spec.target)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return f"network namespace {path} does not exist"
        except OSError as exc:
            return f"cannot open network namespace {path}: {exc.strerror or exc}"
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            kind = None  # not an nsfs file (ENOTTY)
        finally:
            os.close(fd)
        if kind != CLONE_NEWNET:
            return f"{path} is not a network namespace (a leftover file, or /var/run/netns not mounted here)"
        return ""
    from redirect import CaptureError as RedirectError, cgroup2_mount

    try:
        mount = cgroup2_mount()
    except (RedirectError, OSError) as exc:
        return f"cgroup {spec.target}: {exc}"
    path = mount.rstrip("/") + spec.target
    if not os.path.isdir(path):
        return f"cgroup {spec.target} does not exist (no directory {path})"
    return ""


def _lock_state_dir(state_dir: Path) -> int:
    """One agent per state dir: an exclusive flock on ``agent.lock``, held for the agent's life."""
    import fcntl

    path = state_dir / "agent.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AgentSetupError(f"another agent is already running with --state-dir {state_dir} "
                              f"(it holds {path}); stop it or use another --state-dir") from None
    return fd


def _switch_capture_mode(previous: str, current: str, applied: list[WorkloadSpec],
                         pin_dir: str | None) -> list[WorkloadSpec]:
    """--capture changed since the last run: remove what the previous backend applied
    (the new one re-applies every enrolled workload its own way). Returns what is
    still applied by the old backend (the removals that failed), for the next try."""
    from nodeagent.agent.capture import CaptureError, capture_for_uninstall

    old = capture_for_uninstall(previous, pin_dir)
    if old is None:
        return applied
    log.info("capture mode changed from %s to %s: removing the %s capture of %d workload(s)",
             previous, current, previous, len(applied))
    if hasattr(old, "uninstall"):  # eBPF: detach the programs and drop the pins at once
        try:
            old.uninstall()
            return []
        except CaptureError as exc:
            log.warning("removing the previous %s capture failed: %s", previous, exc)
            return applied
    left = []
    for spec in applied:
        try:
            old.remove(spec)
        except CaptureError as exc:
            log.warning("removing the previous %s capture of %s failed: %s", previous, spec.ref, exc)
            left.append(spec)
    return left


def applied_from_state(extra: dict[str, Any], state_dir: Path) -> list[WorkloadSpec]:
    """The capture the previous run had applied (``applied`` in the state file)."""
    raw = extra.get("applied", [])
    if not isinstance(raw, list):
        raise StateFileError(f"{state_dir}/workloads.json: 'applied' must be a list")
    specs = []
    for index, item in enumerate(raw):
        try:
            specs.append(spec_from_json(item))
        except SpecError as exc:
            raise StateFileError(f"{state_dir}/workloads.json: applied[{index}]: {exc}") from None
    return specs


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
