"""Directory configuration store: the YAML files of a directory -> a validated snapshot.

Read side (the daemon):
- ``ConfigStore(directory).load()`` reads every ``*.yaml|*.yml|*.json`` file of
  the directory (not recursive, hidden files skipped), validates the whole set
  and installs a new immutable ``ConfigSnapshot`` as ``store.snapshot``;
- ``await store.watch(callback)`` polls the directory's signature
  (name, mtime_ns, size of each file) every ``poll_interval`` seconds; a change
  that fails validation is refused (errors logged, kept in ``last_errors``) and
  the previous snapshot keeps serving; a good change installs a new snapshot
  and calls ``callback(snapshot)``;
- when no directory was chosen (no ``--config-dir``, no ``NODEAGENT_CONFIG_DIR``)
  and ``/etc/nodeagent/config.d`` does not exist, the embedded default
  (``nodeagent/defaults/``, the shop example) is served read-only.

Write side (the CLI): ``apply``, ``create`` and ``delete`` compute the new
directory contents in memory, validate the whole resulting set, and only then
write: each object lives in ``<kind>.<namespace>.<name>.yaml`` (lower-case
kind), written atomically (temp file + rename). An object found in another
(hand-written, possibly multi-object) file is cut out of that file, keeping
the file's other documents byte for byte.

One change touches several files, and the set appears to the watcher at once:
a writer holds an exclusive ``flock`` on the directory itself (no lock file to
go stale: the kernel drops it when the writer exits) from reading the current
files to the last rename; a poll takes the shared lock without waiting, and
when a writer holds it, skips that poll (the signature it keeps is the old
one, so the next poll retries). Writers also queue on the lock, so two
concurrent ``apply`` runs cannot lose each other's change. Within a write,
new files come first and cuts/removals last: a writer killed halfway leaves
an object defined twice (refused, with both places named) rather than
silently missing.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

import yaml

from policy import model as m
from policy.errors import ConfigError, Diagnostic
from nodeagent.configfiles import exists, load_paths, os_reason, path_problem, scan_dir
from policy.loader import YAML_LOADER, LoadResult, load_bytes, load_text
from policy.snapshot import ConfigSnapshot, build_snapshot

__all__ = [
    "ConfigStore", "DEFAULT_CONFIG_DIR", "ENV_CONFIG_DIR", "EMBEDDED_DIR", "resolve_config_dir",
    "Change", "StoreError", "StoreBusy", "object_filename",
]

log = logging.getLogger("nodeagent.store")

DEFAULT_CONFIG_DIR = Path("/etc/nodeagent/config.d")
ENV_CONFIG_DIR = "NODEAGENT_CONFIG_DIR"
EMBEDDED_DIR = Path(__file__).resolve().parent / "defaults"


class StoreError(Exception):
    """A store operation a user can act on (not found, already exists, read-only, ...)."""


class StoreBusy(StoreError):
    """A writer holds the directory's lock (a poll skips; a blocking read waited too long)."""


LOCK_WAIT = 10.0    # seconds a blocking reader waits for a writer


def _open_dir(directory: Path) -> int:
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY)


def _flock(fd: int, mode: int, block: bool, what: Path) -> None:
    """flock with a bounded wait (``block``) or none; StoreBusy when it is not granted."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if not block or time.monotonic() >= deadline:
                raise StoreBusy(f"{what} is locked by another nodeagent command writing to it"
                                + (f" (waited {LOCK_WAIT:g}s); try again" if block else "")) from None
            time.sleep(0.005)


def resolve_config_dir(explicit: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """(directory, explicitly_chosen): ``--config-dir``, else $NODEAGENT_CONFIG_DIR, else the default."""
    if explicit:
        return Path(explicit), True
    env = os.environ.get(ENV_CONFIG_DIR)
    if env:
        return Path(env), True
    return DEFAULT_CONFIG_DIR, False


def object_filename(kind: str, namespace: str, name: str) -> str:
    return f"{kind.lower()}.{namespace}.{name}.yaml"


@dataclass(frozen=True)
class Change:
    """One object's outcome of apply/create/delete: created | configured | unchanged | deleted."""
    kind: str
    api_version: str
    namespace: str
    name: str
    action: str
    file: str

    @property
    def display(self) -> str:
        group = self.api_version.split("/")[0] if "/" in self.api_version else ""
        return f"{self.kind.lower()}.{group}/{self.name}" if group else f"{self.kind.lower()}/{self.name}"


