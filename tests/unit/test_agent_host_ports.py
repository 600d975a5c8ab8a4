"""Host-mode workloads declare the ports they serve (``ports``): validated,
carried through the wire/state JSON, refused for pods."""
from __future__ import annotations

import pytest

from nodeagent.agent.workload import SpecError, parse_ports, spec_from_json

BASE = {"kind": "cgroup", "target": "/system.slice/web.service", "name": "web", "namespace": "ops"}


def test_cgroup_ports_are_sorted_deduplicated_and_round_trip():
    spec = spec_from_json({**BASE, "ports": [9090, 8080, 9090]})
    assert spec.ports == (8080, 9090)
    assert spec.to_json()["ports"] == [8080, 9090]
    assert spec_from_json(spec.to_json()) == spec


def test_no_ports_keeps_the_old_json_form():
    spec = spec_from_json(BASE)
    assert spec.ports == () and "ports" not in spec.to_json()


@pytest.mark.parametrize("ports, message", [
    ([0], "ports: 0 is not a TCP port number"),
    ([65536], "ports: 65536 is not a TCP port number"),
    (["80"], "ports: '80' is not a TCP port number"),
    ([True], "ports: True is not a TCP port number"),
    ("8080", "ports must be a list"),
])
def test_invalid_ports_name_the_field(ports, message):
    with pytest.raises(SpecError, match=message):
        spec_from_json({**BASE, "ports": ports})


def test_a_pod_declares_no_ports():
    with pytest.raises(SpecError, match="only cgroup"):
        spec_from_json({**BASE, "kind": "netns", "target": "pod1", "ports": [8080]})


def test_cli_form():
    assert parse_ports("8080, 9090,") == [8080, 9090]
    assert parse_ports("") == []
    with pytest.raises(SpecError, match="'http' is not a port number"):
        parse_ports("8080,http")
