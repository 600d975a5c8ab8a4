"""Applying capture rules to a real kernel: idempotence, drift repair, cleanup, backends.

Each test works in its own fresh network namespace (root needed).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from redirect import capture
from redirect import iptables, libnft, nft
from redirect.netns import run_command
from redirect.plan import CaptureConfig, in_pod_plan

PLAN = in_pod_plan(CaptureConfig(exclude_cidrs=("10.96.0.0/12", "fd00:96::/112"),
                                 exclude_outbound_ports=(22,), node_probe_sources=("169.254.7.127",)))


def sh(ns, *argv, input=None, check=True):
    return run_command(ns, list(argv), input=input, check=check)


def nft_listing(ns, family="inet"):
    return sh(ns, "nft", "list", "table", family, "nodeagent").stdout


def rule_handle(ns, comment_prefix):
    listing = json.loads(sh(ns, "nft", "-j", "list", "table", "inet", "nodeagent").stdout)
    for item in listing["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment", "").startswith(comment_prefix):
            return rule["chain"], rule["handle"]
    raise AssertionError(f"no rule with comment {comment_prefix}")


def add_foreign_nft(ns):
    sh(ns, "nft", "-f", "-", input=(
        "table inet foreign {\n chain out {\n  type filter hook output priority 0; policy accept;\n"
        "  tcp dport 9999 counter\n }\n}\n"))
    return sh(ns, "nft", "list", "table", "inet", "foreign").stdout


def test_nft_apply_idempotent_drift_repair_and_cleanup(fresh_netns):
    ns = fresh_netns
    foreign = add_foreign_nft(ns)

    first = capture.apply(PLAN, ns)
    assert first.backend == "nft" and first.changed and first.drift == ("table inet nodeagent is missing",)
    listing = nft_listing(ns)
    for rule in PLAN.rules:
        assert rule.comment in listing
    assert "redirect to :15001" in listing and "redirect to :15006" in listing
    assert "tcp dport 15008 return" in listing
    assert capture.verify(PLAN, ns) == ()

    second = capture.apply(PLAN, ns)
    assert (second.changed, second.drift) == (False, ())
    assert nft_listing(ns) == listing  # same handles even: nothing was reloaded

    # Someone deletes our redirect rule: verify names it, apply restores it.
    chain, handle = rule_handle(ns, "nodeagent:out-redirect:")
    sh(ns, "nft", "delete", "rule", "inet", "nodeagent", chain, "handle", str(handle))
    drift = capture.verify(PLAN, ns)
    assert len(drift) == 1 and "out-redirect" in drift[0]
    repaired = capture.apply(PLAN, ns)
    assert repaired.changed and repaired.drift == drift
    assert capture.verify(PLAN, ns) == ()
    assert nft_listing(ns).count("redirect to :15001") == 1

    # A rule slipped into our table is drift too.
    sh(ns, "nft", "add", "rule", "inet", "nodeagent", "output", "tcp", "dport", "80", "accept")
    assert any("foreign rule" in d for d in capture.verify(PLAN, ns))
    capture.apply(PLAN, ns)
    assert capture.verify(PLAN, ns) == ()

    assert capture.cleanup(ns) == ("nft",)
    tables = sh(ns, "nft", "list", "tables").stdout
    assert "nodeagent" not in tables
    assert sh(ns, "nft", "list", "table", "inet", "foreign").stdout == foreign
    assert capture.cleanup(ns) == ()  # nothing left to remove


def add_foreign_iptables(ns, backend):
    sh(ns, f"iptables-{backend}-restore", "--noflush", "-w", "5", input=(
        "*nat\n:FOREIGN - [0:0]\n-A FOREIGN -p tcp -m tcp --dport 9999 -j RETURN\n"
        "-A OUTPUT -d 10.250.99.1/32 -j RETURN\n-A OUTPUT -j FOREIGN\nCOMMIT\n"))


def foreign_lines(save_text):
    return [l for l in save_text.splitlines() if "FOREIGN" in l or "10.250.99.1" in l]


@pytest.mark.parametrize("variant", ["nft", "legacy"])
def test_iptables_backend_detection_apply_repair_cleanup(fresh_netns, variant):
    ns = fresh_netns
    other = "legacy" if variant == "nft" else "nft"
    add_foreign_iptables(ns, variant)
    save = f"iptables-{variant}-save"
    before = foreign_lines(sh(ns, save).stdout)
    assert len(before) == 4

    assert capture.detect_backend(ns) == f"iptables-{variant}"
    first = capture.apply(PLAN, ns, "iptables")
    assert first.backend == f"iptables-{variant}" and first.changed
    text = sh(ns, save).stdout
    assert text.count("-j NODEAGENT-OUTPUT") == 1 and text.count("-j NODEAGENT-PREROUTING") == 1
    assert "-A NODEAGENT-OUTPUT -p tcp -m comment" in text and "--to-ports 15001" in text
    assert "NODEAGENT" in sh(ns, f"ip6tables-{variant}-save").stdout  # IPv6 too
    assert "NODEAGENT" not in sh(ns, f"iptables-{other}-save").stdout  # the other backend untouched
    # Every rule is present in its check (-C) form.
    for cmd in iptables.check_commands(PLAN, "ipv4"):
        assert sh(ns, f"iptables-{variant}", "-w", "5", *cmd, check=False).returncode == 0, cmd

    second = capture.apply(PLAN, ns, "iptables")
    assert (second.changed, second.drift) == (False, ())
    assert sh(ns, save).stdout.count("-j NODEAGENT-OUTPUT") == 1

    # Drift: a rule deleted and a duplicate jump added; one restore repairs both.
    redirect_check = next(c for c in iptables.check_commands(PLAN, "ipv4") if "15001" in c)
    xt = (f"iptables-{variant}", "-w", "5")
    sh(ns, *xt, *["-D" if a == "-C" else a for a in redirect_check])
    sh(ns, *xt, "-t", "nat", "-A", "OUTPUT", "-j", "NODEAGENT-OUTPUT")
    assert sh(ns, *xt, *redirect_check, check=False).returncode != 0
    drift = capture.verify(PLAN, ns, "iptables")
    assert any("out-redirect" in d for d in drift) and any("jumps" in d for d in drift)
    assert capture.apply(PLAN, ns, "iptables").changed
    assert capture.verify(PLAN, ns, "iptables") == ()
    text = sh(ns, save).stdout
    assert text.count("-j NODEAGENT-OUTPUT") == 1
    assert foreign_lines(text) == before

    assert capture.cleanup(ns) == (f"iptables-{variant}",)
    after = sh(ns, save).stdout
    assert "NODEAGENT" not in after and "NODEAGENT" not in sh(ns, f"ip6tables-{variant}-save").stdout
    assert foreign_lines(after) == before


def test_switching_backend_removes_rules_from_the_old_one(fresh_netns):
    ns = fresh_netns
    capture.apply(PLAN, ns, "iptables-legacy")
    result = capture.apply(PLAN, ns, "nft")
    assert result.removed_from == ("iptables-legacy",)
    assert "NODEAGENT" not in sh(ns, "iptables-legacy-save").stdout
    assert capture.verify(PLAN, ns, "nft") == ()
    # IPv4-only plan replaces the inet table by an ip one.
    v4 = in_pod_plan(CaptureConfig(ipv6=False))
    assert capture.verify(v4, ns) == ("table ip nodeagent is missing", "stale table inet nodeagent")
    capture.apply(v4, ns)
    tables = sh(ns, "nft", "list", "tables").stdout
    assert "table ip nodeagent" in tables and "table inet nodeagent" not in tables
    capture.cleanup(ns)
    assert "nodeagent" not in sh(ns, "nft", "list", "tables").stdout


def test_errors_name_the_namespace():
    with pytest.raises(capture.CaptureError, match=r"network namespace 'nak-missing' not found"):
        capture.apply(PLAN, "nak-missing")
    with pytest.raises(capture.CaptureError, match="capture backend 'pf' is unknown"):
        capture.apply(PLAN, None, "pf")


def test_rendered_nft_text_loads_as_is(fresh_netns):
    """The golden nft text is valid for this nft (host-mode text is covered in test_redirect_capture)."""
    sh(fresh_netns, "nft", "-c", "-f", "-", input=nft.render(PLAN))


def legacy_tables_loaded(ns):
    return sh(ns, "cat", "/proc/self/net/ip_tables_names", "/proc/self/net/ip6_tables_names").stdout.split()


def test_nft_apply_is_in_process_and_never_loads_legacy_tables(fresh_netns, monkeypatch):
    """The nft path spawns no process (libnftables in the namespace), reads iptables-nft
    only when its nat table holds nodeagent's chains, and the legacy backend only where
    it was used: a fresh pod's legacy nat table is never loaded."""
    if not libnft.available():
        pytest.fail("libnftables.so.1 cannot be loaded; it comes with Debian's nftables package")
    ns = fresh_netns
    add_foreign_nft(ns)
    add_foreign_iptables(ns, "nft")  # iptables-nft in use, without nodeagent's chains
    spawned = []
    real_popen = subprocess.Popen

    def counting_popen(*args, **kwargs):
        spawned.append(args[0] if args else kwargs.get("args"))
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", counting_popen)
    assert capture.apply(PLAN, ns).drift == ("table inet nodeagent is missing",)
    assert capture.apply(PLAN, ns).changed is False
    assert capture.verify(PLAN, ns) == ()
    assert capture.cleanup(ns) == ("nft",)
    assert capture.cleanup(ns) == ()
    assert spawned == []
    monkeypatch.undo()
    assert legacy_tables_loaded(ns) == []  # reading never instantiated the legacy nat table


