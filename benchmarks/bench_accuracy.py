#!/usr/bin/env python
"""Accuracy of conductance against the number of path points, for every integration rule.

Models and data
    * EfficientNet-Lite0 with its real ImageNet weights (``conductance.assets.efficientnet_lite0``)
      on real photos, layers that are cuts (block outputs).
    * torchvision GoogLeNet with random weights whose BatchNorm statistics are re-estimated on the
      same photos (``conductance.assets.googlenet(calibration=...)``), the nine Inception blocks.
    Baseline: zeros (a black image after normalisation is not zero; we keep the library default,
    the all-zero input). Target: each photo's top predicted logit. Units: channels.

What is measured (per model)
    1. Completeness error vs points: for each rule and each number of path points P per example,
       the relative completeness error |sum over layer - (F(x) - F(x'))| / |F(x) - F(x')| of every
       (photo, layer); median and max over photos x layers. Rules: ours "uniform_left", "uniform",
       "gausslegendre", "captum", the adaptive rule with a budget of exactly P points
       (tolerance=1e-9, max_steps=P), and Captum 0.9's own LayerConductance (n_steps=P-1, one
       call per layer) in the same process.
    2. Points, evaluations and time needed to reach 1% and 5% median error (first tested P).
       Our "captum" rule (shown equal to Captum's own) is extended to larger P until it reaches
       1%, to measure the evaluations Captum's default needs.
    3. Per-unit accuracy: relative L2 distance of each (photo, layer) channel-conductance vector
       to a high-resolution reference (our "gausslegendre" rule at many points); median.
    4. Refinement bookkeeping: conductance.engine.evaluate (the forward+backward of a chunk of path
       points) is wrapped with a timer; the time spent in the integration driver outside it is the
       bookkeeping, reported as a % of the evaluation time.
    5. Tolerance mode: default adaptive runs with tolerance=0.01 and 0.05.

Evaluation counts (path points x photos that went through forward + backward) are the primary
cost measure; wall times are noisy when the machine is shared.

Usage::

    python benchmarks/bench_accuracy.py --threads 1   # full run -> benchmarks/out/accuracy.json, docs/accuracy.png
    python benchmarks/bench_accuracy.py --long --threads 1   # GoogLeNet at 512/1024 points -> accuracy_long.json
    python benchmarks/bench_accuracy.py --report-only benchmarks/out/accuracy.json benchmarks/out/accuracy_long.json
    python benchmarks/bench_accuracy.py --overhead --threads 1   # bookkeeping on GoogLeNet, 9 blocks
    python benchmarks/bench_accuracy.py --quick       # smoke run (2 photos, 2 layers, few points, small reference)
    python benchmarks/bench_accuracy.py --models efficientnet

``--threads 1`` is advisable on a machine shared with other jobs: two threads that must wait for each
other were up to 8 times slower per point there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from typing import Any, Optional

import numpy as np
import torch

import conductance as cd
import conductance.attribute as cd_attribute
import conductance.engine as cd_engine
import conductance.kernels as cd_kernels
from conductance import assets

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "out")
DOCS_DIR = os.path.join(os.path.dirname(HERE), "docs")
IMAGENET_NORM = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

OUR_FIXED = ["uniform_left", "uniform", "gausslegendre", "captum"]
RULES = OUR_FIXED + ["adaptive", "captum_library"]
LABELS = {
    "uniform_left": "left sum, uniform grid",
    "uniform": "trapezoid, uniform grid",
    "gausslegendre": "trapezoid, Gauss-Legendre nodes + ends",
    "captum": "ours, Captum-compatible (left sum on GL nodes)",
    "adaptive": "adaptive bisection (budget = points)",
    "captum_library": "Captum 0.9 LayerConductance (its default)",
}
TARGET_ERRORS = (0.01, 0.05)
TITLES = {"efficientnet": "EfficientNet-Lite0 (ImageNet weights)",
          "googlenet": "GoogLeNet (random, BatchNorm re-estimated)"}

CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "efficientnet": dict(
            photos=["chelsea", "coffee", "rocket", "china"],
            layers=["_blocks.4", "_blocks.10", "_blocks.15"],
            captum_layers=["_blocks.4", "_blocks.10", "_blocks.15"],
            points=[16, 32, 64, 128, 256], fixed_extra_points=[],
            captum_extend=[512, 1024], reference_steps=2048,
            tolerances=[0.05, 0.01], tolerance_max_steps=256),
        # GoogLeNet costs about twice EfficientNet-Lite0 per point and needs many more points:
        # two photos, Captum's own class on one block, a 1024-interval reference.
        "googlenet": dict(
            photos=["chelsea", "coffee"],
            layers=list(assets.GOOGLENET_LAYERS),
            captum_layers=["inception4c"],
            points=[16, 32, 64, 128, 256], fixed_extra_points=[],
            captum_extend=[512], reference_steps=1024,
            tolerances=[0.05, 0.01], tolerance_max_steps=256),
    },
    # supplement (--long): GoogLeNet needs more than 256 points for 5%; larger budgets for the rules
    # that can get there, on the same photos and reference (no Captum class, no tolerance runs)
    "long": {
        "googlenet": dict(
            photos=["chelsea", "coffee"], layers=list(assets.GOOGLENET_LAYERS), captum_layers=[],
            rules=["uniform", "gausslegendre", "captum", "adaptive"],
            points=[512], fixed_extra_points=[], captum_extend=[1024], reference_steps=1024,
            tolerances=[], tolerance_max_steps=256),
    },
    # bookkeeping check (--overhead): the refinement driver's own time on the 9 GoogLeNet blocks
    "overhead": {
        "googlenet": dict(
            photos=["chelsea", "coffee"], layers=list(assets.GOOGLENET_LAYERS), captum_layers=[],
            rules=["gausslegendre", "adaptive"], points=[64, 256], fixed_extra_points=[], captum_extend=[],
            reference_steps=64, tolerances=[0.01], tolerance_max_steps=256),
    },
    "quick": {
        "efficientnet": dict(
            photos=["chelsea", "coffee"], layers=["_blocks.4", "_blocks.15"], captum_layers=["_blocks.15"],
            points=[16, 32], fixed_extra_points=[], captum_extend=[64], reference_steps=128,
            tolerances=[0.05], tolerance_max_steps=32),
        "googlenet": dict(
            photos=["chelsea", "coffee"], layers=["inception3b", "inception4e"], captum_layers=["inception4e"],
            points=[16, 32], fixed_extra_points=[], captum_extend=[], reference_steps=64,
            tolerances=[0.05], tolerance_max_steps=32),
    },
}
#: The adaptive rule stops adding points when its stored layer values would pass its
#: ``memory_budget=`` (``conductance.engine.ADAPTIVE_STORE_BYTES``, 3 GiB, by default). Nine GoogLeNet blocks take about
#: 15 MB per point, so a 2-photo batch would stop near 200 points in all. For the error-vs-points
#: curve (a fixed budget per photo) the cap is raised to this; tolerance-mode runs keep the default.
BUDGET_RUN_STORE_BYTES = 16 * 2 ** 30
#: Path points per chunk for Captum's LayerConductance (its default sends everything at once,
#: which does not fit in memory at 256 points x 4 photos).
CAPTUM_INTERNAL_BATCH = 64


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# timing instrumentation


class Clock:
    """Accumulates the time spent in the engine's point evaluator and in the integration drivers."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.evaluate_s = self.evaluate_cpu_s = 0.0
        self.evaluate_calls = 0
        self.driver_s = self.driver_cpu_s = 0.0

    def install(self) -> None:
        original_evaluate = cd_engine.evaluate

        def timed_evaluate(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return original_evaluate(*args, **kwargs)
            finally:
                self.evaluate_s += time.perf_counter() - t0
                self.evaluate_cpu_s += time.process_time() - c0
                self.evaluate_calls += 1

        cd_engine.evaluate = timed_evaluate  # the drivers look the name up in the module at call time
        for name in ("integrate_adaptive", "integrate_fixed"):
            original = getattr(cd_attribute, name)

            def timed_driver(*args, __original=original, **kwargs):
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    return __original(*args, **kwargs)
                finally:
                    self.driver_s += time.perf_counter() - t0
                    self.driver_cpu_s += time.process_time() - c0

            setattr(cd_attribute, name, timed_driver)


CLOCK = Clock()


class ForwardCounter:
    """Counts examples passed through a model's forward (every forward, including set-up ones)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if args and isinstance(args[0], torch.Tensor):
            self.count += int(args[0].shape[0])


# ---------------------------------------------------------------------------------------------
# models


def load_model(name: str, photos: list[str]) -> tuple[torch.nn.Module, torch.Tensor]:
    if name == "efficientnet":
        return assets.efficientnet_lite0(), assets.photo_batch(photos)
    if name == "googlenet":
        x = assets.photo_batch(photos, **IMAGENET_NORM)
        return assets.googlenet(calibration=x), x
    raise ValueError(name)


# ---------------------------------------------------------------------------------------------
# running the rules


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-example ||a - b|| / ||b|| over the flattened unit vector; (batch,)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)


def ours(model, x, layers, top, counter, *, method: str, points: Optional[int] = None,
         tolerance: Optional[float] = None, max_steps: int = 256) -> tuple[dict, Any]:
    """One call of cd.layer_conductance; returns (record, result)."""
    kwargs: dict[str, Any] = dict(target=top, units="channel")
    if method == "adaptive":
        if points is not None:  # exact budget: a tolerance that is never met
            kwargs.update(tolerance=1e-9, max_steps=points)
        else:
            kwargs.update(tolerance=tolerance, max_steps=max_steps)
    else:
        kwargs.update(method=method, n_steps=points - 1)
    CLOCK.reset()
    forwards0 = counter.count
    cap_used = cd_engine.ADAPTIVE_STORE_BYTES   # the documented default of memory_budget=
    if method == "adaptive" and points is not None:
        cap_used = max(cap_used, BUDGET_RUN_STORE_BYTES)
        kwargs.update(memory_budget=cap_used)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        r = cd.layer_conductance(model, x, layers, **kwargs)
        elapsed = time.perf_counter() - t0
    record = dict(
        rule=method, points=points, tolerance=tolerance,
        n_points=r.n_points.tolist(),
        memory_limited=bool(r.extra.get("memory_limited", False)),
        store_cap_bytes=cap_used if method == "adaptive" else None,
        evaluations=int(r.extra["model_evaluations"]),
        forward_examples=counter.count - forwards0,
        time_s=elapsed, evaluate_s=CLOCK.evaluate_s, evaluate_calls=CLOCK.evaluate_calls,
        driver_s=CLOCK.driver_s, evaluate_cpu_s=CLOCK.evaluate_cpu_s, driver_cpu_s=CLOCK.driver_cpu_s,
        rel_error={n: r.relative_error[n].double().tolist() for n in layers},
        output_diff=r.output_diff.double().tolist(),
    )
    return record, r


def captum_library(model, x, layers, top, counter, output_diff: torch.Tensor, points: int
                   ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Captum's own LayerConductance, one call per layer, its default method, n_steps = points - 1."""
    from captum.attr import LayerConductance

    modules = dict(model.named_modules())
    rel, chans, times = {}, {}, {}
    forwards0 = counter.count
    t_all = time.perf_counter()
    for name in layers:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attr, delta = LayerConductance(model, modules[name]).attribute(
                x, target=top, n_steps=points - 1, return_convergence_delta=True,
                internal_batch_size=CAPTUM_INTERNAL_BATCH)
        times[name] = time.perf_counter() - t0
        attr = attr.detach()
        chans[name] = attr.flatten(2).sum(2) if attr.dim() > 2 else attr
        rel[name] = (delta.detach().double().abs() / output_diff.double().abs()).tolist()
    record = dict(rule="captum_library", points=points, n_points=[points] * x.shape[0],
                  evaluations=points * x.shape[0] * len(layers),
                  forward_examples=counter.count - forwards0, time_s=time.perf_counter() - t_all,
                  time_per_layer_s=times, rel_error=rel, layers=list(layers))
    return record, chans


def unit_distances(result_channels: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    return {n: rel_l2(v, reference[n]).tolist() for n, v in result_channels.items()}


def run_model(name: str, cfg: dict, budget_log: list) -> dict:
    log(f"\n=== {name}: photos {cfg['photos']}, layers {cfg['layers']}, threads {torch.get_num_threads()}")
    model, x = load_model(name, cfg["photos"])
    counter = ForwardCounter(model)
    layers = cfg["layers"]
    with torch.no_grad():
        logits = model(x)
    top = logits.argmax(1)
    labels = assets.imagenet_classes()
    out: dict[str, Any] = dict(
        photos=cfg["photos"], layers=layers, captum_layers=cfg["captum_layers"], top=top.tolist(),
        top_names=[labels[i] for i in top.tolist()], config=cfg, runs=[], tolerance_runs=[],
        captum_agreement=[])
    t_model = time.perf_counter()

    # high-resolution reference first
    ref_rec, ref = ours(model, x, layers, top, counter, method="gausslegendre",
                        points=cfg["reference_steps"] + 1)
    reference = {n: ref[n].double() for n in layers}
    output_diff = ref.output_diff.double()
    ref_rec["unit_distance"] = {n: [0.0] * x.shape[0] for n in layers}
    out["reference"] = ref_rec
    log(f"reference gausslegendre {cfg['reference_steps'] + 1} points: {ref_rec['time_s']:.1f}s, "
        f"completeness error median {np.median(_flat(ref_rec['rel_error'])):.2e} "
        f"max {np.max(_flat(ref_rec['rel_error'])):.2e}")
    out["output_diff"] = output_diff.tolist()

    def record(rec: dict, chans: dict) -> None:
        rec["unit_distance"] = unit_distances(chans, reference)
        out["runs"].append(rec)
        errs = _flat(rec["rel_error"])
        log(f"  {rec['rule']:<15} P={rec['points']:>5}  median err {100 * np.median(errs):8.3f}%  "
            f"max {100 * np.max(errs):8.3f}%  unit dist {100 * np.median(_flat(rec['unit_distance'])):7.3f}%  "
            f"evals {rec['evaluations']:>6}  {rec['time_s']:6.1f}s")
        budget_log.append((name, rec["rule"], rec["points"], rec["time_s"]))

    our_results: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for points in cfg["points"] + cfg["fixed_extra_points"]:
        for rule in cfg.get("rules", OUR_FIXED + ["adaptive"]):
            if rule == "adaptive" and points not in cfg["points"]:
                continue
            rec, r = ours(model, x, layers, top, counter, method=rule, points=points)
            if rule == "captum":
                our_results[(rule, points)] = {n: r[n] for n in cfg["captum_layers"]}
            record(rec, {n: r[n] for n in layers})
        if points in cfg["points"] and cfg["captum_layers"]:
            rec, chans = captum_library(model, x, cfg["captum_layers"], top, counter, output_diff, points)
            ours_c = our_results[("captum", points)]
            agreement = {n: dict(rel_l2=float(rel_l2(chans[n], ours_c[n]).max()),
                                 max_abs=float((chans[n].double() - ours_c[n].double()).abs().max()))
                         for n in cfg["captum_layers"]}
            out["captum_agreement"].append(dict(points=points, per_layer=agreement))
            record(rec, chans)
            log(f"    Captum vs ours 'captum' rule: max relative L2 "
                f"{max(a['rel_l2'] for a in agreement.values()):.2e}")

    # extend the Captum-compatible rule until it reaches 1% (to count what Captum's default needs)
    for points in cfg["captum_extend"]:
        done = [r for r in out["runs"] if r["rule"] == "captum"]
        if any(np.median(_flat(r["rel_error"])) <= 0.01 for r in done):
            break
        rec, r = ours(model, x, layers, top, counter, method="captum", points=points)
        rec["extension"] = True
        record(rec, {n: r[n] for n in layers})

    # tolerance mode (the library's default adaptive settings, max_steps=256)
    for tol in cfg["tolerances"]:
        rec, r = ours(model, x, layers, top, counter, method="adaptive", tolerance=tol,
                      max_steps=cfg["tolerance_max_steps"])
        rec["unit_distance"] = unit_distances({n: r[n] for n in layers}, reference)
        out["tolerance_runs"].append(rec)
        log(f"  tolerance={tol}: points per photo {rec['n_points']}, max err "
            f"{100 * np.max(_flat(rec['rel_error'])):.2f}%, evals {rec['evaluations']}, {rec['time_s']:.1f}s")
    out["time_s"] = time.perf_counter() - t_model
    return out


def _flat(per_layer: dict) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=float) for v in per_layer.values()])


