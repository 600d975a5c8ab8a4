"""Directory config store: load, refused changes, watch, apply/create/delete."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

import nodeagent.store as store_mod
from nodeagent.store import ConfigStore, StoreError, object_filename
from policy.errors import ConfigError
from policy.loader import load_text

DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: {name}
  namespace: shop
spec:
  host: {host}
"""


def dr(name="reviews", host="reviews"):
    return DR.format(name=name, host=host)


def resources(text):
    res = load_text(text, "in.yaml")
    assert res.errors == []
    return res.resources


def bump(path: Path, text: str) -> None:
    """Write and make sure the signature changes even on coarse-mtime file systems."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    if path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def test_load_installs_snapshot_and_versions(tmp_path):
    (tmp_path / "a.yaml").write_text(dr())
    s = ConfigStore(tmp_path)
    snap = s.load()
    assert s.snapshot is snap and snap.version == 1
    assert [r.name for r in snap.destination_rules] == ["reviews"]
    assert s.reload() and s.snapshot.version == 2


def test_bad_change_is_refused_and_previous_snapshot_keeps_serving(tmp_path, caplog):
    f = tmp_path / "a.yaml"
    f.write_text(dr())
    s = ConfigStore(tmp_path)
    good = s.load()
    bump(f, dr(host="reviews") + "  trafficPolicy:\n    loadBalancer: {simple: FASTEST}\n")
    with caplog.at_level(logging.ERROR, logger="nodeagent.store"):
        assert s.reload() is False
    assert s.snapshot is good
    assert len(s.last_errors) == 1 and "spec.trafficPolicy.loadBalancer.simple" in str(s.last_errors[0])
    assert "refused" in caplog.text and f"{f}:9: DestinationRule shop/reviews" in caplog.text
    with pytest.raises(ConfigError):
        s.load()
    assert s.snapshot is good


def test_explicit_missing_directory_is_an_error(tmp_path):
    s = ConfigStore(tmp_path / "missing")
    assert not s.embedded
    with pytest.raises(ConfigError) as ei:
        s.load()
    assert "config directory does not exist" in str(ei.value)


def test_embedded_default_when_nothing_is_configured(tmp_path, monkeypatch):
    monkeypatch.delenv(store_mod.ENV_CONFIG_DIR, raising=False)
    monkeypatch.setattr(store_mod, "DEFAULT_CONFIG_DIR", tmp_path / "etc-missing")
    s = ConfigStore()
    assert s.embedded and s.readonly and s.directory == store_mod.EMBEDDED_DIR
    assert "read-only" in s.describe()
    snap = s.load()
    assert "catalog.shop.svc.cluster.local" in snap.services
    with pytest.raises(StoreError):
        s.apply(resources(dr()))
    # the environment variable chooses a directory explicitly
    monkeypatch.setenv(store_mod.ENV_CONFIG_DIR, str(tmp_path))
    assert ConfigStore().directory == tmp_path and not ConfigStore().embedded


def test_watch_picks_up_good_changes_and_refuses_bad_ones(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text(dr())
    s = ConfigStore(tmp_path, poll_interval=0.02)
    seen = []

    async def on_change(snap):
        seen.append(snap)

    async def wait_for(cond, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "timed out waiting for the watcher"
            await asyncio.sleep(0.01)

    async def scenario():
        stop = asyncio.Event()
        task = asyncio.create_task(s.watch(on_change, stop=stop))
        await wait_for(lambda: len(seen) == 1)                  # initial load
        first = seen[0]
        bump(f, dr(host="ratings"))                             # a good change
        await wait_for(lambda: len(seen) == 2)
        assert seen[1].destination_rules[0].spec.host == "ratings"
        bump(f, dr(host="ratings") + "  subsets:\n  - labels: {version: v1}\n")   # a bad change
        await wait_for(lambda: s.last_errors != ())
        assert s.snapshot is seen[1] and len(seen) == 2
        (tmp_path / "b.yaml").write_text(dr("ratings", "ratings"))               # still bad overall
        polls = s.polls
        await wait_for(lambda: s.polls > polls)        # a whole poll ran after the write ...
        assert s.last_errors and any("b.yaml" in str(e) or "a.yaml" in str(e) for e in s.last_errors)
        assert s.snapshot is seen[1] and len(seen) == 2  # ... and did not install it
        bump(f, dr(host="reviews"))                             # fixed
        await wait_for(lambda: len(seen) == 3)
        assert sorted(r.name for r in seen[2].destination_rules) == ["ratings", "reviews"]
        assert seen[2].version > seen[1].version > first.version
        stop.set()
        await asyncio.wait_for(task, 2)

    asyncio.run(scenario())


def test_watch_survives_a_failing_callback(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text(dr())
    s = ConfigStore(tmp_path, poll_interval=0.02)
    s.load()
    calls = []

    def boom(snap):
        calls.append(snap)
        raise RuntimeError("consumer bug")

    async def scenario():
        task = asyncio.create_task(s.watch(boom))
        bump(f, dr(host="a"))
        deadline = time.monotonic() + 5
        while len(calls) < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        bump(f, dr(host="b"))
        while len(calls) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert calls[1].destination_rules[0].spec.host == "b"


def test_apply_create_unchanged_configured(tmp_path):
    s = ConfigStore(tmp_path / "conf")
    ch = s.apply(resources(dr() + "---\n" + dr("ratings", "ratings")))
    assert [(c.name, c.action) for c in ch] == [("reviews", "created"), ("ratings", "created")]
    assert ch[0].display == "destinationrule.networking.istio.io/reviews"
    files = sorted(p.name for p in (tmp_path / "conf").iterdir())
    assert files == [object_filename("DestinationRule", "shop", "ratings"), "destinationrule.shop.reviews.yaml"]
    assert [c.action for c in s.apply(resources(dr()))] == ["unchanged"]
    assert [c.action for c in s.apply(resources(dr(host="reviews.shop.svc.cluster.local")))] == ["configured"]
    snap = ConfigStore(tmp_path / "conf").load()
    assert {r.name: r.spec.host for r in snap.destination_rules} == {
        "ratings": "ratings", "reviews": "reviews.shop.svc.cluster.local"}
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "conf").iterdir())


def test_create_refuses_existing_and_writes_nothing(tmp_path):
    s = ConfigStore(tmp_path)
    s.create(resources(dr()))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(StoreError) as ei:
        s.create(resources(dr("ratings", "ratings") + "---\n" + dr()))
    assert 'destinationrules.networking.istio.io "reviews" already exists in namespace shop' in str(ei.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_delete(tmp_path):
    s = ConfigStore(tmp_path)
    s.apply(resources(dr() + "---\n" + dr("ratings", "ratings")))
    ch = s.delete([("DestinationRule", "shop", "reviews")])
    assert [(c.name, c.action) for c in ch] == [("reviews", "deleted")]
    assert not (tmp_path / "destinationrule.shop.reviews.yaml").exists()
    with pytest.raises(StoreError) as ei:
        s.delete([("DestinationRule", "shop", "reviews"), ("DestinationRule", "shop", "ratings")])
    assert '"reviews" not found in namespace shop' in str(ei.value)
    assert (tmp_path / "destinationrule.shop.ratings.yaml").exists(), "nothing deleted when one is missing"
    ch = s.delete([("DestinationRule", "shop", "reviews"), ("DestinationRule", "shop", "ratings")],
                  ignore_not_found=True)
    assert [c.name for c in ch] == ["ratings"]
    assert list(tmp_path.iterdir()) == []


HAND_WRITTEN = """\
# hand-written shop rules
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
spec:
  host: reviews
