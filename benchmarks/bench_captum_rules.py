"""Completeness error of Captum's rules (and ours) on real EfficientNet-Lite0, per n_steps.

For each rule and n_steps: the median and largest relative completeness error
|sum of conductances - (F(x) - F(x'))| / |F(x) - F(x')| over the photos and three cut blocks.
Prints a Markdown table.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_captum_rules.py
"""

from __future__ import annotations

import warnings

import torch

import conductance as cd
from conductance import assets

METHODS = ["captum", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre"]
LAYERS = ["_blocks.4", "_blocks.10", "_blocks.15"]


def main(steps=(16, 64), photos=("chelsea", "coffee")) -> None:
    torch.set_num_threads(1)
    model = assets.efficientnet_lite0()
    x = assets.photo_batch(list(photos))
    print(f"photos: {', '.join(photos)}; layers: {', '.join(LAYERS)}; conductance per channel\n")
    print("| method | " + " | ".join(f"n_steps={n}: median / max" for n in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for m in METHODS:
        cells = []
        for n in steps:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = cd.layer_conductance(model, x, LAYERS, n_steps=n, method=m, units="channel")
            errs = torch.cat([r.relative_error[name] for name in LAYERS])
            cells.append(f"{100 * errs.median():.2f}% / {100 * errs.max():.2f}%")
        print(f"| `{m}` | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
