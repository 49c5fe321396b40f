#!/usr/bin/env python
"""Speed and peak memory of `conductance` against Captum 0.9 in the same process.

Model: torchvision GoogLeNet with random weights and BatchNorm statistics re-estimated on
the eight bundled real photos (``conductance.assets.googlenet``); inputs: real photos with
ImageNet normalisation; target: each photo's top predicted class; baseline: zeros.

Parts (times: time.perf_counter after one warm-up call, median of the repeats, the tasks of a
part run in interleaved rounds; process CPU times are reported alongside):

(a) conductance of all 9 Inception blocks (units="channel") in ONE call, against Captum
    looping LayerConductance over the 9 blocks. Ours with method="captum" does the very
    same work as Captum (n_steps + 1 Gauss-Legendre points, left sums) and must agree with
    it; ours with the default fixed rule (n_steps given, no method) is reported too.
(b) one block (inception4d): ours against Captum's LayerConductance, and ours against the
    bare cost of the same path points: a hand-written loop over the same chunks doing only
    forward + backward of the target logit to the block's output (captured by a plain
    forward hook), with nothing recorded below the block. Ours by default sends path points
    in channels-last layout (conv models on the CPU); the 'captum' rule keeps the inputs' layout
    to reproduce Captum's arithmetic. Each is compared with the bare loop in its own layout.
(c) neuron conductance of 32 single neurons of inception4d (index tuples) in one call,
    against 32 Captum NeuronConductance calls (its default, "riemann_trapezoid"; ours with
    method="captum"), at batch 2, n_steps 16 to keep the run short. Single neurons are the
    apples-to-apples unit: Captum has no correct whole-channel selector (a callable summing a
    channel multiplies the channel's summed gradient by the channel's summed Jacobian, which
    is not the channel's conductance). Agreement is checked in float32 on all neurons and in
    float64 on the worst ones (float32 single-neuron results are themselves ~1e-2 noisy).
(d) peak memory (ru_maxrss of a child process, nothing subtracted): ours with default
    settings for the 9 blocks, and Captum LayerConductance on one block with its defaults.
    Runs first, while this parent is small: Linux carries the parent's peak into the
    child's ru_maxrss across fork+exec (VmHWM of the child is printed as a cross-check).

Usage::

    python benchmarks/bench_speed.py            # full run (batch 4, n_steps 50)
    python benchmarks/bench_speed.py --quick    # smoke test (batch 2, n_steps 16; (c) 4 neurons)
    python benchmarks/bench_speed.py --parts a,b
"""

from __future__ import annotations

import os

# Must precede the first import of torch. On this shared 2-core machine, libgomp's default busy
# waiting made 2-thread runs up to 5x slower whenever another process held a core (the waiting
# thread spins for the descheduled one). Passive waiting costs nothing measurable when the machine
# is idle; it applies to ours, Captum and the bare loop alike. Override from the environment.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import conductance as cd
from conductance import assets
from conductance.inputs import default_chunk

PHOTOS = ["chelsea", "coffee", "rocket", "china", "astronaut", "motorcycle", "flower", "grace_hopper"]
IMAGENET_NORM = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
LAYERS = assets.GOOGLENET_LAYERS
ONE_LAYER = "inception4d"

CONFIGS = {
    # (c) runs at a smaller size than (a)/(b): 32 Captum NeuronConductance calls at batch 4, n_steps 50
    # would take about 6 minutes on their own on this 2-core machine.
    "full": dict(batch=4, n_steps=50, repeats=3, captum_loop_repeats=2,
                 neuron_batch=2, neuron_steps=16, neurons=32, neuron_repeats=2, f64_neurons=3),
    "quick": dict(batch=2, n_steps=16, repeats=2, captum_loop_repeats=1,
                  neuron_batch=1, neuron_steps=8, neurons=4, neuron_repeats=1, f64_neurons=1),
}

TARGETS = {"a": 0.15, "b_captum": 0.8, "b_bare": 1.1, "c": 0.5, "d_ours_gb": 2.5, "agree": 1e-4}


# ---------------------------------------------------------------------------------------------
# setup and helpers


def log(msg: str = "") -> None:
    print(msg, flush=True)


