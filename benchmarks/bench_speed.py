#!/usr/bin/env python
"""Speed and peak memory of `conductance` against Captum 0.9 in the same process.

Model: torchvision GoogLeNet with random weights and BatchNorm statistics re-estimated on
the eight bundled real photos (``conductance.assets.googlenet``); inputs: real photos with
ImageNet normalisation; target: each photo's top predicted class; baseline: zeros.

Parts (all times: time.perf_counter, one warm-up call, median of the repeats):

(a) conductance of all 9 Inception blocks (units="channel") in ONE call, against Captum
    looping LayerConductance over the 9 blocks. Ours with method="captum" does the very
    same work as Captum (n_steps + 1 Gauss-Legendre points, left sums) and must agree with
    it; ours with the default fixed rule (n_steps given, no method) is reported too.
(b) one block (inception4d): ours against Captum's LayerConductance, and ours against the
    bare cost of the same path points: a hand-written loop over the same chunks doing only
    forward + backward of the target logit to the block's output (captured by a plain
    forward hook), with nothing recorded below the block.
(c) neuron conductance of 32 single neurons of inception4d (index tuples) in one call,
    against 32 Captum NeuronConductance calls (its default, "riemann_trapezoid"; ours with
    method="captum"). Single neurons are the apples-to-apples unit: Captum has no correct
    whole-channel selector (a callable summing a channel multiplies the channel's summed
    gradient by the summed Jacobian, which is not the channel's conductance).
(d) peak memory (ru_maxrss of a fresh child process, nothing subtracted): ours with default
    settings for the 9 blocks, and Captum LayerConductance on one block with its defaults.

Usage::

    python benchmarks/bench_speed.py            # full run (batch 4, n_steps 50)
    python benchmarks/bench_speed.py --quick    # smoke test (batch 2, n_steps 16)
    python benchmarks/bench_speed.py --parts a,b
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch

import conductance as cd
from conductance import assets
from conductance.inputs import default_chunk

PHOTOS = ["chelsea", "coffee", "rocket", "china", "astronaut", "motorcycle", "flower", "grace_hopper"]
IMAGENET_NORM = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
LAYERS = assets.GOOGLENET_LAYERS
ONE_LAYER = "inception4d"
N_NEURONS = 32

CONFIGS = {
    "full": dict(batch=4, n_steps=50, repeats=3, captum_loop_repeats=2, neuron_batch=4, neuron_steps=50),
    "quick": dict(batch=2, n_steps=16, repeats=2, captum_loop_repeats=1, neuron_batch=2, neuron_steps=16),
}

TARGETS = {  # name: (threshold, kind) with kind "le" (ratio <= threshold) or "lt"
    "a": 0.15, "b_captum": 0.8, "b_bare": 1.1, "c": 0.5, "d_ours_gb": 2.5, "agree": 1e-4,
}


# ---------------------------------------------------------------------------------------------
# setup and helpers


def log(msg: str = "") -> None:
    print(msg, flush=True)


def setup(batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """GoogLeNet (BatchNorm re-estimated on all 8 photos), the first ``batch`` photos, their top class."""
    torch.set_num_threads(2)
    photos = assets.photo_batch(PHOTOS, **IMAGENET_NORM)
    model = assets.googlenet(calibration=photos)
    for p in model.parameters():  # as a user's model: parameters require grad
        p.requires_grad_(True)
    x = photos[:batch].contiguous()
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, target


def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(fn: Callable[[], Any], repeats: int, warmup: bool = True) -> tuple[float, list[float], Any]:
    """Median wall time of ``repeats`` calls after one warm-up call; returns (median, all times, last result)."""
    if warmup:
        fn()
        gc.collect()
    times, out = [], None
    for _ in range(repeats):
        out = None
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def fmt_times(times: list[float]) -> str:
    return "[" + ", ".join(f"{t:.2f}" for t in times) + "] s"


def max_rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (elementwise ratios blow up on near-zero entries)."""
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def captum_layer(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, layer: str,
                 n_steps: int) -> torch.Tensor:
    """Captum LayerConductance with its defaults, summed to channels; the graph is released on return."""
    from captum.attr import LayerConductance

    attr = LayerConductance(model, model.get_submodule(layer)).attribute(x, target=target, n_steps=n_steps)
    return attr.detach().flatten(2).sum(2)


