"""How the proxy recovers a captured connection's original destination in eBPF mode.

Two equivalent ways, both for the socket the proxy ACCEPTED:

* ``so_original_dst(sock)``: getsockopt(SOL_IP, SO_ORIGINAL_DST), exactly as
  with nftables/iptables REDIRECT. In eBPF mode the cgroup/getsockopt program
  answers it from the pinned map, so the proxy code is identical in all modes.
* ``original_dst_from_map(peer_ip, peer_port, proxy_port=..., netns_cookie=...)``:
  a direct read of the pinned map (no bcc, no compiler), keyed by the accepted
  socket's peer address, its local port and its network namespace;
  ``original_dst_for_socket(sock)`` fills the key in from the socket.

For an inbound connection steered by the sk_lookup program (eBPF inbound
capture), the accepted socket's own local address IS the original
destination (``original_dst_transparent``); SO_ORIGINAL_DST and the map read
answer the same from the in_dst map.

A cookie from SO_COOKIE would not do: the accepted socket is a different
socket from the client's, with a different cookie.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading

from . import maps, sys as bpfsys
from .netns import socket_netns_cookie

SO_ORIGINAL_DST = 80
DEFAULT_PIN_DIR = "/sys/fs/bpf/nodeagent"

_fds: dict[str, int] = {}
_fds_lock = threading.Lock()


def so_original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """SO_ORIGINAL_DST of an accepted socket (IP6T_SO_ORIGINAL_DST for IPv6), or None.

    v4-mapped answers on IPv6 sockets come back as plain IPv4 text.
    """
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            port, = struct.unpack("!H", raw[2:4])
            addr = ipaddress.IPv6Address(raw[8:24])
            return str(addr.ipv4_mapped or addr), port
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port, = struct.unpack("!H", raw[2:4])
    return str(ipaddress.IPv4Address(raw[4:8])), port


def _pair_map_fd(pin_dir: str, name: str = maps.MAP_PAIR) -> int:
    path = f"{pin_dir}/maps/{name}"
    with _fds_lock:
        fd = _fds.get(path)
        if fd is None:
            fd = bpfsys.obj_get(path, readonly=True)
            _fds[path] = fd
        return fd


def forget_pin_dir(pin_dir: str) -> None:
    """Close the cached map fd of ``pin_dir`` (after cleanup, or in tests)."""
    with _fds_lock:
        for name in (maps.MAP_PAIR, maps.MAP_IN_DST):
            fd = _fds.pop(f"{pin_dir}/maps/{name}", None)
            if fd is not None:
                os.close(fd)


def original_dst_from_map(peer_ip: str, peer_port: int, *, proxy_port: int, netns_cookie: int,
                          pin_dir: str = DEFAULT_PIN_DIR) -> tuple[str, int] | None:
    """The original (ip, port) of the connection from peer_ip:peer_port to proxy_port, or None."""
    key = maps.encode_pair_key(netns_cookie, peer_ip, peer_port, proxy_port)
    raw = bpfsys.map_lookup(_pair_map_fd(pin_dir), key, maps.ORIGINAL_DST_SIZE)
    if raw is None and os.path.exists(f"{pin_dir}/maps/{maps.MAP_IN_DST}"):
        # an inbound connection steered by na_inbound: proxy_port is the accepted socket's local port
        raw = bpfsys.map_lookup(_pair_map_fd(pin_dir, maps.MAP_IN_DST), key, maps.ORIGINAL_DST_SIZE)
    if raw is None:
        return None
    found = maps.OriginalDst.decode(raw)
    return found.ip, found.port


def original_dst_for_socket(sock: socket.socket, pin_dir: str = DEFAULT_PIN_DIR) -> tuple[str, int] | None:
    peer_ip, peer_port = sock.getpeername()[:2]
    return original_dst_from_map(peer_ip, peer_port, proxy_port=sock.getsockname()[1],
                                 netns_cookie=socket_netns_cookie(sock), pin_dir=pin_dir)


def original_dst_transparent(sock: socket.socket) -> tuple[str, int]:
    """TPROXY-style: the accepted socket's local address (inbound eBPF capture, TPROXY listeners).

    v4-mapped addresses on dual-stack sockets come back as plain IPv4 text.
    """
    host, port = sock.getsockname()[:2]
    addr = ipaddress.ip_address(host)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (str(mapped) if mapped else host), port
