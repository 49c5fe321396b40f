#!/usr/bin/env python
"""flip_count: batched prefix evaluation against one forward per prefix.

Model: the real pretrained EfficientNet-Lite0 (``conductance.assets.efficientnet_lite0``);
inputs: four bundled real photos (chelsea, coffee, rocket, china); layer ``_blocks.15`` (the
last block, 320 channels), ``units="channel"``; ablation mode "zero".

Rankings:
  conductance  each photo's channels by filter conductance of its top class
               (``cd.layer_conductance(model, x, "_blocks.15", units="channel", n_steps=16)``),
               all 320 channels allowed;
  random       a random order per photo (seed 0), at most ``--random-max`` channels (it takes
               many channels to flip a photo this way, which is where batching matters most).

Methods (time.perf_counter, one run each; forwards and rows counted by a hook on the model,
including the unablated forward and the probe):
  naive     for each photo, for k = 1, 2, ...: one forward of that photo with its top-k
            channels ablated (``ablate`` context manager), stop at the first label change;
  plain     ``cd.flip_count(..., expand_at_layer=False)``: rows (photo, k) batched, each row
            repeating the whole forward;
  default   ``cd.flip_count(...)``: the same rows, with the layers below ``_blocks.15`` run
            once per photo and its output expanded to the rows (chosen by a probe).

Usage::

    python benchmarks/bench_flip_count.py            # both rankings, random capped at 64 channels
    python benchmarks/bench_flip_count.py --quick    # conductance ranking only, random capped at 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import warnings

import torch

import conductance as cd
from conductance import ablation, assets

PHOTOS = ["chelsea", "coffee", "rocket", "china"]
LAYER = "_blocks.15"


def log(msg: str = "") -> None:
    print(msg, flush=True)


def naive_flip_count(model, x, order, max_units):
    """One forward per (photo, prefix); returns (counts, number of forwards)."""
    forwards = 0
    counts = []
    with torch.no_grad():
        labels = model(x).argmax(1)
        for b in range(x.shape[0]):
            count = math.inf
            for k in range(1, max_units + 1):
                with ablation.ablate(model, LAYER, order[b, :k].tolist(), units="channel"):
                    label = model(x[b:b + 1]).argmax(1).item()
                forwards += 1
                if label != labels[b].item():
                    count = k
                    break
            counts.append(count)
    return torch.tensor(counts, dtype=torch.float32), forwards


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def fmt_counts(c: torch.Tensor) -> str:
    return "[" + ", ".join("inf" if math.isinf(v) else str(int(v)) for v in c.tolist()) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="conductance ranking only; random capped at 16")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--random-max", type=int, default=None, help="max_units for the random ranking")
    parser.add_argument("--out", default=None, help="JSON file for the numbers (default benchmarks/out/...)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random_max = args.random_max or (16 if args.quick else 64)

    model = assets.efficientnet_lite0()
    x = assets.photo_batch(PHOTOS)
    log(f"EfficientNet-Lite0, photos {PHOTOS}, layer {LAYER!r} (320 channels), units='channel', mode 'zero'")
    log(f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f} at start")
    with torch.no_grad():
        labels = model(x).argmax(1)
    classes = assets.imagenet_classes()
    log("top-1 labels: " + ", ".join(f"{p}: {classes[int(i)]}" for p, i in zip(PHOTOS, labels)))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t_cond, cond = timed(lambda: cd.layer_conductance(model, x, LAYER, units="channel", n_steps=16))
    log(f"channel conductance, n_steps=16: {t_cond:.1f} s, relative completeness error "
        f"{[round(float(e), 3) for e in cond.relative_error[LAYER]]}"
        + (" (a ConductanceWarning: fixed rule above 5%; fine for ranking)" if caught else ""))

    cases = [("conductance", cond[LAYER], 320)]
    if not args.quick:
        gen = torch.Generator().manual_seed(0)
        cases.append(("random", torch.rand(x.shape[0], 320, generator=gen), random_max))

    results = {}
    for name, scores, max_units in cases:
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        log(f"\nranking: {name}, max_units={max_units}")
        t_naive, (c_naive, n_naive) = timed(lambda: naive_flip_count(model, x, order, max_units))  # noqa: B023 (called in this iteration)
        log(f"  naive, one forward per prefix : {t_naive:7.2f} s  {n_naive} forwards        "
            f"counts {fmt_counts(c_naive)}")
        row = {"max_units": max_units, "naive_s": t_naive, "naive_forwards": n_naive,
               "counts_naive": [None if math.isinf(v) else v for v in c_naive.tolist()]}
        for label, expand in (("plain", False), ("default", None)):
            calls = {"forwards": 0, "rows": 0}

            def count(module, inputs):
                calls["forwards"] += 1  # noqa: B023 (called in this iteration)
                calls["rows"] += int(inputs[0].shape[0])  # noqa: B023 (called in this iteration)

            handle = model.register_forward_pre_hook(count)
            try:
                t, counts = timed(lambda: cd.flip_count(model, x, LAYER, scores, units="channel", max_units=max_units,  # noqa: B023 (called in this iteration)
                                                        expand_at_layer=expand))  # noqa: B023 (called in this iteration)
            finally:
                handle.remove()
            same = torch.equal(counts, c_naive)
            how = "repeated inputs" if expand is False else "probe, then expanded"
            log(f"  batched, {label:<7} ({how}): {t:7.2f} s  {calls['forwards']} forwards, {calls['rows']} rows  "
                f"counts {fmt_counts(counts)}  identical to naive: {same}  speed-up x{t_naive / t:.1f}")
            row[f"{label}_forwards"] = calls["forwards"]
            row[f"{label}_rows"] = calls["rows"]
            row[f"{label}_identical"] = same
            row[f"{label}_speedup"] = t_naive / t
            row[f"{label}_s"] = t
        results[name] = row

    log("\nsummary (speed-up = naive time / batched time):")
    for name, row in results.items():
        log(f"  {name:<12} plain x{row['plain_speedup']:.1f}   default x{row['default_speedup']:.1f}   "
            f"counts identical: {row['plain_identical'] and row['default_identical']}")
    out = args.out or os.path.join(os.path.dirname(__file__), "out",
                                   "flip_count_quick.json" if args.quick else "flip_count.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"threads": args.threads, "photos": PHOTOS, "layer": LAYER, "results": results}, f, indent=1)
    log(f"numbers written to {out}")


if __name__ == "__main__":
    main()
