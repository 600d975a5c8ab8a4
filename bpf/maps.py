"""Key/value layouts of the capture maps (see capture.c), as pure codecs.

Byte order follows the C structs: addresses in network order (as the kernel
hands them to the programs), 16 bytes each with IPv4 as ::ffff:a.b.c.d so one
map serves both families; ports in host order; everything else in host
(little-endian on the supported machines) order.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

# Names of the maps pinned under <pin_dir>/maps/ (must match capture.c).
MAP_NETNS = "netns"            # u64 netns cookie -> WorkloadConfig
MAP_CGROUP = "cgroup"          # u64 cgroup id -> WorkloadConfig
MAP_EXCL_PORT = "excl_port"    # PortKey -> u8
MAP_EXCL_DST = "excl_dst"      # CidrKey (LPM trie) -> u8
MAP_COOKIE = "cookie_dst"      # u64 socket cookie -> OriginalDst (until established)
MAP_PAIR = "pair_dst"          # PairKey -> OriginalDst (the proxy's lookup)
MAP_SOCKS = "local_socks"      # SOCKHASH SockKey -> socket (same-node fast path)
MAP_TCP_USED = "tcp_used"      # SockKey -> u8: this sender once went by TCP, never redirect it
MAP_IN_LISTEN = "in_listen"    # SOCKHASH ListenKey -> the proxy's inbound listener of a netns
MAP_IN_PORT = "in_port"        # InPortKey -> u8 (IN_PORT_TUNNEL / IN_PORT_EXCLUDED): not captured inbound
MAP_IN_SRC = "in_src"          # InSrcKey (LPM trie) -> u8: probe sources, not captured inbound
MAP_IN_DST = "in_dst"          # PairKey -> OriginalDst of an inbound connection (the proxy's lookup)
MAP_NAMES = (MAP_NETNS, MAP_CGROUP, MAP_EXCL_PORT, MAP_EXCL_DST, MAP_COOKIE, MAP_PAIR, MAP_SOCKS, MAP_TCP_USED,
             MAP_IN_LISTEN, MAP_IN_PORT, MAP_IN_SRC, MAP_IN_DST)

FLAG_FAST_PATH = 1             # WorkloadConfig.flags: use the sk_msg fast path
IN_PORT_EXCLUDED = 1           # MAP_IN_PORT values
IN_PORT_TUNNEL = 2

_U64 = struct.Struct("=Q")
_CFG = struct.Struct("=I4sHHI")       # id, proxy ip (net order), proxy port, flags, pad
_ORIG = struct.Struct("=16sHHIQ")    # ip, port, flags, id, netns cookie
_SOCK = struct.Struct("=Q16s16sHHI")  # netns cookie, local ip, remote ip, local port, remote port, pad
_PAIR = struct.Struct("=Q16sHHI")     # netns cookie, client ip, client port, proxy port, pad
_PORT = struct.Struct("=IHH")         # id, port, pad
_CIDR = struct.Struct("=II16s")       # prefixlen (bits after this field), id, ip
_LISTEN = struct.Struct("=QII")       # netns cookie, address family, pad
_IN_PORT = struct.Struct("=QHHI")     # netns cookie, port, pad, pad
_IN_SRC = struct.Struct("=IQ16s")     # prefixlen (bits after this field), netns cookie, ip


def _ip4(value: str) -> bytes:
    try:
        return ipaddress.IPv4Address(value).packed
    except ValueError as exc:
        raise ValueError(f"not an IPv4 address: {value!r}") from exc


_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def _ip16(value: str) -> bytes:
    """An IPv4 or IPv6 address as 16 bytes (IPv4 v4-mapped)."""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError as exc:
        raise ValueError(f"not an IP address: {value!r}") from exc
    return _MAPPED_PREFIX + addr.packed if addr.version == 4 else addr.packed


def _ip_str(raw: bytes) -> str:
    """16 bytes back to text: v4-mapped addresses as plain IPv4."""
    if raw[:12] == _MAPPED_PREFIX:
        return str(ipaddress.IPv4Address(raw[12:16]))
    return str(ipaddress.IPv6Address(raw))


def _port(value: int, what: str = "port") -> int:
    if not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"{what} must be 1..65535, got {value!r}")
    return value


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64(raw: bytes) -> int:
    return _U64.unpack(raw[:8])[0]


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """What connect4 does for one selected workload."""
    workload_id: int
    proxy_ip: str
    proxy_port: int
    flags: int = 0

    def encode(self) -> bytes:
        return _CFG.pack(self.workload_id, _ip4(self.proxy_ip), _port(self.proxy_port, "proxy port"),
                         self.flags, 0)

    @classmethod
    def decode(cls, raw: bytes) -> "WorkloadConfig":
        wid, ip, port, flags, _pad = _CFG.unpack(raw[:_CFG.size])
        return cls(wid, str(ipaddress.IPv4Address(ip)), port, flags)


WORKLOAD_CONFIG_SIZE = _CFG.size


@dataclass(frozen=True, slots=True)
class OriginalDst:
    """The destination a captured connection asked for."""
    ip: str
    port: int
    workload_id: int = 0
    netns_cookie: int = 0
    flags: int = 0

    def encode(self) -> bytes:
        return _ORIG.pack(_ip16(self.ip), _port(self.port), self.flags, self.workload_id, self.netns_cookie)

    @classmethod
    def decode(cls, raw: bytes) -> "OriginalDst":
        ip, port, flags, wid, netns = _ORIG.unpack(raw[:_ORIG.size])
        return cls(_ip_str(ip), port, wid, netns, flags)


ORIGINAL_DST_SIZE = _ORIG.size


def encode_pair_key(netns_cookie: int, client_ip: str, client_port: int, proxy_port: int) -> bytes:
    """Key of MAP_PAIR: the accepted socket's peer address, its local port and netns."""
    return _PAIR.pack(netns_cookie, _ip16(client_ip), _port(client_port, "client port"),
                      _port(proxy_port, "proxy port"), 0)


