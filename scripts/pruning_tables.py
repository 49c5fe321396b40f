"""Print docs/pruning.md's study tables from the results.json of ``conductance reproduce pruning``.

Usage::

    python scripts/pruning_tables.py out/pruning/results.json [more results.json ...]

Several files may be given (a study run as separate parts with ``CONDUCTANCE_PRUNING_PARTS``); each
network is taken from the first file that has it. Per Fashion-MNIST network: test accuracy right
after pruning, with the mean fill and after fine-tuning, per criterion and ratio (several random
draws as mean (min-max)), global pruning at 50% and the scoring time; then the errors of the
conductance scores per layer. For EfficientNet-Lite0: top-1 agreement and margin change. Only the
standard library is needed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any, Optional

NETWORKS = ("inception", "resnet")
KINDS = (("pruned", "pruned"), ("pruned_mean_fill", "pruned + mean fill"), ("fine_tuned", "fine-tuned 1 epoch"))


def _columns(runs: list[list[float]]) -> list[list[float]]:
    """Per ratio, the values of every run (runs are rows, ratios columns)."""
    return [list(col) for col in zip(*runs)]


def cell(values: list[float]) -> str:
    """One accuracy: the value, or for several runs 'mean (min-max)'."""
    # the mean of equal accuracies can differ from them in the last bit, which .3f may round the other way
    mean = round(statistics.fmean(values), 9)
    if len(values) == 1 or min(values) == max(values):
        return f"{mean:.3f}"
    return f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def network_table(name: str, r: dict) -> list[str]:
    """The accuracy table of one Fashion-MNIST network."""
    ratios = r["ratios"]
    header = ["criterion"] + [f"{round(100 * x)}%" for x in ratios] + ["global 50%", "scores (s)"]
    lines = [f"**{name}** (test accuracy {r['base_accuracy']:.3f}; {r['seconds']:.0f} s)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label in KINDS:
        lines.append(f"| *{label}* |" + " |" * (len(header) - 1))
        for criterion, v in r["criteria"].items():
            cells = [cell(col) for col in _columns(v[key])]
            glob = cell(v["global50"]) if key == "pruned" else ""
            seconds = v.get("score_seconds")
            timing = f"{seconds:.2f}" if key == "pruned" and seconds is not None else ""
            lines.append("| " + " | ".join([criterion] + cells + [glob, timing]) + " |")
    return lines


def errors_table(name: str, r: dict) -> list[str]:
    """Completeness (cut layers) and per-unit error estimate of the conductance scores, per layer."""
    comp: dict = r["criteria"].get("conductance", {}).get("completeness") or {}
    if not comp:
        return []

    def pct(v: Optional[float]) -> str:
        return "–" if v is None else f"{100 * v:.1f}%"

    def count(v: Optional[int]) -> str:
        return "–" if v is None else str(v)

    lines = [f"Errors of the conductance scores, {name} (per calibration example; – : not a cut layer, so no "
             "completeness check):", "",
             "| layer | completeness mean | max | examples > 5% | per-unit mean | max | examples > 5% |",
             "|---|---|---|---|---|---|---|"]
    for layer, e in comp.items():
        lines.append(f"| {layer} | {pct(e.get('mean'))} | {pct(e.get('max'))} | {count(e.get('above'))} | "
                     f"{pct(e.get('unit_mean'))} | {pct(e.get('unit_max'))} | {count(e.get('unit_above'))} |")
    return lines


def efficientnet_table(e: dict) -> list[str]:
    """Top-1 agreement (plain and mean fill) and margin change per criterion and ratio."""
    ratios = [f"{round(100 * x)}%" for x in e["ratios"]]
    header = (["criterion"] + [f"agreement {x}" for x in ratios] + [f"mean fill {x}" for x in ratios]
              + [f"margin change {x}" for x in ratios] + ["scores (s)"])
    lines = [f"**EfficientNet-Lite0** ({e.get('views', '?')} held-out views; base mean margin "
             f"{e.get('base_mean_margin', float('nan')):.2f}; {e.get('seconds', 0):.0f} s)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for criterion, v in e["criteria"].items():
        cells = ([f"{statistics.fmean(c):.3f}" for c in _columns(v["agreement"])]
                 + [f"{statistics.fmean(c):.3f}" for c in _columns(v["agreement_mean_fill"])]
                 + [f"{statistics.fmean(c):+.2f}" for c in _columns(v["margin_change"])])
        seconds = v.get("score_seconds")
        lines.append("| " + " | ".join([criterion] + cells + ["" if seconds is None else f"{seconds:.2f}"]) + " |")
    return lines


def render(files: list[dict]) -> list[str]:
    """Every table the files hold, networks in the study's order."""
    lines: list[str] = []

    def find(key: str) -> Optional[dict[str, Any]]:
        return next((d[key] for d in files if key in d), None)

    for name in NETWORKS:
        r = find(f"pruning-{name}")
        if r is not None:
            lines += network_table(name, r) + [""] + errors_table(name, r) + [""]
    e = find("pruning-efficientnet")
    if e is not None:
        lines += efficientnet_table(e)
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results.json of conductance reproduce pruning")
    args = p.parse_args(argv)
    files = []
    for path in args.results:
        with open(path) as f:
            files.append(json.load(f))
    lines = render(files)
    if not lines:
        print("no pruning results in these files", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
