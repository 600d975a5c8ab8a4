"""How long capture apply takes on this machine: ``python -m redirect.bench [-n 20]`` (root).

For each round a fresh network namespace is created (``ip netns add``, like a
new pod), then timed: the first apply (nothing there yet), a no-op re-apply
(in sync, with the sweep of the other backends), a no-op without the sweep,
and cleanup. The namespace is deleted afterwards. Prints the median, min and
max of each in milliseconds.
"""
from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import sys
import time
from typing import Callable

from . import capture, libnft
from .plan import CaptureConfig, CaptureError, in_pod_plan

STEPS = ("apply fresh", "apply no-op", "apply no-op sweep=False", "cleanup")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return (time.perf_counter() - started) * 1000, result


def measure(rounds: int = 20, backend: str = "nft", *, pause: float = 0.02) -> dict[str, list[float]]:
    """Milliseconds per step (see STEPS), ``rounds`` fresh namespaces; checks each step's result."""
    plan = in_pod_plan(CaptureConfig())
    samples: dict[str, list[float]] = {step: [] for step in STEPS}
    for _ in range(rounds):
        name = f"nabench{secrets.token_hex(4)}"
        _ip("netns", "add", name)
        try:
            ms, first = _timed(lambda: capture.apply(plan, name, backend))
            if not first.changed:
                raise CaptureError(f"first apply in fresh namespace {name} changed nothing")
            samples["apply fresh"].append(ms)
            for step, sweep in (("apply no-op", True), ("apply no-op sweep=False", False)):
                ms, again = _timed(lambda: capture.apply(plan, name, backend, sweep=sweep))
                if again.changed:
                    raise CaptureError(f"re-apply in {name} changed something: {again.drift}")
                samples[step].append(ms)
            ms, removed = _timed(lambda: capture.cleanup(name))
            if not removed:
                raise CaptureError(f"cleanup in {name} found nothing to remove")
            samples["cleanup"].append(ms)
        finally:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        time.sleep(pause)  # rounds apart, like enrollments, not one burst
    libnft.drain()
    return samples


def summary(samples: dict[str, list[float]]) -> str:
    return "\n".join(f"{step:<26} median {statistics.median(v):6.1f} ms   min {min(v):6.1f}   max {max(v):6.1f}"
                     for step, v in samples.items() if v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m redirect.bench", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--rounds", type=int, default=20, help="fresh namespaces to measure (default 20)")
    parser.add_argument("--backend", default="nft", help="nft (default), iptables, iptables-nft, iptables-legacy")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    via = "libnftables in-process" if libnft.available() else "the nft command"
    try:
        samples = measure(args.rounds, args.backend)
    except (CaptureError, subprocess.CalledProcessError, OSError) as exc:
        print(f"redirect.bench: {exc}", file=sys.stderr)
        return 1
    print(f"capture apply, backend {args.backend} ({via if args.backend == 'nft' else 'subprocesses'}), "
          f"{args.rounds} fresh namespaces:")
    print(summary(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
