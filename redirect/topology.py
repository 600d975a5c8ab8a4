"""A small node/pod network built from network namespaces (tests and the demo).

Layout, all inside 10.250.0.0/16 and all inside namespaces this object made:

- node N (1-based, in order of ``add_node``) is a namespace with IP forwarding;
  its pods live in 10.250.N.0/24 and it answers as 10.250.N.1 (the gateway,
  put on every pod veth: the "node's address on the pod's veth", which is the
  source of kubelet-style probes).
- a pod is a namespace with ``eth0`` = IP/32, routed through its node (no
  bridge, Calico style): the pod has ``default via 10.250.N.1``, the node has
  ``IP/32 dev <veth>``. Traffic between pods on one node crosses the node's
  netfilter.
- nodes are linked pairwise by veths; node N is 10.250.0.N on its links and
  routes 10.250.M.0/24 via 10.250.0.M.

Namespace names carry a random prefix so parallel runs never collide. Veths are
created directly inside their namespaces (``ip -n``), never in the host's.
``teardown`` (also on ``with`` exit or a failed ``add_*``) deletes every
namespace it made, which removes every veth; processes started with ``spawn``
are killed first. Every command is bounded by a timeout.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Sequence

from .netns import NETNS_RUN_DIR, NetnsError, netns_command

SUBNET = ipaddress.ip_network("10.250.0.0/16")


@dataclass(slots=True)
class Node:
    name: str
    netns: str
    index: int
    link_address: str  # 10.250.0.N on inter-node links
    gateway: str  # 10.250.N.1 on every pod veth
    pod_cidr: str  # 10.250.N.0/24
    pods: list["Pod"] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    node: str
    netns: str
    ip: str
    gateway: str
    host_veth: str  # the node-side interface name


class Topology:
    def __init__(self, *, prefix: str | None = None, timeout: float = 5.0) -> None:
        self.prefix = prefix or f"na{secrets.token_hex(3)}"
        self.timeout = timeout
        self.nodes: dict[str, Node] = {}
        self.pods: dict[str, Pod] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []

    # --- context management -------------------------------------------------

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    # --- commands -----------------------------------------------------------

    def netns(self, name: str) -> str:
        """Namespace name of a node or pod of this topology."""
        if name in self.nodes:
            return self.nodes[name].netns
        if name in self.pods:
            return self.pods[name].netns
        raise NetnsError(f"topology has no node or pod named {name!r}")

    def _run(self, argv: Sequence[str], *, input: str | None = None) -> None:
        try:
            proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise NetnsError(f"`{' '.join(argv)}` took longer than {self.timeout} s") from None
        if proc.returncode != 0:
            raise NetnsError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}\n{input or ''}".rstrip())

    def _ip_batch(self, netns: str, commands: list[str]) -> None:
        self._run(["ip", "-n", netns, "-batch", "-"], input="\n".join(commands) + "\n")

    def exec(self, ns: str, argv: Sequence[str], *, timeout: float | None = None, check: bool = True,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in node/pod ``ns`` and wait (bounded by ``timeout``)."""
        cmd = netns_command(self.netns(ns), argv)
        try:
            proc = subprocess.run(cmd, input=input, capture_output=True, text=True,
                                  timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired:
            raise NetnsError(f"`{' '.join(argv)}` in {ns} took longer than {timeout or self.timeout} s") from None
        if check and proc.returncode != 0:
            raise NetnsError(f"`{' '.join(argv)}` in {ns} failed (exit {proc.returncode}): "
                             f"{(proc.stderr or proc.stdout).strip()}")
        return proc

    def spawn(self, ns: str, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` in ``ns`` in the background; killed by ``teardown``."""
        proc = subprocess.Popen(netns_command(self.netns(ns), argv), **popen_kwargs)
        self._procs.append(proc)
        return proc

    # --- building -----------------------------------------------------------

    def _new_netns(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        self._run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        self._ip_batch(name, ["link set lo up"])
        # ip_forward and friends are per namespace; nsenter keeps /sys as is.
        self._run(netns_command(name, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                                       "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]))
        return name

    def add_node(self, name: str) -> Node:
        if name in self.nodes or name in self.pods:
            raise NetnsError(f"topology already has {name!r}")
        index = len(self.nodes) + 1
        if index > 254:
            raise NetnsError("topology: at most 254 nodes fit in 10.250.0.0/16")
        try:
            netns = self._new_netns(f"n{index}")
            node = Node(name, netns, index, f"10.250.0.{index}", f"10.250.{index}.1", f"10.250.{index}.0/24")
            for other in self.nodes.values():
                self._link_nodes(other, node)
            self.nodes[name] = node
            return node
        except BaseException:
            self.teardown()
            raise

    def _link_nodes(self, a: Node, b: Node) -> None:
        a_if, b_if = f"nl{b.index}", f"nl{a.index}"
        self._ip_batch(a.netns, [f"link add {a_if} type veth peer name {b_if} netns {b.netns}"])
        for me, peer, dev in ((a, b, a_if), (b, a, b_if)):
            self._ip_batch(me.netns, [
                f"addr add {me.link_address}/32 dev {dev}",
                f"link set {dev} up",
                f"route add {peer.link_address}/32 dev {dev} scope link",
                f"route add {peer.pod_cidr} via {peer.link_address} dev {dev} onlink",
            ])

    def add_pod(self, node: str, name: str, ip: str | None = None) -> Pod:
        if node not in self.nodes:
            raise NetnsError(f"topology has no node {node!r}; add_node first")
        if name in self.pods or name in self.nodes:
            raise NetnsError(f"topology already has {name!r}")
        n = self.nodes[node]
        cidr = ipaddress.ip_network(n.pod_cidr)
        used = {p.ip for p in n.pods} | {n.gateway}
        if ip is None:
            ip = next(str(a) for a in cidr.hosts() if str(a) not in used)
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise NetnsError(f"pod {name}: {ip!r} is not an IPv4 address") from None
        if addr not in cidr or str(addr) in used or addr == cidr.broadcast_address:
            raise NetnsError(f"pod {name}: address {ip} must be a free host address in node {node}'s {cidr} "
                             f"(not {n.gateway})")
        try:
            index = sum(len(x.pods) for x in self.nodes.values()) + 1
            netns = self._new_netns(f"p{index}")
            veth = f"vp{index}"
            self._ip_batch(n.netns, [f"link add {veth} type veth peer name eth0 netns {netns}",
                                     f"addr add {n.gateway}/32 dev {veth}",
                                     f"link set {veth} up",
                                     f"route add {ip}/32 dev {veth} scope link"])
            self._ip_batch(netns, [f"addr add {ip}/32 dev eth0",
                                   "link set eth0 up",
                                   f"route add {n.gateway}/32 dev eth0 scope link",
                                   f"route add default via {n.gateway} dev eth0"])
            pod = Pod(name, node, netns, str(addr), n.gateway, veth)
            n.pods.append(pod)
            self.pods[name] = pod
            return pod
        except BaseException:
            self.teardown()
            raise

    # --- teardown -----------------------------------------------------------

    def teardown(self) -> None:
        """Kill spawned processes and delete every namespace made here (idempotent)."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        errors = []
        for name in reversed(self._namespaces):
            if os.path.exists(f"{NETNS_RUN_DIR}/{name}"):
                proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True,
                                      timeout=self.timeout)
                if proc.returncode != 0:
                    errors.append(f"{name}: {proc.stderr.strip()}")
        self._namespaces.clear()
        self.nodes.clear()
        self.pods.clear()
        if errors:
            raise NetnsError("topology teardown left namespaces behind: " + "; ".join(errors))

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(self._namespaces)
