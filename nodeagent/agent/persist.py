"""The registry on disk: ``<state-dir>/workloads.json``, written atomically.

Every change is written to a temp file in the same directory (0600), fsynced
and renamed over the old file, so a crash leaves either the old or the new
registry, never half of one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nodeagent.agent.registry import Registry, StateFileError

STATE_FILE = "workloads.json"


def ensure_state_dir(state_dir: Path) -> Path:
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateFileError(f"cannot create state dir {state_dir}: {exc.strerror}; pick another with --state-dir") from None
    if not os.access(state_dir, os.W_OK):
        raise StateFileError(f"state dir {state_dir} is not writable; pick another with --state-dir")
    return state_dir


def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_registry(state_dir: Path, registry: Registry, extra: dict[str, Any] | None = None) -> None:
    write_atomic(state_dir / STATE_FILE, registry.dumps(extra))


def load_registry(state_dir: Path) -> tuple[Registry, dict[str, Any]]:
    """The persisted registry, or an empty one on first start."""
    path = state_dir / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Registry(), {}
    except OSError as exc:
        raise StateFileError(f"cannot read {path}: {exc.strerror}") from None
    return Registry.loads(text, str(path))