def decode_pair_key(raw: bytes) -> tuple[int, str, int, int]:
    netns, ip, port, pport, _pad = _PAIR.unpack(raw[:_PAIR.size])
    return netns, _ip_str(ip), port, pport


PAIR_KEY_SIZE = _PAIR.size


def encode_port_key(workload_id: int, port: int) -> bytes:
    return _PORT.pack(workload_id, _port(port, "excluded port"), 0)


PORT_KEY_SIZE = _PORT.size


def encode_cidr_key(workload_id: int, cidr: str) -> bytes:
    """LPM trie key: the 32-bit workload id is always matched, then the (v4-mapped) prefix."""
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise ValueError(f"excluded destination must be an IP address or CIDR, got {cidr!r}") from exc
    if net.version == 4:
        return _CIDR.pack(32 + 96 + net.prefixlen, workload_id, _MAPPED_PREFIX + net.network_address.packed)
    return _CIDR.pack(32 + net.prefixlen, workload_id, net.network_address.packed)


CIDR_KEY_SIZE = _CIDR.size


def decode_cidr_key(raw: bytes) -> tuple[int, str]:
    plen, wid, ip = _CIDR.unpack(raw[:_CIDR.size])
    if ip[:12] == _MAPPED_PREFIX and plen >= 32 + 96:
        return wid, f"{ipaddress.IPv4Address(ip[12:])}/{plen - 32 - 96}"
    return wid, f"{ipaddress.IPv6Address(ip)}/{plen - 32}"


def encode_sock_key(netns_cookie: int, local: tuple[str, int], remote: tuple[str, int]) -> bytes:
    """Key of MAP_SOCKS / MAP_TCP_USED: one socket by its netns and addresses."""
    return _SOCK.pack(netns_cookie, _ip16(local[0]), _ip16(remote[0]), _port(local[1], "local port"),
                      _port(remote[1], "remote port"), 0)


def decode_sock_key(raw: bytes) -> tuple[int, tuple[str, int], tuple[str, int]]:
    netns, lip, rip, lport, rport, _pad = _SOCK.unpack(raw[:_SOCK.size])
    return netns, (_ip_str(lip), lport), (_ip_str(rip), rport)


SOCK_KEY_SIZE = _SOCK.size


# ---- inbound (sk_lookup) -------------------------------------------------------------


def encode_listen_key(netns_cookie: int, family: int) -> bytes:
    """Key of MAP_IN_LISTEN: the inbound listener of one netns for one address family."""
    return _LISTEN.pack(netns_cookie, family, 0)


def decode_listen_key(raw: bytes) -> tuple[int, int]:
    netns, family, _pad = _LISTEN.unpack(raw[:_LISTEN.size])
    return netns, family


LISTEN_KEY_SIZE = _LISTEN.size


def encode_in_port_key(netns_cookie: int, port: int) -> bytes:
    return _IN_PORT.pack(netns_cookie, _port(port, "inbound port"), 0, 0)


def decode_in_port_key(raw: bytes) -> tuple[int, int]:
    netns, port, _a, _b = _IN_PORT.unpack(raw[:_IN_PORT.size])
    return netns, port


IN_PORT_KEY_SIZE = _IN_PORT.size


def encode_in_src_key(netns_cookie: int, cidr: str) -> bytes:
    """LPM trie key: the 64-bit netns cookie is always matched, then the (v4-mapped) source prefix."""
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise ValueError(f"probe source must be an IP address or CIDR, got {cidr!r}") from exc
    if net.version == 4:
        return _IN_SRC.pack(64 + 96 + net.prefixlen, netns_cookie, _MAPPED_PREFIX + net.network_address.packed)
    return _IN_SRC.pack(64 + net.prefixlen, netns_cookie, net.network_address.packed)


def decode_in_src_key(raw: bytes) -> tuple[int, str]:
    plen, netns, ip = _IN_SRC.unpack(raw[:_IN_SRC.size])
    if ip[:12] == _MAPPED_PREFIX and plen >= 64 + 96:
        return netns, f"{ipaddress.IPv4Address(ip[12:])}/{plen - 64 - 96}"
    return netns, f"{ipaddress.IPv6Address(ip)}/{plen - 64}"


IN_SRC_KEY_SIZE = _IN_SRC.size
