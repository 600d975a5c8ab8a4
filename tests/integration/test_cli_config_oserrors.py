"""Configuration input the file system will not give us: one line naming the path and the
reason, exit 1, never ``internal error`` (exit 70). Run as a user runs the CLI (subprocess).

As root, ``chmod`` does not stop reads, so the permission cases run the CLI as ``nobody``
(``setpriv``); the other cases use what even root cannot read: a FIFO, a dangling symbolic
link, a symbolic link loop, a file where a directory is expected, bytes that are not UTF-8.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]
SHOP = REPO / "examples" / "shop"
LOOP = "Too many levels of symbolic links"


def run(*args, cwd, user_prefix=()):
    env = dict(os.environ)
    env.pop("NODEAGENT_CONFIG_DIR", None)
    env["PYTHONPATH"] = str(REPO)
    p = subprocess.run([*user_prefix, sys.executable, "-m", "nodeagent", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    assert p.returncode in (0, 1), (p.returncode, p.stderr)
    return p


@pytest.fixture
def cfg(tmp_path):
    """A valid config directory (the shop example's three files)."""
    d = tmp_path / "cfg"
    d.mkdir()
    for f in sorted(SHOP.glob("*.yaml")):
        shutil.copy(f, d / f.name)
    return d


def test_fifo_and_dangling_link_in_a_config_dir(cfg, tmp_path):
    os.mkfifo(cfg / "pipe.yaml")
    os.symlink(tmp_path / "gone.yaml", cfg / "gone.yaml")
    (cfg / "sub.yaml").mkdir()      # a sub-directory is not read (documented), not an error
    want = [f"{cfg}/gone.yaml: cannot read: dangling symbolic link to {tmp_path}/gone.yaml",
            f"{cfg}/pipe.yaml: cannot read: a FIFO, not a regular file"]
    p = run("validate", "-f", cfg, cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.splitlines() == want + ["nodeagent: configuration is invalid: 2 errors"]
    p = run("get", "vs", "-A", "--config-dir", cfg, cwd=tmp_path)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.splitlines() == want + [f"nodeagent: the configuration in {cfg} is invalid"]
    # the proxy refuses to start on it (it would not block forever opening the FIFO)
    p = run("proxy", "--config-dir", cfg, "--workload", "shop/x", "--listen", "127.0.0.1:0", cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.splitlines() == [f"nodeagent: configuration in {cfg} rejected:"] + want


def test_config_dir_that_is_a_loop_or_a_file(cfg, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for argv in (("get", "vs", "--config-dir", loop),
                 ("proxy", "--config-dir", loop, "--workload", "shop/x"),
                 ("apply", "-f", SHOP, "--config-dir", loop)):
        p = run(*argv, cwd=tmp_path)
        assert p.returncode == 1
        assert p.stderr.splitlines() == [f"nodeagent: {loop}: cannot read: {LOOP}"], argv
    p = run("validate", "-f", loop, cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.splitlines()[0] == f"{loop}: cannot read: {LOOP}"
    afile = cfg / "catalog.yaml"
    for argv in (("get", "vs", "--config-dir", afile), ("apply", "-f", SHOP, "--config-dir", afile)):
        p = run(*argv, cwd=tmp_path)
        assert p.returncode == 1
        assert p.stderr.splitlines() == [f"nodeagent: {afile}: is not a directory"], argv
    p = run("validate", "-f", afile / "x.yaml", cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.splitlines()[0] == f"{afile}/x.yaml: no such file or directory (a parent is not a directory)"


def test_undecodable_file_in_the_config_dir_refuses_get_and_apply(cfg, tmp_path):
    (cfg / "bad.yaml").write_bytes(b"apiVersion: v1\nkind: \xff\xfe\n")
    p = run("get", "vs", "-A", "--config-dir", cfg, cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.splitlines()[0] == f"{cfg}/bad.yaml:2: not UTF-8 text (is this a YAML file?)"
    p = run("apply", "-f", SHOP, "--config-dir", cfg, cwd=tmp_path)
    assert p.returncode == 1
    assert p.stderr.splitlines()[0] == f"{cfg}/bad.yaml:2: not UTF-8 text (is this a YAML file?)"


@pytest.fixture
def as_nobody():
    """(prefix, base): a command prefix that runs as an unprivileged user and a 0755 work
    directory that user can enter. As root: setpriv to nobody; otherwise: ourselves."""
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")
        require(setpriv is not None, "needs setpriv to drop root")
        prefix = (setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups")
        probe = subprocess.run([*prefix, sys.executable, "-c", f"import os; os.listdir({str(REPO)!r})"],
                               capture_output=True, timeout=30)
        require(probe.returncode == 0, "user nobody cannot run the project's python")
    else:
        prefix = ()
    base = Path(tempfile.mkdtemp(prefix="nodeagent-perm-"))
    base.chmod(0o755)
    try:
        yield prefix, base
    finally:
        for p in base.rglob("*"):
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)
        shutil.rmtree(base)


def test_permission_denied_directory_and_file(as_nobody):
    prefix, base = as_nobody
    d = base / "cfg"
    d.mkdir()
    for f in sorted(SHOP.glob("*.yaml")):
        shutil.copy(f, d / f.name)
    d.chmod(0o000 if os.geteuid() != 0 else 0o700)   # root-owned 0700: nobody may not list it
    want = f"{d}: cannot read: Permission denied"
    p = run("validate", "-f", d, cwd=base, user_prefix=prefix)
    assert p.returncode == 1
    assert p.stderr.splitlines() == [want, "nodeagent: configuration is invalid: 1 error"]
    for argv in (("get", "vs", "-A", "--config-dir", d),
                 ("proxy", "--config-dir", d, "--workload", "shop/x", "--listen", "127.0.0.1:0")):
        p = run(*argv, cwd=base, user_prefix=prefix)
        assert p.returncode == 1
        assert p.stderr.splitlines() == [f"nodeagent: {want}"], argv

    # the directory readable, one file in it not
    d.chmod(0o755)
    (d / "catalog.yaml").chmod(0o000 if os.geteuid() != 0 else 0o600)
    want = f"{d}/catalog.yaml: cannot read: Permission denied"
    p = run("validate", "-f", d, cwd=base, user_prefix=prefix)
    assert p.returncode == 1 and p.stderr.splitlines()[0] == want
    p = run("get", "vs", "-A", "--config-dir", d, cwd=base, user_prefix=prefix)
    assert p.returncode == 1 and p.stderr.splitlines() == [want, f"nodeagent: the configuration in {d} is invalid"]
