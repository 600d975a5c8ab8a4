"""Kernel header trees for bcc.

bcc compiles the capture programs at run time and needs a kernel header
tree. In order of preference:

1. ``BCC_KERNEL_SOURCE`` when it is set and holds a usable tree;
2. the running kernel's own headers, ``/lib/modules/$(uname -r)/build``;
3. a tree prepared earlier under the cache root
   (``/var/cache/nodeagent/kernel-headers/<version>``): Debian's
   ``linux-headers-<ver>-amd64`` and ``linux-headers-<ver>-common`` packages
   extracted into ONE directory. The capture programs only use uapi structs,
   so headers of an older kernel (6.1) work on a newer one (6.18).

Finding is cheap and has no side effects; preparing (``prepare_debian_tree``,
or ``python -m bpf.headers prepare`` from scripts/setup.sh) downloads the two
packages with apt once.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ROOT = Path("/var/cache/nodeagent/kernel-headers")
MODULES_ROOT = Path("/lib/modules")
META_PACKAGE = "linux-headers-amd64"
COMPLETE_MARKER = ".nodeagent-complete"
# Files bcc needs from a tree; their absence means the tree is unusable.
REQUIRED_FILES = ("include/uapi/linux/bpf.h", "include/generated/autoconf.h",
                  "arch/x86/include/generated/uapi/asm/unistd_64.h")


class HeaderError(Exception):
    """No usable header tree, or preparing one failed (message says what to do)."""


@dataclass(frozen=True, slots=True)
class HeaderTree:
    path: Path
    origin: str   # "BCC_KERNEL_SOURCE", "running kernel", "prepared Debian packages"
    version: str

    @property
    def needs_env(self) -> bool:
        """bcc finds the running kernel's tree itself; others go in BCC_KERNEL_SOURCE."""
        return self.origin != "running kernel"

    def describe(self) -> str:
        return f"kernel headers: {self.path} ({self.origin}, {self.version})"


def missing_files(path: Path) -> list[str]:
    return [rel for rel in REQUIRED_FILES if not (path / rel).is_file()]


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.\-+~]", version))


def find_header_tree(release: str | None = None, *, env: dict | None = None,
                     modules_root: Path = MODULES_ROOT, cache_root: Path = CACHE_ROOT) -> HeaderTree | None:
    """The best usable header tree, or None. Looks only; changes nothing."""
    release = release or os.uname().release
    env = os.environ if env is None else env
    explicit = env.get("BCC_KERNEL_SOURCE")
    if explicit and not missing_files(Path(explicit)):
        return HeaderTree(Path(explicit), "BCC_KERNEL_SOURCE", release)
    build = modules_root / release / "build"
    if not missing_files(build):
        return HeaderTree(build, "running kernel", release)
    prepared = []
    if cache_root.is_dir():
        for child in cache_root.iterdir():
            if (child / COMPLETE_MARKER).is_file() and not missing_files(child):
                prepared.append(child)
    if not prepared:
        return None
    exact = [p for p in prepared if p.name == release]
    best = exact[0] if exact else max(prepared, key=lambda p: _version_key(p.name))
    return HeaderTree(best, "prepared Debian packages", best.name)


def explain_missing(release: str | None = None, *, modules_root: Path = MODULES_ROOT,
                    cache_root: Path = CACHE_ROOT) -> str:
    release = release or os.uname().release
    return (f"no kernel headers for bcc: {modules_root / release / 'build'} is missing and no tree is "
            f"prepared under {cache_root}; run `python -m bpf.headers prepare` as root "
            f"(scripts/setup.sh does) or set BCC_KERNEL_SOURCE to a kernel header tree")


def debian_packages(depends_output: str, meta: str = META_PACKAGE) -> tuple[str, str, str]:
    """(version, arch package, common package) from `apt-cache depends <meta>` output."""
    match = re.search(r"Depends:\s*linux-headers-(\S+)-amd64\b", depends_output)
    if not match:
        raise HeaderError(f"`apt-cache depends {meta}` names no linux-headers-<version>-amd64 package; "
                          f"check the apt sources (Debian main) and run `apt-get update`")
    version = match.group(1)
    return version, f"linux-headers-{version}-amd64", f"linux-headers-{version}-common"


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    except FileNotFoundError as exc:
        raise HeaderError(f"`{cmd[0]}` not found: preparing headers needs Debian's apt and dpkg") from exc
    except subprocess.TimeoutExpired as exc:
        raise HeaderError(f"`{' '.join(cmd)}` took longer than 300 s") from exc
    if done.returncode != 0:
        raise HeaderError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-400:]}")
    return done.stdout


