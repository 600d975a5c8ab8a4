"""Pure parts of bpf/: map key/value codecs, the attach plan, privilege checks."""
from __future__ import annotations

import pytest

from bpf import loader, maps


def test_workload_config_layout_matches_c_struct():
    raw = maps.WorkloadConfig(7, "127.0.0.1", 15001).encode()
    # u32 id, u32 ip (network order), u16 port (host order), u16 flags, u32 pad
    assert raw == (7).to_bytes(4, "little") + bytes([127, 0, 0, 1]) + (15001).to_bytes(2, "little") + bytes(6)
    assert len(raw) == maps.WORKLOAD_CONFIG_SIZE == 16
    assert maps.WorkloadConfig.decode(raw) == maps.WorkloadConfig(7, "127.0.0.1", 15001)


MAPPED = bytes(10) + b"\xff\xff"


def test_original_dst_round_trip_and_layout():
    od = maps.OriginalDst("10.250.1.2", 80, workload_id=3, netns_cookie=0x1122334455)
    raw = od.encode()
    assert len(raw) == maps.ORIGINAL_DST_SIZE == 32
    assert raw[:16] == MAPPED + bytes([10, 250, 1, 2])      # IPv4 as ::ffff:a.b.c.d
    assert raw[16:18] == (80).to_bytes(2, "little")
    assert raw[18:20] == bytes(2)                            # flags
    assert raw[20:24] == (3).to_bytes(4, "little")
    assert raw[24:32] == (0x1122334455).to_bytes(8, "little")
    assert maps.OriginalDst.decode(raw) == od
    v6 = maps.OriginalDst("fd00:250::2", 443, 1, 9)
    assert v6.encode()[:16] == bytes.fromhex("fd000250000000000000000000000002")
    assert maps.OriginalDst.decode(v6.encode()) == v6


def test_pair_key_layout():
    raw = maps.encode_pair_key(99, "127.0.0.1", 40000, 15001)
    assert len(raw) == maps.PAIR_KEY_SIZE == 32
    assert raw == (99).to_bytes(8, "little") + MAPPED + bytes([127, 0, 0, 1]) \
        + (40000).to_bytes(2, "little") + (15001).to_bytes(2, "little") + bytes(4)
    assert maps.decode_pair_key(raw) == (99, "127.0.0.1", 40000, 15001)
    assert maps.decode_pair_key(maps.encode_pair_key(1, "::1", 5, 6)) == (1, "::1", 5, 6)
    # a v4-mapped peer (dual-stack listener) is the same key as the plain IPv4 one
    assert maps.encode_pair_key(1, "::ffff:127.0.0.1", 5, 6) == maps.encode_pair_key(1, "127.0.0.1", 5, 6)


def test_cidr_key_counts_the_workload_id_in_the_prefix():
    raw = maps.encode_cidr_key(5, "10.250.3.7/24")
    assert len(raw) == maps.CIDR_KEY_SIZE == 24
    assert int.from_bytes(raw[:4], "little") == 32 + 96 + 24
    assert raw[8:] == MAPPED + bytes([10, 250, 3, 0])     # host bits cleared
    assert maps.decode_cidr_key(raw) == (5, "10.250.3.0/24")
    assert maps.decode_cidr_key(maps.encode_cidr_key(5, "10.250.3.7")) == (5, "10.250.3.7/32")
    v6 = maps.encode_cidr_key(5, "fd00:250::/64")
    assert int.from_bytes(v6[:4], "little") == 32 + 64
    assert maps.decode_cidr_key(v6) == (5, "fd00:250::/64")


def test_port_key_layout():
    assert maps.encode_port_key(2, 443) == (2).to_bytes(4, "little") + (443).to_bytes(2, "little") + bytes(2)


@pytest.mark.parametrize("bad", [0, 65536, -1, "80"])
def test_bad_ports_are_refused_with_the_field_named(bad):
    with pytest.raises(ValueError, match="excluded port must be 1..65535"):
        maps.encode_port_key(1, bad)
    with pytest.raises(ValueError, match="proxy port must be 1..65535"):
        maps.WorkloadConfig(1, "127.0.0.1", bad).encode()


def test_bad_addresses_are_refused():
    with pytest.raises(ValueError, match="excluded destination must be an IP address or CIDR"):
        maps.encode_cidr_key(1, "example.com")
    with pytest.raises(ValueError, match="not an IPv4 address: 'localhost'"):
        maps.WorkloadConfig(1, "localhost", 15001).encode()