---
# ratings: keep this comment
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
  namespace: shop
spec:
  host: ratings   # inline comment
"""


def test_objects_in_hand_written_files_are_moved_or_cut_out(tmp_path):
    f = tmp_path / "shop.yaml"
    f.write_text(HAND_WRITTEN)
    s = ConfigStore(tmp_path)
    ch = s.apply(resources(dr(host="reviews.shop.svc.cluster.local")))
    assert [c.action for c in ch] == ["configured"]
    rest = f.read_text()
    assert "name: reviews" not in rest
    assert "# ratings: keep this comment" in rest and "host: ratings   # inline comment" in rest
    assert (tmp_path / "destinationrule.shop.reviews.yaml").exists()
    snap = ConfigStore(tmp_path).load()
    assert len(snap.destination_rules) == 2
    s.delete([("DestinationRule", "shop", "ratings")])
    assert not f.exists(), "a file left without objects is removed"


def test_write_refused_when_the_directory_is_invalid(tmp_path):
    (tmp_path / "broken.yaml").write_text(dr(host="reviews") + "  bogus: 1\n")
    s = ConfigStore(tmp_path)
    with pytest.raises(ConfigError) as ei:
        s.apply(resources(dr("ratings", "ratings")))
    assert 'unknown field "bogus"' in str(ei.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml"]


def test_namespace_is_written_and_objects_listed(tmp_path):
    s = ConfigStore(tmp_path)
    s.apply(load_text(DR.replace("  namespace: shop\n", "").format(name="x", host="x"), "in.yaml",
                      default_namespace="team").resources)
    text = (tmp_path / "destinationrule.team.x.yaml").read_text()
    assert "namespace: team" in text
    assert [r.key for r in s.objects()] == [("DestinationRule", "team", "x")]


def test_polls_are_counted_and_a_poll_installs_only_a_changed_directory(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text(dr())
    s = ConfigStore(tmp_path)
    assert s.polls == 0
    assert s.poll() is True and s.snapshot.version == 1 and s.polls == 1      # first poll loads
    assert s.poll() is False and s.snapshot.version == 1 and s.polls == 2     # nothing changed
    bump(f, dr(host="ratings"))
    assert s.poll() is True and s.snapshot.destination_rules[0].spec.host == "ratings"
    bump(f, dr(host="ratings") + "  bogus: 1\n")
    assert s.poll() is False and s.last_errors and s.polls == 4


def test_a_watcher_never_sees_half_of_a_write(tmp_path, monkeypatch):
    """apply moves an object out of a hand-written file into its own file and changes another
    object: every poll the watcher makes between the store's file operations sees either the
    old set or the new one, never a mix (an object missing, or defined twice)."""
    f = tmp_path / "shop.yaml"
    f.write_text(HAND_WRITTEN)
    (tmp_path / "other.yaml").write_text(dr("other", "other"))
    watcher = ConfigStore(tmp_path)
    assert watcher.poll() is True
    writer = ConfigStore(tmp_path)
    observed = []

    def poll_between(step):
        def wrapped(*a, **kw):
            result = step(*a, **kw)
            installed = watcher.poll()
            observed.append((step.__name__, installed, watcher.last_errors))
            snap = watcher.snapshot
            assert watcher.last_errors == (), [str(e) for e in watcher.last_errors]
            names = {r.name: r.spec.host for r in snap.destination_rules}
            assert set(names) == {"reviews", "ratings", "other"}, names
            # the two changes of one apply appear together
            assert (names["reviews"], names["other"]) in (
                ("reviews.shop.svc.cluster.local", "other.shop.svc.cluster.local"), ("reviews", "other")), names
            return result
        return wrapped

    monkeypatch.setattr(store_mod, "_atomic_write", poll_between(store_mod._atomic_write))
    monkeypatch.setattr(store_mod, "_unlink", poll_between(store_mod._unlink))
    writer.apply(resources(dr(host="reviews.shop.svc.cluster.local") + "---\n"
                           + dr("other", "other.shop.svc.cluster.local")))
    assert len(observed) == 4, observed           # two new files, one cut, one file left empty
    assert not any(installed for _, installed, _ in observed), "nothing installed while the writer works"
    assert watcher.poll() is True                  # the whole change, at once
    assert {r.name: r.spec.host for r in watcher.snapshot.destination_rules} == {
        "reviews": "reviews.shop.svc.cluster.local", "ratings": "ratings", "other": "other.shop.svc.cluster.local"}


def test_writers_hold_the_lock_and_a_blocked_reader_gives_up_cleanly(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text(dr())
    writer, reader = ConfigStore(tmp_path), ConfigStore(tmp_path)
    monkeypatch.setattr(store_mod, "LOCK_WAIT", 0.05)
    seen = {}
    real_plan = ConfigStore._plan

    def plan_while_locked(self, *a):
        # the write lock is held from reading the files to the last rename
        assert reader.poll() is False and reader.snapshot is None and reader.last_errors == ()
        with pytest.raises(ConfigError) as ei:
            reader.load()                       # blocking, but bounded
        seen["blocked"] = str(ei.value)
        return real_plan(self, *a)

    monkeypatch.setattr(ConfigStore, "_plan", plan_while_locked)
    writer.apply(resources(dr("ratings", "ratings")))
    assert "is locked by another nodeagent command writing to it (waited 0.05s)" in seen["blocked"]
    monkeypatch.setattr(ConfigStore, "_plan", real_plan)
    assert reader.poll() is True and len(reader.snapshot.destination_rules) == 2


def test_a_refused_write_to_a_new_directory_leaves_nothing(tmp_path):
    s = ConfigStore(tmp_path / "new")
    with pytest.raises(StoreError):
        s.delete([("DestinationRule", "shop", "reviews")])
    assert not (tmp_path / "new").exists()


LIST_FILE = """\
# exported with kubectl get dr -o yaml
apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: networking.istio.io/v1
  kind: DestinationRule
  metadata: {name: reviews, namespace: shop}
  spec: {host: reviews}