# ---------------------------------------------------------------------------------------------
# report: tables and figure


def _pct(v: float) -> str:
    if v is None or not np.isfinite(v):
        return "-"
    v = 100 * v
    if v >= 100:
        return f"{v:.0f}%"
    if v >= 10:
        return f"{v:.1f}%"
    if v >= 0.01:
        return f"{v:.2f}%"
    return f"{v:.1e}%"


def short_of_budget(rec: dict) -> bool:
    """Whether an exact-budget run stopped with fewer points than asked (e.g. the memory cap)."""
    return rec.get("points") is not None and min(rec["n_points"]) < rec["points"]


def curve(model_out: dict, rule: str, key: str = "rel_error") -> list[tuple[int, float, float, dict]]:
    rows = []
    for r in sorted((r for r in model_out["runs"] if r["rule"] == rule), key=lambda r: r["points"]):
        v = _flat(r[key])
        rows.append((r["points"], float(np.median(v)), float(np.max(v)), r))
    return rows


def first_reaching(model_out: dict, rule: str, target: float) -> Optional[dict]:
    for _points, med, _, rec in curve(model_out, rule):
        if med <= target:
            return rec
    return None


def overhead_rows(model_out: dict) -> list[dict]:
    rows = []
    for r in model_out["runs"] + model_out["tolerance_runs"]:
        if r["rule"] not in ("adaptive", "gausslegendre") or "evaluate_s" not in r:
            continue
        book = r["driver_s"] - r["evaluate_s"]
        # CPU time (all threads of this process) is less disturbed than wall time by other jobs
        book_cpu = r["driver_cpu_s"] - r["evaluate_cpu_s"] if "driver_cpu_s" in r else None
        rows.append(dict(rule=r["rule"], points=r["points"], tolerance=r.get("tolerance"),
                         evaluations=r["evaluations"], evaluate_calls=r["evaluate_calls"],
                         time_s=r["time_s"], evaluate_s=r["evaluate_s"], driver_s=r["driver_s"],
                         bookkeeping_s=book, bookkeeping_pct=100 * book / max(r["evaluate_s"], 1e-9),
                         bookkeeping_cpu_pct=None if book_cpu is None
                         else 100 * book_cpu / max(r["evaluate_cpu_s"], 1e-9),
                         outside_pct=100 * (r["time_s"] - r["evaluate_s"]) / max(r["evaluate_s"], 1e-9),
                         evaluate_ms_per_point=1000 * r["evaluate_s"] / max(r["evaluations"], 1)))
    return rows


