"""The e2e mesh: two nodes + a CA node as network namespaces, the shop sample
(nodeagent/defaults) with its addresses rewritten for the pods, one real
``nodeagent run`` per node. Built once per module by ``nodeagent.meshlab``
(the same code ``make demo`` runs); torn down after the module, also when a
test fails."""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
import warnings

import pytest

from tests.conftest import require


def _preconditions() -> None:
    require(os.geteuid() == 0, "needs root (network namespaces, nftables)")
    for tool in ("nft", "nsenter", "curl", "ip"):
        require(shutil.which(tool) is not None or shutil.which(tool, path="/usr/sbin:/sbin") is not None,
                f"needs the {tool} command")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed and getattr(item, "module", None) is not None:
        item.module._meshlab_failed = True


def save_logs(lab) -> str:
    """Copy the agents', CA's and servers' logs out of the lab before teardown deletes them."""
    keep = tempfile.mkdtemp(prefix="nodeagent-e2e-logs-")
    for path in glob.glob(os.path.join(lab.dir, "*.log")):
        shutil.copy(path, keep)
    return keep


def shop_fixture(capture: str):
    """A module-scoped ``shop`` fixture: the shop on a two-node mesh with this capture mode."""

    @pytest.fixture(scope="module")
    def shop(request):
        _preconditions()
        from nodeagent.meshlab import MeshLab, start_shop

        lab = MeshLab(capture=capture)
        try:
            yield start_shop(lab)
        except BaseException:
            request.module._meshlab_failed = True
            raise
        finally:
            if getattr(request.module, "_meshlab_failed", False):
                warnings.warn(f"e2e mesh logs (agents, CA, servers) kept in {save_logs(lab)}")
            problems = lab.teardown()
            assert not problems, problems

    return shop


shop = shop_fixture("nftables")