def test_map_layouts_match_codecs():
    assert loader.MAP_LAYOUTS[maps.MAP_PAIR] == (32, 32)
    assert set(loader.MAP_LAYOUTS) == set(maps.MAP_NAMES)


def test_attach_plan_creates_missing_links_and_replaces_pinned_ones():
    pin = "/sys/fs/bpf/nodeagent"
    fresh = loader.attach_plan(pin, set())
    assert [(s.program.name, s.action) for s in fresh] == [
        ("na_connect4", "create"), ("na_connect6", "create"), ("na_sockops", "create"),
        ("na_getsockopt", "create"), ("na_fast_sockops", "create"), ("na_fast_msg", "attach-map")]
    assert [s.link_pin for s in fresh] == [
        f"{pin}/links/na_connect4", f"{pin}/links/na_connect6", f"{pin}/links/na_sockops",
        f"{pin}/links/na_getsockopt", f"{pin}/links/na_fast_sockops", f"{pin}/maps/local_socks"]
    partly = loader.attach_plan(pin, {f"{pin}/links/na_sockops", f"{pin}/maps/netns"})
    assert [s.action for s in partly] == ["create", "create", "replace", "create", "create", "attach-map"]


def test_attach_plan_leaves_out_optional_programs_the_kernel_refused():
    core = {"na_connect4", "na_connect6", "na_sockops", "na_getsockopt"}
    plan = loader.attach_plan("/sys/fs/bpf/x", set(), loaded=core)
    assert {s.program.name for s in plan} == core
    assert all(not p.optional for p in loader.PROGRAMS if p.name in core)


def test_attach_types_match_the_kernel_enum():
    by_name = {p.name: (p.prog_type, p.attach_type) for p in loader.PROGRAMS}
    assert by_name == {"na_connect4": (18, 10), "na_connect6": (18, 11), "na_sockops": (13, 3),
                       "na_getsockopt": (25, 21), "na_fast_sockops": (13, 3), "na_fast_msg": (16, 7)}


def test_privilege_problem():
    root_caps = (1 << 41) - 1
    assert loader.privilege_problem(root_caps) is None
    assert loader.privilege_problem((1 << loader.CAP_BPF) | (1 << loader.CAP_NET_ADMIN)) is None
    problem = loader.privilege_problem(1 << loader.CAP_BPF)
    assert problem is not None and "needs root" in problem


def test_pin_dir_must_be_inside_bpffs():
    with pytest.raises(ValueError, match="must be inside the bpffs mount /sys/fs/bpf"):
        loader.EbpfCapture("/tmp/nodeagent")
    with pytest.raises(ValueError, match="must be inside"):
        loader.EbpfCapture("/sys/fs/bpf")


def test_decide_capture_modes():
    assert loader.decide_capture("auto", None) == ("ebpf", None)
    assert loader.decide_capture("ebpf", None) == ("ebpf", None)
    assert loader.decide_capture("nftables", "no headers") == ("nftables", None)
    assert loader.decide_capture("auto", "no headers") == (
        "nftables", "capture: eBPF unavailable, using nftables: no headers")
    with pytest.raises(loader.EbpfUnavailable, match="^--capture ebpf: no headers$"):
        loader.decide_capture("ebpf", "no headers")
    with pytest.raises(ValueError, match="--capture must be one of auto, ebpf, nftables, iptables"):
        loader.decide_capture("tproxy", None)


def test_sock_key_layout_and_flags():
    raw = maps.encode_sock_key(7, ("127.0.0.1", 40000), ("127.0.0.1", 15001))
    assert len(raw) == maps.SOCK_KEY_SIZE == 48
    assert raw[8:24] == MAPPED + bytes([127, 0, 0, 1])
    assert raw[40:44] == (40000).to_bytes(2, "little") + (15001).to_bytes(2, "little")
    assert maps.decode_sock_key(raw) == (7, ("127.0.0.1", 40000), ("127.0.0.1", 15001))
    cfg = maps.WorkloadConfig(1, "127.0.0.1", 15001, maps.FLAG_FAST_PATH)
    assert cfg.encode()[10:12] == (1).to_bytes(2, "little")
    assert maps.WorkloadConfig.decode(cfg.encode()) == cfg
    od = maps.OriginalDst("10.250.1.2", 80, flags=maps.FLAG_FAST_PATH)
    assert maps.OriginalDst.decode(od.encode()).flags == maps.FLAG_FAST_PATH