def gl_alphas(n_points: int) -> np.ndarray:
    nodes, _ = np.polynomial.legendre.leggauss(n_points)
    return 0.5 * (1.0 + nodes)


def bare_loop(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, layer: str,
              n_points: int, chunk: int) -> None:
    """The floor: forward + backward of the target logit to ``layer``'s output at the same path points,
    in the same chunks (points ordered by position, then example), nothing else.

    A plain forward hook hands on the layer's output as a fresh leaf that requires grad, and the
    parameters are frozen for the duration, so autograd records nothing below the layer.
    """
    B = x.shape[0]
    alphas = torch.as_tensor(gl_alphas(n_points), dtype=x.dtype).repeat_interleave(B)
    ex = torch.arange(B).repeat(n_points)
    store: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        leaf = output.detach().requires_grad_(True)
        store["y"] = leaf
        return leaf

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        for start in range(0, alphas.shape[0], chunk):
            a = alphas[start:start + chunk].view(-1, 1, 1, 1)
            e = ex[start:start + chunk]
            points = a * x[e]  # baseline zero
            logits = model(points)
            F = logits.gather(1, target[e].unsqueeze(1)).sum()
            torch.autograd.grad(F, store["y"])
    finally:
        handle.remove()
        for p in params:
            p.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# parts


