"""The enrollment state machine, retry set, wire protocol and persistence (pure + tmp files)."""
from __future__ import annotations

import json
import os
import stat

import pytest

from nodeagent.agent import protocol
from nodeagent.agent.persist import STATE_FILE, load_registry, save_registry
from nodeagent.agent.registry import EnrollConflict, Outcome, Registry, RetrySet, StateFileError
from nodeagent.agent.workload import SpecError, WorkloadSpec, parse_labels, spec_from_json


def spec(name="web", target="pod-web", ips=("10.250.0.2",), kind="netns", sa="web-sa", labels=None, ns="shop"):
    return spec_from_json({
        "kind": kind, "target": target, "name": name, "namespace": ns,
        "service_account": sa, "labels": labels or {"app": name}, "ips": list(ips),
    })


def test_enroll_add_then_same_spec_is_a_noop():
    reg = Registry()
    first = reg.enroll(spec())
    assert first.outcome is Outcome.ADDED and first.previous is None
    assert reg.find("shop", "web") == spec() and reg.by_ip("10.250.0.2") == spec()
    again = reg.enroll(spec())
    assert again.outcome is Outcome.UNCHANGED
    assert len(reg) == 1


def test_same_netns_written_as_name_or_path_is_one_target():
    reg = Registry()
    reg.enroll(spec(target="pod-web"))
    assert reg.enroll(spec(target="/var/run/netns/pod-web")).outcome is Outcome.UNCHANGED
    assert reg.enroll(spec(target="/run/netns/pod-web")).outcome is Outcome.UNCHANGED
    assert reg.get("netns", "pod-web") is not None


def test_changed_spec_on_same_target_is_an_update():
    reg = Registry()
    reg.enroll(spec())
    change = reg.enroll(spec(labels={"app": "web", "version": "v2"}, ips=("10.250.0.2", "fd00::2")))
    assert change.outcome is Outcome.UPDATED
    assert change.previous.labels == {"app": "web"}
    assert reg.get("netns", "pod-web").labels == {"app": "web", "version": "v2"}
    assert reg.get("netns", "pod-web").ips == ("10.250.0.2", "fd00::2")


def test_two_workloads_cannot_share_a_netns():
    reg = Registry()
    reg.enroll(spec())
    with pytest.raises(EnrollConflict, match="netns pod-web is already enrolled as shop/web"):
        reg.enroll(spec(name="other", ips=("10.250.0.9",)))
    assert reg.get("netns", "pod-web").name == "web"


def test_two_workloads_cannot_share_an_ip():
    reg = Registry()
    reg.enroll(spec())
    with pytest.raises(EnrollConflict, match="IP 10.250.0.2 is already held by workload shop/web"):
        reg.enroll(spec(name="db", target="pod-db", ips=("10.250.0.2",)))
    assert len(reg) == 1


def test_one_workload_name_on_two_targets_is_refused():
    reg = Registry()
    reg.enroll(spec())
    with pytest.raises(EnrollConflict, match="already enrolled on netns pod-web"):
        reg.enroll(spec(target="pod-web-2", ips=("10.250.0.3",)))


def test_cgroup_and_netns_are_distinct_targets():
    reg = Registry()
    reg.enroll(spec(kind="cgroup", target="/sys/fs/cgroup/system.slice/web.service/"))
    assert reg.get("cgroup", "/system.slice/web.service") is not None
    assert reg.enroll(spec(kind="cgroup", target="/system.slice/web.service")).outcome is Outcome.UNCHANGED


def test_unenroll_and_unenroll_again():
    reg = Registry()
    reg.enroll(spec())
    removed = reg.unenroll("netns", "pod-web")
    assert removed.outcome is Outcome.REMOVED and removed.previous.name == "web"
    assert reg.unenroll("netns", "pod-web").outcome is Outcome.ABSENT
    assert reg.find("shop", "web") is None
    # the IP is free again
    assert reg.enroll(spec(name="db", target="pod-db")).outcome is Outcome.ADDED


def test_identity_is_spiffe():
    assert spec().identity("cluster.local") == "spiffe://cluster.local/ns/shop/sa/web-sa"


