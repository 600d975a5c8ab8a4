"""Configuration files on disk -> the pure loader (``policy.loader.load_bytes``).

``policy/`` does no I/O; this module is the edge that reads. Every ``OSError`` on
configuration input (a file, a directory, a directory entry) becomes an error
``Diagnostic`` naming the path and the reason (``DIR: cannot read: Permission
denied``), never an exception, so the CLI prints one line and exits 1, and the
store refuses the change and keeps its last good snapshot.

- ``load_paths(paths)``: files and directories (their ``*.yaml|*.yml|*.json``
  files; ``recursive`` for sub-directories), loaded in order as ONE set;
- ``load_file(path)``: one file (a FIFO named explicitly is read, so
  ``-f <(...)`` works);
- ``scan_dir(directory)``: the config entries of one directory, sorted by name,
  each with its ``stat`` or the problem that makes it unreadable (a dangling
  symbolic link, a FIFO or socket, EACCES, ...). Hidden files, names ending in
  ``~`` and other suffixes are skipped, and so are sub-directories.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from policy.errors import Diagnostic
from policy.loader import LoadResult, load_bytes

__all__ = ["CONFIG_SUFFIXES", "DirEntry", "scan_dir", "config_files", "load_file", "load_paths",
           "os_reason", "path_problem", "exists"]

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def os_reason(exc: OSError) -> str:
    """``Permission denied``, not ``[Errno 13] Permission denied: '/x'`` (the caller names the path)."""
    return exc.strerror or str(exc)


def _kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _missing(path: str) -> str:
    """The problem of a path that stat() did not find: a dangling link says where it points."""
    try:
        target = os.readlink(path)
    except OSError:
        return "no such file or directory"
    return f"cannot read: dangling symbolic link to {target}"


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One configuration entry of a directory: a regular file (``stat`` set) or a problem."""
    path: Path
    stat: os.stat_result | None
    problem: str | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def diagnostic(self) -> Diagnostic:
        return Diagnostic(str(self.path), None, self.problem or "")


def _is_config_name(name: str) -> bool:
    if name.startswith(".") or name.endswith("~"):
        return False
    return os.path.splitext(name)[1].lower() in CONFIG_SUFFIXES


def scan_dir(directory: str | os.PathLike) -> list[DirEntry]:
    """The config entries of ``directory`` (not recursive), sorted by name. Raises ``OSError``
    only for the directory itself (missing, not a directory, not readable)."""
    d = Path(directory)
    with os.scandir(d) as it:
        names = sorted(e.name for e in it)
    out = []
    for name in names:
        if not _is_config_name(name):
            continue
        p = d / name
        try:
            st = os.stat(p)
        except FileNotFoundError:
            if os.path.islink(p):
                out.append(DirEntry(p, None, _missing(str(p))))
            continue        # removed since the listing: the next read sees the new state
        except OSError as exc:
            out.append(DirEntry(p, None, f"cannot read: {os_reason(exc)}"))
            continue
        if stat.S_ISDIR(st.st_mode):
            continue        # sub-directories are read only with -R (see _walk)
        if not stat.S_ISREG(st.st_mode):
            out.append(DirEntry(p, None, f"cannot read: {_kind_of(st.st_mode)}, not a regular file"))
            continue
        out.append(DirEntry(p, st))
    return out


def config_files(directory: str | os.PathLike) -> list[Path]:
    """The readable-looking config files of a directory (regular files only), sorted by name.
    Raises ``OSError`` for the directory itself; use ``scan_dir`` to see the entries skipped."""
    return [e.path for e in scan_dir(directory) if e.problem is None]


def path_problem(path: str | os.PathLike) -> str | None:
    """Why a config directory cannot be read (``cannot read: Permission denied``, ...), else None."""
    try:
        with os.scandir(path):
            return None
    except FileNotFoundError:
        return _missing(str(path)) if os.path.islink(path) else "config directory does not exist"
    except NotADirectoryError:
        return "is not a directory"
    except OSError as exc:
        return f"cannot read: {os_reason(exc)}"