def setup(batch: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """GoogLeNet (BatchNorm re-estimated on all 8 photos), the first ``batch`` photos, their top class."""
    torch.set_num_threads(2)
    photos = assets.photo_batch(PHOTOS, **IMAGENET_NORM)
    model = assets.googlenet(calibration=photos)
    x = photos[:batch].contiguous()
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, target


def rss_mb(field: str = "VmRSS") -> float:
    """A field of /proc/self/status in MiB: VmRSS (now) or VmHWM (peak of this address space)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result) of one call."""
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


class Stat:
    """Repeated timings of one task; the median is what is reported."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.out: Any = None

    def add(self, wall: float, cpu: float, out: Any = None) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.out = out

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)

    def show(self) -> str:
        return (f"{self.median:7.2f} s  (runs {', '.join(f'{t:.2f}' for t in self.wall)}; "
                f"CPU median {self.median_cpu:.2f} s)")

    def as_dict(self) -> dict:
        return dict(median=self.median, wall=self.wall, median_cpu=self.median_cpu, cpu=self.cpu)


def interleaved(tasks: dict[str, tuple[Callable[[], Any], int]]) -> dict[str, Stat]:
    """Run every task's repeats in rounds (A B C, A B C, ...), so a slow spell of a shared
    machine hits all tasks alike. Warm-ups are the caller's business."""
    stats = {name: Stat() for name in tasks}
    for r in range(max(reps for _, reps in tasks.values())):
        for name, (fn, reps) in tasks.items():
            if r < reps:
                stats[name].add(*measure(fn))
    return stats


def ratio(a: Stat, b: Stat) -> tuple[float, float]:
    """(wall-time ratio, CPU-time ratio) of the medians."""
    return a.median / b.median, a.median_cpu / b.median_cpu


def max_rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| (elementwise ratios blow up on near-zero entries)."""
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-300))


def captum_layer(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, layer: str,
                 n_steps: int) -> torch.Tensor:
    """Captum LayerConductance with its defaults, summed to channels.

    Captum's result stays attached to its autograd graph (the whole expanded batch); keeping
    only a detached reduction lets the graph go when this returns, as a careful user would.
    """
    from captum.attr import LayerConductance

    attr = LayerConductance(model, model.get_submodule(layer)).attribute(x, target=target, n_steps=n_steps)
    return attr.detach().flatten(2).sum(2)


def gauss_legendre_points(n_points: int) -> np.ndarray:
    nodes, _ = np.polynomial.legendre.leggauss(n_points)
    return 0.5 * (1.0 + nodes)


def bare_loop(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, layer: str,
              n_points: int, chunk: int, channels_last: bool = False) -> None:
    """The floor for one layer: forward + backward of the target logit to ``layer``'s output at the
    same path points, in the same chunks (points ordered by position, then example), nothing else.

    A plain forward hook hands the layer's output on as a fresh leaf that requires grad, and the
    parameters are frozen meanwhile, so autograd records nothing below the layer (as ours).
    With ``channels_last`` the points are laid out as ours are by default for convolutional models.
    """
    B = x.shape[0]
    alphas = torch.as_tensor(gauss_legendre_points(n_points), dtype=x.dtype).repeat_interleave(B)
    ex = torch.arange(B).repeat(n_points)
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        leaf = output.detach().requires_grad_(True)
        seen["y"] = leaf
        return leaf

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        for start in range(0, alphas.shape[0], chunk):
            e = ex[start:start + chunk]
            points = alphas[start:start + chunk].view(-1, 1, 1, 1) * x[e]  # baseline zero
            if channels_last:
                points = points.contiguous(memory_format=torch.channels_last)
            score = model(points).gather(1, target[e].unsqueeze(1)).sum()
            torch.autograd.grad(score, seen["y"])
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

    captum_out: dict[str, torch.Tensor] = {}
    per_layer: dict[str, list[float]] = {name: [] for name in LAYERS}
    per_layer_cpu: dict[str, list[float]] = {name: [] for name in LAYERS}

    def captum_loop():
        for name in LAYERS:
            wall, cpu, captum_out[name] = measure(lambda: captum_layer(model, x, target, name, n))  # noqa: B023 (called at once)
            per_layer[name].append(wall)
            per_layer_cpu[name].append(cpu)

    ours("captum")()                              # warm-ups
    captum_layer(model, x, target, ONE_LAYER, n)
    st = interleaved({"ours_captum": (ours("captum"), cfg["repeats"]),
                      "ours_default": (ours(None), cfg["repeats"]),
                      "captum_loop": (captum_loop, cfg["captum_loop_repeats"])})
    res, res_def = st["ours_captum"].out, st["ours_default"].out
    log(f"ours, one call, method='captum'      : {st['ours_captum'].show()}; "
        f"{res.extra['model_evaluations']} path points")
    log(f"ours, one call, default fixed rule   : {st['ours_default'].show()}; method={res_def.method!r}, "
        f"{int(res_def.n_points[0])} points per example")
    log(f"Captum, LayerConductance x 9 blocks  : {st['captum_loop'].show()}; "
        f"{9 * (n + 1) * x.shape[0]} path points")
    log("  Captum per block (median s): " + ", ".join(f"{k} {statistics.median(v):.2f}"
                                                      for k, v in per_layer.items()))
    diffs = {name: max_rel_diff(res[name], captum_out[name]) for name in LAYERS}
    worst = max(diffs.values())
    log("agreement, ours (method='captum') vs Captum, max|diff| / max|Captum| per block:\n  "
        + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    r_cap, r_cap_cpu = ratio(st["ours_captum"], st["captum_loop"])
    r_def, r_def_cpu = ratio(st["ours_default"], st["captum_loop"])
    log(f"ratio ours/Captum, method='captum'   : {r_cap:.3f} (CPU time {r_cap_cpu:.3f})   target <= {TARGETS['a']}")
    log(f"ratio ours/Captum, default fixed rule: {r_def:.3f} (CPU time {r_def_cpu:.3f})")
    rel_c = torch.stack([res.relative_error[k] for k in LAYERS]).max().item()
    rel_d = torch.stack([res_def.relative_error[k] for k in LAYERS]).max().item()
    log(f"(context) worst completeness error over the blocks and photos at these n_steps: "
        f"method='captum' {100 * rel_c:.1f}%, default fixed rule {100 * rel_d:.1f}%")
    results["a"] = dict(ours_captum=st["ours_captum"].as_dict(), ours_default=st["ours_default"].as_dict(),
                        captum_loop=st["captum_loop"].as_dict(), ratio=r_cap, ratio_cpu=r_cap_cpu,
                        ratio_default=r_def, ratio_default_cpu=r_def_cpu, agreement=worst,
                        agreement_per_layer=diffs, captum_per_layer=per_layer,
                        captum_per_layer_cpu=per_layer_cpu)


def part_b(model, x, target, cfg, results: dict) -> None:
    n = cfg["n_steps"]
    chunk = default_chunk(x)
    log(f"\n=== (b) one block ({ONE_LAYER}), batch {x.shape[0]}, n_steps {n}, units='channel'; "
        f"{n + 1} points per example, chunks of {chunk} points ===")

    def ours(method):
        return lambda: cd.layer_conductance(model, x, ONE_LAYER, target=target, n_steps=n, method=method,
                                            units="channel")

    bare = lambda: bare_loop(model, x, target, ONE_LAYER, n + 1, chunk)  # noqa: E731
    bare_cl = lambda: bare_loop(model, x, target, ONE_LAYER, n + 1, chunk, channels_last=True)  # noqa: E731
    captum = lambda: captum_layer(model, x, target, ONE_LAYER, n)  # noqa: E731
    ours("captum")()  # warm-ups
    ours(None)()
    bare()
    bare_cl()
    # Captum's single call is the slowest; the loop of (a) already timed it on this block, so
    # when (a) ran, one more call here gives a third sample
    captum_reps = 1 if "a" in results else cfg["captum_loop_repeats"]
    if "a" not in results:
        captum()
    st = interleaved({"ours_captum": (ours("captum"), cfg["repeats"]),
                      "ours_default": (ours(None), cfg["repeats"]),
                      "bare": (bare, cfg["repeats"]),
                      "bare_cl": (bare_cl, cfg["repeats"]),
                      "captum": (captum, captum_reps)})
    if "a" in results:  # add the loop's calls on this block
        st["captum"].wall += results["a"]["captum_per_layer"][ONE_LAYER]
        st["captum"].cpu += results["a"]["captum_per_layer_cpu"][ONE_LAYER]
    log(f"ours, method='captum'                : {st['ours_captum'].show()}")
    log(f"ours, default fixed rule             : {st['ours_default'].show()}")
    log(f"bare forward+backward, same points   : {st['bare'].show()}")
    log(f"bare, channels-last points           : {st['bare_cl'].show()}")
    log(f"Captum LayerConductance, defaults    : {st['captum'].show()}")
    # ours by default (channels-last points) against Captum by default; the 'captum' rule keeps
    # the inputs' layout to reproduce Captum's arithmetic, so it is compared with the plain bare loop
    r_def_cap, r_def_cap_cpu = ratio(st["ours_default"], st["captum"])
    r_cap, r_cap_cpu = ratio(st["ours_captum"], st["captum"])
    r_bare, r_bare_cpu = ratio(st["ours_captum"], st["bare"])
    r_def, r_def_cpu = ratio(st["ours_default"], st["bare_cl"])
    log(f"ratio ours(default rule)/Captum      : {r_def_cap:.3f} (CPU time {r_def_cap_cpu:.3f})   "
        f"target <= {TARGETS['b_captum']}")
    log(f"ratio ours('captum' rule)/Captum     : {r_cap:.3f} (CPU time {r_cap_cpu:.3f})")
    log(f"ratio ours('captum' rule)/bare       : {r_bare:.3f} (CPU time {r_bare_cpu:.3f})   "
        f"target <= {TARGETS['b_bare']}")
    log(f"ratio ours(default rule)/bare, c-last: {r_def:.3f} (CPU time {r_def_cpu:.3f})   "
        f"target <= {TARGETS['b_bare']}")
    results["b"] = dict(chunk=chunk, **{k: v.as_dict() for k, v in st.items()}, ratio_captum=r_def_cap,
                        ratio_captum_cpu=r_def_cap_cpu, ratio_captum_rule=r_cap, ratio_captum_rule_cpu=r_cap_cpu,
                        ratio_bare=r_bare, ratio_bare_cpu=r_bare_cpu,
                        ratio_bare_default=r_def, ratio_bare_default_cpu=r_def_cpu)


def pick_neurons(model, x, count: int) -> list[tuple[int, int, int]]:
    """``count`` single neurons of the block: channels spread evenly, positions from a fixed seed."""
    shape: dict[str, torch.Size] = {}

    def hook(module, args, output):
        shape["y"] = output.shape

    handle = model.get_submodule(ONE_LAYER).register_forward_hook(hook)
    with torch.no_grad():
        model(x[:1])
    handle.remove()
    C, H, W = shape["y"][1:]
    gen = torch.Generator().manual_seed(0)
    channels = torch.linspace(0, C - 1, count).round().long().tolist()
    rows = torch.randint(2, H - 2, (count,), generator=gen).tolist()
    cols = torch.randint(2, W - 2, (count,), generator=gen).tolist()
    return list(zip(channels, rows, cols))


def part_c(model, x_full, target_full, cfg, results: dict) -> None:
    from captum.attr import NeuronConductance

    B, n, U = cfg["neuron_batch"], cfg["neuron_steps"], cfg["neurons"]
    x, target = x_full[:B], target_full[:B]
    neurons = pick_neurons(model, x, U)
    log(f"\n=== (c) neuron conductance of {U} single neurons of {ONE_LAYER}, batch {B}, n_steps {n}: ours "
        f"(method='captum') in one call vs {U} Captum NeuronConductance calls (default 'riemann_trapezoid') ===")

    def ours(units=neurons, m=model, inp=x):
        return cd.neuron_conductance(m, inp, ONE_LAYER, units, units="neuron", target=target, n_steps=n,
                                     method="captum")

    nc = NeuronConductance(model, model.get_submodule(ONE_LAYER))
    captum = Stat()
    per_call: list[float] = []

    def captum_all():
        outs = []
        for neuron in neurons:
            t0 = time.perf_counter()
            outs.append(nc.attribute(x, neuron_selector=neuron, target=target, n_steps=n).detach())
            per_call.append(time.perf_counter() - t0)
        return outs

    ours(neurons[:1])  # warm-ups
    nc.attribute(x, neuron_selector=neurons[0], target=target, n_steps=n)
    mine = Stat()
    mine.add(*measure(ours))
    captum.add(*measure(captum_all))
    for _ in range(cfg["neuron_repeats"] - 1):
        mine.add(*measure(ours))
    res, outs = mine.out, captum.out
    log(f"ours, one call for {U} neurons        : {mine.show()}")
    log(f"Captum, {U} NeuronConductance calls    : {captum.show()}; per call median "
        f"{statistics.median(per_call):.2f} s (min {min(per_call):.2f}, max {max(per_call):.2f})")
    diffs = [max_rel_diff(res[u], outs[u]) for u in range(U)]
    r_c, r_c_cpu = ratio(mine, captum)
    log(f"ratio ours/Captum                    : {r_c:.3f} (CPU time {r_c_cpu:.3f})   target <= {TARGETS['c']}")
    log(f"agreement in float32, max|diff| / max|Captum| per neuron: max {max(diffs):.1e}, "
        f"median {statistics.median(diffs):.1e}")

    # float32 cannot settle agreement for single neurons: tiny rounding differences flip ReLU gates and
    # max-pool winners inside the neuron's receptive field. Recompute the worst neurons in float64.
    worst = sorted(range(U), key=lambda u: -diffs[u])[:cfg["f64_neurons"]]
    m64, x64 = copy.deepcopy(model).double(), x.double()
    sel = [neurons[u] for u in worst]
    ours64 = ours(sel, m64, x64)
    nc64 = NeuronConductance(m64, m64.get_submodule(ONE_LAYER))
    cap64 = [nc64.attribute(x64, neuron_selector=neurons[u], target=target, n_steps=n).detach() for u in worst]
    d64 = [max_rel_diff(ours64[i], cap64[i]) for i in range(len(worst))]
    ours_err = [max_rel_diff(res[u], cap64[i]) for i, u in enumerate(worst)]
    cap_err = [max_rel_diff(outs[u], cap64[i]) for i, u in enumerate(worst)]
    log(f"agreement in float64 on the {len(worst)} worst neurons {sel}: ours vs Captum "
        + ", ".join(f"{d:.1e}" for d in d64))
    log("  their float32 results against the float64 Captum result: ours "
        + ", ".join(f"{d:.1e}" for d in ours_err) + "; Captum " + ", ".join(f"{d:.1e}" for d in cap_err))
    results["c"] = dict(batch=B, n_steps=n, neurons=neurons, ours=mine.as_dict(), captum=captum.as_dict(),
                        captum_per_call=per_call, ratio=r_c, ratio_cpu=r_c_cpu, agreement32=max(diffs),
                        agreement32_median=statistics.median(diffs), agreement64=max(d64),
                        f32_error_ours=ours_err, f32_error_captum=cap_err)


def part_d(cfg_name: str, cfg: dict, results: dict) -> None:
    log(f"\n=== (d) peak memory: ru_maxrss of a child process (nothing subtracted), batch {cfg['batch']}, "
        f"n_steps {cfg['n_steps']} ===")
    log(f"(run first: Linux carries a parent's peak RSS into ru_maxrss across fork+exec; this parent's "
        f"peak so far is {peak_rss_mb() / 1024:.2f} GB)")
    out = {}
    for mode, label in (("mem-ours", "ours, 9 blocks, defaults (n_steps 50 given)"),
                        ("mem-captum", f"Captum LayerConductance, {ONE_LAYER}, defaults")):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--config", cfg_name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log(f"{label}: child failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
            out[mode] = None
            continue
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        out[mode] = info
        log(f"{label:45s}: peak {info['peak_mb'] / 1024:5.2f} GB (VmHWM {info['hwm_mb'] / 1024:.2f} GB); after "
            f"model construction: peak {info['baseline_peak_mb'] / 1024:.2f} GB, resident "
            f"{info['baseline_rss_mb'] / 1024:.2f} GB; call {info['call_s']:.1f} s")
    results["d"] = out


def child(mode: str, cfg: dict) -> None:
    warnings.filterwarnings("ignore")
    model, x, target = setup(cfg["batch"])
    gc.collect()
    base_peak, base_now = peak_rss_mb(), rss_mb("VmRSS")
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
                          hwm_mb=rss_mb("VmHWM"), call_s=call)))


# ---------------------------------------------------------------------------------------------
# summary


def summary(results: dict) -> None:
    rows = []

    def row(name, value, target, fmt, cpu=None, le=True, unit=""):
        if value is None:
            rows.append((name, "n/a", "", f"{target:g}", "n/a"))
            return
        ok = value <= target if le else value < target
        rows.append((name, fmt.format(value) + unit, "" if cpu is None else fmt.format(cpu),
                     ("<= " if le else "< ") + f"{target:g}{unit}", "PASS" if ok else "MISS"))

    def info(name, value, cpu=""):
        rows.append((name, value, cpu, "(info)", ""))

    if "a" in results:
        a = results["a"]
        row("(a) 9 blocks: ours (captum rule) / Captum loop", a["ratio"], TARGETS["a"], "{:.3f}", a["ratio_cpu"])
        info("(a) 9 blocks: ours (default rule) / Captum loop", f"{a['ratio_default']:.3f}",
             f"{a['ratio_default_cpu']:.3f}")
        row("(a) agreement, max|diff|/max|Captum|", a["agreement"], TARGETS["agree"], "{:.1e}")
    if "b" in results:
        b = results["b"]
        row(f"(b) {ONE_LAYER}: ours (default) / Captum", b["ratio_captum"], TARGETS["b_captum"], "{:.3f}",
            b["ratio_captum_cpu"])
        info(f"(b) {ONE_LAYER}: ours ('captum' rule) / Captum", f"{b['ratio_captum_rule']:.3f}",
             f"{b['ratio_captum_rule_cpu']:.3f}")
        row(f"(b) {ONE_LAYER}: ours ('captum' rule) / bare", b["ratio_bare"], TARGETS["b_bare"], "{:.3f}",
            b["ratio_bare_cpu"])
        row(f"(b) {ONE_LAYER}: ours (default) / bare c-last", b["ratio_bare_default"], TARGETS["b_bare"], "{:.3f}",
            b["ratio_bare_default_cpu"])
    if "c" in results:
        c = results["c"]
        u = len(c["neurons"])
        row(f"(c) {u} neurons: ours / {u} Captum calls", c["ratio"], TARGETS["c"], "{:.3f}", c["ratio_cpu"])
        row("(c) agreement float64, max|diff|/max|Captum|", c["agreement64"], TARGETS["agree"], "{:.1e}")
        info("(c) agreement float32 (both ~1e-2 off float64)", f"{c['agreement32']:.1e}")
    if "d" in results:
        d = results["d"]
        ours = d.get("mem-ours")
        row("(d) peak RSS: ours, 9 blocks, defaults", None if ours is None else ours["peak_mb"] / 1024,
            TARGETS["d_ours_gb"], "{:.2f}", le=False, unit=" GB")
        cap = d.get("mem-captum")
        info("(d) peak RSS: Captum, 1 block, defaults", "n/a" if cap is None else f"{cap['peak_mb'] / 1024:.2f} GB")
    widths = [max(len(r[i]) for r in rows + [("measure", "value", "CPU-time", "target", "result")])
              for i in range(5)]
    log("\n=== summary (value: ratio of median wall times; CPU-time: same ratio of process CPU times) ===")
    for r in [("measure", "value", "CPU-time", "target", "result")] + rows:
        log(f"{r[0]:{widths[0]}s}  {r[1]:>{widths[1]}s}  {r[2]:>{widths[2]}s}  {r[3]:>{widths[3]}s}  {r[4]}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Speed and peak memory of conductance against Captum 0.9.")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 2, n_steps 16, fewer repeats")
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
    warnings.filterwarnings("ignore")  # accuracy warnings at fixed n_steps are not what is measured here
    import captum
    import torchvision

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    log(f"conductance {cd.__version__}, captum {captum.__version__}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, python {platform.python_version()}, {platform.machine()}")
    log(f"conductance imported from {os.path.dirname(cd.__file__)}")
    log(f"config {cfg_name}: {cfg}")
    log(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')}, load average at start {os.getloadavg()[0]:.2f}")
    t_start = time.perf_counter()
    results: dict = {"config": cfg_name, "load_start": os.getloadavg()}
    if "d" in parts:
        part_d(cfg_name, cfg, results)
    if any(p in parts for p in "abc"):
        model, x, target = setup(cfg["batch"])
        log(f"\nphotos {PHOTOS[:cfg['batch']]}, top classes {target.tolist()}, baseline zeros; "
            f"resident after setup {rss_mb() / 1024:.2f} GB")
        if "a" in parts:
            part_a(model, x, target, cfg, results)
        if "b" in parts:
            part_b(model, x, target, cfg, results)
        if "c" in parts:
            part_c(model, x, target, cfg, results)
    summary(results)
    results["load_end"] = os.getloadavg()
    log(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s; load average at end {os.getloadavg()[0]:.2f} "
        f"(2 cores: well above 2 means other jobs shared the CPU and wall times are inflated)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
