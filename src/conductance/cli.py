"""Command-line interface: ``conductance demo`` runs the method on a real network and photo;
``conductance aggregate`` computes per-class statistics over a data set; ``conductance show`` prints them."""

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
        # pixels are normalised as (p - 0.5) / 0.5: a black photo is -1, zero is mid-grey
        baseline = -1.0 if args.baseline == "black" else 0.0
        result = layer_conductance(model, x, layers, units="channel", tolerance=args.tolerance,
                                   n_steps=args.n_steps, method=args.method, max_steps=args.max_steps,
                                   baselines=baseline)
    seconds = time.perf_counter() - start
    print(f"EfficientNet-Lite0 (real ImageNet weights), {args.baseline} baseline, top-logit target; "
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


def load_entry_point(spec: str, what: str):
    """Call ``module:function`` (or ``path/to/file.py:function``) with no arguments and return its value."""
    import importlib
    import importlib.util
    import os

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--{what} must be module:function (e.g. mypkg.models:build), got {spec!r}")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise FileNotFoundError(f"--{what}: no file {module_name}")
        mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(module_name))[0],
                                                          module_name)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"--{what}: module {module_name!r} has no attribute {attr!r}") from None
    return fn() if callable(fn) else fn


def _aggregate(args: argparse.Namespace) -> int:
    import os

    import torch

    from .aggregate import _write_results, aggregate, init_distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = 0
    if distributed:
        rank, _ = init_distributed("nccl" if args.device != "cpu" and torch.cuda.is_available() else "gloo")
    try:
        model = load_entry_point(args.model, "model")
        data = load_entry_point(args.data, "data")
        if args.device == "auto":
            device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
                      else torch.device("cpu"))
        else:
            device = torch.device(args.device)
        model = model.to(device).eval()
        target = args.target
        if target not in ("label", "predicted"):
            if not target.isdigit():
                raise ValueError(f"--target must be label, predicted or a class index, got {target!r}")
            target = int(target)
        kwargs = {k: v for k, v in dict(n_steps=args.n_steps, tolerance=args.tolerance, method=args.method,
                                        max_steps=args.max_steps, internal_batch_size=args.internal_batch_size
                                        ).items() if v is not None}
        start = time.perf_counter()
        measure = args.measure[0] if len(args.measure) == 1 else args.measure
        result = aggregate(model, data, args.layers, measure=measure, by=None if args.by == "none" else args.by,
                           units=args.units, target=target, near_zero=args.near_zero, checkpoint=args.checkpoint,
                           checkpoint_every=args.checkpoint_every, progress=False if args.no_progress else None,
                           distributed=True if distributed else None, limit_batches=args.limit_batches, **kwargs)
        seconds = time.perf_counter() - start
        if rank == 0:
            results = list(result.values()) if isinstance(result, dict) else [result]
            _write_results(args.out, results, {})
            n = results[0].n_examples
            print(f"{n} examples in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} examples/s); wrote {args.out}")
            for r in results:
                print(r.summary())
    finally:
        if distributed:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


