"""Time to compute each pruning criterion on the same calibration set, and the choice of statistic.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_pruning.py [--n-cal 256] [--statistics] [--no-timing]

Part 1 (always): the Fashion-MNIST Inception-style network of the quick reproduction (cached or trained,
about 30 s): for each criterion, the wall time of scoring every channel of every convolution on the
same ``--n-cal`` training images (fit + one call per pruning group, as ``MetaPruner.step`` makes them).

Part 2 (``--statistics``): accuracy after pruning 50% of the hidden units of a 64-128-128-10 network
trained on scikit-learn's real digits (six training seeds), for each statistic of conductance, with
and without the removed units' means folded into the next layer (docs/pruning.md).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import numpy as np
import torch


def _time_criteria(n_cal: int) -> None:
    import torch_pruning as tp

    from conductance.experiments import fashion_inception as fi
    from conductance.experiments.pruning import make_importance

    model = fi.load_or_train(fi.QUICK_CONFIG).model
    x, y = fi.fashion_tensors("train", n_cal)
    calibration = [(x[s:s + 64], y[s:s + 64]) for s in range(0, n_cal, 64)]
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    groups = list(dg.get_all_groups(ignored_layers=[model.fc], root_module_types=[torch.nn.Conv2d]))
    del dg
    rows = [("conductance, n_steps=16", "conductance", {"n_steps": 16}),
            ("conductance, n_steps=32", "conductance", {"n_steps": 32}),
            ("conductance, adaptive 1% (default)", "conductance", {}),
            ("grad_x_activation", "grad_x_activation", {}), ("activation", "activation", {}),
            ("taylor (calibrated)", "taylor", {}), ("l1", "l1", {}), ("random", "random", {})]
    print(f"Fashion-MNIST Inception (quick weights), {n_cal} calibration images, {len(groups)} groups, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"{'criterion':38s} {'seconds':>8s} {'images/s':>9s}")
    for label, criterion, options in rows:
        imp = make_importance(criterion, calibration, **options)
        m = copy.deepcopy(model)
        dgm = tp.DependencyGraph().build_dependency(m, example_inputs=x[:1])     # tracing is not timed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            for g in dgm.get_all_groups(ignored_layers=[m.fc], root_module_types=[torch.nn.Conv2d]):
                imp(g)                                   # the first call computes the scores of every layer
            seconds = time.perf_counter() - start
        print(f"{label:38s} {seconds:8.2f} {n_cal / seconds:9.0f}")


def _statistics(seeds: int) -> None:
    import torch_pruning as tp
    from sklearn.datasets import load_digits
    from torch import nn

    from conductance.pruning import CalibratedTaylorImportance, ConductanceImportance, prune

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16
    Y = torch.tensor(d.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1200], perm[1200:]
    cal = [(X[tr[i:i + 100]], Y[tr[i:i + 100]]) for i in range(0, 300, 100)]

    def train(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        opt = torch.optim.Adam(m.parameters(), 1e-3)
        for epoch in range(30):
            order = torch.randperm(1200, generator=torch.Generator().manual_seed(seed * 100 + epoch))
            for b in range(0, 1200, 32):
                i = tr[order[b:b + 32]]
                loss = nn.functional.cross_entropy(m(X[i]), Y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return m.eval()

    def acc(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(X[te]).argmax(1) == Y[te]).float().mean())

    criteria = {f"conductance {s}": (lambda s=s: ConductanceImportance(cal, statistic=s, n_steps=32))
                for s in ("class_max", "class_abs", "mean", "rms")}
    criteria["grad_x_activation class_max"] = lambda: ConductanceImportance(cal, "grad_x_activation")
    criteria["grad_x_activation class_abs"] = lambda: ConductanceImportance(cal, "grad_x_activation",
                                                                            statistic="class_abs")
    criteria["activation rms"] = lambda: ConductanceImportance(cal, "activation", statistic="rms")
    criteria["taylor (calibrated)"] = lambda: CalibratedTaylorImportance(cal)
    criteria["l1"] = lambda: tp.importance.MagnitudeImportance(p=1)
    table: dict = {}
    for seed in range(seeds):
        model = train(seed)
        for fill in (None, "mean"):
            for name, make in criteria.items():
                m = copy.deepcopy(model)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    prune(m, X[:1], make(), pruning_ratio=0.5, ignored_layers=[m[4]], compensate=fill, fill_data=cal)
                table.setdefault((name, fill), []).append(acc(m))
            rand = []
            for s in range(5):
                m = copy.deepcopy(model)
                torch.manual_seed(s)
                prune(m, X[:1], tp.importance.RandomImportance(), pruning_ratio=0.5, ignored_layers=[m[4]],
                      compensate=fill, fill_data=cal)
                rand.append(acc(m))
            table.setdefault(("random (mean of 5)", fill), []).append(float(np.mean(rand)))
            table.setdefault(("random (best of 5)", fill), []).append(max(rand))
    print(f"\ndigits MLP, 50% of both hidden layers removed, {seeds} training seeds: mean (min-max) accuracy")
    for fill in (None, "mean"):
        print(f"  fill={fill}")
        for (name, f), values in table.items():
            if f == fill:
                print(f"    {name:32s} {np.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-cal", type=int, default=256)
    parser.add_argument("--statistics", action="store_true", help="also compare the statistics on digits")
    parser.add_argument("--no-timing", action="store_true", help="skip part 1")
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_timing:
        _time_criteria(args.n_cal)
    if args.statistics:
        _statistics(args.seeds)


if __name__ == "__main__":
    main()
