"""Capture plans, state parsing, drift and backend choice (pure, no root)."""
from __future__ import annotations

import json

import pytest

from redirect import iptables, nft
from redirect.netns import netns_command, netns_path
from redirect.plan import CaptureConfig, CaptureError, HostWorkload, host_plan, in_pod_plan


def _names(plan, hook):
    return [r.name for r in plan.rules_for(hook)]


def test_in_pod_plan_skips_before_it_redirects():
    plan = in_pod_plan(CaptureConfig(exclude_cidrs=("10.96.0.0/12",), node_probe_sources=("169.254.7.127",)))
    assert _names(plan, "output") == ["out-skip-proxy-mark", "out-skip-loopback", "out-skip-cidrs4", "out-redirect"]
    # the node's probe SNAT addresses (IPv4 and IPv6) are exempt by default, before anything else
    assert _names(plan, "prerouting") == ["in-skip-probes4", "in-skip-probes6", "in-skip-loopback",
                                          "in-accept-tunnel", "in-skip-proxy-socket", "in-redirect"]
    probes = {r.name: r.saddrs for r in plan.rules_for("prerouting")[:2]}
    assert probes == {"in-skip-probes4": ("169.254.7.127/32",),
                      "in-skip-probes6": ("fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128",)}
    out = plan.rules_for("output")[-1]
    assert (out.action, out.to_port, out.tcp) == ("redirect", 15001, True)
    inbound = plan.rules_for("prerouting")[-1]
    assert (inbound.action, inbound.to_port) == ("redirect", 15006)
    tunnel = plan.rules_for("prerouting")[3]
    assert (tunnel.action, tunnel.dports) == ("return", (15008,))
    assert plan.rules_for("output")[0].mark == (0x539, 0xFFF)


def test_in_pod_plan_leaves_midstream_packets_of_the_proxys_sockets_alone():
    """Only in-pod (where a catch-all redirect exists), right before it, never a bare SYN."""
    plan = in_pod_plan(CaptureConfig(exclude_inbound_ports=(22,), proxy_mark=0x77, mark_mask=0xFF))
    rule = plan.rules_for("prerouting")[-2]
    assert (rule.name, rule.action, rule.midstream, rule.socket_mark) == ("in-skip-proxy-socket", "return", True,
                                                                          (0x77, 0xFF))
    assert (rule.saddrs, rule.daddrs, rule.dports, rule.iif, rule.mark) == ((), (), (), None, None)
    assert "tcp flags & (fin | syn | rst | ack) != syn socket wildcard 0 socket mark & 0xff == 0x77 return" in nft.render(plan)
    assert ("-p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m socket --restore-skmark -m mark --mark 0x77/0xff "
            in iptables.render_restore(plan, "ipv4"))
    host = host_plan([HostWorkload("web", "web", 15101, inbound_ports=(8080,))])
    assert "in-skip-proxy-socket" not in [r.name for r in host.rules]
    # a field added later: rules that do not use it keep their digests (no drift on upgrade)
    assert plan.rules_for("prerouting")[-1].comment == "nodeagent:in-redirect:8dae5b3d91"


def test_cidrs_split_by_family_and_ipv4_only_plan_drops_nothing_silently():
    plan = in_pod_plan(CaptureConfig(exclude_cidrs=("fd00::/8", "10.0.0.0/8")))
    fams = {r.name: (r.family, r.daddrs) for r in plan.rules}
    assert fams["out-skip-cidrs4"] == ("ipv4", ("10.0.0.0/8",))
    assert fams["out-skip-cidrs6"] == ("ipv6", ("fd00::/8",))
    assert [r.name for r in plan.rules_for("output", "ipv4")].count("out-skip-cidrs6") == 0
    with pytest.raises(CaptureError, match="IPv6 addresses .*ipv6 is off"):
        CaptureConfig(ipv6=False, exclude_cidrs=("fd00::/8",))


@pytest.mark.parametrize("kwargs,message", [
    ({"exclude_cidrs": ("10.0.0.1/8",)}, r"exclude_cidrs\[0\]: '10.0.0.1/8' .*did you mean 10.0.0.0/8"),
    ({"exclude_cidrs": ("nonsense",)}, r"exclude_cidrs\[0\]: 'nonsense' is not an address"),
    ({"exclude_cidrs": "10.0.0.0/8"}, r"exclude_cidrs must be a list"),
    ({"exclude_outbound_ports": (0,)}, r"exclude_outbound_ports\[0\] must be a TCP port"),
    ({"exclude_inbound_ports": (15008,)}, r"15008 is the tunnel port"),
    ({"outbound_port": 15006}, r"must differ"),
    ({"proxy_mark": 0x1539}, r"outside mark_mask"),
])
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(CaptureError, match=message):
        CaptureConfig(**kwargs)


