#!/usr/bin/env python
"""Throughput of ``conductance.aggregate`` on real Fashion-MNIST with a small CNN trained here.

Data: the Fashion-MNIST test set (10,000 real 28x28 photos of clothing, 10 classes) from the
Debian package ``dataset-fashion-mnist``. Model: a small CNN (two 3x3 convolutions with ReLU and
max-pooling, a 64-unit hidden layer, 10 logits) trained by this script on the 60,000 training
photos (Adam, one epoch by default) and cached under ``~/.cache/conductance`` (or
``$CONDUCTANCE_CACHE``); it is retrained when the cache is missing.

Measured (time.perf_counter, best of ``--repeats`` alternating runs, examples per second):

(a) conductance of all four layers (``relu1``, ``relu2``, ``pool2``, ``relu3``, channel units)
    in ONE aggregate pass, against four passes of one layer each (the Captum way);
(b) the same pass with a checkpoint written after every batch: the time spent writing measured
    inside the runs against the time computing (target: under 5%), and the wall-clock difference
    of the best runs (noisy on a shared machine);
(c) the class-level result: for each class, its top hidden units and the completeness error.

Usage::

    python benchmarks/bench_aggregate.py            # 1,000 test photos, batch 100, best of 3
    python benchmarks/bench_aggregate.py --quick    # 200 photos, one run (and a 10,000-photo training run
                                                    # if no trained model is cached yet)
    python benchmarks/bench_aggregate.py --json out.json --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import conductance as cd
from conductance.aggregate import AggregateResult, _write_results
from conductance.datasets import FASHION_MNIST_CLASSES, INSTALL_HINT, fashion_mnist_available, load_fashion_mnist

LAYERS = ["relu1", "relu2", "pool2", "relu3"]
MEAN, STD = 0.2860, 0.3530            # Fashion-MNIST training-set pixel statistics (in [0, 1])


class FashionCNN(nn.Module):
    """28x28x1 -> conv 16 -> relu -> pool -> conv 32 -> relu -> pool -> fc 64 -> relu -> fc 10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_fashion_mnist(split)
    x = (torch.from_numpy(images).float().div_(255).sub_(MEAN).div_(STD)).unsqueeze(1)
    return x, torch.from_numpy(labels)


