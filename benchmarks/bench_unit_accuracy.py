#!/usr/bin/env python
"""Per-unit accuracy of conductance: every rule, against a high-resolution reference, on real data.

Model and data: EfficientNet-Lite0 with its real ImageNet weights (``conductance.assets``) on four
real bundled photos; black baseline (-1 after the model's normalisation), each photo's top logit,
channel (filter) units.

Layer sets: a late block alone (``_blocks.15``), a middle block alone (``_blocks.7``), an early block
alone (``_blocks.2``), and the three together. The fixed rules' values of a layer do not depend on
which other layers are asked for, so they run once on all three; the adaptive rule runs per set.

What is measured
    1. Per-unit error: relative L2 distance of each (photo, layer) vector of filter conductances to
       the reference, against points per photo, for our fixed rules ("gausslegendre", "uniform",
       "captum" = Captum's LayerConductance default, shown equal to Captum's own below), for the
       adaptive rule at several tolerances, and for Captum 0.9's LayerConductance itself.
    2. The reference: the Gauss-Legendre trapezoid with 2048 intervals; its own error is given by
       its own estimate (its change from the 1024-interval half grid, which the calibration below
       shows to be cautious).
    3. Calibration of the estimate ``result.unit_error``: actual / estimated over every (photo, layer)
       pair of every run; the share of pairs where actual <= 1.5 x estimate.
    4. Points and evaluations to reach 2% and 1% (worst photo and layer) per rule.
    5. Bookkeeping of the adaptive rule: time outside the forward+backward passes, as a % of them.

Usage::

    python benchmarks/bench_unit_accuracy.py --threads 1          # -> benchmarks/out/unit_accuracy.json,
                                                                  #    docs/unit-accuracy.png
    python benchmarks/bench_unit_accuracy.py --quick              # smoke run
    python benchmarks/bench_unit_accuracy.py --report-only benchmarks/out/unit_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch

import conductance as cd
import conductance.engine as cd_engine
from conductance import assets

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "out")
DOCS_DIR = os.path.join(os.path.dirname(HERE), "docs")
LAYER_SETS = {"late": ["_blocks.15"], "middle": ["_blocks.7"], "early": ["_blocks.2"],
              "together": ["_blocks.2", "_blocks.7", "_blocks.15"]}
ALL_LAYERS = LAYER_SETS["together"]
FIXED = ["gausslegendre", "uniform", "captum"]
BLACK = -1.0


def per_unit_error(values: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    v, r = values.double().flatten(1), reference.double().flatten(1)
    return ((v - r).norm(dim=1) / r.norm(dim=1)).numpy()


class EvalTimer:
    """Wraps the engine's point evaluator to split the forward+backward time from the rest."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.original = cd_engine.evaluate

    def __enter__(self) -> EvalTimer:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        cd_engine.evaluate = timed
        return self

    def __exit__(self, *exc: Any) -> None:
        cd_engine.evaluate = self.original


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = assets.efficientnet_lite0()
    x = assets.photo_batch(args.photos)
    with torch.no_grad():
        target = model(x).argmax(1)
    common = dict(baselines=BLACK, target=target, units="channel")
    out: dict[str, Any] = {"photos": args.photos, "layer_sets": LAYER_SETS, "threads": args.threads,
                           "machine": platform.platform(), "torch": torch.__version__}

    t0 = time.perf_counter()
    key = {"photos": list(args.photos), "steps": args.reference_steps, "layers": ALL_LAYERS}
    cached = torch.load(args.reference_cache) if args.reference_cache and os.path.exists(args.reference_cache) else None
    if cached is not None and cached["key"] == key:
        # the reference takes most of the run; its values do not depend on the estimate being measured
        ref = cached["values"]
        out["reference"] = {"rule": f"gausslegendre, {args.reference_steps} intervals", "seconds": cached["seconds"],
                            "own_estimate": cached["own_estimate"], "completeness": cached["completeness"],
                            "cached": args.reference_cache}
    else:
        r = cd.layer_conductance(model, x, ALL_LAYERS, n_steps=args.reference_steps, method="gausslegendre",
                                 **common)
        ref = {L: r[L] for L in ALL_LAYERS}
        out["reference"] = {
            "rule": f"gausslegendre, {args.reference_steps} intervals", "seconds": time.perf_counter() - t0,
            "own_estimate": {L: r.unit_error[L].tolist() for L in ALL_LAYERS},
            "completeness": {L: r.relative_error[L].tolist() for L in ALL_LAYERS}}
        if args.reference_cache:
            torch.save({"key": key, "values": ref, **{k: out["reference"][k] for k in
                                                      ("seconds", "own_estimate", "completeness")}},
                       args.reference_cache)
    print(f"reference ({args.reference_steps} intervals) own estimate max "
          f"{max(max(v) for v in out['reference']['own_estimate'].values()):.2e}", flush=True)

    def record(rule: str, setting: Any, layers: list, r: Any, seconds: float, evals: int) -> dict:
        entry = {"rule": rule, "setting": setting, "layers": layers, "seconds": seconds, "evaluations": evals,
                 "points": r.n_points.tolist(),
                 "actual": {L: per_unit_error(r[L], ref[L]).tolist() for L in layers},
                 "estimate": {L: r.unit_error[L].tolist() for L in layers},
                 "completeness": {L: r.relative_error[L].tolist() for L in layers}}
        worst = max(max(v) for v in entry["actual"].values())
        est = max(max(v) for v in entry["estimate"].values())
        print(f"{rule:14s} {str(setting):>6s} {'+'.join(layers):34s} points {min(entry['points']):4d}-"
              f"{max(entry['points']):4d}  per-unit worst {100 * worst:6.2f}%  estimate worst {100 * est:6.2f}%"
              f"  {seconds:6.1f}s", flush=True)
        return entry

    runs: list = []
    out["runs"] = runs
    if args.keep:
        # runs of these rules from an earlier output, when only the others changed
        with open(os.path.join(OUT_DIR, args.json_name)) as f:
            earlier = json.load(f)
        runs.extend(r for r in earlier["runs"] if r["rule"] in args.keep)
        out["kept_from_earlier_run"] = list(args.keep)

    def checkpoint() -> None:
        # written after every run, so that a run that dies keeps what it measured
        os.makedirs(OUT_DIR, exist_ok=True)
        with open(os.path.join(OUT_DIR, args.json_name), "w") as f:
            json.dump(out, f, indent=1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rule in [r for r in FIXED if r not in args.keep]:
            for points in [p for p in args.points if rule != "uniform" or p <= 256] + (
                    args.captum_extend if rule == "captum" else []):
                t0 = time.perf_counter()
                r = cd.layer_conductance(model, x, ALL_LAYERS, n_steps=points - 1, method=rule, **common)
                runs.append(record(rule, points, ALL_LAYERS, r, time.perf_counter() - t0,
                                   r.extra["model_evaluations"]))
                checkpoint()
        for name, layers in LAYER_SETS.items():
            for tol in args.tolerances:
                with EvalTimer() as timer:
                    t0 = time.perf_counter()
                    r = cd.layer_conductance(model, x, layers, tolerance=tol, **common)
                    total = time.perf_counter() - t0
                entry = record("adaptive", tol, layers, r, total, r.extra["model_evaluations"])
                entry["set"] = name
                entry["bookkeeping_share"] = (total - timer.seconds) / timer.seconds
                runs.append(entry)
                checkpoint()
        from captum.attr import LayerConductance
        modules = dict(model.named_modules())
        for points in args.captum_points:
            for L in ALL_LAYERS:
                t0 = time.perf_counter()
                # Captum's internal_batch_size bounds its memory (one expanded batch of all points
                # through EfficientNet with autograd everywhere did not fit beside other jobs)
                attr = LayerConductance(model, modules[L]).attribute(x, baselines=BLACK, target=target,
                                                                     n_steps=points - 1, internal_batch_size=64)
                values = attr.detach().sum(dim=(2, 3))
                ours = cd.layer_conductance(model, x, L, n_steps=points - 1, method="captum", **common)
                runs.append({"rule": "captum_library", "setting": points, "layers": [L],
                             "seconds": time.perf_counter() - t0, "evaluations": points * x.shape[0],
                             "points": [points] * x.shape[0],
                             "actual": {L: per_unit_error(values, ref[L]).tolist()},
                             "agreement_with_ours": float((values - ours[L]).norm() / values.norm())})
                checkpoint()
                print(f"captum library {points:6d} {L:34s} per-unit worst "
                      f"{100 * max(runs[-1]['actual'][L]):6.2f}%  agreement with method='captum' "
                      f"{runs[-1]['agreement_with_ours']:.1e}", flush=True)
    return out


def report(out: dict) -> str:
    runs = out["runs"]
    lines = ["## Per-unit error against points per photo (worst over photos and layers; median in brackets)", "",
             "| rule | setting | layers | points per photo | per-unit error (actual) | estimate | evaluations |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        actual = np.concatenate([np.asarray(v) for v in r["actual"].values()])
        est = (np.concatenate([np.asarray(v) for v in r["estimate"].values()]) if "estimate" in r else None)
        pts = r["points"]
        lines.append(f"| {r['rule']} | {r['setting']} | {'+'.join(r['layers'])} | "
                     f"{min(pts)}-{max(pts)} | {100 * actual.max():.2f}% ({100 * np.median(actual):.2f}%) | "
                     + (f"{100 * est.max():.2f}% ({100 * np.median(est):.2f}%)" if est is not None else "n/a")
                     + f" | {r['evaluations']} |")
    # calibration over every (photo, layer) pair with an estimate
    ratios, pairs = [], 0
    for r in runs:
        if "estimate" not in r:
            continue
        for L in r["actual"]:
            for a, e in zip(r["actual"][L], r["estimate"][L]):
                if a > 3e-4:   # below the reference's own error the ratio measures the reference
                    ratios.append(a / max(e, 1e-12))
                    pairs += 1
    ratios = np.asarray(ratios)
    lines += ["", "## Calibration of `unit_error` (actual / estimate, pairs with actual > 0.03%)", "",
              f"pairs: {pairs}; actual <= 1.5 x estimate in {100 * np.mean(ratios <= 1.5):.1f}%; "
              f"actual <= estimate in {100 * np.mean(ratios <= 1.0):.1f}%; ratio median {np.median(ratios):.2f}, "
              f"5th percentile {np.percentile(ratios, 5):.2f}, 95th {np.percentile(ratios, 95):.2f}, max "
              f"{ratios.max():.2f} (a ratio below 1 means the estimate is cautious: 1/median = "
              f"{1 / np.median(ratios):.1f}x)"]
    # points to reach 2% and 1%
    lines += ["", "## Points per photo to reach a per-unit error (worst photo and layer)", "",
              "| rule | layers | 2% | 1% |", "|---|---|---|---|"]
    for rule in FIXED + ["captum_library"]:
        for L in ALL_LAYERS:
            cells = []
            for goal in (0.02, 0.01):
                hit = [r for r in runs if r["rule"] == rule and L in r["actual"] and max(r["actual"][L]) <= goal]
                cells.append(str(min(r["setting"] for r in hit)) if hit else "> tested")
            lines.append(f"| {rule} | {L} | {cells[0]} | {cells[1]} |")
    # the goal: points for 2% on every photo and layer of a set, adaptive against Captum's rule
    lines += ["", "## Cost of 2% per unit on every photo and layer of a set: adaptive against Captum's default",
              "", "| set | adaptive: largest tolerance tested that gives <= 2% | its points per photo (mean) | "
              "Captum's rule: fewest points tested that give <= 2% | ratio |", "|---|---|---|---|---|"]
    for name, layers in out["layer_sets"].items():
        ok = [r for r in runs if r["rule"] == "adaptive" and r.get("set") == name
              and max(max(v) for v in r["actual"].values()) <= 0.02]
        fixed = [r for r in runs if r["rule"] == "captum" and all(
            L in r["actual"] and max(r["actual"][L]) <= 0.02 for L in layers)]
        best = max(ok, key=lambda r: r["setting"]) if ok else None
        mean = float(np.mean(best["points"])) if best else None
        captum = min(r["setting"] for r in fixed) if fixed else None
        ratio = f"1/{captum / mean:.1f}" if mean and captum else "n/a"
        lines.append(f"| {name} | {best['setting'] if best else 'none tested'} | "
                     f"{f'{mean:.0f}' if mean else 'n/a'} | {captum if captum else '> tested'} | {ratio} |")
    lines += ["", "## Adaptive rule per layer set", "",
              "| set | tolerance | points per photo (mean) | actual worst | estimate worst | bookkeeping |",
              "|---|---|---|---|---|---|"]
    for r in runs:
        if r["rule"] != "adaptive":
            continue
        actual = max(max(v) for v in r["actual"].values())
        est = max(max(v) for v in r["estimate"].values())
        lines.append(f"| {r['set']} | {r['setting']} | {min(r['points'])}-{max(r['points'])} "
                     f"({np.mean(r['points']):.0f}) | {100 * actual:.2f}% | {100 * est:.2f}% | "
                     f"{100 * r['bookkeeping_share']:.1f}% |")
    ref = out["reference"]
    lines += ["", f"Reference: {ref['rule']}; its own per-unit estimate (against its 1024-interval half) at "
              f"most {max(max(v) for v in ref['own_estimate'].values()):.1e}, median "
              f"{np.median(np.concatenate([np.asarray(v) for v in ref['own_estimate'].values()])):.1e}."]
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 4.8))
    ax, cal = fig.subplots(1, 2)
    colours = {"gausslegendre": "C0", "uniform": "C1", "captum": "C2", "captum_library": "C3", "adaptive": "C4"}
    for rule in FIXED + ["captum_library"]:
        rs = sorted((r for r in out["runs"] if r["rule"] == rule), key=lambda r: r["setting"])
        if not rs:
            continue
        pts = [r["setting"] for r in rs]
        worst = [max(max(v) for v in r["actual"].values()) for r in rs]
        ax.loglog(pts, worst, "o-", color=colours[rule], label=f"{rule} (worst)")
    ad = [r for r in out["runs"] if r["rule"] == "adaptive"]
    ax.loglog([np.mean(r["points"]) for r in ad], [max(max(v) for v in r["actual"].values()) for r in ad], "*",
              color=colours["adaptive"], markersize=10, label="adaptive, one star per tolerance (mean points)")
    ax.axhline(0.02, color="grey", linestyle=":")
    ax.set_xlabel("path points per photo")
    ax.set_ylabel("per-unit error (relative L2 to reference)")
    ax.set_title("EfficientNet-Lite0, 4 photos, filter conductance", fontsize=10)
    ax.legend(fontsize=7)
    for r in out["runs"]:
        if "estimate" not in r:
            continue
        for L in r["actual"]:
            cal.loglog(r["estimate"][L], r["actual"][L], ".", color=colours[r["rule"]], alpha=0.5)
    lim = [1e-4, 2]
    cal.loglog(lim, lim, "k-", linewidth=0.8, label="actual = estimate")
    cal.loglog(lim, [1.5 * v for v in lim], "k--", linewidth=0.8, label="actual = 1.5 x estimate")
    cal.set_xlabel("estimate (result.unit_error)")
    cal.set_ylabel("actual per-unit error")
    cal.set_title("calibration: every (photo, layer) of every run", fontsize=10)
    cal.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--report-only", metavar="JSON")
    p.add_argument("--keep", nargs="*", default=[], choices=FIXED,
                   help="keep these fixed rules' runs from the last output instead of running them again")
    p.add_argument("--reference-cache", metavar="PT", default=os.path.join(OUT_DIR, "unit_accuracy_reference.pt"),
                   help="reuse the reference values from this file when photos and steps match (written "
                        "after computing them; '' to always recompute)")
    args = p.parse_args(argv)
    args.photos = ["chelsea", "coffee", "rocket", "astronaut"]
    args.points = [16, 32, 64, 128, 256, 512]
    args.captum_extend = [1024]
    args.captum_points = [64]
    args.tolerances = [0.05, 0.03, 0.025, 0.02, 0.01]
    args.reference_steps = 2048
    if args.quick:
        args.photos, args.points, args.captum_extend = ["chelsea", "coffee"], [16, 64], []
        args.captum_points, args.tolerances, args.reference_steps = [32], [0.05], 256
        if args.reference_cache:
            args.reference_cache = args.reference_cache.replace(".pt", "_quick.pt")
    if args.report_only:
        with open(args.report_only) as f:
            out = json.load(f)
    else:
        args.json_name = "unit_accuracy_quick.json" if args.quick else "unit_accuracy.json"
        out = run(args)
    text = report(out)
    print(text)
    if not args.quick:
        plot(out, os.path.join(DOCS_DIR, "unit-accuracy.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
