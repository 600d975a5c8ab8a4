"""The agent's node-probe wiring (pure: no namespace is touched)."""
from __future__ import annotations

import shutil

import pytest

from nodeagent.agent.capture import capture_for_uninstall, select_capture
from nodeagent.agent.netfilter import NetfilterCapture
from nodeagent.agent.probes import NodeProbes
from nodeagent.agent.workload import WorkloadSpec
from redirect.plan import CaptureConfig

needs_tools = pytest.mark.skipif(not all(shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin")
                                         for t in ("nft", "iptables", "nsenter")),
                                 reason="needs nft, iptables and nsenter installed")


@needs_tools
@pytest.mark.parametrize("mode,backend", [("nftables", "nft"), ("iptables", "iptables")])
def test_netfilter_modes_keep_the_node_probes(mode, backend):
    config = CaptureConfig(node_probe_sources=("10.250.1.1",))
    capture = select_capture(mode, config=config)
    assert isinstance(capture, NetfilterCapture) and capture.mode == mode
    assert isinstance(capture.probes, NodeProbes)
    assert (capture.probes.backend, capture.probes.config) == (backend, config)
    removal = capture_for_uninstall(mode)  # uninstall removes the node's SNAT too
    assert isinstance(removal, NetfilterCapture) and removal.probes.backend == backend


def test_probes_off_touch_nothing():
    probes = NodeProbes(CaptureConfig(probe_snat_v4=None, probe_snat_v6=None), netns="/nonexistent/netns")
    assert not probes.enabled
    probes.add(WorkloadSpec("netns", "/nonexistent/netns", "web", "shop", "web", ips=("10.250.1.5",)))
    assert probes.addresses() == ()  # no namespace visited, no rule written


def test_only_families_with_a_snat_address_are_used():
    probes = NodeProbes(CaptureConfig(ipv6=False))
    assert probes._usable(("10.250.1.5", "fd00:250::5")) == ["10.250.1.5"]
    v6_only = NodeProbes(CaptureConfig(probe_snat_v4=None))
    assert v6_only._usable(("10.250.1.5", "fd00:250::5")) == ["fd00:250::5"]