@pytest.mark.parametrize("field,value,message", [
    ("kind", "vm", "kind must be one of netns, cgroup"),
    ("name", "Web_1", "name: 'Web_1' is not a valid Kubernetes name"),
    ("namespace", "", "namespace is required"),
    ("ips", ["10.0.0.300"], "ips: '10.0.0.300' is not an IP address"),
    ("labels", {"app": "has space"}, "labels: app='has space' is not a valid label value"),
    ("target", "pod web", "not a valid network namespace name"),
    ("target", "..", "must not contain '..'"),
    ("target", "/proc/1/../2/ns/net", "must not contain '..'"),
    ("target", "relative/path", "must be absolute"),
    ("extra", 1, "unknown field(s): extra"),
])
def test_spec_validation_names_the_field(field, value, message):
    data = spec().to_json()
    data[field] = value
    with pytest.raises(SpecError) as exc:
        spec_from_json(data)
    assert message in str(exc.value)


def test_service_account_defaults_to_default():
    data = spec().to_json()
    del data["service_account"]
    assert spec_from_json(data).service_account == "default"


def test_parse_labels():
    assert parse_labels("app=web, version=v1") == {"app": "web", "version": "v1"}
    assert parse_labels("") == {}
    with pytest.raises(SpecError, match="'app' must be written key=value"):
        parse_labels("app")


def test_retry_set_backoff_doubles_and_caps():
    retry = RetrySet(base=0.5, cap=3.0)
    key = ("netns", "pod-web")
    delays = []
    for attempt in range(5):
        entry = retry.failed(key, "nft: no such file", now=100.0)
        delays.append(entry.next_at - 100.0)
        assert entry.attempts == attempt + 1
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert retry.due(102.9) == []
    assert retry.due(103.0) == [key]
    assert retry.get(key).since == 100.0
    retry.succeeded(key)
    assert key not in retry and retry.next_due() is None


def test_protocol_parses_requests():
    req = protocol.parse_request(protocol.encode(protocol.enroll_request(spec().to_json())))
    assert req.op == "enroll" and req.spec == spec()
    req = protocol.parse_request(protocol.encode(protocol.unenroll_request("netns", "/var/run/netns/pod-web")))
    assert req.key == ("netns", "pod-web")
    assert protocol.parse_request(b'{"op":"list"}\n').op == "list"
    req = protocol.parse_request(b'{"op":"unenroll","namespace":"shop","name":"web"}\n')
    assert req.workload == ("shop", "web") and req.key is None
    for line, message in [
        (b"nonsense\n", "not a JSON line"),
        (b"[1]\n", "must be a JSON object"),
        (b'{"op":"nuke"}\n', "op must be one of enroll, unenroll, list"),
        (b'{"op":"unenroll","kind":"netns"}\n', "unenroll: target is required"),
        (b'{"op":"unenroll","namespace":"shop"}\n', "unenroll: give kind and target, or namespace and name"),
        (b'{"op":"enroll","kind":"netns","target":"x"}\n', "enroll: name is required"),
    ]:
        with pytest.raises(protocol.ProtocolError) as exc:
            protocol.parse_request(line)
        assert message in str(exc.value)


def test_persist_roundtrip_atomic_0600(tmp_path):
    reg = Registry()
    reg.enroll(spec())
    reg.enroll(spec(name="db", target="pod-db", ips=("10.250.0.3",), sa="db"))
    save_registry(tmp_path, reg, {"capture": "nftables"})
    path = tmp_path / STATE_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temp file left
    loaded, extra = load_registry(tmp_path)
    assert list(loaded) == list(reg)
    assert extra == {"capture": "nftables"}
    assert json.loads(path.read_text())["version"] == 1


def test_load_missing_is_empty_and_corrupt_names_the_file(tmp_path):
    reg, extra = load_registry(tmp_path)
    assert len(reg) == 0 and extra == {}
    (tmp_path / STATE_FILE).write_text('{"version": 1, "workloads": [{"kind": "netns"}]}')
    with pytest.raises(StateFileError, match=r"workloads.json: workloads\[0\]: target is required"):
        load_registry(tmp_path)
    (tmp_path / STATE_FILE).write_text('{"version": 1,\n "workloads": [}')
    with pytest.raises(StateFileError, match=r"workloads.json:2: not valid JSON"):
        load_registry(tmp_path)
