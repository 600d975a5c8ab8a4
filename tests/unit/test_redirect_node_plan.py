"""The node probe plan and the probe exemptions of in-pod plans (pure, no root)."""
from __future__ import annotations

import re

import pytest

from redirect import iptables, nft
from redirect.plan import (ISTIO_PROBE_SOURCE, ISTIO_PROBE_SOURCE_V6, NODE_OWNER, OWNER, CaptureConfig,
                           CaptureError, in_pod_plan, node_plan)


def test_node_plan_snats_local_sockets_to_pods_but_not_the_proxy():
    plan = node_plan(["10.250.1.6", "10.250.1.5", "fd00:250::5", "10.250.1.5"])
    assert (plan.mode, plan.owner, plan.hooks) == ("node", NODE_OWNER, ("postrouting",))
    skip, snat4, snat6 = plan.rules
    assert (skip.name, skip.action, skip.mark) == ("post-skip-proxy-mark", "return", (0x539, 0xFFF))
    assert (snat4.action, snat4.to_addr, snat4.family, snat4.local_socket, snat4.tcp) == (
        "snat", ISTIO_PROBE_SOURCE, "ipv4", True, True)
    assert snat4.daddrs == ("10.250.1.5/32", "10.250.1.6/32")  # sorted, duplicates dropped
    assert (snat6.to_addr, snat6.daddrs) == (ISTIO_PROBE_SOURCE_V6, ("fd00:250::5/128",))


def test_node_plan_families_follow_the_config():
    v4 = node_plan(["10.250.1.5", "fd00:250::5"], CaptureConfig(ipv6=False))
    assert [r.name for r in v4.rules] == ["post-skip-proxy-mark", "post-probe-snat4"]
    custom = node_plan(["10.250.1.5"], CaptureConfig(probe_snat_v4="169.254.99.1"))
    assert custom.rules[1].to_addr == "169.254.99.1"
    with pytest.raises(CaptureError, match="probe SNAT is off"):
        node_plan(["10.250.1.5"], CaptureConfig(probe_snat_v4=None))


@pytest.mark.parametrize("addresses,message", [
    ([], "no pod addresses given"),
    (["10.250.1.5/24"], r"pod address \[0\] '10.250.1.5/24' is not an IP address"),
    (["pod-web"], r"\[0\] 'pod-web' is not an IP address"),
    ("10.250.1.5", "must be a list"),
])
def test_node_plan_errors_name_the_address(addresses, message):
    with pytest.raises(CaptureError, match=message):
        node_plan(addresses)


@pytest.mark.parametrize("kwargs,message", [
    ({"probe_snat_v4": "fd00::1"}, r"probe_snat_v4: 'fd00::1' is not an IPv4 address"),
    ({"probe_snat_v6": "169.254.7.127"}, r"probe_snat_v6: '169.254.7.127' is not an IPv6 address"),
    ({"probe_snat_v4": "169.254.7.127/32"}, r"probe_snat_v4: .* is not an IPv4 address"),
])
def test_snat_address_errors(kwargs, message):
    with pytest.raises(CaptureError, match=message):
        CaptureConfig(**kwargs)


def test_in_pod_plan_exempts_the_snat_address_and_explicit_sources():
    config = CaptureConfig(node_probe_sources=("10.250.1.1", "169.254.7.127"))
    assert config.inbound_exempt_sources == ("10.250.1.1/32", "169.254.7.127/32",
                                             "fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128")
    saddrs = {r.name: r.saddrs for r in in_pod_plan(config).rules if r.name.startswith("in-skip-probes")}
    assert saddrs == {"in-skip-probes4": ("10.250.1.1/32", "169.254.7.127/32"),
                      "in-skip-probes6": ("fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128",)}
    # ipv6 off drops the IPv6 SNAT address instead of refusing the default
    assert CaptureConfig(ipv6=False).inbound_exempt_sources == ("169.254.7.127/32",)
    # both off: only what the operator gave
    off = CaptureConfig(probe_snat_v4=None, probe_snat_v6=None)
    assert [r.name for r in in_pod_plan(off).rules if r.name.startswith("in-skip-probes")] == []


def test_owners_never_read_each_others_chains():
    assert iptables.prefix_of(OWNER) == "NODEAGENT-" and iptables.prefix_of(NODE_OWNER) == "NODEAGENT_NODE-"
    plan = node_plan(["10.250.1.5"])
    saved = ("*nat\n:NODEAGENT-OUTPUT - [0:0]\n:NODEAGENT_NODE-POSTROUTING - [0:0]\n"
             "-A OUTPUT -j NODEAGENT-OUTPUT\n-A POSTROUTING -j NODEAGENT_NODE-POSTROUTING\n"
             + "".join(line + "\n" for line in iptables.desired_state(plan, "ipv4").chains[
                 "NODEAGENT_NODE-POSTROUTING"]) + "COMMIT\n")
    node_state = iptables.parse_save(saved, iptables.prefix_of(NODE_OWNER))
    main_state = iptables.parse_save(saved)
    assert list(node_state.chains) == ["NODEAGENT_NODE-POSTROUTING"]
    assert node_state.jumps == ("-A POSTROUTING -j NODEAGENT_NODE-POSTROUTING",)
    assert iptables.diff(iptables.desired_state(plan, "ipv4"), node_state) == ()
    assert list(main_state.chains) == ["NODEAGENT-OUTPUT"] and main_state.jumps == ("-A OUTPUT -j NODEAGENT-OUTPUT",)
    # nft: replacing or removing one owner's table never names the other's
    def tables(text):
        return set(re.findall(r"table (?:inet|ip) (\S+)", text))

    assert tables(nft.render(plan)) == tables(nft.render_cleanup((NODE_OWNER,))) == {NODE_OWNER}
    assert tables(nft.render(in_pod_plan())) == tables(nft.render_cleanup()) == {OWNER}
    assert nft.desired_state(plan).chains["postrouting"].priority == nft.SNAT_PRIORITY