def load_file(path: str | os.PathLike, display: str | None = None, default_namespace: str = "default",
              known_keys: dict | None = None, identities_only: bool = False) -> LoadResult:
    """Read one file as bytes and load it; an unreadable file is an error naming it."""
    shown = display if display is not None else str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        problem = _missing(str(path))
        return LoadResult(errors=[Diagnostic(shown, None, "no such file" if problem.startswith("no such")
                                             else problem)], files=[shown])
    except IsADirectoryError:
        return LoadResult(errors=[Diagnostic(shown, None, "is a directory")], files=[shown])
    except OSError as exc:
        return LoadResult(errors=[Diagnostic(shown, None, f"cannot read: {os_reason(exc)}")], files=[shown])
    return load_bytes(data, shown, default_namespace, known_keys, identities_only)


def _is_dir(entry: os.DirEntry) -> bool:
    """A sub-directory to walk; an entry we cannot even stat (a link loop) is none."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _walk(d: Path, res: LoadResult, seen: set) -> list[Path]:
    """Config files of ``d`` and of its sub-directories (hidden ones skipped), depth first in
    name order; a directory reached twice (a symbolic link loop) is read once. Problems go to
    ``res.errors``."""
    try:
        st = os.stat(d)
        if (st.st_dev, st.st_ino) in seen:
            return []
        seen.add((st.st_dev, st.st_ino))
        entries = scan_dir(d)
        with os.scandir(d) as it:
            subs = sorted(e.name for e in it if not e.name.startswith(".") and _is_dir(e))
    except OSError as exc:
        res.errors.append(Diagnostic(str(d), None, f"cannot read: {os_reason(exc)}"))
        return []
    out = []
    for e in entries:
        if e.problem is not None:
            res.errors.append(e.diagnostic())
        else:
            out.append(e.path)
    for name in subs:
        out.extend(_walk(d / name, res, seen))
    return out


def load_paths(paths: Iterable[str | os.PathLike], default_namespace: str = "default",
               recursive: bool = False, known_keys: dict | None = None,
               identities_only: bool = False) -> LoadResult:
    """Load files and directories (their *.yaml, *.yml, *.json files), in order, as ONE set:
    a duplicate object across files is an error. ``known_keys`` carries that set across calls.
    Nothing here raises for the file system: every problem is an error naming its path."""
    res = LoadResult()
    keys: dict = known_keys if known_keys is not None else {}
    for p in paths:
        ps = str(p)
        try:
            st = os.stat(ps)
        except FileNotFoundError:
            res.errors.append(Diagnostic(ps, None, _missing(ps)))
            continue
        except NotADirectoryError:
            res.errors.append(Diagnostic(ps, None, "no such file or directory (a parent is not a directory)"))
            continue
        except OSError as exc:
            res.errors.append(Diagnostic(ps, None, f"cannot read: {os_reason(exc)}"))
            continue
        if not stat.S_ISDIR(st.st_mode):
            res.extend(load_file(ps, ps, default_namespace, keys, identities_only))
            continue
        path = Path(ps)
        errors_before = len(res.errors)
        if recursive:
            files = _walk(path, res, set())
        else:
            try:
                entries = scan_dir(path)
            except OSError as exc:
                res.errors.append(Diagnostic(ps, None, f"cannot read: {os_reason(exc)}"))
                continue
            files = []
            for e in entries:
                if e.problem is not None:
                    res.errors.append(e.diagnostic())
                else:
                    files.append(e.path)
        if not files and len(res.errors) == errors_before:
            res.warnings.append(Diagnostic(ps, None, "directory has no .yaml, .yml or .json files",
                                           severity="warning"))
        for f in files:
            res.extend(load_file(f, str(f), default_namespace, keys, identities_only))
    return res


# errno values that mean "this path is not there" (as opposed to "there but unreadable")
_ABSENT = (errno.ENOENT, errno.ENOTDIR)


def exists(path: str | os.PathLike) -> bool:
    """Like ``Path.exists`` but a path we may not look at counts as existing (so reading it
    reports why), instead of raising ``PermissionError`` or being taken for absent."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno not in _ABSENT
    return True
