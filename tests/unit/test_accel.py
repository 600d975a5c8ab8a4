"""nodeagent/accel.py: the compiled request path is used only when it was built from the
sources as they are now; CI runs compiled; the same proxy tests pass as Python."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent import accel

REPO = Path(__file__).resolve().parents[2]


def _copy_sources(root: Path) -> None:
    for name in accel.MODULES:
        for src in accel._sources(name):
            dst = root / src.relative_to(REPO)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)


def test_the_digest_follows_every_source_and_declaration(tmp_path, monkeypatch):
    _copy_sources(tmp_path)
    monkeypatch.setattr(accel, "ROOT", tmp_path)
    first = accel.digest()
    assert first == accel.digest()
    for rel in ("nodeagent/proxy/http.pxd", "nodeagent/telemetry.py"):
        path = tmp_path / rel
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert accel.digest() != first, rel
        path.write_bytes(original)
    assert accel.digest() == first
    (tmp_path / "nodeagent/proxy/upstream.py").unlink()
    assert accel.digest() is None  # no sources: nothing is looked up


def test_the_finder_loads_only_a_build_of_the_current_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("NODEAGENT_ACCEL_DIR", str(tmp_path))
    (tmp_path / "CYTHON").write_text("9.9.9\n")
    key = accel._cython_key()
    assert key == f"{accel.digest()}-9.9.9"
    finder = accel._Finder(key)
    name = "nodeagent.proxy.http"
    assert finder.find_spec(name) is None  # nothing built: the ordinary .py
    stale = tmp_path / f"{name}-0123456789abcdef0123-9.9.9{accel._SUFFIX}"
    stale.write_bytes(b"")
    assert finder.find_spec(name) is None  # built from other sources: never loaded
    current = accel._built(name, key)
    current.write_bytes(b"")
    spec = finder.find_spec(name)
    assert spec is not None and spec.origin == str(current)
    assert finder.find_spec("nodeagent.proxy.h2") is None  # not a compiled module
    assert accel._Finder(None).find_spec(name) is None


def test_ci_runs_the_request_path_compiled():
    built = all(accel.status().values())
    if not built:
        if os.environ.get("CI"):
            pytest.fail("CI: the request path is not compiled; `make setup` runs python -m nodeagent.accelbuild")
        pytest.skip("the request path is not compiled here (python -m nodeagent.accelbuild)")
    for name in accel.MODULES:
        assert sys.modules[name].__file__.startswith(str(accel.accel_dir()))


def test_the_proxy_tests_pass_as_python():
    """The .py files stay the source of truth: the proxy's HTTP tests and the routing and LB
    unit tests pass without the build."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/integration/test_proxy_http.py", "tests/integration/test_proxy_bench_engine.py",
         "tests/unit/test_routing.py", "tests/unit/test_lb.py", "tests/unit/test_routing_weights.py"],
        cwd=REPO, env={**os.environ, "NODEAGENT_PURE": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