# -- document spans (to cut one object out of a multi-object file) -------------


def _node_key(node) -> tuple[str, str | None, str] | None:
    """(kind, namespace or None, name) of an object's node, else None."""
    if not isinstance(node, yaml.MappingNode):
        return None
    fields = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}
    kind = fields.get("kind")
    meta = fields.get("metadata")
    name = ns = None
    if isinstance(meta, yaml.MappingNode):
        for k, v in meta.value:
            if isinstance(k, yaml.ScalarNode) and isinstance(v, yaml.ScalarNode):
                if k.value == "name" and name is None:
                    name = v.value
                elif k.value == "namespace" and ns is None:
                    ns = v.value
    if isinstance(kind, yaml.ScalarNode) and name:
        return (kind.value, ns, name)
    return None


def _is_list(node) -> bool:
    if not isinstance(node, yaml.MappingNode):
        return False
    fields = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}
    return all(isinstance(fields.get(f), yaml.ScalarNode) for f in ("apiVersion", "kind")) \
        and fields["apiVersion"].value == "v1" and fields["kind"].value == "List"


def _list_keys(node) -> set[tuple[str, str | None, str]]:
    """The keys of the objects a ``kind: List`` node holds, nested Lists included."""
    keys = set()
    pending = [node]
    while pending:
        n = pending.pop()
        items = next((v for k, v in n.value if isinstance(k, yaml.ScalarNode) and k.value == "items"), None)
        for item in (items.value if isinstance(items, yaml.SequenceNode) else ()):
            if _is_list(item):
                pending.append(item)
            else:
                key = _node_key(item)
                if key is not None:
                    keys.add(key)
    return keys


def _doc_spans(text: str) -> list[tuple[tuple[str, str, str] | None, int, int, Any]]:
    """For each YAML document: (key or None, start, end, node) character offsets, where the
    span runs from the end of the previous document (so it carries the comments and
    the ``---`` before it) to the end of this one."""
    spans = []
    prev_end = 0
    try:
        nodes = list(yaml.compose_all(text, Loader=YAML_LOADER))
    except yaml.YAMLError:
        return []
    for node in nodes:
        if node is None:
            continue
        end = node.end_mark.index
        spans.append((_node_key(node), prev_end, end, node))
        prev_end = end
    return spans


def _without(lst: dict, remove: set, default_ns: str) -> dict:
    """A constructed ``kind: List`` without the objects in ``remove`` (nested Lists too; a
    nested List left empty goes as well)."""
    kept = []
    for item in lst.get("items") or []:
        if isinstance(item, dict) and item.get("apiVersion") == "v1" and item.get("kind") == "List":
            inner = _without(item, remove, default_ns)
            if inner.get("items"):
                kept.append(inner)
            continue
        meta = item.get("metadata") if isinstance(item, dict) else None
        if isinstance(meta, dict) and (item.get("kind"), meta.get("namespace") or default_ns,
                                       meta.get("name")) in remove:
            continue
        kept.append(item)
    return {**lst, "items": kept}


def _cut_documents(text: str, remove: set[tuple[str, str, str]], default_ns: str = "default") -> str:
    """``text`` without the objects whose (kind, namespace, name) is in ``remove``: their
    documents are cut out, the rest of the text is kept byte for byte. An object inside a
    ``kind: List`` is taken out of the List, which is written again (that document's
    comments are lost; an emptied List goes)."""
    def full(key):
        return (key[0], key[1] or default_ns, key[2])

    out = []
    pos = 0
    for key, start, end, node in _doc_spans(text):
        if key is not None and full(key) in remove:
            out.append(text[pos:start])
            pos = end
        elif _is_list(node) and any(full(k) in remove for k in _list_keys(node)):
            try:
                rest = _without(yaml.load(text[node.start_mark.index:end], Loader=YAML_LOADER) or {},
                                remove, default_ns)
            except RecursionError:
                raise StoreError("cannot take an object out of Lists nested this deep; "
                                 "edit the file by hand") from None
            out.append(text[pos:start])
            if rest.get("items"):
                out.append(text[start:node.start_mark.index])
                dumped = yaml.safe_dump(rest, sort_keys=False, default_flow_style=False)
                out.append(dumped if text[end - 1:end] == "\n" else dumped.rstrip("\n"))
            pos = end
    out.append(text[pos:])
    return "".join(out)


