#!/usr/bin/env python
"""The paper's ablation experiment on a small CNN trained on scikit-learn's digits.

Data: ``sklearn.datasets.load_digits`` (1797 real 8x8 handwritten digits), pixels in [0, 1].
Per model seed: a seeded permutation, 1200 examples train the CNN, 200 of the rest are ablated.
Model: conv(1->12, 3x3) - relu - conv(12->24, 3x3) - relu ["act2": 24 filters] - global average
pool - linear(24->10). Adam, 60 full-batch epochs.

For each example, the 24 filters of "act2" are ranked by each measure of
``cd.layer_importance`` (each example's predicted-class logit, zero baseline, n_steps=32) and
ablated (set to zero) in that order until the predicted label changes; a random order per
example (3 seeds, pooled) is the floor. Reported per measure, as the paper reports it: mean
flips, how many examples need more than 10, the maximum, and how many flip when their top 10
filters are removed at once; plus the deletion / insertion areas of the target logit.

Usage::

    python benchmarks/ablation_digits.py            # model seeds 0, 1, 2
    python benchmarks/ablation_digits.py --seeds 1
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

import conductance as cd

MEASURES = ("conductance", "internal_influence", "layer_integrated_gradients", "grad_x_activation",
            "activation", "gradient")
LAYER = "act2"


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 12, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(12, 24, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(24 * 16, 48)
        self.act3 = nn.ReLU()
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        h = self.pool(self.act2(self.conv2(self.act1(self.conv1(x)))))
        return self.head(self.act3(self.fc(h.flatten(1))))


def train(seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:1200], perm[1200:1400]
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[tr]), y[tr]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(X[te]).argmax(1) == y[te]).float().mean().item()
    return model, X[te], acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mode", default="zero", choices=["zero", "baseline"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        model, x, acc = train(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fixed-rule accuracy warnings: rankings only
            results = cd.layer_importance(model, x, LAYER, list(MEASURES), units="channel", n_steps=32)
        rankings = {m: results[m] for m in MEASURES}
        summary = cd.compare_rankings(model, x, LAYER, rankings, units="channel", random_seeds=3, mode=args.mode)
        print(f"\nmodel seed {seed}: held-out accuracy {acc:.3f}, {x.shape[0]} examples")
        print(summary.format_table())
        print("areas under the target-logit curves (deletion: lower is better; insertion: higher is better)")
        for m in MEASURES:
            d = cd.deletion_curve(model, x, LAYER, rankings[m], units="channel", random_seeds=3, mode=args.mode)
            i = cd.insertion_curve(model, x, LAYER, rankings[m], units="channel", random_seeds=3, mode=args.mode)
            print(f"  {m:<27} deletion {d.auc_logit:7.3f} (random {d.random_auc_logit:6.3f})   "
                  f"insertion {i.auc_logit:7.3f} (random {i.random_auc_logit:6.3f})")
        print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
