#!/usr/bin/env python
"""conductance.forward_args: what the one normaliser costs per forward pass.

A chunk of 256 path points of 8 examples (32 points each) with a shared (8, 5) weight and two
per-example arguments of (8, 16) (a float tensor and an integer mask): ``ForwardArgs.at(rows)``
against the two index operations it has to do anyway, ``ForwardArgs.at()`` (the whole batch, as the
ablation's unablated forward and the hf target's forward use it) and ``ForwardArgs.make`` (once per
call). Minimum over 7 rounds of 20000, time.perf_counter, one thread.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_forward_args.py
"""

from __future__ import annotations

import timeit

import torch

import conductance as cd
from conductance.forward_args import ForwardArgs


def main() -> None:
    torch.set_num_threads(1)
    batch = 8
    values = torch.randn(batch, 16)
    mask = torch.ones(batch, 16, dtype=torch.long)
    rows = torch.arange(batch).repeat_interleave(32)
    fa = ForwardArgs.make((cd.shared(torch.randn(8, 5)), values), {"attention_mask": mask}, batch,
                          warn_ambiguous=False)
    cases = {
        "two bare index operations (256 rows)": lambda: (values[rows], mask[rows]),
        "ForwardArgs.at(rows) (256 rows)": lambda: fa.at(rows),
        "ForwardArgs.at() (whole batch)": lambda: fa.at(),
        "ForwardArgs.make (checks and warning scan)": lambda: ForwardArgs.make((values,), {"m": mask}, batch),
    }
    for name, fn in cases.items():
        seconds = min(timeit.repeat(fn, number=20000, repeat=7)) / 20000
        print(f"{name:45s} {seconds * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
