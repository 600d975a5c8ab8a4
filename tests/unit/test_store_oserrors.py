"""The running store (hot reload) and the write side when the file system refuses: the change
is refused with an error naming the path, the last good snapshot keeps serving, the watcher
keeps running, and fixing the files is enough."""
from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path

import pytest

from nodeagent.store import ConfigStore, StoreError
from policy.errors import ConfigError
from policy.loader import load_text

DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: {name}
  namespace: shop
spec:
  host: {name}
"""
LOOP = "cannot read: Too many levels of symbolic links"


def _wait(cond, what: str, timeout: float = 5.0):
    async def go():
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)
    return go()


def test_watcher_refuses_unreadable_entries_and_directory_and_recovers(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.yaml").write_text(DR.format(name="reviews"))
    cfg = tmp_path / "cfg"
    cfg.symlink_to(real)
    s = ConfigStore(cfg, poll_interval=0.02)
    seen = []

    async def scenario():
        stop = asyncio.Event()
        task = asyncio.create_task(s.watch(seen.append, stop=stop))
        await _wait(lambda: len(seen) == 1, "the initial load")
        good = seen[0]

        # a FIFO among the files: refused (the daemon never blocks opening it)
        os.mkfifo(real / "b.yaml")
        await _wait(lambda: s.last_errors != (), "the FIFO to be refused")
        assert [str(e) for e in s.last_errors] == [f"{cfg}/b.yaml: cannot read: a FIFO, not a regular file"]
        assert s.snapshot is good
        os.unlink(real / "b.yaml")
        (real / "b.yaml").write_text(DR.format(name="ratings"))
        await _wait(lambda: len(seen) == 2, "the fixed directory to load")
        assert sorted(r.name for r in s.snapshot.destination_rules) == ["ratings", "reviews"]
        assert s.last_errors == ()

        # a dangling link among the files
        (real / "c.yaml").symlink_to(tmp_path / "nowhere.yaml")
        await _wait(lambda: s.last_errors != (), "the dangling link to be refused")
        assert [str(e) for e in s.last_errors] == [
            f"{cfg}/c.yaml: cannot read: dangling symbolic link to {tmp_path}/nowhere.yaml"]
        assert s.snapshot is seen[1]
        (real / "c.yaml").unlink()
        await _wait(lambda: len(seen) == 3, "the directory to load again")

        # the directory itself becomes unreadable (a link loop: an OSError even for root)
        cfg.unlink()
        cfg.symlink_to(cfg)
        await _wait(lambda: s.last_errors != (), "the unreadable directory to be refused")
        assert [str(e) for e in s.last_errors] == [f"{cfg}: {LOOP}"]
        assert s.snapshot is seen[2] and not task.done()
        polls = s.polls
        await _wait(lambda: s.polls > polls + 2, "more polls")   # still watching, nothing new
        assert len(seen) == 3 and not task.done()
        cfg.unlink()
        cfg.symlink_to(real)
        await _wait(lambda: len(seen) == 4, "the directory to come back")
        assert s.last_errors == () and s.snapshot.version > seen[2].version
        stop.set()
        await asyncio.wait_for(task, 2)

    asyncio.run(scenario())


def test_signature_and_read_never_raise(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    s = ConfigStore(loop)
    assert s.signature() == (("<unreadable>", errno.ELOOP, 0),)
    res = s.read()
    assert [str(e) for e in res.errors] == [f"{loop}: {LOOP}"]
    with pytest.raises(ConfigError):
        s.load()
    assert s.reload() is False and s.snapshot is None


def test_writes_refuse_an_unreadable_current_directory(tmp_path):
    (tmp_path / "a.yaml").write_text(DR.format(name="reviews"))
    os.mkfifo(tmp_path / "p.yaml")
    s = ConfigStore(tmp_path)
    new = load_text(DR.format(name="ratings"), "in.yaml").resources
    with pytest.raises(ConfigError) as ei:
        s.apply(new)
    assert [str(e) for e in ei.value.errors] == [f"{tmp_path}/p.yaml: cannot read: a FIFO, not a regular file"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml", "p.yaml"]    # nothing written
    (tmp_path / "p.yaml").unlink()
    (tmp_path / "b.yaml").write_bytes(b"# ok\n\xff\n")
    with pytest.raises(ConfigError) as ei:
        s.delete([("DestinationRule", "shop", "reviews")])
    assert [str(e) for e in ei.value.errors] == [f"{tmp_path}/b.yaml:2: not UTF-8 text (is this a YAML file?)"]
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(StoreError, match=f"^{loop}: {LOOP}$"):
        ConfigStore(loop).apply(new)
    afile = tmp_path / "a.yaml"
    with pytest.raises(StoreError, match=f"^{afile}: is not a directory$"):
        ConfigStore(afile).apply(new)
    assert Path(afile).read_text() == DR.format(name="reviews")