def part_a(model, x, target, cfg, results: dict) -> None:
    n = cfg["n_steps"]
    log(f"\n=== (a) all 9 Inception blocks, batch {x.shape[0]}, n_steps {n}, units='channel' ===")

    def ours(method):
        return lambda: cd.layer_conductance(model, x, LAYERS, target=target, n_steps=n, method=method,
                                            units="channel")

    t_ours, ts, res = timed(ours("captum"), cfg["repeats"])
    log(f"ours, one call, method='captum'        : {t_ours:7.2f} s  {fmt_times(ts)}  "
        f"model evaluations {res.extra['model_evaluations']}")
    t_def, ts_def, res_def = timed(ours(None), cfg["repeats"])
    log(f"ours, one call, default fixed rule     : {t_def:7.2f} s  {fmt_times(ts_def)}  "
        f"(method={res_def.method!r}, {int(res_def.n_points[0])} points per example)")

    # Captum: warm up on one block, then loop over the 9 blocks
    captum_layer(model, x, target, ONE_LAYER, n)
    gc.collect()
    loop_times, per_layer, captum_out = [], {name: [] for name in LAYERS}, {}
    for _ in range(cfg["captum_loop_repeats"]):
        total = 0.0
        for name in LAYERS:
            gc.collect()
            t0 = time.perf_counter()
            captum_out[name] = captum_layer(model, x, target, name, n)
            dt = time.perf_counter() - t0
            per_layer[name].append(dt)
            total += dt
        loop_times.append(total)
    t_cap = statistics.median(loop_times)
    log(f"Captum, LayerConductance x 9 blocks    : {t_cap:7.2f} s  {fmt_times(loop_times)}  "
        f"model evaluations {9 * (n + 1) * x.shape[0]}")
    log("  per block (median s): " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in per_layer.items()))
    diffs = {name: max_rel_diff(res[name], captum_out[name]) for name in LAYERS}
    worst = max(diffs.values())
    log("agreement, ours (method='captum') vs Captum, max|diff|/max|Captum| per block: "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    log(f"ratio ours/Captum, method='captum'     : {t_ours / t_cap:.3f}   (target <= {TARGETS['a']})")
    log(f"ratio ours/Captum, default fixed rule  : {t_def / t_cap:.3f}")
    rel_c = torch.stack([res.relative_error[k] for k in LAYERS]).max().item()
    rel_d = torch.stack([res_def.relative_error[k] for k in LAYERS]).max().item()
    log(f"(context) worst completeness error over blocks and photos: method='captum' {100 * rel_c:.1f}%, "
        f"default fixed rule {100 * rel_d:.1f}%")
    results["a"] = dict(ours_captum=t_ours, ours_captum_times=ts, ours_default=t_def, ours_default_times=ts_def,
                        captum_loop=t_cap, captum_loop_times=loop_times, ratio=t_ours / t_cap,
                        ratio_default=t_def / t_cap, agreement=worst, agreement_per_layer=diffs,
                        captum_one_layer_times=per_layer[ONE_LAYER])


def part_b(model, x, target, cfg, results: dict) -> None:
    n = cfg["n_steps"]
    chunk = default_chunk(x)
    log(f"\n=== (b) one block ({ONE_LAYER}), batch {x.shape[0]}, n_steps {n}, units='channel', "
        f"{n + 1} points per example in chunks of {chunk} ===")

    def ours(method):
        return lambda: cd.layer_conductance(model, x, ONE_LAYER, target=target, n_steps=n, method=method,
                                            units="channel")

    t_ours, ts, _ = timed(ours("captum"), cfg["repeats"])
    log(f"ours, method='captum'                  : {t_ours:7.2f} s  {fmt_times(ts)}")
    t_def, ts_def, _ = timed(ours(None), cfg["repeats"])
    log(f"ours, default fixed rule               : {t_def:7.2f} s  {fmt_times(ts_def)}")
    t_bare, ts_bare, _ = timed(lambda: bare_loop(model, x, target, ONE_LAYER, n + 1, chunk), cfg["repeats"])
    log(f"bare forward+backward, same points     : {t_bare:7.2f} s  {fmt_times(ts_bare)}")
    cap_times = list(results.get("a", {}).get("captum_one_layer_times", []))
    if cap_times:  # the loop of (a) already gave timed (warm) calls on this block; add one more
        gc.collect()
        t0 = time.perf_counter()
        captum_layer(model, x, target, ONE_LAYER, n)
        cap_times.append(time.perf_counter() - t0)
    else:
        _, cap_times, _ = timed(lambda: captum_layer(model, x, target, ONE_LAYER, n), 2)
    t_cap = statistics.median(cap_times)
    log(f"Captum LayerConductance, defaults      : {t_cap:7.2f} s  {fmt_times(cap_times)}")
    log(f"ratio ours/Captum                      : {t_ours / t_cap:.3f}   (target <= {TARGETS['b_captum']})")
    log(f"ratio ours/bare                        : {t_ours / t_bare:.3f}   (target <= {TARGETS['b_bare']})")
    log(f"ratio ours(default rule)/bare          : {t_def / t_bare:.3f}")
    results["b"] = dict(ours_captum=t_ours, ours_times=ts, ours_default=t_def, ours_default_times=ts_def,
                        bare=t_bare, bare_times=ts_bare, captum=t_cap, captum_times=cap_times,
                        ratio_captum=t_ours / t_cap, ratio_bare=t_ours / t_bare,
                        ratio_bare_default=t_def / t_bare)


def pick_neurons(model, x) -> list[tuple[int, int, int]]:
    """32 single neurons of the block: channels spread over the block, positions from a fixed seed."""
    with torch.no_grad():
        shape = {}

        def hook(module, args, output):
            shape["s"] = output.shape

        h = model.get_submodule(ONE_LAYER).register_forward_hook(hook)
        model(x[:1])
        h.remove()
    C, H, W = shape["s"][1:]
    gen = torch.Generator().manual_seed(0)
    channels = torch.linspace(0, C - 1, N_NEURONS).round().long().tolist()
    rows = torch.randint(2, H - 2, (N_NEURONS,), generator=gen).tolist()
    cols = torch.randint(2, W - 2, (N_NEURONS,), generator=gen).tolist()
    return [(c, r, q) for c, r, q in zip(channels, rows, cols)]


def part_c(model, x_full, target_full, cfg, results: dict) -> None:
    from captum.attr import NeuronConductance

    B, n = cfg["neuron_batch"], cfg["neuron_steps"]
    x, target = x_full[:B], target_full[:B]
    neurons = pick_neurons(model, x)
    log(f"\n=== (c) neuron conductance, {N_NEURONS} single neurons of {ONE_LAYER}, batch {B}, n_steps {n} "
        f"(Captum default 'riemann_trapezoid'; ours method='captum') ===")

    def ours():
        return cd.neuron_conductance(model, x, ONE_LAYER, neurons, units="neuron", target=target, n_steps=n,
                                     method="captum")

    t_ours, ts, res = timed(ours, cfg["repeats"])
    log(f"ours, one call for {N_NEURONS} neurons          : {t_ours:7.2f} s  {fmt_times(ts)}")

    nc = NeuronConductance(model, model.get_submodule(ONE_LAYER))

    def captum_one(neuron):
        return nc.attribute(x, neuron_selector=neuron, target=target, n_steps=n).detach()

    captum_one(neurons[0])  # warm-up
    gc.collect()
    call_times, outs = [], []
    for neuron in neurons:
        t0 = time.perf_counter()
        outs.append(captum_one(neuron))
        call_times.append(time.perf_counter() - t0)
    t_cap = sum(call_times)
    log(f"Captum, {N_NEURONS} NeuronConductance calls      : {t_cap:7.2f} s  (per call median "
        f"{statistics.median(call_times):.2f} s, min {min(call_times):.2f}, max {max(call_times):.2f})")
    diffs = [max_rel_diff(res[u], outs[u]) for u in range(N_NEURONS)]
    log(f"agreement, max over neurons of max|diff|/max|Captum|: {max(diffs):.1e} "
        f"(median {statistics.median(diffs):.1e})")
    log(f"ratio ours/Captum                           : {t_ours / t_cap:.3f}   (target <= {TARGETS['c']})")

    # context only: whole channels (units="channel"), which Captum cannot compute correctly in one call
    channels = [c for c, _, _ in neurons]
    t0 = time.perf_counter()
    cd.neuron_conductance(model, x, ONE_LAYER, channels, units="channel", target=target, n_steps=n,
                          method="captum")
    t_ch = time.perf_counter() - t0
    log(f"(context) ours, {N_NEURONS} whole channels (units='channel'), one run: {t_ch:.2f} s")
    results["c"] = dict(ours=t_ours, ours_times=ts, captum=t_cap, captum_call_times=call_times,
                        ratio=t_ours / t_cap, agreement=max(diffs), agreement_median=statistics.median(diffs),
                        ours_channels=t_ch, neurons=neurons)


def part_d(cfg_name: str, cfg: dict, results: dict) -> None:
    log(f"\n=== (d) peak memory (ru_maxrss of a fresh child process, nothing subtracted), batch {cfg['batch']}, "
        f"n_steps {cfg['n_steps']} ===")
    out = {}
    for child, label in (("mem-ours", "ours, 9 blocks, default settings (n_steps given)"),
                         ("mem-captum", f"Captum LayerConductance, {ONE_LAYER}, defaults")):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", child, "--config", cfg_name]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log(f"{label}: child failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
            out[child] = None
            continue
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        info["wall"] = time.perf_counter() - t0
        out[child] = info
        log(f"{label:52s}: peak {info['peak_mb'] / 1024:6.2f} GB  (after model construction: peak "
            f"{info['baseline_peak_mb'] / 1024:.2f} GB, current {info['baseline_rss_mb'] / 1024:.2f} GB; "
            f"call {info['call_s']:.1f} s)")
    results["d"] = out


def child(mode: str, cfg: dict) -> None:
    warnings.filterwarnings("ignore")
    model, x, target = setup(cfg["batch"])
    gc.collect()
    base_peak, base_now = peak_rss_mb(), rss_now_mb()
    n = cfg["n_steps"]
    t0 = time.perf_counter()
    if mode == "mem-ours":
        res = cd.layer_conductance(model, x, LAYERS, target=target, n_steps=n, units="channel")
        assert len(res) == len(LAYERS)
    elif mode == "mem-captum":
        captum_layer(model, x, target, ONE_LAYER, n)
    else:
        raise SystemExit(f"unknown child mode {mode}")
    call = time.perf_counter() - t0
    print(json.dumps(dict(baseline_peak_mb=base_peak, baseline_rss_mb=base_now, peak_mb=peak_rss_mb(),
                          call_s=call)))


# ---------------------------------------------------------------------------------------------
# summary


def summary(results: dict) -> None:
    rows = []

    def row(name, value, target, fmt, le=True, unit=""):
        if value is None:
            rows.append((name, "n/a", target, "n/a"))
            return
        ok = value <= target if le else value < target
        rows.append((name, fmt.format(value) + unit, ("<= " if le else "< ") + f"{target:g}{unit}",
                     "PASS" if ok else "MISS"))

    def info(name, value):
        rows.append((name, value, "(info)", ""))

    if "a" in results:
        a = results["a"]
        row("(a) 9 blocks, ours(captum rule) / Captum loop", a["ratio"], TARGETS["a"], "{:.3f}")
        info("(a) 9 blocks, ours(default rule) / Captum loop", f"{a['ratio_default']:.3f}")
        row("(a) agreement max|diff|/max|Captum|", a["agreement"], TARGETS["agree"], "{:.1e}")
    if "b" in results:
        b = results["b"]
        row(f"(b) {ONE_LAYER}, ours / Captum", b["ratio_captum"], TARGETS["b_captum"], "{:.3f}")
        row(f"(b) {ONE_LAYER}, ours / bare fwd+bwd", b["ratio_bare"], TARGETS["b_bare"], "{:.3f}")
        info(f"(b) {ONE_LAYER}, ours(default rule) / bare", f"{b['ratio_bare_default']:.3f}")
    if "c" in results:
        c = results["c"]
        row(f"(c) {N_NEURONS} neurons, ours / {N_NEURONS} Captum calls", c["ratio"], TARGETS["c"], "{:.3f}")
        row("(c) agreement max|diff|/max|Captum|", c["agreement"], TARGETS["agree"], "{:.1e}")
    if "d" in results:
        d = results["d"]
        ours = d.get("mem-ours")
        row("(d) peak RSS, ours 9 blocks default", None if ours is None else ours["peak_mb"] / 1024,
            TARGETS["d_ours_gb"], "{:.2f}", le=False, unit=" GB")
        cap = d.get("mem-captum")
        info(f"(d) peak RSS, Captum 1 block default", "n/a" if cap is None else f"{cap['peak_mb'] / 1024:.2f} GB")
    w = max(len(r[0]) for r in rows)
    log("\n=== summary ===")
    log(f"{'measure':{w}s}  {'value':>10s}  {'target':>10s}  result")
    for name, value, target, verdict in rows:
        log(f"{name:{w}s}  {value:>10s}  {target:>10s}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run: batch 2, n_steps 16")
    parser.add_argument("--parts", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--json", help="also write the raw numbers to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg_name = args.config or ("quick" if args.quick else "full")
    cfg = CONFIGS[cfg_name]
    torch.set_num_threads(2)
    if args.child:
        child(args.child, cfg)
        return
    warnings.filterwarnings("ignore")  # accuracy warnings are not what is measured here
    import captum
    import torchvision

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    log(f"conductance {cd.__version__}, captum {captum.__version__}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, python {platform.python_version()}")
    log(f"config {cfg_name}: {cfg}; torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}; "
        f"load average at start {os.getloadavg()[0]:.2f}")
    t_start = time.perf_counter()
    results: dict = {"config": cfg_name}
    if any(p in parts for p in "abc"):
        model, x, target = setup(cfg["batch"])
        log(f"photos {PHOTOS[:cfg['batch']]}, top classes {target.tolist()}; RSS after setup "
            f"{rss_now_mb() / 1024:.2f} GB")
        if "a" in parts:
            part_a(model, x, target, cfg, results)
        if "b" in parts:
            part_b(model, x, target, cfg, results)
        if "c" in parts:
            part_c(model, x, target, cfg, results)
        del model, x, target
        gc.collect()
    if "d" in parts:
        part_d(cfg_name, cfg, results)
    summary(results)
    log(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s; load average at end "
        f"{os.getloadavg()[0]:.2f} (2 cores: above ~2 means other jobs shared the CPU)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
