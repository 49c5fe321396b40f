#!/usr/bin/env python
"""Variants of the adaptive rule's starting grid and selection, per-unit error against points.

Same model, photos, baseline, target, units, layer sets and reference as
``bench_unit_accuracy.py`` (EfficientNet-Lite0, four photos, black baseline, top logit, channel
units; Gauss-Legendre trapezoid at 2049 points, read from that benchmark's reference cache). Each
variant replaces one or two methods of ``conductance.adaptive.AdaptiveIntegrator``:

- ``current``: the library's rule (Gauss-Legendre starting nodes, bisect the worst pairs until they
  hold 30% of the example's score);
- ``uniform start``: evenly spaced starting pairs, the same selection;
- ``sketch``: evenly spaced start and the top quarter of pairs by count (ENGINE-NOTES' sketch);
- ``share 0.15``: the library's start, pairs up to 15% of the score.

For each variant, layer set and tolerance it prints the mean and range of points per photo and the
worst per-unit error, and per set the cost of 2% (the largest tested tolerance whose worst photo is
at most 2%, and its mean points).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_adaptive_variants.py --threads 1   # -> out/adaptive_variants.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from typing import Any

import numpy as np
import torch
from bench_unit_accuracy import ALL_LAYERS, BLACK, LAYER_SETS, OUT_DIR, per_unit_error

import conductance as cd
import conductance.adaptive as cd_adaptive
from conductance import assets

PHOTOS = ["chelsea", "coffee", "rocket", "astronaut"]


class UniformStart(cd_adaptive.AdaptiveIntegrator):
    def start_ends(self, n0: int) -> np.ndarray:
        return np.linspace(0.0, 1.0, n0 + 1)


class Sketch(UniformStart):
    def choose(self, e: int) -> list:
        scored = self.scores(e)
        budget = (self.max_points - len(self.examples[e].ids)) // 2
        return [pair for _, pair in scored[:min(budget, max(1, round(0.25 * len(scored))))]]


class ShareFifteen(cd_adaptive.AdaptiveIntegrator):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refine_share = 0.15


VARIANTS = {"current": cd_adaptive.AdaptiveIntegrator, "uniform start": UniformStart, "sketch": Sketch,
            "share 0.15": ShareFifteen}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tolerances", type=float, nargs="+", default=[0.03, 0.025, 0.02])
    ap.add_argument("--reference-cache", default=os.path.join(OUT_DIR, "unit_accuracy_reference.pt"))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = assets.efficientnet_lite0()
    x = assets.photo_batch(PHOTOS)
    with torch.no_grad():
        target = model(x).argmax(1)
    if not os.path.exists(args.reference_cache):
        raise SystemExit(f"no reference at {args.reference_cache}: run benchmarks/bench_unit_accuracy.py "
                         "--reference-cache (default path) first")
    cached = torch.load(args.reference_cache)
    if cached["key"]["photos"] != PHOTOS or cached["key"]["layers"] != ALL_LAYERS:
        raise SystemExit(f"{args.reference_cache} holds another reference: {cached['key']}")
    ref = cached["values"]
    runs: list[dict] = []
    original = cd_adaptive.AdaptiveIntegrator
    try:
        for vname in args.variants:
            # integrate_adaptive builds the integrator by this module-level name at call time
            cd_adaptive.AdaptiveIntegrator = VARIANTS[vname]
            for sname, layers in LAYER_SETS.items():
                for tol in args.tolerances:
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        r = cd.layer_conductance(model, x, layers, baselines=BLACK, target=target, units="channel",
                                                 tolerance=tol)
                    worst = max(float(per_unit_error(r[L], ref[L]).max()) for L in layers)
                    run = {"variant": vname, "set": sname, "tolerance": tol, "points": r.n_points.tolist(),
                           "worst": worst, "estimate_worst": max(float(r.unit_error[L].max()) for L in layers),
                           "seconds": time.perf_counter() - t0}
                    runs.append(run)
                    print(f"{vname:14s} {sname:9s} {tol:6.3f} points {min(run['points']):4d}-{max(run['points']):4d} "
                          f"(mean {np.mean(run['points']):5.1f})  worst {100 * worst:5.2f}%  estimate "
                          f"{100 * run['estimate_worst']:5.2f}%  {run['seconds']:5.1f}s", flush=True)
    finally:
        cd_adaptive.AdaptiveIntegrator = original
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "adaptive_variants.json"), "w") as f:
        json.dump({"runs": runs, "photos": PHOTOS, "threads": args.threads}, f, indent=1)
    print("\n| variant | " + " | ".join(LAYER_SETS) + " |")
    print("|---|" + "---|" * len(LAYER_SETS))
    for vname in args.variants:
        cells = []
        for sname in LAYER_SETS:
            ok = [r for r in runs if r["variant"] == vname and r["set"] == sname and r["worst"] <= 0.02]
            best = max(ok, key=lambda r: r["tolerance"]) if ok else None
            cells.append(f"{np.mean(best['points']):.0f} ({best['tolerance']}, {100 * best['worst']:.2f}%)"
                         if best else "> tested")
        print(f"| {vname} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