def _has_documents(text: str) -> bool:
    try:
        return any(d is not None for d in yaml.safe_load_all(text))
    except yaml.YAMLError:
        return True


def _normalized_raw(res: m.Resource) -> dict:
    raw = _plain(res.raw)
    raw.setdefault("metadata", {})
    if isinstance(raw["metadata"], dict):
        raw["metadata"]["namespace"] = res.namespace
    raw.pop("status", None)
    return raw


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict) or hasattr(obj, "items") and not isinstance(obj, (str, bytes)):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def dump_object(res: m.Resource) -> str:
    return yaml.safe_dump(_normalized_raw(res), sort_keys=False, default_flow_style=False)


# -- the store -----------------------------------------------------------------


class ConfigStore:
    """A directory of YAML files, validated as one set, compiled into snapshots."""

    def __init__(self, directory: str | os.PathLike | None = None, *, poll_interval: float = 1.0,
                 domain_suffix: str = "svc.cluster.local", root_namespace: str = "istio-system",
                 allow_embedded: bool = True):
        path, explicit = resolve_config_dir(directory)
        self.explicit = explicit
        self.embedded = False
        if not explicit and allow_embedded and not exists(path):
            path = EMBEDDED_DIR
            self.embedded = True
        self.directory = path
        self.poll_interval = poll_interval
        self.domain_suffix = domain_suffix
        self.root_namespace = root_namespace
        self.snapshot: ConfigSnapshot | None = None
        self.last_errors: tuple[Diagnostic, ...] = ()
        self.last_warnings: tuple[Diagnostic, ...] = ()
        self._version = 0
        self._signature: tuple | None = None
        self.polls = 0      # completed watcher polls (``poll()``): tests and probes wait on it

    @property
    def readonly(self) -> bool:
        return self.embedded

    def describe(self) -> str:
        if self.embedded:
            return f"embedded default configuration {self.directory} (read-only; " \
                   f"create {DEFAULT_CONFIG_DIR} or pass --config-dir to use your own)"
        return str(self.directory)

    # -- read side -------------------------------------------------------

    def signature(self) -> tuple:
        """(name, mtime_ns, size) of every config file; () when the directory is missing. An
        unreadable directory or entry has its problem in the signature, so the poll that sees
        it reads (and refuses) once, and the one after it is fixed reads again. Never raises."""
        try:
            entries = scan_dir(self.directory)
        except FileNotFoundError:
            return ()
        except NotADirectoryError:
            return (("<not a directory>", 0, 0),)
        except OSError as exc:
            return (("<unreadable>", exc.errno or 0, 0),)
        return tuple((e.name, e.stat.st_mtime_ns, e.stat.st_size) if e.stat is not None
                     else (e.name, e.problem, 0) for e in entries)

    def _read_consistent(self, block: bool = True) -> tuple[tuple | None, LoadResult]:
        """(signature, result) of the directory read under its shared lock, so a writer's
        change is seen whole or not at all. StoreBusy when a writer holds the lock and
        ``block`` is False; an error result when it held it longer than LOCK_WAIT."""
        try:
            fd = _open_dir(self.directory)
        except FileNotFoundError:
            return (), LoadResult(errors=[Diagnostic(str(self.directory), None,
                                                     "config directory does not exist")])
        except NotADirectoryError:
            return self.signature(), LoadResult(errors=[Diagnostic(str(self.directory), None,
                                                                   "is not a directory")])
        except OSError as exc:      # EACCES, ELOOP, ...: refused like an invalid file
            return self.signature(), LoadResult(errors=[Diagnostic(str(self.directory), None,
                                                                   f"cannot read: {os_reason(exc)}")])
        try:
            try:
                _flock(fd, fcntl.LOCK_SH, block, self.directory)
            except StoreBusy as exc:
                if not block:
                    raise
                # waited too long: an error like any other (callers handle ConfigError), and no
                # signature, so the watcher reads the directory again at its next poll
                return None, LoadResult(errors=[Diagnostic(str(self.directory), None, str(exc))])
            return self.signature(), load_paths([self.directory])
        finally:
            os.close(fd)

    def read(self) -> LoadResult:
        """Load and validate the directory's files as one set (no state change)."""
        return self._read_consistent(block=True)[1]

    def load(self, block: bool = True) -> ConfigSnapshot:
        """Validate the directory and install a new snapshot; on errors raise ``ConfigError``
        (the previous snapshot, if any, stays in ``self.snapshot``). With ``block=False``,
        raise StoreBusy at once, changing nothing, while a writer is at work."""
        sig, result = self._read_consistent(block)
        self._signature = sig
        self.last_warnings = tuple(result.warnings)
        if result.errors:
            self.last_errors = tuple(result.errors)
            raise ConfigError(result.errors, result.warnings)
        self.last_errors = ()
        self._version += 1
        snap = build_snapshot(_by_age(result.resources), self.domain_suffix, self.root_namespace,
                              version=self._version)
        self.snapshot = snap
        return snap

    def reload(self, block: bool = True) -> bool:
        """Like ``load`` but never raises: True when a new snapshot was installed. A refused
        change is logged with every error and the previous snapshot keeps serving."""
        try:
            snap = self.load(block)
        except StoreBusy as exc:
            log.debug("configuration not read this time: %s", exc)
            return False
        except ConfigError as exc:
            keep = f"keeping snapshot version {self.snapshot.version}" if self.snapshot else "no configuration loaded"
            log.error("configuration change in %s refused (%s):\n%s", self.directory, keep,
                      "\n".join(str(e) for e in exc.errors))
            return False
        for w in self.last_warnings:
            log.warning("%s", w)
        log.info("configuration version %d loaded from %s: %d objects", snap.version, self.describe(),
                 len(snap.resources))
        return True

    def poll(self) -> bool:
        """One watcher step: when the directory changed since the last load (or nothing was
        loaded yet), load it, unless a writer is at work (the next poll retries). True when a
        new snapshot was installed. Counts ``self.polls``."""
        try:
            if self.embedded and self.snapshot is not None:
                return False
            if not self.changed():
                return False
            return self.reload(block=False)
        finally:
            self.polls += 1

    def changed(self) -> bool:
        return self.signature() != self._signature

    async def watch(self, callback: Callable[[ConfigSnapshot], Awaitable[None] | None] | None = None,
                    stop: asyncio.Event | None = None) -> None:
        """Poll for changes until cancelled (or ``stop`` is set); install good changes and
        call ``callback(snapshot)`` after each one (also once for an initial load if none was done)."""
        if self.snapshot is None:
            if self.poll() and callback is not None:
                await _maybe_await(callback(self.snapshot))
        while stop is None or not stop.is_set():
            if stop is None:
                await asyncio.sleep(self.poll_interval)
            else:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancel racing with its timeout, and the watcher would never end.
                try:
                    async with asyncio.timeout(self.poll_interval):
                        await stop.wait()
                    break
                except TimeoutError:
                    pass
            if self.poll() and callback is not None:
                try:
                    await _maybe_await(callback(self.snapshot))
                except Exception:   # a consumer bug must not stop the watcher
                    log.exception("configuration callback failed")

    # -- write side ------------------------------------------------------

    def _require_writable(self) -> None:
        if self.embedded:
            raise StoreError(f"the embedded default configuration is read-only; pass --config-dir "
                             f"(or set {ENV_CONFIG_DIR}) or create {DEFAULT_CONFIG_DIR}")

    @contextlib.contextmanager
    def _write_lock(self):
        """The directory's exclusive lock, for a whole read-plan-write (see the module doc).
        A directory created only to be locked is removed again if nothing was written."""
        created = not exists(self.directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StoreError(f"{self.directory}: {path_problem(self.directory) or 'is not a directory'}") from None
        except OSError as exc:
            raise StoreError(f"{exc.filename or self.directory}: cannot create the directory: "
                             f"{os_reason(exc)}") from None
        try:
            fd = _open_dir(self.directory)
        except NotADirectoryError:
            raise StoreError(f"{self.directory}: is not a directory") from None
        except OSError as exc:
            raise StoreError(f"{self.directory}: cannot read: {os_reason(exc)}") from None
        try:
            _flock(fd, fcntl.LOCK_EX, True, self.directory)
            yield
        finally:
            os.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    self.directory.rmdir()      # only when still empty

    def _current_texts(self) -> dict[str, str]:
        """name -> text of every config file. A file or directory that cannot be read, or is
        not UTF-8, raises ConfigError naming it (a write must see the whole current set)."""
        texts: dict[str, str] = {}
        try:
            entries = scan_dir(self.directory)
        except (FileNotFoundError, NotADirectoryError):
            problem = path_problem(self.directory)
            if problem == "config directory does not exist":
                return texts        # a write creates it
            raise ConfigError([Diagnostic(str(self.directory), None, problem or "is not a directory")]) from None
        except OSError as exc:
            raise ConfigError([Diagnostic(str(self.directory), None, f"cannot read: {os_reason(exc)}")]) from None
        errors = [e.diagnostic() for e in entries if e.problem is not None]
        for e in entries:
            if e.problem is not None:
                continue
            try:
                with open(e.path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue            # removed under us by hand: it is not part of the set
            except OSError as exc:
                errors.append(Diagnostic(str(e.path), None, f"cannot read: {os_reason(exc)}"))
                continue
            try:
                texts[e.name] = data.decode("utf-8")
            except UnicodeDecodeError:
                errors.extend(load_bytes(data, str(e.path)).errors)     # names the line
        if errors:
            raise ConfigError(errors)
        return texts

    def _load_texts(self, texts: dict[str, str]) -> LoadResult:
        res = LoadResult()
        keys: dict = {}
        for name in sorted(texts):
            res.extend(load_text(texts[name], str(self.directory / name), known_keys=keys))
        return res

    def objects(self) -> list[m.Resource]:
        """Every object currently stored (the directory must be valid)."""
        res = self.read() if not self.embedded else self._load_texts(self._current_texts())
        if res.errors:
            raise ConfigError(res.errors, res.warnings)
        return res.resources

    def _plan(self, texts: dict[str, str], current: LoadResult, upserts: list[m.Resource],
              deletes: set[tuple[str, str, str]]) -> tuple[dict[str, str | None], list[Change], dict]:
        """New file contents (None = remove file) for upserts and deletes, the changes, and
        where each changed object must end up (key -> file name, None = gone)."""
        where: dict[tuple[str, str, str], str] = {}
        existing: dict[tuple[str, str, str], m.Resource] = {}
        for r in current.resources:
            fname = Path(r.source.file).name
            where[r.key] = fname
            existing[r.key] = r
        new_texts: dict[str, str | None] = {}
        cut: dict[str, set] = {}
        changes: list[Change] = []
        expect: dict[tuple[str, str, str], str | None] = {}
        for r in upserts:
            target = object_filename(r.kind, r.namespace, r.name)
            old = existing.get(r.key)
            if old is not None and _normalized_raw(old) == _normalized_raw(r):
                changes.append(Change(r.kind, r.api_version, r.namespace, r.name, "unchanged", where[r.key]))
                continue
            action = "configured" if old is not None else "created"
            if old is not None and where[r.key] != target:
                cut.setdefault(where[r.key], set()).add(r.key)
            new_texts[target] = dump_object(r)
            expect[r.key] = target
            changes.append(Change(r.kind, r.api_version, r.namespace, r.name, action, target))
        for key in deletes:
            old = existing[key]
            fname = where[key]
            cut.setdefault(fname, set()).add(key)
            expect[key] = None
            changes.append(Change(old.kind, old.api_version, old.namespace, old.name, "deleted", fname))
        for fname, keys in cut.items():
            base = new_texts.get(fname, texts.get(fname, ""))
            remaining = _cut_documents(base, keys)
            new_texts[fname] = remaining if _has_documents(remaining) else None
        return new_texts, changes, expect

    def _commit(self, texts: dict[str, str], new_texts: dict[str, str | None], expect: dict) -> None:
        # validate the whole resulting set before writing anything
        final = dict(texts)
        for fname, t in new_texts.items():
            if t is None:
                final.pop(fname, None)
            else:
                final[fname] = t
        result = self._load_texts(final)
        if result.errors:
            raise ConfigError(result.errors, result.warnings)
        # every object must be where the plan put it (a cut that could not be made must not
        # be reported as done)
        now = {r.key: r.source for r in result.resources}
        for key, fname in expect.items():
            src = now.get(key)
            if (Path(src.file).name if src else None) != fname:
                raise StoreError(f"cannot {'remove' if fname is None else 'move'} {key[0]} {key[1]}/{key[2]} "
                                 f"(defined at {src.file}:{src.line}): edit that file by hand; "
                                 f"nothing was changed")
        self.directory.mkdir(parents=True, exist_ok=True)
        # under the write lock the watcher sees none of this until the end; the order is for a
        # writer killed halfway: new files first, then edits (cuts), removals last, so an object
        # is at worst defined twice (refused, both places named), never silently gone
        order = sorted(new_texts, key=lambda f: (f in texts, new_texts[f] is None, f))
        for fname in order:
            t = new_texts[fname]
            path = self.directory / fname
            if t is None:
                _unlink(path)
            else:
                _atomic_write(path, t)

    def apply(self, resources: Iterable[m.Resource]) -> list[Change]:
        """Create or replace objects by (kind, namespace, name)."""
        self._require_writable()
        with self._write_lock():
            return self._apply(list(resources))

    def _apply(self, resources: list[m.Resource]) -> list[Change]:
        texts = self._current_texts()
        current = self._load_texts(texts)
        if current.errors:
            raise ConfigError(current.errors, current.warnings)
        new_texts, changes, expect = self._plan(texts, current, list(resources), set())
        if new_texts:
            self._commit(texts, new_texts, expect)
        return changes

    def create(self, resources: Iterable[m.Resource]) -> list[Change]:
        """Create objects; refuses (writing nothing) if any already exists."""
        self._require_writable()
        with self._write_lock():
            return self._create(list(resources))

    def _create(self, resources: list[m.Resource]) -> list[Change]:
        texts = self._current_texts()
        current = self._load_texts(texts)
        if current.errors:
            raise ConfigError(current.errors, current.warnings)
        have = {r.key: r for r in current.resources}
        clashes = [r for r in resources if r.key in have]
        if clashes:
            raise StoreError("\n".join(
                f'{_plural(r.kind)}.{r.api_version.split("/")[0]} "{r.name}" already exists in namespace '
                f"{r.namespace} ({have[r.key].source.file}:{have[r.key].source.line}); use apply to replace it"
                for r in clashes))
        new_texts, changes, expect = self._plan(texts, current, resources, set())
        if new_texts:
            self._commit(texts, new_texts, expect)
        return changes

    def delete(self, keys: Iterable[tuple[str, str, str]], ignore_not_found: bool = False) -> list[Change]:
        """Delete objects by (kind, namespace, name); all must exist unless ``ignore_not_found``."""
        self._require_writable()
        with self._write_lock():
            return self._delete(list(dict.fromkeys(keys)), ignore_not_found)

    def _delete(self, keys: list[tuple[str, str, str]], ignore_not_found: bool) -> list[Change]:
        texts = self._current_texts()
        current = self._load_texts(texts)
        if current.errors:
            raise ConfigError(current.errors, current.warnings)
        have = {r.key for r in current.resources}
        missing = [k for k in keys if k not in have]
        if missing and not ignore_not_found:
            raise StoreError("\n".join(f'{_plural(k[0])}.{m.SPEC_KINDS[k[0]][0]} "{k[2]}" not found in namespace {k[1]}'
                                       for k in missing))
        present = {k for k in keys if k in have}
        new_texts, changes, expect = self._plan(texts, current, [], present)
        if new_texts:
            self._commit(texts, new_texts, expect)
        order = {k: i for i, k in enumerate(keys)}
        changes.sort(key=lambda c: order.get((c.kind, c.namespace, c.name), 0))
        return changes


def _plural(kind: str) -> str:
    k = kind.lower()
    return k[:-1] + "ies" if k.endswith("y") else k + "s"


def _by_age(resources: list[m.Resource]) -> list[m.Resource]:
    """Oldest first: metadata.creationTimestamp when present, else load order."""
    def key(ir):
        i, r = ir
        ts = r.raw.get("metadata", {}).get("creationTimestamp") if isinstance(r.raw, dict) else None
        return (0, str(ts), i) if ts else (1, "", i)
    return [r for _, r in sorted(enumerate(resources), key=key)]


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


async def _maybe_await(value) -> None:
    if inspect.isawaitable(value):
        await value

