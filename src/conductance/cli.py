"""Command-line interface: ``conductance demo`` runs the method on a real network and photo."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Optional, Sequence


def _demo(args: argparse.Namespace) -> int:
    import torch

    from . import assets
    from .attribute import layer_conductance

    torch.set_num_threads(args.threads) if args.threads else None
    model = assets.efficientnet_lite0(args.weights)
    x = assets.photo_batch(args.photo)
    classes = assets.imagenet_classes()
    with torch.no_grad():
        logits = model(x)
    layers = args.layers or assets.EFFICIENTNET_LAYERS
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = layer_conductance(model, x, layers, units="channel", tolerance=args.tolerance,
                                   n_steps=args.n_steps, method=args.method, max_steps=args.max_steps)
    seconds = time.perf_counter() - start
    print(f"EfficientNet-Lite0 (real ImageNet weights), black baseline, top-logit target; "
          f"{result.method} rule" + (f", tolerance {result.tolerance:g}" if result.tolerance else
                                     f", n_steps {result.n_steps}") + f"; {seconds:.1f} s")
    for i, name in enumerate(args.photo):
        label = int(result.target[i])
        print(f"\nphoto {name!r}: top label {label} '{classes[label]}' "
              f"(logit {logits[i, label]:.2f}); F(x) - F(x') = {result.output_diff[i]:.3f}; "
              f"{int(result.n_points[i])} path points")
        for layer in layers:
            values = result[layer][i]
            top = torch.argsort(values, descending=True)[:args.top]
            shown = ", ".join(f"{int(c)} ({values[c]:+.3f})" for c in top)
            print(f"  {layer:<11} {values.numel():>4} filters, completeness error "
                  f"{100 * result.relative_error[layer][i]:6.3f}%   top filters: {shown}")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0


def _layers(args: argparse.Namespace) -> int:
    from . import assets

    model = assets.efficientnet_lite0(args.weights)
    for name, module in model.named_modules():
        if name and name.count(".") <= args.depth:
            print(f"{name:<28} {type(module).__name__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conductance",
        description="How important is each hidden unit of a network? Conductance (Dhamdhere, Sundararajan, "
                    "Yan, 2018) with a known completeness error.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="filter conductance of real EfficientNet-Lite0 on real photos",
                          description="Conductance of the filters of several blocks of EfficientNet-Lite0 "
                                      "(real ImageNet weights) on bundled real photos, with the completeness "
                                      "error of each block.")
    demo.add_argument("--photo", nargs="+", default=["chelsea", "coffee"],
                      help="bundled photo names (chelsea coffee rocket astronaut motorcycle china flower "
                           "grace_hopper) or image file paths")
    demo.add_argument("--layers", nargs="+", default=None, help="dotted layer names (default: six block outputs)")
    demo.add_argument("--top", type=int, default=5, help="filters to show per layer")
    demo.add_argument("--tolerance", type=float, default=None,
                      help="relative completeness error to reach (default 0.01 when --n-steps is not given)")
    demo.add_argument("--n-steps", type=int, default=None, help="use a fixed rule with this many intervals")
    demo.add_argument("--method", default=None, help="gausslegendre, uniform, uniform_left, captum or adaptive")
    demo.add_argument("--max-steps", type=int, default=256, help="point budget per photo (adaptive)")
    demo.add_argument("--weights", default=None, help="a local EfficientNet-Lite0 weights file")
    demo.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    demo.set_defaults(func=_demo)
    layers = sub.add_parser("layers", help="list the layer names of the demo model")
    layers.add_argument("--depth", type=int, default=1, help="show names with at most this many dots")
    layers.add_argument("--weights", default=None)
    layers.set_defaults(func=_layers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, ModuleNotFoundError, FileNotFoundError) as exc:
        print(f"conductance: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