def _show(args: argparse.Namespace) -> int:
    from .aggregate import _read_results

    results, _ = _read_results(args.file)
    for measure, result in results.items():
        layers = args.layers or result.layers
        print(result.summary())
        groups = result.groups if args.group is None else [int(args.group) if args.group != "all" else None]
        for g in groups:
            print(f"{result.group_name(g)}: {result.count(g)} examples, mean F(x) - F(x') "
                  f"{result.mean_output_diff(g):+.4g}")
            for layer in layers:
                rows = result.top(args.top, g, layer, absolute=args.absolute)
                print(f"  {layer}")
                for r in rows:
                    print(f"    unit {r.unit:>5}  mean {r.mean:+.4g}  std {r.std:.3g}  "
                          f"positive {100 * r.positive:5.1f}%  negative {100 * r.negative:5.1f}%")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    import importlib
    import time

    import torch

    from .experiments import EXPERIMENTS
    from .experiments.report import Report

    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    settings = {"experiments": ", ".join(names), "quick": args.quick, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "seed": args.seed}
    if args.weights:
        settings["googlenet weights"] = args.weights
    report = Report("conductance: reproducing \"How Important Is a Neuron?\"", settings)
    failures = []
    for name in names:
        module = importlib.import_module(f".experiments.{name}", __package__)
        start = time.perf_counter()
        print(f"[reproduce] {name} ...", flush=True)
        try:
            module.run(report, quick=args.quick, weights=args.weights, seed=args.seed)
        except (ImportError, FileNotFoundError) as exc:
            # A missing optional dependency or data set stops this experiment only; the report says so.
            failures.append(name)
            report.section(f"{name}: not run", key=f"{name}-not-run").text(f"This experiment did not run: {exc}")
        report.settings[f"{name} seconds"] = round(time.perf_counter() - start, 1)
        html_path, json_path = report.write(args.out)
        print(f"[reproduce] {name} done in {report.settings[f'{name} seconds']} s; wrote {html_path}", flush=True)
    print(f"report: {html_path}\nnumbers: {json_path}")
    return 1 if failures else 0


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
    demo.add_argument("--baseline", choices=["black", "grey"], default="black",
                      help="the photo every path starts from (default black, as in the paper)")
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

    agg = sub.add_parser(
        "aggregate", help="per-class importance statistics of your model over your data set",
        description="Mean, std and sign shares of every unit's importance per class over a whole data set, "
                    "resumable from a checkpoint; under torchrun each process takes every N-th batch.")
    agg.add_argument("--model", required=True, help="module:function (or file.py:function) returning the nn.Module")
    agg.add_argument("--data", required=True,
                     help="module:function returning the DataLoader (batches (inputs, labels) or inputs)")
    agg.add_argument("--layers", nargs="+", required=True, help="dotted layer names")
    agg.add_argument("--measure", nargs="+", default=["conductance"],
                     help="conductance (default), internal_influence, activation, gradient, grad_x_activation or "
                          "layer_integrated_gradients; several are computed in one pass and saved in one file")
    agg.add_argument("--out", required=True, help="result file (.npz, or .safetensors with safetensors installed)")
    agg.add_argument("--checkpoint", default=None, help="checkpoint file: resumes from it when it exists")
    agg.add_argument("--checkpoint-every", type=int, default=10, help="batches between checkpoint writes")
    agg.add_argument("--units", default="channel", choices=["channel", "neuron"])
    agg.add_argument("--by", default="class", choices=["class", "label", "predicted", "none"])
    agg.add_argument("--target", default="label", help="label (default), predicted, or a class index")
    agg.add_argument("--near-zero", type=float, default=0.01, help="|value| <= this counts as near zero")
    steps = agg.add_mutually_exclusive_group()
    steps.add_argument("--n-steps", type=int, default=None, help="fixed rule with this many intervals")
    steps.add_argument("--tolerance", type=float, default=None, help="adaptive rule to this completeness error")
    agg.add_argument("--method", default=None, help="integration rule (see docs/maths.md)")
    agg.add_argument("--max-steps", type=int, default=None, help="point budget per example (adaptive)")
    agg.add_argument("--internal-batch-size", type=int, default=None, help="path points per forward/backward")
    agg.add_argument("--limit-batches", type=int, default=None, help="use only the first N batches")
    agg.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu, cuda:0, ...")
    agg.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    agg.add_argument("--no-progress", action="store_true", help="no progress bar")
    agg.set_defaults(func=_aggregate)

    rep = sub.add_parser(
        "reproduce", help="reproduce the paper's experiments on real models and data; writes an HTML report",
        description="Runs the paper's image and text experiments (and the transformer study) on the real "
                    "networks and data sets that install offline, and writes report.html, results.json and "
                    "figures/ into --out. The report is rewritten after each experiment.")
    rep.add_argument("experiment", choices=["image", "text", "transformer", "pruning", "all"])
    rep.add_argument("--out", required=True, help="output folder")
    rep.add_argument("--quick", action="store_true", help="reduced version that runs in a few minutes")
    rep.add_argument("--weights", default=None,
                     help="local file of torchvision's pretrained GoogLeNet weights (image experiment)")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--threads", type=int, default=1,
                     help="torch CPU threads (default 1: on a shared 2-core machine two threads that wait "
                          "for each other were many times slower)")
    rep.set_defaults(func=_reproduce)

    show = sub.add_parser("show", help="print the top units per class of an aggregate result file")
    show.add_argument("file", help="file written by `conductance aggregate` or AggregateResult.save")
    show.add_argument("--top", type=int, default=5, help="units per class and layer")
    show.add_argument("--layers", nargs="+", default=None, help="only these layers")
    show.add_argument("--group", default=None, help="only this class index (or 'all' for all examples pooled)")
    show.add_argument("--absolute", action="store_true", help="rank by |mean| instead of mean")
    show.set_defaults(func=_show)
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
