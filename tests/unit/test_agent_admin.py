"""Pure helpers of the agent's HTTP faces and systemd notify."""
from __future__ import annotations

import os
import socket
from types import MappingProxyType

import pytest

from nodeagent.agent import sdnotify
from nodeagent.agent.admin import parse_listen, to_jsonable
from nodeagent.agent.workload import spec_from_json
from policy.snapshot import WorkloadRef


def test_parse_listen():
    assert parse_listen("127.0.0.1:15000", "--admin") == ("127.0.0.1", 15000)
    assert parse_listen("[::1]:15021", "--readiness") == ("::1", 15021)
    assert parse_listen(":15020", "--metrics") == ("0.0.0.0", 15020)
    for bad, message in [("localhost", "must be HOST:PORT"), ("1.2.3.4:99999", "must be HOST:PORT"),
                         ("example.com:80", "'example.com' is not an IP address")]:
        with pytest.raises(ValueError, match=message):
            parse_listen(bad, "--admin")


def test_to_jsonable_handles_frozen_model_values():
    ref = WorkloadRef(name="w", namespace="ns", service_account="sa",
                      labels=MappingProxyType({"app": "w"}), address="10.250.0.2")
    assert to_jsonable(ref)["labels"] == {"app": "w"}
    spec = spec_from_json({"kind": "netns", "target": "p", "name": "w", "namespace": "ns", "ips": ["fd00::1"]})
    out = to_jsonable({"spec": spec, "set": frozenset({"b", "a"}), "raw": b"x"})
    assert out == {"spec": {"kind": "netns", "target": "p", "name": "w", "namespace": "ns",
                            "service_account": "default", "labels": {}, "ips": ["fd00::1"],
                            "ports": []},
                   "set": ["a", "b"], "raw": "x"}


def test_sdnotify_datagram_and_abstract_socket(tmp_path):
    assert sdnotify.notify("READY=1", environ={}) is False
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(path)}) is True
        assert sock.recv(100) == b"READY=1"
    name = f"nodeagent-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert sdnotify.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(100) == b"STOPPING=1"
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "nobody")}) is False
    # A receiver that never reads: notify must not block (it runs on the agent's event loop).
    full = tmp_path / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(full))
        results = [sdnotify.notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": str(full)}) for _ in range(2000)]
    assert results[0] is True and results[-1] is False


def test_watchdog_interval():
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # not us
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
