"""Fixtures for kernel tests: throw-away namespaces, topologies and cgroups.

Everything made here is removed afterwards, also when a test fails. Names
carry a random part so parallel runs on one machine never collide.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from redirect.cgroup import cgroup2_mount
from redirect.topology import Topology


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=5)


@pytest.fixture
def fresh_netns(needs_root):
    """An empty network namespace (lo up, no routes); yields its name."""
    name = f"nak{secrets.token_hex(4)}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=5)


@pytest.fixture
def topology(needs_root):
    with Topology() as topo:
        yield topo


@pytest.fixture
def cgroup_dir(needs_root):
    """A fresh cgroup two levels below the cgroup v2 root; yields (mount, relative path)."""
    mount = cgroup2_mount()
    parent = Path(mount) / f"nodeagent-test-{secrets.token_hex(4)}"
    child = parent / "wl"
    child.mkdir(parents=True)
    try:
        yield mount, str(child.relative_to(mount))
    finally:
        for d in (child, parent):
            deadline = time.monotonic() + 5
            while d.exists():
                try:
                    d.rmdir()
                except OSError:  # a process is still leaving it
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            assert not d.exists()
        assert os.path.isdir(mount)