- apiVersion: v1
  kind: List
  items:
  - apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: ratings, namespace: shop}
    spec: {host: ratings}
---
# a plain document after it: kept byte for byte
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: other, namespace: shop}
spec: {host: other}   # comment
"""


def test_objects_inside_a_hand_written_list_are_cut_out(tmp_path):
    f = tmp_path / "all.yaml"
    f.write_text(LIST_FILE)
    s = ConfigStore(tmp_path)
    ch = s.delete([("DestinationRule", "shop", "reviews")])
    assert [(c.name, c.action) for c in ch] == [("reviews", "deleted")]
    assert sorted(r.name for r in s.objects()) == ["other", "ratings"]
    text = f.read_text()
    assert text.startswith("# exported with kubectl get dr -o yaml\n")
    assert text.endswith(LIST_FILE[LIST_FILE.index("---\n# a plain document"):])
    # moved out of the nested List by apply
    ch = s.apply(resources(dr("ratings", "ratings.shop.svc.cluster.local")))
    assert [c.action for c in ch] == ["configured"]
    assert {r.name: r.spec.host for r in s.objects()} == {
        "other": "other", "ratings": "ratings.shop.svc.cluster.local"}
    assert (tmp_path / "destinationrule.shop.ratings.yaml").exists()
    # the List left empty is dropped; the file keeps its other document
    text = f.read_text()
    assert "kind: List" not in text and text.endswith("spec: {host: other}   # comment\n")
    s.delete([("DestinationRule", "shop", "other")])
    assert not f.exists()


def test_an_object_the_store_cannot_cut_out_is_refused_not_reported_deleted(tmp_path, monkeypatch):
    f = tmp_path / "shop.yaml"
    f.write_text(HAND_WRITTEN)
    s = ConfigStore(tmp_path)
    monkeypatch.setattr(store_mod, "_cut_documents", lambda text, remove, default_ns="default": text)
    with pytest.raises(StoreError) as ei:
        s.delete([("DestinationRule", "shop", "ratings")])
    assert f"cannot remove DestinationRule shop/ratings (defined at {f}:11): edit that file by hand" in str(ei.value)
    assert f.read_text() == HAND_WRITTEN and [p.name for p in tmp_path.iterdir()] == ["shop.yaml"]