def test_host_plan_one_listener_per_cgroup():
    plan = host_plan([HostWorkload("web", "/system.slice/web.service/", 15101, inbound_ports=(8080,)),
                      HostWorkload("db", "db", 15102, inbound_ports=(5432, 5433))],
                     cgroup2_mount="/sys/fs/cgroup/unified")
    redirects = {r.name: (r.cgroup, r.cgroup_level, r.to_port) for r in plan.rules if r.cgroup}
    assert redirects == {"out-redirect-web": ("system.slice/web.service", 2, 15101),
                         "out-redirect-db": ("db", 1, 15102)}
    inbound = {r.name: r.dports for r in plan.rules_for("prerouting") if r.action == "redirect"}
    assert inbound == {"in-redirect-web": (8080,), "in-redirect-db": (5432, 5433)}
    assert 'socket cgroupv2 level 2 "unified/system.slice/web.service"' in nft.render(plan)


@pytest.mark.parametrize("workloads,message", [
    ([], "no workloads"),
    ([("a", "x", 15101), ("a", "y", 15102)], "enrolled twice"),
    ([("a", "x", 15101), ("b", "x", 15102)], "share cgroup"),
    ([("a", "x", 15001)], "already used"),
    ([("a", "x", 15101), ("b", "y", 15101)], "already used"),
])
def test_host_plan_refuses_conflicts(workloads, message):
    with pytest.raises(CaptureError, match=message):
        host_plan([HostWorkload(*w) for w in workloads])


def test_host_workload_validation():
    with pytest.raises(CaptureError, match="must be a path below the cgroup v2 root"):
        HostWorkload("a", "../etc", 15101)
    with pytest.raises(CaptureError, match="name"):
        HostWorkload('a"b', "x", 15101)
    with pytest.raises(CaptureError, match=r"inbound port 15006 is one of the proxy's own ports"):
        host_plan([HostWorkload("a", "x", 15101, inbound_ports=(15006,))])
    with pytest.raises(CaptureError, match="workload 'a': inbound port 80 is also declared by workload 'b'"):
        host_plan([HostWorkload("a", "x", 15101, inbound_ports=(80,)), HostWorkload("b", "y", 15102, inbound_ports=(80,))])


def test_nft_cgroup_needs_a_mount_under_sys_fs_cgroup():
    plan = host_plan([HostWorkload("a", "x", 15101)], cgroup2_mount="/mnt/cg2")
    with pytest.raises(CaptureError, match="use the iptables backend"):
        nft.render(plan)
    assert '--path "x"' in iptables.render_restore(plan, "ipv4")  # iptables needs no mount


def _nft_listing(plan, *, drop=None, extra_rule=False):
    items = [{"metainfo": {"version": "1.0.6"}}, {"table": {"family": "inet", "name": "nodeagent", "handle": 1}}]
    handle = 1
    for hook in ("prerouting", "output"):
        items.append({"chain": {"family": "inet", "table": "nodeagent", "name": hook, "handle": handle,
                                "type": "nat", "hook": hook, "prio": -100, "policy": "accept"}})
    for rule in plan.rules:
        handle += 1
        if rule.name == drop:
            continue
        items.append({"rule": {"family": "inet", "table": "nodeagent", "chain": rule.hook, "handle": handle,
                               "comment": rule.comment, "expr": []}})
    if extra_rule:
        items.append({"rule": {"family": "inet", "table": "nodeagent", "chain": "output", "handle": 99,
                               "expr": []}})
    return json.dumps({"nftables": items})


def test_nft_state_round_trip_and_drift():
    plan = in_pod_plan()
    want = nft.desired_state(plan)
    assert nft.diff(want, nft.parse_state(_nft_listing(plan), "inet")) == ()
    assert nft.diff(want, None) == ("table inet nodeagent is missing",)
    gone = nft.diff(want, nft.parse_state(_nft_listing(plan, drop="out-redirect"), "inet"))
    assert len(gone) == 1 and "chain output" in gone[0] and "out-redirect" in gone[0]
    extra = nft.diff(want, nft.parse_state(_nft_listing(plan, extra_rule=True), "inet"))
    assert len(extra) == 1 and "<foreign rule handle 99>" in extra[0]
    # Same rules, new port: the comment digest changes, so it is drift.
    newer = nft.desired_state(in_pod_plan(CaptureConfig(outbound_port=15011)))
    assert nft.diff(newer, nft.parse_state(_nft_listing(plan), "inet"))
    with pytest.raises(CaptureError, match="cannot parse"):
        nft.parse_state("{not json", "inet")