def test_new_rule_fields_leave_older_digests_alone():
    # the rules that do not use to_addr/local_socket hash as before (no drift on upgrade)
    rules = {r.name: r.comment for r in in_pod_plan().rules}
    assert rules["in-redirect"] == "nodeagent:in-redirect:8dae5b3d91"
    assert rules["out-skip-proxy-mark"] == "nodeagent:out-skip-proxy-mark:987fede70e"


def test_node_plan_sets_hold_the_addresses_and_the_rules_do_not_change_with_them():
    one, two = node_plan(["10.250.1.5"]), node_plan(["10.250.1.5", "10.250.1.6", "fd00:250::5"])
    assert [r.comment for r in one.rules] == [r.comment for r in two.rules]  # members are the set's
    assert nft.named_sets(two) == {"probe_pods4": ("ipv4_addr", ("10.250.1.5", "10.250.1.6")),
                                   "probe_pods6": ("ipv6_addr", ("fd00:250::5",))}
    # a family with no pod yet: an empty set in nft (matches nothing), no rule at all in ip6tables
    assert nft.named_sets(one)["probe_pods6"] == ("ipv6_addr", ())
    assert "set probe_pods6 {\n\t\ttype ipv6_addr\n\t}" in nft.render(one)
    (only,) = iptables.desired_state(one, "ipv6").chains["NODEAGENT_NODE-POSTROUTING"]
    assert "post-skip-proxy-mark" in only  # not an SNAT rule without -d (it would match everything)


def test_element_updates_are_one_batch_per_set():
    plan = node_plan(["10.250.1.5"])
    assert nft.render_elements(plan, add=["10.250.1.7", "fd00:250::7"], delete=["10.250.1.5", "10.250.1.6"]) == (
        "delete element inet nodeagent-node probe_pods4 { 10.250.1.5, 10.250.1.6 }\n"
        "add element inet nodeagent-node probe_pods4 { 10.250.1.7 }\n"
        "add element inet nodeagent-node probe_pods6 { fd00:250::7 }\n")
    assert nft.render_elements(plan) == ""
    v4 = node_plan(["10.250.1.5"], CaptureConfig(ipv6=False))
    assert nft.render_elements(v4, add=["10.250.1.7"]) == "add element ip nodeagent-node probe_pods4 { 10.250.1.7 }\n"
    with pytest.raises(CaptureError, match="no set for ipv6 address fd00:250::7"):
        nft.render_elements(v4, add=["fd00:250::7"])


def test_set_members_are_part_of_the_drift_check():
    plan = node_plan(["10.250.1.5", "10.250.1.6"], CaptureConfig(ipv6=False))
    want = nft.desired_state(plan)

    def listing(elements, name="probe_pods4", kind="ipv4_addr"):
        items = [{"table": {"family": "ip", "name": NODE_OWNER}},
                 {"set": {"family": "ip", "table": NODE_OWNER, "name": name, "type": kind, "elem": elements}},
                 {"chain": {"family": "ip", "table": NODE_OWNER, "name": "postrouting", "type": "nat",
                            "hook": "postrouting", "prio": 100, "policy": "accept"}}]
        items += [{"rule": {"family": "ip", "table": NODE_OWNER, "chain": "postrouting", "comment": r.comment}}
                  for r in plan.rules]
        import json
        return nft.parse_state(json.dumps({"nftables": items}), "ip", NODE_OWNER)

    assert nft.diff(want, listing(["10.250.1.6", "10.250.1.5"])) == ()
    assert nft.diff(want, listing(["10.250.1.5", "10.250.1.9"])) == (
        "set probe_pods4: elements differ (missing ['10.250.1.6']; unexpected ['10.250.1.9'])",)
    assert nft.diff(want, listing(["10.250.1.5", {"prefix": {"addr": "10.250.1.0", "len": 24}}]))[0].startswith(
        "set probe_pods4: elements differ (missing ['10.250.1.6']; unexpected ['{")
    assert nft.diff(want, listing([], name="other")) == ("set probe_pods4 is missing", "unexpected set other")
    assert nft.diff(want, listing(["10.250.1.5", "10.250.1.6"], kind="ipv6_addr")) == (
        "set probe_pods4 is type ipv6_addr, want ipv4_addr",)
