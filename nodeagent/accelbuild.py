"""`python -m nodeagent.accelbuild`: compile the hot proxy modules (nodeagent/accel.py says how
they are used). Needs Cython (requirements.lock) and a C compiler with Python's headers
(Debian's gcc, libc6-dev and python3-dev, which `make setup` installs)."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from nodeagent.accel import DIRECTIVES, MODULES, ROOT, _SUFFIX, _built, accel_dir, digest, install, status


def build(force: bool = False, log=print) -> int:
    """Compile MODULES into accel_dir() unless a build for the current sources is there.
    Needs Cython and a C compiler with Python's headers; returns 0, or 1 with the reason."""
    try:
        import Cython
        from Cython.Build import cythonize
        from setuptools import Distribution, Extension
    except ImportError as exc:
        log(f"accel: cannot build ({exc.name} is not installed); the proxy runs as Python")
        return 1
    d = digest()
    if d is None:
        log("accel: no sources to build")
        return 1
    key = f"{d}-{Cython.__version__}"
    out = accel_dir()
    if not force and all(_built(name, key).exists() for name in MODULES):
        if (out / "CYTHON").exists() and (out / "CYTHON").read_text().strip() == Cython.__version__:
            return 0
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nodeagent-accel-") as tmp:
        exts = [Extension(name, [str(ROOT.joinpath(*name.split(".")).with_suffix(".py"))],
                          extra_compile_args=["-O2", "-g0", "-Wno-unused-function", "-Wno-unused-variable"],
                          extra_link_args=["-s"])
                for name in MODULES]
        try:
            exts = cythonize(exts, compiler_directives=DIRECTIVES, include_path=[str(ROOT)],
                             build_dir=os.path.join(tmp, "c"), quiet=True, nthreads=os.cpu_count() or 1)
            dist = Distribution({"ext_modules": exts, "script_name": "nodeagent-accel",
                                 "script_args": ["-q", "build_ext", "--build-lib", os.path.join(tmp, "lib"),
                                                 "--build-temp", os.path.join(tmp, "tmp"),
                                                 "--parallel", str(os.cpu_count() or 1)]})
            dist.parse_command_line()
            dist.run_commands()
        except (Exception, SystemExit) as exc:  # a compiler error is reported, not raised
            log(f"accel: build failed ({exc}); the proxy runs as Python")
            return 1
        for name in MODULES:
            src = Path(tmp, "lib", *name.split(".")).with_name(name.rsplit(".", 1)[1] + _SUFFIX)
            for old in out.glob(f"{name}-*{_SUFFIX}"):
                old.unlink()
            shutil.copyfile(src, _built(name, key))
        (out / "CYTHON").write_text(Cython.__version__ + "\n")
    log(f"accel: built {len(MODULES)} modules into {out}")
    return 0


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m nodeagent.accelbuild", description=__doc__.split("\n")[0])
    p.add_argument("--force", action="store_true", help="rebuild even when the build is current")
    p.add_argument("--status", action="store_true", help="only say which modules run compiled")
    p.add_argument("--quiet", action="store_true", help="print only failures (to stderr)")
    args = p.parse_args(argv)
    if not args.status:
        rc = build(args.force, log=lambda m: print(m, file=sys.stderr) if m.startswith("accel: c") or
                   "failed" in m or not args.quiet else None)
        if rc or args.quiet:
            return rc
    install()
    for name, ok in status().items():
        print(f"{name:<28} {'compiled' if ok else 'python'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