@pytest.mark.parametrize("old", ["iptables-nft", "iptables-legacy"])
def test_switching_from_each_iptables_backend_to_nft(fresh_netns, old):
    ns = fresh_netns
    add_foreign_iptables(ns, old.split("-")[1])
    save = f"{old}-save"
    before = foreign_lines(sh(ns, save).stdout)
    capture.apply(PLAN, ns, old)
    assert "NODEAGENT" in sh(ns, f"ip6tables-{old.split('-')[1]}-save").stdout
    result = capture.apply(PLAN, ns, "nft")
    assert result.removed_from == (old,) and result.changed
    after = sh(ns, save).stdout
    assert "NODEAGENT" not in after and "NODEAGENT" not in sh(ns, f"ip6tables-{old.split('-')[1]}-save").stdout
    assert foreign_lines(after) == before  # only ours removed
    assert capture.apply(PLAN, ns, "nft") == capture.ApplyResult("nft", False, ())
    capture.cleanup(ns)


def test_the_nft_command_path_gives_the_same_results(fresh_netns, monkeypatch, caplog):
    """Without libnftables (or with a caller's runner) the nft binary does the same job."""
    ns = fresh_netns
    calls = []

    def runner(netns, argv, **kwargs):
        calls.append(argv[0])
        return run_command(netns, argv, **kwargs)

    foreign = add_foreign_nft(ns)
    assert capture.apply(PLAN, ns, runner=runner).drift == ("table inet nodeagent is missing",)
    assert calls == ["nft", "nft"]  # list ruleset, one load
    listing = nft_listing(ns)
    assert capture.apply(PLAN, ns, runner=runner).changed is False
    assert nft_listing(ns) == listing
    chain, handle = rule_handle(ns, "nodeagent:in-redirect:")
    sh(ns, "nft", "delete", "rule", "inet", "nodeagent", chain, "handle", str(handle))
    assert any("in-redirect" in d for d in capture.verify(PLAN, ns, runner=runner))
    assert capture.apply(PLAN, ns, runner=runner).changed
    assert capture.verify(PLAN, ns) == ()  # and the in-process reader agrees

    # libnftables missing: one warning, then the nft binary through nsenter.
    monkeypatch.setattr(libnft, "SONAME", "libnftables-missing-for-this-test.so.1")
    monkeypatch.setattr(libnft, "_lib", None)
    monkeypatch.setattr(libnft, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="redirect.libnft"):
        assert capture.apply(PLAN, ns).changed is False
        assert capture.cleanup(ns) == ("nft",)
    warnings = [r.getMessage() for r in caplog.records if r.name == "redirect.libnft"]
    assert len(warnings) == 1 and "using the nft command instead" in warnings[0]
    assert sh(ns, "nft", "list", "table", "inet", "foreign").stdout == foreign