def _opt_pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}%"


def summarise(data: dict) -> dict:
    summary: dict[str, Any] = {}
    for model_name, m in data["models"].items():
        s: dict[str, Any] = {"curves": {}, "unit": {}, "targets": {}, "overhead": overhead_rows(m)}
        for rule in RULES:
            s["curves"][rule] = [(p, med, mx) for p, med, mx, _ in curve(m, rule)]
            s["unit"][rule] = [(p, med, mx) for p, med, mx, _ in curve(m, rule, "unit_distance")]
            for target in TARGET_ERRORS:
                rec = first_reaching(m, rule, target)
                tested = [p for p, *_ in curve(m, rule)]
                s["targets"][f"{rule}@{target}"] = (
                    dict(points=rec["points"], evaluations=rec["evaluations"], time_s=rec["time_s"])
                    if rec else dict(points=None, max_tested=max(tested) if tested else None))
        a = s["targets"]["adaptive@0.01"]
        c = s["targets"]["captum@0.01"]
        if a.get("points"):
            if c.get("points"):
                s["adaptive_vs_captum_1pct"] = dict(ratio=a["points"] / c["points"], bound=False,
                                                    adaptive=a["points"], captum=c["points"])
            else:
                s["adaptive_vs_captum_1pct"] = dict(ratio=a["points"] / c["max_tested"], bound=True,
                                                    adaptive=a["points"], captum=f"> {c['max_tested']}")
        summary[model_name] = s
    return summary