def cache_dir() -> str:
    return os.environ.get("CONDUCTANCE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "conductance"))


def trained_model(n_train: int, epochs: int, seed: int = 0) -> tuple[nn.Module, dict]:
    """The CNN trained on the first ``n_train`` training photos, from the cache or trained now."""
    name = f"fashion_cnn_n{n_train}_e{epochs}_s{seed}"
    weights = os.path.join(cache_dir(), name + ".pt")
    info_file = os.path.join(cache_dir(), name + ".json")
    model = FashionCNN()
    if os.path.exists(weights) and os.path.exists(info_file):
        try:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            with open(info_file) as f:
                return model.eval(), dict(json.load(f), cached=weights)
        except Exception as exc:           # a damaged cache: train again
            print(f"cached model {weights} unusable ({exc}); training again", file=sys.stderr)
    torch.manual_seed(seed)
    model = FashionCNN()
    x, y = tensors("train")
    x, y = x[:n_train], y[:n_train]
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    start = time.perf_counter()
    model.train()
    for _epoch in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    xt, yt = tensors("test")
    with torch.no_grad():
        accuracy = float((model(xt).argmax(1) == yt).float().mean())
    info = dict(train_examples=n_train, epochs=epochs, seed=seed, train_seconds=round(seconds, 1),
                test_accuracy=accuracy)
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = weights + ".tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, weights)
    with open(info_file, "w") as f:
        json.dump(info, f)
    return model, dict(info, cached=weights, trained_now=True)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="200 test photos, one run; train on 10,000 if nothing is cached")
    parser.add_argument("--examples", type=int, default=None, help="test photos to aggregate over")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--n-steps", type=int, default=16, help="fixed rule for the throughput runs")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each configuration (best kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    if not fashion_mnist_available():
        print("Fashion-MNIST is not installed. This benchmark uses the real data set from the Debian package:\n"
              f"  {INSTALL_HINT}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.examples or (200 if args.quick else 1000)
    repeats = args.repeats or (1 if args.quick else 3)
    model, info = trained_model(60000 if not args.quick or _cached(60000, 1) else 10000, 1)
    print(f"model: FashionCNN trained on {info['train_examples']} photos for {info['epochs']} epoch(s), test accuracy "
          f"{100 * info['test_accuracy']:.1f}%" + (f" (trained now in {info['train_seconds']} s)"
                                                   if info.get("trained_now") else f" (cached {info['cached']})"))
    xt, yt = tensors("test")
    loader = DataLoader(TensorDataset(xt[:n], yt[:n]), batch_size=args.batch_size)
    n_batches = len(loader)
    common = dict(n_steps=args.n_steps, progress=False)
    print(f"data: first {n} Fashion-MNIST test photos, {n_batches} batches of {args.batch_size}; "
          f"rule gausslegendre n_steps={args.n_steps}; torch threads {torch.get_num_threads()}\n")

    tmp = tempfile.mkdtemp(prefix="bench_aggregate_")

    def all_layers(checkpoint_every=None):
        ck = None
        if checkpoint_every:
            ck = os.path.join(tmp, f"ck{checkpoint_every}.npz")
            if os.path.exists(ck):
                os.unlink(ck)
        return cd.aggregate(model, loader, LAYERS, checkpoint=ck, checkpoint_every=checkpoint_every or 10, **common)

    def one_at_a_time():
        return [cd.aggregate(model, loader, [layer], **common) for layer in LAYERS]

    module = sys.modules["conductance.aggregate.api"]   # where aggregate() looks _write_results up
    write_seconds: list[float] = []

    def timed_write(*a, **k):
        start = time.perf_counter()
        try:
            return _write_results(*a, **k)
        finally:
            write_seconds.append(time.perf_counter() - start)

    module._write_results = timed_write          # count the time spent writing checkpoints inside the runs
    configs = {"all 4 layers, one pass": lambda: all_layers(),
               "one layer per pass (4 passes)": one_at_a_time,
               "all layers, checkpoint every batch": lambda: all_layers(1)}
    times: dict[str, list[float]] = {k: [] for k in configs}
    outputs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.ConductanceWarning)
        all_layers()                                          # warm-up
        for _ in range(repeats):                              # alternate, so load changes hit all alike
            for name, fn in configs.items():
                seconds, outputs[name] = timed(fn)
                times[name].append(seconds)
    module._write_results = _write_results
    best = {k: min(v) for k, v in times.items()}
    base = best["all 4 layers, one pass"]
    rows = []
    print(f"(a, b) throughput, best of {repeats}")
    print(f"{'configuration':<42} {'seconds':>8} {'examples/s':>11} {'vs one pass':>12}")
    for name, seconds in best.items():
        rows.append(dict(configuration=name, seconds=seconds, examples_per_second=n / seconds,
                         relative=seconds / base, all_runs=times[name]))
        print(f"{name:<42} {seconds:8.2f} {n / seconds:11.1f} {seconds / base:11.3f}x")
    single = outputs["all 4 layers, one pass"]
    per_layer = outputs["one layer per pass (4 passes)"]
    same = all(np.allclose(single.mean(layer, g), r.mean(layer, g), rtol=1e-9, atol=1e-12)
               for r, layer in zip(per_layer, LAYERS) for g in single.groups)
    print(f"one pass and per-layer passes agree: {same}")
    resumed = AggregateResult.load(os.path.join(tmp, "ck1.npz"))
    print(f"checkpointed result equals the plain one: {resumed.equals(single)}")

    # checkpoint overhead, measured inside the runs: time in the writes against the rest of the run
    ck_runs = times["all layers, checkpoint every batch"]
    writes_per_run = len(write_seconds) // repeats
    in_run = sum(write_seconds) / max(sum(ck_runs) - sum(write_seconds), 1e-9)
    write_ms = 1000 * statistics.median(write_seconds)
    size_kb = os.path.getsize(os.path.join(tmp, "ck1.npz")) / 1024
    per_batch_ms = 1000 * base / n_batches
    wall = best["all layers, checkpoint every batch"] / base - 1
    print(f"\ncheckpoint every batch: {writes_per_run} writes per run of {n_batches} batches, median "
          f"{write_ms:.2f} ms each ({size_kb:.0f} kB); one batch of conductance takes {per_batch_ms:.0f} ms")
    print(f"overhead measured inside the runs (time writing / time computing): {100 * in_run:.3f}% "
          f"(every 10 batches: about {10 * in_run:.4f}%); target < 5%")
    print(f"wall-clock difference of the best runs: {100 * wall:+.1f}% (noise of a shared machine: runs of the "
          f"same configuration differ by up to {100 * max(max(v) / min(v) - 1 for v in times.values()):.0f}%)")

    # (c) the class-level result
    print(f"\n(c) {single.summary()}")
    print("top 3 units of relu3 (the 64-unit hidden layer) per class, mean conductance:")
    for g in single.groups:
        top = single.top(3, "relu3", group=g)
        print(f"  {g} {FASHION_MNIST_CLASSES[g]:<12} n={single.count(g):<4} "
              + ", ".join(f"{t.unit:>2} ({t.mean:+.3f}, {100 * t.positive:.0f}% +)" for t in top)
              + f"   mean F(x)-F(x') {single.mean_output_diff(g):+.2f}")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=dict(platform=platform.platform(), python=platform.python_version(),
                                        torch=torch.__version__, threads=torch.get_num_threads(),
                                        cpus=os.cpu_count()),
                           model=info, examples=n, batch_size=args.batch_size, n_steps=args.n_steps,
                           layers=LAYERS, repeats=repeats, rows=rows, checkpoint_write_ms=write_ms,
                           checkpoint_kb=size_kb, batch_ms=per_batch_ms, checkpoint_overhead_in_run=in_run,
                           checkpoint_overhead_wall=wall,
                           completeness=single.completeness(), agree=bool(same)), f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


def _cached(n_train: int, epochs: int, seed: int = 0) -> bool:
    name = os.path.join(cache_dir(), f"fashion_cnn_n{n_train}_e{epochs}_s{seed}")
    return os.path.exists(name + ".pt") and os.path.exists(name + ".json")


if __name__ == "__main__":
    sys.exit(main())
