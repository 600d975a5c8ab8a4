"""Shared test policy.

Tests that need root or a kernel feature use the ``needs_root`` fixture (or
call ``require(...)``): without it they skip with the reason, but when the CI
variable is set a missing capability is a failure, never a silent skip.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

import nodeagent  # noqa: F401  first: its import puts the compiled request path's finder in place (nodeagent/accel.py)

REPO = Path(__file__).resolve().parent.parent
# Istio's own sample YAML (Apache-2.0), an exact copy of the workspace's
# shared/istio-samples kept in the repo so a clone is self-contained.
SAMPLES = REPO / "tests" / "data" / "istio-samples"
SHARED_SAMPLES = REPO.parent / "shared" / "istio-samples"
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")

sys.path.insert(0, str(REPO))


def require(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (in CI) when a test's precondition is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI requires this test to run, but: {reason}")
    pytest.skip(reason)


@pytest.fixture
def needs_root():
    require(os.geteuid() == 0, "needs root (network namespaces, nftables/iptables, eBPF)")


@pytest.fixture
def needs_tool():
    def check(name: str) -> str:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")
        require(path is not None, f"needs the {name} command")
        return path
    return check


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    require(SAMPLES.is_dir(), f"Istio sample corpus not found at {SAMPLES}")
    return SAMPLES