def merge_trees(sources: list[Path], dest: Path) -> None:
    """Merge trees into ``dest`` by renaming (later ones win); sources are consumed.

    Dangling symlinks (Debian's scripts/ and tools/ point into linux-kbuild,
    which bcc does not need) are dropped.
    """
    def move(src: Path, dst: Path) -> None:
        if src.is_symlink() and not src.exists():
            src.unlink()
        elif not dst.exists() and not dst.is_symlink():
            src.rename(dst)
        elif src.is_dir() and not src.is_symlink() and dst.is_dir() and not dst.is_symlink():
            for child in src.iterdir():
                move(child, dst / child.name)
        else:
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            else:
                dst.unlink()
            src.rename(dst)

    dest.mkdir()
    for tree in sources:
        move(tree, dest)
    for directory, dirs, files in os.walk(dest):
        for name in dirs + files:
            path = os.path.join(directory, name)
            if os.path.islink(path) and not os.path.exists(path):
                os.unlink(path)


def prepare_debian_tree(cache_root: Path = CACHE_ROOT, log=print) -> HeaderTree:
    """Download and merge Debian's header packages into cache_root/<version> (once)."""
    try:
        version, arch_pkg, common_pkg = debian_packages(_run(["apt-cache", "depends", META_PACKAGE]))
    except HeaderError:   # a fresh machine may have no package lists yet
        _run(["apt-get", "update", "-qq"])
        version, arch_pkg, common_pkg = debian_packages(_run(["apt-cache", "depends", META_PACKAGE]))
    dest = cache_root / version
    if (dest / COMPLETE_MARKER).is_file() and not missing_files(dest):
        return HeaderTree(dest, "prepared Debian packages", version)
    cache_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root, prefix=".prepare-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt's _apt user downloads into it
        _run(["apt-get", "download", "-q", arch_pkg, common_pkg], cwd=work)
        extracted = work / "x"
        for deb in sorted(work.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(extracted)])
        src = extracted / "usr" / "src"
        trees = [src / f"linux-headers-{version}-common", src / f"linux-headers-{version}-amd64"]
        for tree in trees:
            if not tree.is_dir():
                raise HeaderError(f"package contents unexpected: {tree.relative_to(work)} missing")
        merged = work / "merged"
        merge_trees(trees, merged)
        absent = missing_files(merged)
        if absent:
            raise HeaderError(f"merged header tree lacks {', '.join(absent)}")
        (merged / COMPLETE_MARKER).write_text(f"{arch_pkg} {common_pkg}\n")
        if dest.exists():
            shutil.rmtree(dest)
        merged.rename(dest)
    log(f"bpf: prepared kernel headers {dest} from {arch_pkg} + {common_pkg}")
    return HeaderTree(dest, "prepared Debian packages", version)


def activate(tree: HeaderTree) -> None:
    """Point bcc at ``tree`` (bcc reads BCC_KERNEL_SOURCE at each compile)."""
    if tree.needs_env:
        os.environ["BCC_KERNEL_SOURCE"] = str(tree.path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpf.headers",
                                     description="Find or prepare the kernel header tree bcc needs.")
    parser.add_argument("action", choices=("find", "prepare"))
    parser.add_argument("--cache-root", type=Path, default=CACHE_ROOT)
    args = parser.parse_args(argv)
    tree = find_header_tree(cache_root=args.cache_root)
    if tree is not None:
        if args.action == "find":
            print(tree.describe())
        return 0
    if args.action == "find":
        print(explain_missing(cache_root=args.cache_root), file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("bpf: kernel headers not prepared (needs root: apt-get download); eBPF capture stays "
              "unavailable until `python -m bpf.headers prepare` runs as root", file=sys.stderr)
        return 0
    try:
        prepare_debian_tree(args.cache_root)
    except (HeaderError, OSError) as exc:
        print(f"bpf: cannot prepare kernel headers: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
