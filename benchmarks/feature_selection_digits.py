#!/usr/bin/env python
"""Feature selection on a small CNN trained on scikit-learn's handwritten digits.

Data: ``sklearn.datasets.load_digits`` (1797 real 8x8 digits, 10 classes), pixels scaled to [0, 1].
Per model seed, 1000 examples (a seeded permutation) train the CNN and the other 797 are the
held-out examples of the feature-selection task, split per class 60 / 40 into selection and
evaluation (about 48 / 32 per class; the paper used 30 / 20 on ImageNet validation images).

Model: conv(1->16, 3x3) - relu - conv(16->32, 3x3) - relu [layer "relu2", 32 channels] - global
average pool - linear(32->64) - relu [layer "relu3", 64 neurons] - linear(64->10). Adam, 30 epochs.

Measures: every measure of ``cd.layer_importance`` on each example's own label logit, with the
library defaults (zero baseline; path measures adaptive to 1% completeness error), k in
{1, 2, 5, 10, 20}, random units matched in number (10 draws). Reported: the full table for model
seed 0, then per (layer, measure, k) the mean over model seeds of the number of pooled units, the
accuracy, the matched random accuracy and their difference, and in how many seeds the measure was
ahead of, tied with or behind random units.

Usage::

    python benchmarks/feature_selection_digits.py               # 5 model seeds, both layers
    python benchmarks/feature_selection_digits.py --seeds 1 --layers relu2
    python benchmarks/feature_selection_digits.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch
from torch import nn

import conductance as cd

MEASURES = ("conductance", "internal_influence", "layer_integrated_gradients", "grad_x_activation",
            "gradient", "activation")
KS = (1, 2, 5, 10, 20)


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(32, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1)
        return self.fc2(self.relu3(self.fc1(x)))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(data.target)


def train(X: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = 30) -> nn.Module:
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=gen)
        for start in range(0, len(X), 32):
            batch = order[start:start + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[batch]), y[batch]).backward()
            opt.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="model seeds (each trains a CNN)")
    parser.add_argument("--layers", default="relu2,relu3")
    parser.add_argument("--random-seeds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write every result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = args.layers.split(",")
    X, y = digits()
    results: dict[str, list] = {layer: [] for layer in layers}
    print(f"conductance {cd.__version__}, torch {torch.__version__}, {args.threads} thread(s)")
    for seed in range(args.seeds):
        perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(1000 + seed))
        train_idx, held = perm[:1000], perm[1000:]
        t0 = time.perf_counter()
        model = train(X[train_idx], y[train_idx], seed)
        with torch.no_grad():
            acc = (model(X[held]).argmax(1) == y[held]).float().mean().item()
        print(f"model seed {seed}: trained in {time.perf_counter() - t0:.1f} s, held-out accuracy {acc:.3f}")
        for layer in layers:
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", cd.ConductanceWarning)
                res = cd.feature_selection(model, X[held], y[held], layer, measures=MEASURES, ks=KS,
                                           random_seeds=args.random_seeds, seed=seed)
            note = f", {len(caught)} accuracy warning(s)" if caught else ""
            print(f"  {layer}: feature selection in {time.perf_counter() - t0:.1f} s{note}")
            results[layer].append(res)
            if seed == 0:
                print("\n" + res.format_table() + "\n")

    for layer in layers:
        runs = results[layer]
        print(f"\n{layer}: mean over {len(runs)} model seed(s) (accuracy on the evaluation split; random = "
              f"same number of random units, {args.random_seeds} draws)")
        print("| measure | k | units (mean) | accuracy | random units | gain | seeds ahead / tied / behind |")
        print("|---|---|---|---|---|---|---|")
        for m in MEASURES:
            for k in KS:
                rows = [r.row(m, k) for r in runs]
                acc = np.mean([r["accuracy"] for r in rows])
                rnd = np.mean([r["random_accuracy"] for r in rows])
                diff = [r["accuracy"] - r["random_accuracy"] for r in rows]
                ahead, behind = sum(d > 1e-9 for d in diff), sum(d < -1e-9 for d in diff)
                print(f"| {m} | {k} | {np.mean([r['n_units'] for r in rows]):.1f} | {acc:.3f} | {rnd:.3f} | "
                      f"{acc - rnd:+.3f} | {ahead} / {len(rows) - ahead - behind} / {behind} |")
        print(f"all {runs[0].n_layer_units} units: {np.mean([r.all_units_accuracy for r in runs]):.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({layer: [r.to_dict() for r in runs] for layer, runs in results.items()}, fh, indent=1)


if __name__ == "__main__":
    main()
