"""The e2e mesh: two nodes + a CA node as network namespaces, the shop sample
(nodeagent/defaults) with its addresses rewritten for the pods, one real
``nodeagent run`` per node. Built once per module by ``nodeagent.meshlab``
(the same code ``make demo`` runs); torn down after the module, also when a
test fails."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import require


def _preconditions() -> None:
    require(os.geteuid() == 0, "needs root (network namespaces, nftables)")
    for tool in ("nft", "nsenter", "curl", "ip"):
        require(shutil.which(tool) is not None or shutil.which(tool, path="/usr/sbin:/sbin") is not None,
                f"needs the {tool} command")


@pytest.fixture(scope="module")
def shop():
    _preconditions()
    from nodeagent.meshlab import MeshLab, start_shop

    lab = MeshLab()
    try:
        yield start_shop(lab)
    finally:
        problems = lab.teardown()
        assert not problems, problems