def test_tables_and_chains_listings_tell_where_our_rules_can_be():
    meta = {"metainfo": {"version": "1.0.6"}}
    tables = json.dumps({"nftables": [meta, {"table": {"family": "inet", "name": "nodeagent", "handle": 1}},
                                      {"table": {"family": "ip", "name": "nodeagent", "handle": 2}},
                                      {"table": {"family": "inet", "name": "foreign", "handle": 3}},
                                      {"table": {"family": "ip6", "name": "nat", "handle": 4}}]})
    present = nft.parse_tables(tables)
    assert present == {("inet", "nodeagent"), ("ip", "nodeagent"), ("inet", "foreign"), ("ip6", "nat")}
    assert nft.iptables_nft_holders(present) == ("ip6",)
    assert nft.iptables_nft_holders(nft.parse_tables('{"nftables": [{"metainfo": {}}]}')) == ()

    chains = [
        # Same chain name outside iptables-nft's nat tables: not ours.
        {"chain": {"family": "inet", "table": "foreign", "name": "NODEAGENT-OUTPUT", "handle": 8}},
        {"chain": {"family": "ip", "table": "nat", "name": "OUTPUT", "handle": 10, "type": "nat",
                   "hook": "output", "prio": -100, "policy": "accept"}},
    ]
    assert nft.parse_owned_chains(json.dumps({"nftables": [meta, *chains]}), iptables.PREFIX) == frozenset()
    chains.append({"chain": {"family": "ip6", "table": "nat", "name": "NODEAGENT-PREROUTING", "handle": 13}})
    assert nft.parse_owned_chains(json.dumps({"nftables": chains}), iptables.PREFIX) == {"ipv6"}
    with pytest.raises(CaptureError, match="cannot parse `nft -j list chains` output"):
        nft.parse_owned_chains('{"nftables": 3}', iptables.PREFIX)
    with pytest.raises(CaptureError, match="cannot parse `nft -j list tables` output"):
        nft.parse_tables("{not json")


def test_iptables_state_round_trip_and_drift():
    plan = in_pod_plan(CaptureConfig(exclude_cidrs=("10.96.0.0/12",)))
    text = iptables.render_restore(plan, "ipv4")
    # A save of what we loaded (iptables-save prints built-in chains and jumps first).
    saved = ("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n" + text)
    state = iptables.parse_save(saved)
    assert state.rule_count == text.count("\n-A ") + 1
    assert iptables.diff(iptables.desired_state(plan, "ipv4"), state) == ()
    broken = iptables.parse_save(saved.replace("-A OUTPUT -j NODEAGENT-OUTPUT\n", ""))
    assert any("jumps" in d for d in iptables.diff(iptables.desired_state(plan, "ipv4"), broken))


def test_backend_choice_prefers_what_the_namespace_uses():
    empty = iptables.EMPTY
    busy = iptables.IptablesState({}, (), rule_count=12)
    ours = iptables.IptablesState({"NODEAGENT-OUTPUT": ()}, ("-A OUTPUT -j NODEAGENT-OUTPUT",), 1)
    assert iptables.choose_backend(empty, empty) == "iptables-nft"
    assert iptables.choose_backend(busy, empty) == "iptables-legacy"
    assert iptables.choose_backend(empty, busy) == "iptables-nft"
    assert iptables.choose_backend(busy, ours) == "iptables-nft"  # keep repairing where we are
    assert iptables.choose_backend(ours, busy) == "iptables-legacy"


def test_netns_references():
    assert netns_path("pod1") == "/var/run/netns/pod1"
    assert netns_path("/proc/42/ns/net") == "/proc/42/ns/net"
    assert netns_path(42) == "/proc/42/ns/net"
    assert netns_command("pod1", ["nft", "list", "ruleset"]) == [
        "nsenter", "--net=/var/run/netns/pod1", "--", "nft", "list", "ruleset"]
    assert netns_command(None, ["nft"]) == ["nft"]


def test_cgroup2_mount_found_in_mountinfo(tmp_path):
    from redirect.cgroup import cgroup2_mount
    info = tmp_path / "mountinfo"
    info.write_text(
        "35 24 0:30 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755\n"
        "36 35 0:31 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n")
    assert cgroup2_mount(str(info)) == "/sys/fs/cgroup/unified"
    info.write_text("35 24 0:30 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    with pytest.raises(CaptureError, match="cgroup v2 is not mounted"):
        cgroup2_mount(str(info))


def test_long_workload_names_fit_in_rule_comments():
    long_a, long_b = "ns-" + "x" * 190 + ".web", "ns-" + "x" * 190 + ".api"
    plan = host_plan([HostWorkload(long_a, "a/b", 15101, inbound_ports=(80,)),
                      HostWorkload(long_b, "a/c", 15102, inbound_ports=(81,)),
                      HostWorkload("short", "a/d", 15103)])
    assert max(len(r.comment) for r in plan.rules) <= 128  # nft's comment limit
    assert len({r.name for r in plan.rules}) == len(plan.rules)  # cut names stay distinct
    assert "out-redirect-short" in {r.name for r in plan.rules}
    with pytest.raises(CaptureError, match="1-200 characters"):
        HostWorkload("x" * 201, "a", 15101)
