#!/usr/bin/env python
"""The fused interval-sum kernels (``conductance.kernels``) against the engine's torch operations.

For channel units, times one call of ``engine.interval_contributions`` (the trapezoid rule) and of
``engine.left_and_right_contributions`` (Captum's rule) with the kernel and with it standing aside,
in the same process, on one and on two torch threads (the kernel column also where the library's
thread bound, ``kernels.MAX_THREADS``, keeps the torch operations).
Shapes are GoogLeNet Inception-block outputs in channels-last layout (the engine's layout for
these models), one interval (the adaptive rule sums intervals one at a time) or 52 (a fixed rule's
chunk of 13 positions for 4 examples). Each call reads tensors the previous calls did not (a ring of
40 tensors, 10 for 52 intervals), so the reads are cold, as they are in a run.

Usage::

    python benchmarks/bench_kernels.py            # prints a markdown table (ms per call, ratio)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from conductance import engine, kernels, measures

SHAPES = {"inception3b": (480, 28, 28), "inception4d": (528, 14, 14), "inception5b": (1024, 7, 7)}


def per_call_ms(fn: Callable[[int], object], repeats: int) -> float:
    fn(0)
    t0 = time.perf_counter()
    for i in range(repeats):
        fn(i + 1)
    return (time.perf_counter() - t0) / repeats * 1e3


def compare(sums: Callable[..., object], ys: list, gs: list, repeats: int) -> tuple[float, float]:
    """ms per call of ``sums(y0, g0, y1, g1)`` over a ring of tensors, with the kernels and without."""
    ring = len(ys)

    def call(i: int) -> object:
        k = i % (ring - 1)
        return sums(ys[k], gs[k], ys[k + 1], gs[k + 1])

    trapezoid, left_right = kernels.channel_trapezoid, kernels.channel_left_right
    bound = kernels.MAX_THREADS
    # the kernel column is the kernel at any thread count, also where the library lets it stand aside
    kernels.MAX_THREADS = 1 << 20
    try:
        fused = per_call_ms(call, repeats)
    finally:
        kernels.MAX_THREADS = bound
    kernels.channel_trapezoid = kernels.channel_left_right = lambda *t: None   # the engine looks them up per call
    try:
        plain = per_call_ms(call, repeats)
    finally:
        kernels.channel_trapezoid, kernels.channel_left_right = trapezoid, left_right
    return fused, plain


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit("numba is not installed: pip install -e '.[fast]'")
    fns = {"conductance": measures.conductance}
    scratch = engine.Scratch()
    rules = {
        "trapezoid": (lambda y0, g0, y1, g1: engine.interval_contributions(fns, y0, g0, y1, g1, 0.1, "trapezoid",
                                                                           "channel", scratch),
                      kernels.channel_trapezoid),
        "left + right": (lambda y0, g0, y1, g1: engine.left_and_right_contributions(fns, y0, g0, y1, g1, 0.1,
                                                                                   "channel", scratch),
                         kernels.channel_left_right),
    }
    print("| threads | layer | intervals | sums | kernel ms | torch ms | torch / kernel | the library uses |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, shape in SHAPES.items():
            for m in (1, 52):
                ring = 10 if m > 1 else 40
                ys = [torch.randn(m, *shape).contiguous(memory_format=torch.channels_last) for _ in range(ring)]
                gs = [torch.randn_like(y) for y in ys]
                for label, (sums, kernel) in rules.items():
                    used = kernel(ys[0], gs[0], ys[1], gs[1]) is not None
                    fused, plain = compare(sums, ys, gs, args.repeats)
                    print(f"| {threads} | {name} | {m} | {label} | {fused:.3f} | {plain:.3f} | {plain / fused:.2f} | "
                          f"{'the kernel' if used else 'torch (above the thread bound)'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
