"""Header-tree discovery and Debian package handling (bpf/headers.py), on temporary trees."""
from __future__ import annotations

from pathlib import Path

import pytest

from bpf import headers

RELEASE = "6.18.44-test"


def make_tree(path: Path, complete: bool = True, marker: bool = False) -> Path:
    files = headers.REQUIRED_FILES if complete else headers.REQUIRED_FILES[:1]
    for rel in files:
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text("/* test */\n")
    if marker:
        (path / headers.COMPLETE_MARKER).write_text("test\n")
    return path


def find(tmp_path: Path, env=None):
    return headers.find_header_tree(RELEASE, env=env or {}, modules_root=tmp_path / "modules",
                                    cache_root=tmp_path / "cache")


def test_nothing_found_and_the_reason_says_what_to_do(tmp_path):
    assert find(tmp_path) is None
    reason = headers.explain_missing(RELEASE, modules_root=tmp_path / "modules", cache_root=tmp_path / "cache")
    assert str(tmp_path / "modules" / RELEASE / "build") in reason
    assert "python -m bpf.headers prepare" in reason and "BCC_KERNEL_SOURCE" in reason


def test_running_kernel_headers_win_over_prepared_ones(tmp_path):
    make_tree(tmp_path / "cache" / "6.1.0-56", marker=True)
    make_tree(tmp_path / "modules" / RELEASE / "build")
    tree = find(tmp_path)
    assert tree.origin == "running kernel" and tree.path == tmp_path / "modules" / RELEASE / "build"
    assert not tree.needs_env


def test_explicit_env_wins_but_only_when_usable(tmp_path):
    make_tree(tmp_path / "modules" / RELEASE / "build")
    explicit = make_tree(tmp_path / "explicit")
    assert find(tmp_path, {"BCC_KERNEL_SOURCE": str(explicit)}).origin == "BCC_KERNEL_SOURCE"
    broken = make_tree(tmp_path / "broken", complete=False)
    assert find(tmp_path, {"BCC_KERNEL_SOURCE": str(broken)}).origin == "running kernel"


def test_prepared_tree_newest_complete_one(tmp_path):
    make_tree(tmp_path / "cache" / "6.1.0-9", marker=True)
    make_tree(tmp_path / "cache" / "6.1.0-56", marker=True)
    make_tree(tmp_path / "cache" / "6.12.113+deb12")                  # no marker: interrupted
    make_tree(tmp_path / "cache" / "6.13.0-1", complete=False, marker=True)
    tree = find(tmp_path)
    assert tree.path == tmp_path / "cache" / "6.1.0-56"
    assert tree.needs_env and "prepared Debian packages" in tree.describe()


def test_prepared_tree_matching_release_is_preferred(tmp_path):
    make_tree(tmp_path / "cache" / "6.20.0-1", marker=True)
    make_tree(tmp_path / "cache" / RELEASE, marker=True)
    assert find(tmp_path).path == tmp_path / "cache" / RELEASE


def test_debian_package_names_from_apt_cache_depends():
    out = "linux-headers-amd64\n  Depends: linux-headers-6.1.0-56-amd64\n"
    assert headers.debian_packages(out) == ("6.1.0-56", "linux-headers-6.1.0-56-amd64",
                                            "linux-headers-6.1.0-56-common")
    with pytest.raises(headers.HeaderError, match="names no linux-headers-<version>-amd64"):
        headers.debian_packages("linux-headers-amd64\n")


def test_merge_trees_later_wins_and_drops_dangling_links(tmp_path):
    common = tmp_path / "common"
    arch = tmp_path / "arch"
    (common / "include" / "linux").mkdir(parents=True)
    (common / "include" / "linux" / "a.h").write_text("common a")
    (common / "include" / "linux" / "b.h").write_text("common b")
    (common / "scripts").symlink_to("../../lib/linux-kbuild-6.1/scripts")
    (arch / "include" / "linux").mkdir(parents=True)
    (arch / "include" / "linux" / "b.h").write_text("arch b")
    (arch / "include" / "generated").mkdir()
    (arch / "include" / "generated" / "autoconf.h").write_text("arch gen")
    (arch / "scripts").symlink_to("../../lib/linux-kbuild-6.1/scripts")
    dest = tmp_path / "merged"
    headers.merge_trees([common, arch], dest)
    assert (dest / "include" / "linux" / "a.h").read_text() == "common a"
    assert (dest / "include" / "linux" / "b.h").read_text() == "arch b"
    assert (dest / "include" / "generated" / "autoconf.h").read_text() == "arch gen"
    assert not (dest / "scripts").is_symlink()
