"""Transparent capture: plans as data, nft/iptables rendering, the apply edge, netns helpers.

The daemon's entry points (see docs/capture.md):

    plan = in_pod_plan(CaptureConfig(...))              # or host_plan([HostWorkload(...)], ...)
    apply(plan, "/proc/PID/ns/net")                      # idempotent; repairs drift atomically
    verify(plan, netns) -> tuple[str, ...]               # empty when the kernel matches
    cleanup(netns)                                       # only nodeagent's rules, every backend
    sock = open_listener_in_netns(netns, "0.0.0.0", 15001)
    original_dst(accepted_sock) -> (ip, port)
    connect_marked((ip, port), netns=netns)              # the proxy's own upstream, not captured
"""
from .capture import ApplyResult, BACKENDS, apply, cleanup, detect_backend, verify
from .cgroup import cgroup2_mount, cgroup_of
from .netns import (NetnsError, connect_marked, entered, marked_socket, netns_path, open_listener_in_netns,
                    original_dst, run_command, run_in_netns, set_mark)
from .plan import (CaptureConfig, CaptureError, CapturePlan, HostWorkload, Rule, host_plan, in_pod_plan,
                   INBOUND_PORT, OUTBOUND_PORT, PROXY_MARK, TUNNEL_PORT)

__all__ = [
    "ApplyResult", "BACKENDS", "apply", "cleanup", "detect_backend", "verify",
    "cgroup2_mount", "cgroup_of",
    "NetnsError", "connect_marked", "entered", "marked_socket", "netns_path", "open_listener_in_netns",
    "original_dst", "run_command", "run_in_netns", "set_mark",
    "CaptureConfig", "CaptureError", "CapturePlan", "HostWorkload", "Rule", "host_plan", "in_pod_plan",
    "INBOUND_PORT", "OUTBOUND_PORT", "PROXY_MARK", "TUNNEL_PORT",
]
