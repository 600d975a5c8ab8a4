"""The repo's copy of Istio's samples must stay byte-identical to the shared corpus."""
import pytest

from tests.conftest import SAMPLES, SHARED_SAMPLES


def test_sample_copy_matches_the_shared_corpus():
    if not SHARED_SAMPLES.is_dir():
        pytest.skip(f"no shared corpus at {SHARED_SAMPLES} to compare with")
    ours = sorted(p.relative_to(SAMPLES) for p in SAMPLES.rglob("*") if p.is_file())
    theirs = sorted(p.relative_to(SHARED_SAMPLES) for p in SHARED_SAMPLES.rglob("*") if p.is_file())
    assert ours == theirs
    for rel in ours:
        assert (SAMPLES / rel).read_bytes() == (SHARED_SAMPLES / rel).read_bytes(), rel
