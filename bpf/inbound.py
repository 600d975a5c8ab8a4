"""Inbound capture in eBPF mode: what is passed through, the per-netns program, the listeners.

TCP arriving at an enrolled pod is steered by ``na_inbound`` (an sk_lookup
program, capture.c) to the proxy's inbound listener (15006) inside that pod's
namespace, with the semantics of the nftables plan (docs/capture.md):

* the tunnel port (15008) and excluded inbound ports reach their own
  listeners (the proxy's tunnel listener, or the application);
* connections from node probe sources (kubelet) reach the application;
* loopback traffic (the pod talking to itself, and the proxy's own
  connections to the application) is never steered;
* everything else is accepted by the 15006 listener, whose accepted socket
  has the ORIGINAL destination as its local address; ``SO_ORIGINAL_DST``
  (the getsockopt hook) answers it too, so the proxy code is the same as with
  nftables REDIRECT.

sk_lookup programs cannot read their namespace's cookie, so each enrolled
namespace gets its own instance of ``na_inbound``: the compiled instructions
with the cookie patched into one 64-bit immediate (``patch_netns``). This
module is pure except ``listeners_in_process``.
"""
from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from . import maps
from .netns import socket_netns_cookie

INBOUND_PORT = 15006
TUNNEL_PORT = 15008
INBOUND_MAGIC = 0x6E6174696E626E64   # NA_NETNS_MAGIC in capture.c
INBOUND_PROGRAM = "na_inbound"
LINK_PREFIX = "na_inbound_"            # links/na_inbound_<netns cookie> (bpffs refuses dots)

_LD_IMM64 = 0x18
SO_ACCEPTCONN = getattr(socket, "SO_ACCEPTCONN", 30)


@dataclass(frozen=True, slots=True)
class InboundConfig:
    """What arrives at a pod and is NOT captured (the rest goes to its inbound listener)."""
    exclude_ports: tuple[int, ...] = ()    # excludeInboundPorts: straight to the application
    probe_sources: tuple[str, ...] = ()    # node probe sources (addresses/CIDRs): straight to the application
    tunnel_port: int = TUNNEL_PORT         # the mTLS tunnel, accepted by its own listener

    def port_entries(self, netns_cookie: int) -> dict[bytes, bytes]:
        """MAP_IN_PORT entries for this netns (validates every port)."""
        out = {maps.encode_in_port_key(netns_cookie, p): bytes([maps.IN_PORT_EXCLUDED]) for p in self.exclude_ports}
        out[maps.encode_in_port_key(netns_cookie, self.tunnel_port)] = bytes([maps.IN_PORT_TUNNEL])
        return out

    def source_entries(self, netns_cookie: int) -> set[bytes]:
        """MAP_IN_SRC keys for this netns (validates every address)."""
        return {maps.encode_in_src_key(netns_cookie, c) for c in self.probe_sources}


@dataclass(frozen=True, slots=True)
class InboundEnrollment:
    key: int                 # netns cookie
    config: InboundConfig
    listeners: tuple[int, ...] = ()   # address families with a registered listener
    link_pin: str = ""


def magic_offsets(code: bytes) -> list[int]:
    """Byte offsets of the ld_imm64 instructions loading INBOUND_MAGIC."""
    if len(code) % 8:
        raise ValueError(f"{len(code)} bytes is not a whole number of BPF instructions")
    lo, hi = INBOUND_MAGIC & 0xFFFFFFFF, INBOUND_MAGIC >> 32
    found = []
    for off in range(0, len(code) - 15, 8):
        if code[off] != _LD_IMM64:
            continue
        first, = struct.unpack_from("<I", code, off + 4)
        second, = struct.unpack_from("<I", code, off + 12)
        if first == lo and second == hi and code[off + 1] >> 4 == 0:   # src_reg 0: a plain constant
            found.append(off)
    return found


def patch_netns(code: bytes, netns_cookie: int) -> bytes:
    """The na_inbound instructions with ``netns_cookie`` in place of the magic immediate."""
    offsets = magic_offsets(code)
    if len(offsets) != 1:
        raise ValueError(f"{INBOUND_PROGRAM}: expected one netns placeholder in the compiled program, "
                         f"found {len(offsets)}")
    if not 0 <= netns_cookie < 1 << 64:
        raise ValueError(f"netns cookie out of range: {netns_cookie!r}")
    out = bytearray(code)
    struct.pack_into("<I", out, offsets[0] + 4, netns_cookie & 0xFFFFFFFF)
    struct.pack_into("<I", out, offsets[0] + 12, netns_cookie >> 32)
    return bytes(out)


def link_name(netns_cookie: int) -> str:
    return f"{LINK_PREFIX}{netns_cookie}"


def cookie_of_link(name: str) -> int | None:
    """The netns cookie a links/ pin name stands for, or None for other links."""
    if not name.startswith(LINK_PREFIX):
        return None
    rest = name[len(LINK_PREFIX):]
    return int(rest) if rest.isdigit() else None


def listeners_in_process(netns_cookie: int, port: int = INBOUND_PORT) -> list[socket.socket]:
    """This process's TCP listening sockets on ``port`` inside the netns with that cookie.

    One per address family (duplicates of one socket under several fds are
    collapsed). Each returned socket is a dup: the caller closes it. This is
    how the agent's eBPF backend finds the listeners its data plane opened in
    a pod without holding them itself.
    """
    found: dict[int, socket.socket] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            dup = os.dup(fd)
        except (OSError, ValueError):
            continue   # closed meanwhile, or not ours to look at
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        keep = False
        try:
            keep = (sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6)
                    and sock.family not in found
                    and sock.getsockopt(socket.SOL_SOCKET, SO_ACCEPTCONN) == 1
                    and sock.getsockname()[1] == port
                    and socket_netns_cookie(sock) == netns_cookie)
        except OSError:
            keep = False
        if keep:
            found[sock.family] = sock
        else:
            sock.close()
    return [found[f] for f in sorted(found)]
