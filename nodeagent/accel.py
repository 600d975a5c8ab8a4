"""The request path, compiled: the hot proxy modules built with Cython, used only when current.

The modules in ``MODULES`` are ordinary Python and stay the source of truth. `make setup`
(``python -m nodeagent.accelbuild``) compiles each one, with the ``.pxd`` beside it that
turns its slotted classes into extension types (attribute access by C struct offset instead
of a descriptor lookup), into ``build/accel/`` under a name carrying a digest of every
compiled module's source and declarations, the Cython version and the compiler directives.
``install()`` (run when ``nodeagent`` is imported) puts a finder in front of Python's: an
import of one of these modules loads the compiled file whose digest matches the sources as
they are now, and the ``.py`` otherwise. So an edited module can never run as a stale
build: it runs as Python until it is rebuilt. ``NODEAGENT_PURE=1`` forces the ``.py``
files. Behaviour is the same either way (the whole suite runs compiled in CI, and the
proxy tests once more as Python: tests/unit/test_accel.py); compiled, the in-process request
path (`python -m bench engine`) takes ~29% less CPU (5.34 -> ~3.8 us; docs/proxy.md).

``python -m nodeagent.accelbuild --status`` says which modules run compiled.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

MODULES = (
    "nodeagent.proxy.http",
    "nodeagent.proxy.inbound",
    "nodeagent.proxy.runtime",
    "nodeagent.proxy.tunnel",
    "nodeagent.proxy.upstream",
    "nodeagent.proxy.requestid",
    "nodeagent.telemetry",
    "policy.routing",
    "policy.lb",
)
# Cython compiler directives: language level 3; annotations are documentation only (types
# come from the .pxd files), so a `float` parameter keeps Python's semantics.
DIRECTIVES = {"language_level": 3, "annotation_typing": False, "binding": True, "embedsignature": False}

# policy.routing and policy.lb are pure functions and classes like the rest of policy/; they are
# compiled too (their .py stays the source) and used compiled wherever nodeagent is imported
# first, which every nodeagent command and the test suite's conftest do.
ROOT = Path(__file__).resolve().parent.parent
_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]  # .cpython-311-x86_64-linux-gnu.so


def accel_dir() -> Path:
    """Where compiled modules live: $NODEAGENT_ACCEL_DIR, else build/accel beside the packages."""
    return Path(os.environ.get("NODEAGENT_ACCEL_DIR") or ROOT / "build" / "accel")


def _sources(name: str) -> list[Path]:
    base = ROOT.joinpath(*name.split("."))
    return [p for p in (base.with_suffix(".py"), base.with_suffix(".pxd")) if p.exists()]


def digest() -> str | None:
    """One digest over every compiled module's .py and .pxd (a .pxd can declare types another
    module uses) and the directives; the build's name adds the Cython version. None when a
    source file is missing (an installation without sources)."""
    h = hashlib.sha256()
    for name in MODULES:
        files = _sources(name)
        if not files or files[0].suffix != ".py":
            return None
        for path in files:
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(repr(sorted(DIRECTIVES.items())).encode())
    return h.hexdigest()[:20]


def _built(name: str, key: str) -> Path:
    return accel_dir() / f"{name}-{key}{_SUFFIX}"


class _Finder:
    """A meta path finder for MODULES: the compiled file when it matches the sources."""

    def __init__(self, key: str | None) -> None:
        self.key = key

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MODULES or self.key is None:
            return None
        built = _built(fullname, self.key)
        if not built.exists():
            return None  # the ordinary finders load the .py
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(built))
        spec = importlib.util.spec_from_file_location(fullname, str(built), loader=loader)
        return spec


_installed: _Finder | None = None


def install() -> None:
    """Put the finder first on sys.meta_path (once; again: look at build/accel anew, for the
    modules not imported yet). A no-op under NODEAGENT_PURE=1."""
    global _installed
    if os.environ.get("NODEAGENT_PURE") == "1":
        return
    if _installed is not None:
        _installed.key = _cython_key()
        return
    _installed = _Finder(_cython_key())
    sys.meta_path.insert(0, _installed)


def _cython_key() -> str | None:
    """The digest the finder looks for: it includes the Cython version recorded at build time
    (build/accel/CYTHON), so the daemon does not import Cython to learn it."""
    try:
        version = (accel_dir() / "CYTHON").read_text().strip()
    except OSError:
        return None
    d = digest()
    return None if d is None else f"{d}-{version}"


def compiled(name: str) -> bool:
    """Whether module ``name`` (imported already, or now) runs compiled."""
    module = sys.modules.get(name) or __import__(name, fromlist=["_"])
    return str(getattr(module, "__file__", "")).endswith(_SUFFIX)


def status() -> dict[str, bool]:
    return {name: compiled(name) for name in MODULES}
