"""Golden-file tests for the rendered capture rules (pure, no root).

The files under tests/unit/golden/ are the exact nft / iptables text nodeagent
loads. After an intended change, regenerate them and review the diff:

    NODEAGENT_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/unit/test_redirect_render.py
    git diff tests/unit/golden/

Without the variable a difference fails the test.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from redirect import iptables, nft
from redirect.plan import CaptureConfig, HostWorkload, host_plan, in_pod_plan, node_plan

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("NODEAGENT_REGEN_GOLDEN") == "1"

EXCLUSIONS = CaptureConfig(
    exclude_outbound_ports=(22, 3306),
    exclude_inbound_ports=(9000,),
    exclude_cidrs=("10.96.0.0/12", "fd00:10:96::/112", "192.168.0.1/32"),
    node_probe_sources=("169.254.7.127", "10.250.1.1"),
)

PLANS = {
    "inpod-default": lambda: in_pod_plan(),
    "inpod-exclusions": lambda: in_pod_plan(EXCLUSIONS),
    "inpod-ipv4-probes": lambda: in_pod_plan(CaptureConfig(ipv6=False, node_probe_sources=("169.254.7.127",))),
    # 17 ports: more than one multiport match can take.
    "inpod-many-ports": lambda: in_pod_plan(CaptureConfig(exclude_outbound_ports=tuple(range(8000, 8017)))),
    "host-cgroups": lambda: host_plan(
        [HostWorkload("web", "system.slice/web.service", 15101, inbound_ports=(8080, 8443)),
         HostWorkload("batch", "/batch/", 15102)],
        CaptureConfig(exclude_cidrs=("169.254.169.254/32",), node_probe_sources=("10.250.0.1",)),
        cgroup2_mount="/sys/fs/cgroup/unified"),
    # The node's own namespace: node-originated TCP to enrolled pods SNATed to the probe address.
    "node-probes": lambda: node_plan(["10.250.1.6", "10.250.1.5", "fd00:250::5"]),
    "node-probes-ipv4": lambda: node_plan(["10.250.1.5"], CaptureConfig(ipv6=False)),
}


def _renderings(name: str) -> dict[str, str]:
    plan = PLANS[name]()
    out = {f"{name}.nft": nft.render(plan)}
    for family, tool in (("ipv4", "iptables"), ("ipv6", "ip6tables")):
        if family not in plan.families:
            continue
        out[f"{name}.{tool}-restore"] = iptables.render_restore(plan, family)
        out[f"{name}.{tool}-check"] = "".join(
            shlex.join([tool, *cmd]) + "\n" for cmd in iptables.check_commands(plan, family))
    return out


CASES = [(name, file) for name in PLANS for file in _renderings(name)]


@pytest.mark.parametrize("name,file", CASES, ids=[f for _, f in CASES])
def test_rendering_matches_golden_file(name, file):
    text = _renderings(name)[file]
    path = GOLDEN / file
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with NODEAGENT_REGEN_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{file} differs from its golden file (regenerate if intended)"


def test_no_orphan_golden_files():
    expected = {file for _, file in CASES}
    assert {p.name for p in GOLDEN.iterdir()} == expected


@pytest.mark.parametrize("name", sorted(PLANS))
def test_rendering_is_deterministic(name):
    assert _renderings(name) == _renderings(name)


def test_equivalent_configs_render_identically():
    a = in_pod_plan(CaptureConfig(exclude_outbound_ports=(3306, 22, 22),
                                  exclude_cidrs=("192.168.0.1/32", "10.96.0.0/12")))
    b = in_pod_plan(CaptureConfig(exclude_outbound_ports=(22, 3306),
                                  exclude_cidrs=("10.96.0.0/12", "192.168.0.1")))
    assert nft.render(a) == nft.render(b)
    assert iptables.render_restore(a, "ipv4") == iptables.render_restore(b, "ipv4")


def test_nft_text_is_one_transaction_that_replaces_the_table():
    text = nft.render(in_pod_plan())
    lines = text.splitlines()
    # add-then-delete for both families first: loading twice can never duplicate rules.
    assert lines[:4] == ["add table inet nodeagent", "delete table inet nodeagent",
                         "add table ip nodeagent", "delete table ip nodeagent"]
    assert text.count("table inet nodeagent {") == 1
    # nft 1.0.6 refuses `dstnat` for nat output: numeric priorities only.
    assert "dstnat" not in text and text.count("priority -100;") == 2


def test_restore_text_has_one_jump_per_owned_chain_and_repairs_existing_jumps():
    plan = in_pod_plan()
    fresh = iptables.render_restore(plan, "ipv4")
    assert fresh.count("-A OUTPUT -j NODEAGENT-OUTPUT") == 1
    assert fresh.count("-A PREROUTING -j NODEAGENT-PREROUTING") == 1
    # The kernel already holds our rules plus a duplicated jump and a stale chain.
    current = iptables.parse_save(
        "*nat\n:OUTPUT ACCEPT [0:0]\n:NODEAGENT-OUTPUT - [0:0]\n:NODEAGENT-OLD - [0:0]\n"
        "-A OUTPUT -j NODEAGENT-OUTPUT\n-A OUTPUT -j NODEAGENT-OUTPUT\n-A OUTPUT -j NODEAGENT-OLD\n"
        "-A OUTPUT -j KUBE-SERVICES\nCOMMIT\n")
    repair = iptables.render_restore(plan, "ipv4", current).splitlines()
    assert repair.count("-D OUTPUT -j NODEAGENT-OUTPUT") == 2
    assert "-D OUTPUT -j NODEAGENT-OLD" in repair and "-X NODEAGENT-OLD" in repair
    assert repair.index("-D OUTPUT -j NODEAGENT-OLD") < repair.index("-X NODEAGENT-OLD")
    assert repair.count("-A OUTPUT -j NODEAGENT-OUTPUT") == 1
    assert not any("KUBE-SERVICES" in line for line in repair)
    # Declarations (which flush) come before every command.
    first_cmd = next(i for i, l in enumerate(repair) if l.startswith("-"))
    assert all(not l.startswith(":") for l in repair[first_cmd:])


def test_cleanup_is_reverse_order_and_only_owned():
    cmds = [" ".join(c) for c in iptables.cleanup_commands()]
    assert cmds == [
        "-t nat -D OUTPUT -j NODEAGENT-OUTPUT", "-t nat -D PREROUTING -j NODEAGENT-PREROUTING",
        "-t nat -F NODEAGENT-OUTPUT", "-t nat -F NODEAGENT-PREROUTING",
        "-t nat -X NODEAGENT-OUTPUT", "-t nat -X NODEAGENT-PREROUTING",
    ]
    state = iptables.parse_save(
        "*nat\n:NODEAGENT-OUTPUT - [0:0]\n:MINE - [0:0]\n-A OUTPUT -j NODEAGENT-OUTPUT\n"
        "-A OUTPUT -j MINE\n-A MINE -j RETURN\n-A NODEAGENT-OUTPUT -j RETURN\nCOMMIT\n")
    text = iptables.render_cleanup(state)
    assert text == ("*nat\n:NODEAGENT-OUTPUT - [0:0]\n-D OUTPUT -j NODEAGENT-OUTPUT\n"
                    "-X NODEAGENT-OUTPUT\nCOMMIT\n")
    assert iptables.render_cleanup(iptables.parse_save("*nat\n-A OUTPUT -j MINE\nCOMMIT\n")) is None


def test_rule_comment_changes_with_rule_content():
    a = {r.name: r.comment for r in in_pod_plan().rules}
    b = {r.name: r.comment for r in in_pod_plan(CaptureConfig(outbound_port=15011)).rules}
    assert a["out-redirect"] != b["out-redirect"]
    assert a["out-skip-loopback"] == b["out-skip-loopback"]