def test_libnftables_errors_name_the_namespace(fresh_netns):
    with pytest.raises(libnft.NftLibError, match=rf"in network namespace '{fresh_netns}' refused "
                                                 r"`add rule inet nosuch output accept`: .*No such file"):
        libnft.run(fresh_netns, lambda s: s.cmd("add rule inet nosuch output accept"))
    # A failed load leaves the namespace as it was (one transaction).
    add_foreign_nft(fresh_netns)
    bad = nft.render(PLAN).replace("redirect to :15001", "redirect to :99999")
    with pytest.raises(libnft.NftLibError):
        libnft.run(fresh_netns, lambda s: s.cmd(bad))
    assert "nodeagent" not in sh(fresh_netns, "nft", "list", "tables").stdout


def test_concurrent_applies_in_several_namespaces(needs_root):
    """The agent applies from executor threads: contexts never cross namespaces."""
    names = [f"nakc{secrets.token_hex(3)}{i}" for i in range(4)]
    plans = [in_pod_plan(CaptureConfig(outbound_port=15001 + i)) for i in range(len(names))]
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        def work(i):
            for _ in range(5):
                capture.apply(plans[i], names[i])
                capture.apply(plans[(i + 1) % len(plans)], names[i])
            return capture.apply(plans[i], names[i])

        with ThreadPoolExecutor(len(names)) as pool:
            results = list(pool.map(work, range(len(names))))
        for i, name in enumerate(names):
            assert results[i].changed  # the last plan differed from the one before
            assert capture.verify(plans[i], name) == ()
            assert f"redirect to :{15001 + i}" in nft_listing(name)
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def test_out_of_file_descriptors_is_an_error_not_an_exit(fresh_netns):
    """libnftables exit()s when it cannot open its socket; apply must raise instead."""
    import resource

    assert libnft.available()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    errors = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        try:
            while len(held) < 256:  # bounded: the limit is 256
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
        # 0 spare: the namespace cannot be opened; 2 spare: the namespace and the
        # thread's own are opened, then libnftables' socket would fail.
        for spare in (0, 2):
            while len(held) > 0 and spare > 0:
                os.close(held.pop())
                spare -= 1
            with pytest.raises(capture.CaptureError, match="Too many open files") as info:
                capture.apply(PLAN, fresh_netns)
            errors.append(str(info.value))
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "cannot open network namespace" in errors[0]
    assert "netfilter netlink socket" in errors[1]
    assert capture.apply(PLAN, fresh_netns).changed  # and it works again once there are fds