def tables_markdown(data: dict, summary: dict) -> str:
    lines: list[str] = []
    for model_name, m in data["models"].items():
        s = summary[model_name]
        lines += [f"### {model_name}", "",
                  f"Photos: {', '.join(m['photos'])} (top classes: {', '.join(m['top_names'])}); layers: "
                  f"{', '.join(m['layers'])}. Captum's own LayerConductance on: {', '.join(m['captum_layers'])}.",
                  f"Reference: trapezoid on Gauss-Legendre nodes + ends, {m['reference']['points']} points; its own "
                  f"median / max completeness error {_pct(np.median(_flat(m['reference']['rel_error'])))} / "
                  f"{_pct(np.max(_flat(m['reference']['rel_error'])))}.", ""]
        all_points = sorted({p for rule in RULES for p, *_ in s["curves"][rule]})
        for title, key in (("Median (max) relative completeness error over photos x layers", "curves"),
                           ("Median relative L2 distance of the channel conductance to the reference", "unit")):
            lines += [f"{title}:", "", "| rule | " + " | ".join(str(p) for p in all_points) + " |",
                      "|---|" + "---|" * len(all_points)]
            for rule in RULES:
                got = {p: (med, mx, rec) for p, med, mx, rec in curve(m, rule, "rel_error" if key == "curves"
                                                                        else "unit_distance")}
                cells = []
                for p in all_points:
                    if p not in got:
                        cells.append("")
                        continue
                    flag = " (short: " + ",".join(map(str, got[p][2]["n_points"])) + " points)" \
                        if short_of_budget(got[p][2]) else ""
                    if key == "curves":
                        cells.append(f"{_pct(got[p][0])} ({_pct(got[p][1])}){flag}")
                    else:
                        cells.append(_pct(got[p][0]) + flag)
                lines.append(f"| {LABELS[rule]} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["Points per photo, model evaluations (points x photos, forward + backward) and wall time of the "
                  "first tested point count whose median completeness error is at most 1% / 5%:", "",
                  "| rule | 1%: points | evaluations | time | 5%: points | evaluations | time |",
                  "|---|---|---|---|---|---|---|"]
        for rule in RULES:
            cells = []
            for target in (0.01, 0.05):
                t = s["targets"][f"{rule}@{target}"]
                if t.get("points"):
                    cells += [str(t["points"]), str(t["evaluations"]), f"{t['time_s']:.1f} s"]
                else:
                    cells += [f"> {t.get('max_tested')}", "-", "-"]
            lines.append(f"| {LABELS[rule]} | " + " | ".join(cells) + " |")
        lines.append("")
        if "adaptive_vs_captum_1pct" in s:
            a = s["adaptive_vs_captum_1pct"]
            lines += [f"Evaluations for a 1% median error, adaptive / Captum's default: {a['adaptive']} / "
                      f"{a['captum']} points per photo = {'<= ' if a['bound'] else ''}{a['ratio']:.3f} "
                      f"(goal: <= 0.125).", ""]
        agree = m["captum_agreement"]
        if agree:
            lines += [f"Captum's own LayerConductance against our 'captum' rule on the same layers "
                      f"({', '.join(m['captum_layers'])}) and points: median completeness error of each, and the "
                      "largest relative L2 difference of the channel conductance:", "",
                      "| points | ours, 'captum' rule | Captum 0.9 | largest relative L2 difference |",
                      "|---|---|---|---|"]
            by_rule = {(r["rule"], r["points"]): r for r in m["runs"]}
            for a in agree:
                p = a["points"]
                ours_err = np.concatenate([by_rule[("captum", p)]["rel_error"][n] for n in m["captum_layers"]])
                lib_err = _flat(by_rule[("captum_library", p)]["rel_error"])
                worst = max(v["rel_l2"] for v in a["per_layer"].values())
                lines.append(f"| {p} | {_pct(np.median(ours_err))} | {_pct(np.median(lib_err))} | {worst:.1e} |")
            lines.append("")
        lines += [f"Tolerance mode (adaptive, max_steps={m['config']['tolerance_max_steps']}):", "",
                  "| tolerance | points per photo | evaluations | median / max completeness error | "
                  "median unit distance | stopped by memory cap | time |", "|---|---|---|---|---|---|---|"]
        for r in m["tolerance_runs"]:
            errs = _flat(r["rel_error"])
            lines.append(f"| {r['tolerance']} | {', '.join(map(str, r['n_points']))} | {r['evaluations']} | "
                         f"{_pct(np.median(errs))} / {_pct(np.max(errs))} | "
                         f"{_pct(np.median(_flat(r['unit_distance'])))} | "
                         f"{'yes' if r.get('memory_limited') else 'no'} | {r['time_s']:.1f} s |")
        lines += ["", "Bookkeeping (time in the integration driver outside `engine.evaluate`) as a share of the "
                  "evaluation time, in wall time and in CPU time of the process (less disturbed by other jobs); "
                  "the last column also counts the per-call set-up (one forward at the inputs, one for the cut "
                  "check, and for the 'captum' rule the end-point forwards):", "",
                  "| run | evaluations | evaluate calls | evaluation time | ms per point | bookkeeping | "
                  "bookkeeping / evaluation | same, CPU time | whole call minus evaluation, / evaluation |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for o in s["overhead"]:
            run = (f"{o['rule']} P={o['points']}" if o["points"] else f"adaptive tolerance={o['tolerance']}")
            lines.append(f"| {run} | {o['evaluations']} | {o['evaluate_calls']} | {o['evaluate_s']:.1f} s | "
                         f"{o['evaluate_ms_per_point']:.0f} | {o['bookkeeping_s']:.2f} s | "
                         f"{o['bookkeeping_pct']:.1f}% | {_opt_pct(o.get('bookkeeping_cpu_pct'))} | "
                         f"{o['outside_pct']:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def figure(data: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(data["models"])
    fig, axes = plt.subplots(2, len(models), figsize=(6.2 * len(models), 8.4), squeeze=False)
    styles = {"uniform_left": ("tab:gray", "s", "-"), "uniform": ("tab:blue", "^", "-"),
              "gausslegendre": ("tab:green", "D", "-"), "captum": ("tab:orange", "o", "-"),
              "adaptive": ("tab:red", "*", "-"), "captum_library": ("black", "x", ":")}
    for col, model_name in enumerate(models):
        m = data["models"][model_name]
        for row, key in enumerate(("rel_error", "unit_distance")):
            ax = axes[row][col]
            for rule in RULES:
                c = curve(m, rule, key)
                if not c:
                    continue
                color, marker, ls = styles[rule]
                label = LABELS[rule]
                if rule == "captum_library" and list(m["captum_layers"]) != list(m["layers"]):
                    label += " [" + ", ".join(m["captum_layers"]) + " only]"
                ax.plot([p for p, *_ in c], [max(med, 1e-7) for _, med, *_ in c], color=color, marker=marker,
                        ls=ls, ms=8 if rule == "adaptive" else 5, lw=1.6, label=label,
                        mfc="none" if rule == "captum_library" else color)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            if key == "rel_error":
                for t in TARGET_ERRORS:
                    ax.axhline(t, color="0.6", lw=0.8, ls="--")
                ax.set_title(f"{TITLES.get(model_name, model_name)}, {len(m['photos'])} photos:\n"
                             f"completeness error, {len(m['layers'])} layers", fontsize=10.5)
                ax.set_ylabel("median relative completeness error")
            else:
                ax.set_title(f"channel conductance vs reference ({m['reference']['points']} points)", fontsize=10.5)
                ax.set_ylabel("median relative L2 to reference")
            ax.set_xlabel("path points per example")
            ax.grid(True, which="major", alpha=0.3)
    handles: dict = {}
    for ax in axes.flat:  # one legend for the figure, below the panels
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=2, fontsize=8.5, frameon=False)
    fig.tight_layout(rect=(0, 0.026 * (1 + (len(handles) + 1) // 2), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 photos, 2 layers, points 16 and 32")
    ap.add_argument("--long", action="store_true", help="supplement: GoogLeNet at 512 (adaptive, fixed) "
                    "and 1024 (Captum-compatible) points; merge with --report-only main.json long.json")
    ap.add_argument("--overhead", action="store_true",
                    help="bookkeeping check only: GoogLeNet 9 blocks, 64 and 256 points, tolerance 0.01")
    ap.add_argument("--models", default="efficientnet,googlenet")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/out/accuracy[_quick].json)")
    ap.add_argument("--figure", default=None, help="figure path (default docs/accuracy.png; quick: out/)")
    ap.add_argument("--report-only", metavar="JSON", nargs="+", default=None,
                    help="only rebuild tables and figure; with several files, the runs of later files "
                         "(e.g. a --long supplement) are added to the same model's runs")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-fused-kernel", action="store_true",
                    help="interval sums by torch operations only (conductance.kernels stands aside): the "
                         "bookkeeping without numba, for a before/after comparison")
    args = ap.parse_args(argv)

    mode = "quick" if args.quick else "long" if args.long else "overhead" if args.overhead else "full"
    if (args.long or args.overhead) and args.models == "efficientnet,googlenet":
        args.models = "googlenet"
    out_path = args.out or os.path.join(OUT_DIR, {"quick": "accuracy_quick.json", "long": "accuracy_long.json",
                                                  "overhead": "accuracy_overhead.json", "full": "accuracy.json"}[mode])
    fig_path = args.figure or (os.path.join(OUT_DIR, f"accuracy_{mode}.png") if mode != "full"
                               else os.path.join(DOCS_DIR, "accuracy.png"))
    os.makedirs(OUT_DIR, exist_ok=True)
    if args.report_only:
        out_path = args.report_only[0]
        with open(args.report_only[0]) as f:
            data = json.load(f)
        for extra_path in args.report_only[1:]:
            with open(extra_path) as f:
                extra = json.load(f)
            data.setdefault("supplements", []).append(dict(command=extra.get("command"),
                                                           total_time_s=extra.get("total_time_s")))
            for name, m in extra["models"].items():
                have = {(r["rule"], r["points"]) for r in data["models"][name]["runs"]}
                for r in m["runs"]:
                    if (r["rule"], r["points"]) not in have:
                        r["supplement"] = True
                        data["models"][name]["runs"].append(r)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.no_fused_kernel:
            cd_kernels.channel_trapezoid = lambda *tensors: None   # the engine looks it up at call time
        torch.manual_seed(0)
        CLOCK.install()
        data = dict(mode=mode, command=" ".join([os.path.basename(sys.executable)] + sys.argv),
                    machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                                 torch_threads=torch.get_num_threads(), torch=torch.__version__,
                                 fused_kernel=not args.no_fused_kernel and cd_kernels.available(),
                                 load_average_start=os.getloadavg()),
                    started=time.strftime("%Y-%m-%d %H:%M:%S"), models={})
        budget_log: list = []
        t0 = time.perf_counter()
        for name in args.models.split(","):
            data["models"][name] = run_model(name, CONFIGS[mode][name], budget_log)
            data["total_time_s"] = time.perf_counter() - t0
            data["machine"]["load_average_end"] = os.getloadavg()
            with open(out_path, "w") as f:  # save after each model, so a long run leaves partial data
                json.dump(data, f, indent=1)
        log(f"\ntotal {data['total_time_s']:.0f} s; raw numbers in {out_path}")
    data["summary"] = summarise(data)
    text = tables_markdown(data, data["summary"])
    with open(out_path.replace(".json", "_tables.md"), "w") as f:
        f.write(text)
    if not args.report_only:
        with open(out_path, "w") as f:
            json.dump(data, f, indent=1)
    log("\n" + text)
    figure(data, fig_path)
    log(f"figure: {fig_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
