"""Print the markdown tables of docs/REPRODUCTION.md from a reproduction's results.json.

Usage::

    python scripts/reproduction_tables.py out/reproduction/results.json            # every table
    python scripts/reproduction_tables.py out/reproduction/results.json photos     # some of them
    python scripts/reproduction_tables.py --list

Each table is printed under a ``<!-- table: NAME -->`` line, the name of the place in
docs/REPRODUCTION.md it replaces; a table whose results are missing from the file (a partial run, or
``--quick``, which has fewer photos and blocks) is skipped with a note on stderr. Percentages are
rounded as the document rounds them. Only the standard library is needed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import Any, Optional

MEASURES = ["conductance", "internal_influence", "activation", "grad_x_activation", "gradient",
            "layer_integrated_gradients", "random"]
LABELS = {"conductance": "conductance", "internal_influence": "internal influence", "activation": "activation",
          "grad_x_activation": "grad × act", "gradient": "gradient", "layer_integrated_gradients": "layer IG",
          "random": "random"}


def row(cells: list[Any]) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table; raises ValueError when a row's cell count differs from the header's."""
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"row {r!r} has {len(r)} cells, the header {len(header)}")
    return [row(header), "|" + "---|" * len(header)] + [row(r) for r in rows]


def pct(x: Optional[float], digits: int = 2) -> str:
    """A fraction as a percentage, '–' when absent."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if 0 < abs(x) < 0.5 * 10 ** -(digits + 2):  # would print as zero: keep two significant digits
        return f"{100 * x:.2g}%"
    return f"{100 * x:.{digits}f}%"


def flips(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.1f}"


# ----------------------------------------------------------------------------- image, EfficientNet-Lite0

def photos(d: dict) -> list[str]:
    """Per photo: label, F(x) - F(x'), path points, and per block completeness / per-unit error."""
    p = d["image-effnet-photos"]
    blocks = list(next(iter(p["photos"].values()))["blocks"])
    rows = []
    for name, ph in p["photos"].items():
        cells = [name, f"{ph['label_name']} ({ph['logit']:.1f})", f"{ph['output_diff']:.2f}", ph["n_points"]]
        cells += [f"{pct(b['relative_error'])} · {pct(b['unit_error'])}" for b in ph["blocks"].values()]
        cells.append(pct(max(b["unit_error"] for b in ph["blocks"].values())))
        rows.append(cells)
    out = table(["photo", "top label (logit)", "F(x) − F(x′)", "path points"] + blocks + ["max per-unit"], rows)
    out += ["", f"Completeness error: largest {pct(p['max_relative_error'])}, mean {pct(p['mean_relative_error'])}. "
                f"Per-unit error: largest {pct(p['max_unit_error'])}, mean {pct(p['mean_unit_error'])}. "
                f"Path points per photo: {p['mean_points']:.0f} on average "
                f"(rule: tolerance {p['rule'].get('tolerance')}, max_steps {p['rule'].get('max_steps')})."]
    return out


def pixels(d: dict) -> list[str]:
    """The per-pixel maps' checks: sum-vs-layer difference and the consistent filter."""
    px = d["image-effnet-pixels"]
    top = {n: f[0] for n, f in px["filters"].items()}
    warn = [w for w in d["image-effnet-photos"].get("warnings", []) if "neuron conductance" in w]
    rule = ", ".join(f"{k}={v}" for k, v in px["rule"].items())
    out = [f"Per-pixel maps of {px['block']} ({rule}): each map's sum against the filter's layer "
           f"conductance: largest relative difference {pct(px['pixel_sum_relative_error_max'], 1)}, mean "
           f"{pct(px['pixel_sum_relative_error_mean'], 1)}. Top filter per photo: "
           + ", ".join(f"{n} {f}" for n, f in top.items()) + "."]
    if "consistent_filter" in px:
        out.append(f"Filter {px['consistent_filter']} is among the top 5 for {px['consistent_filter_top5_count']} "
                   f"of {len(px['filters'])} photos.")
    if warn:
        out.append(f"{len(warn)} per-unit warnings from the per-pixel maps; the estimates reached per map call: "
                   + ", ".join(w.split("up to ")[1].split(" ")[0] for w in warn if "up to " in w) + ".")
    return out


def effnet_ablation(d: dict) -> list[str]:
    """Mean flip count (photos flipped by their top 10 filters) per block and mode."""
    ab = d["image-effnet-ablation"]
    rows = []
    for mode in ("zero", "baseline"):
        for block, modes in ab["blocks"].items():
            r = modes[mode]["rows"]
            rows.append([block, mode] + [f"{flips(r[m]['mean_flips'])} ({r[m]['top_k_flipped']}/{r[m]['examples']})"
                                         for m in MEASURES if m in r])
    names = [m for m in MEASURES if m in next(iter(ab["blocks"].values()))["zero"]["rows"]]
    return table(["block", "mode"] + [LABELS[m] for m in names], rows)


def effnet_means(d: dict) -> list[str]:
    """Mean flip count over the blocks, both modes."""
    means = d["image-effnet-ablation"]["mean_over_blocks"]
    names = [m for m in MEASURES if m in means["zero"]]
    return table(["mode"] + [LABELS[m] for m in names],
                 [[mode] + [flips(means[mode][m]) for m in names] for mode in ("zero", "baseline")])


# ----------------------------------------------------------------------------- image, Fashion-MNIST

def _of(n: int, total: int) -> str:
    return f"{n}/{total}"


def fashion_zero(d: dict) -> list[str]:
    """Mode 'zero' flip counts per layer and measure, with the paper's numbers."""
    fa = d["image-fashion-ablation"]
    paper = fa.get("paper", {})
    pc, pii = paper.get("conductance", {}), paper.get("internal_influence", {})
    units = {"inception3a": 48, "inception3b": 64, "inception4a": 96, "inception4b": 128}
    rows = []
    for layer, entry in fa["modes"]["zero"].items():
        for i, m in enumerate(m for m in MEASURES if m in entry["rows"]):
            r = entry["rows"][m]
            n = r["examples"]
            first = f"{layer} ({units[layer]})" if i == 0 and layer in units else (layer if i == 0 else "")
            rows.append([first, LABELS[m].replace("grad × act", "grad × activation"), flips(r["mean_flips"]),
                         pc.get("mean_flips", "") if m == "conductance" else "", _of(r["more_than_k"], n),
                         f"{pc['more_than_10']}/{pc['examples']}" if m == "conductance" and pc else "",
                         "–" if r["max_flips"] is None else int(r["max_flips"]),
                         pc.get("max_flips", "") if m == "conductance" else "", _of(r["top_k_flipped"], n),
                         f"{pii['top_10_flipped']}/{pii['examples']}" if m == "internal_influence" and pii else ""])
    return table(["layer", "measure", "mean flips", "paper", "> 10", "paper", "max", "paper", "top-10 flips",
                  "paper"], rows)


def fashion_baseline(d: dict) -> list[str]:
    """Mode 'baseline': mean flips · > 10 · max · top-10 flips per layer and measure."""
    fa = d["image-fashion-ablation"]
    rows, names = [], []
    for layer, entry in fa["modes"]["baseline"].items():
        names = [m for m in MEASURES if m in entry["rows"]]
        cells = [layer]
        for m in names:
            r = entry["rows"][m]
            n = r["examples"]
            suffix = "" if n == 100 else f"/{n}"
            mean = flips(r["mean_flips"])
            if m == "conductance":
                mean = f"**{mean}**"
            cells.append(f"{mean} · {r['more_than_k']}{suffix} · "
                         f"{'–' if r['max_flips'] is None else int(r['max_flips'])} · {r['top_k_flipped']}{suffix}")
        rows.append(cells)
    never = {layer: {m: entry["rows"][m]["never"] for m in names if m != "random"}
             for layer, entry in fa["modes"]["baseline"].items()}
    out = table(["layer"] + [LABELS[m] for m in names], rows)
    out += ["", "Images that never flip (mode baseline, ranked measures): "
            + "; ".join(f"{layer} {min(v.values())}-{max(v.values())}" for layer, v in never.items()) + "."]
    return out


def fashion_errors(d: dict) -> list[str]:
    """Completeness error of the ablation rankings per layer, and the per-unit error."""
    fa = d["image-fashion-ablation"]
    rows = [[layer, pct(e["max"]), pct(e["mean"], 3)] for layer, e in fa["relative_error"].items()]
    out = table(["layer", "max", "mean"], rows)
    if "unit_error_max" in fa:
        out += ["", f"Per-unit error over all layers and images: max {pct(fa['unit_error_max'])}, mean "
                    f"{pct(fa['unit_error_mean'])}; completeness over all: max {pct(fa['relative_error_max'])}, mean "
                    f"{pct(fa['relative_error_mean'])}; {fa['mean_points']:.1f} path points per image on average."]
    warn = d.get("image-warnings", {}).get("warnings", [])
    if warn:
        out += ["", f"{len(warn)} warning(s) from the Fashion-MNIST protocols: " + " / ".join(warn)]
    return out


def selection(d: dict) -> list[str]:
    """Per layer: accuracy / random accuracy (filters pooled) per measure and k."""
    fs = d["image-fashion-selection"]
    out: list[str] = []
    for layer, e in fs["layers"].items():
        by = {(r["measure"], r["k"]): r for r in e["rows"]}
        errs = (f"completeness error of conductance on the selection images: max {pct(e['relative_error_max'])}, "
                f"mean {pct(e['relative_error_mean'])}")
        if "unit_error_max" in e:
            errs += f"; per-unit error: max {pct(e['unit_error_max'])}, mean {pct(e['unit_error_mean'])}"
        out += [f"**{layer}** ({e['n_layer_units']} filters; all filters: {e['all_units_accuracy']:.3f}; {errs})", ""]
        rows = []
        for m in e["measures"]:
            rows.append([LABELS[m].replace("grad × act", "grad × activation")]
                        + [f"{by[m, k]['accuracy']:.3f} / {by[m, k]['random_accuracy']:.3f} ({by[m, k]['n_units']})"
                           for k in e["ks"]])
        out += table(["measure"] + [f"k = {k}" for k in e["ks"]], rows) + [""]
    out.append(f"Over all layers: completeness max {pct(fs['relative_error_max'])}, mean "
               f"{pct(fs['relative_error_mean'])}.")
    return out


# ----------------------------------------------------------------------------- text

def text_model(d: dict) -> list[str]:
    m = d["text-model"]
    secs = m.get("epoch_seconds") or []
    return table(["quantity", "ours"], [
        ["test accuracy", f"{pct(m['test_accuracy'], 1)} ({m['n_test']:,} reviews)"],
        ["majority-class rate", pct(m["majority_rate"], 1)],
        ["training / test reviews", f"{m['n_train']:,} / {m['n_test']:,}"],
        # the vocabulary size counts the padding entry; the document (and the report) do not
        ["vocabulary (of which with a GloVe vector)", f"{m['vocab_size'] - 1:,} ({m['glove_words']:,})"],
        ["seconds per epoch (1 thread)", ", ".join(f"{s:.1f}" for s in secs) if secs else "– (cached)"]])


def text_signs(d: dict) -> list[str]:
    s = d["text-signs"]
    rows = []
    for key, label in (("predicted_logit", "predicted-class logit"), ("sentiment_score", "fresh − rotten logit")):
        e = s[key]
        rows.append([label, e["n_active"], f"{e['n_single_signed']} ({e['n_positive_units']} +, "
                     f"{e['n_negative_units']} −)", f"**{pct(e['share_single_signed'], 1)}**"])
    out = table(["explained output", "filters ever non-zero", "single-signed", "share"], rows)
    return out + ["", f"Median majority-sign share (predicted logit): {pct(s['median_majority_share'], 0)}."]


def text_negation(d: dict) -> list[str]:
    n = d["text-negation"]
    rows = []
    for sent, e in n["sentences"].items():
        score = e["logits"][1] - e["logits"][0]
        rows.append([sent, e["predicted"], f"{score:+.2f}", ", ".join(str(f) for f in e["top_filters"])])
    out = table(["sentence", "predicted", "fresh − rotten logit", "top filters by conductance (predicted logit)"],
                rows)
    tn = n.get("through_not", {})
    out += ["", "Through 'not', share of F(x) − F(x'): "
            + ", ".join(f"{s} {pct(v['share_of_output_diff'], 0)}" for s, v in tn.items())
            + f". Accuracy with a negation word {pct(n['accuracy_with_negation'], 1)} "
              f"({n['n_test_with_negation']} reviews), without {pct(n['accuracy_without_negation'], 1)}."]
    return out


def text_words(d: dict) -> list[str]:
    n = d["text-negation"]
    return table(["reviews", "contain a negation word", "the filter's n-gram contains one"], [
        ["all test reviews (base rate)", pct(n["base_rate_all_test"], 1), "–"],
        [f"top-{n['top_reviews']} reviews of all 256 filters (mean)", pct(n["all_filters_negation_share"], 1),
         pct(n["all_filters_ngram_negation_share"], 1)],
        [f"top-{n['top_reviews']} reviews of the 10 top filters of the two sentences",
         f"**{pct(n['chosen_negation_share'], 1)}**", f"**{pct(n['chosen_ngram_negation_share'], 1)}**"],
        [f"top-{n['top_reviews']} reviews of the 10 filters with most conductance through \"not\"",
         pct(n["through_not_negation_share"], 1), pct(n["through_not_ngram_negation_share"], 1)]])


def text_completeness(d: dict) -> list[str]:
    c = d["text-completeness"]
    n_test = d["text-model"]["n_test"]

    def g(key: str) -> str:
        v = c.get(key)
        return "–" if v is None else f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e+")

    pts = c.get("mean_points")
    pts_s = "–" if pts is None else f"{pts:.0f}"
    header = ["computation", "examples", "max per-unit error", "max relative error", "mean", "points per example"]
    return table(header, [
        ["filter layer, predicted logit", f"{n_test:,}", g("predicted_max_unit_error"),
         g("predicted_max_relative_error"), g("predicted_mean_relative_error"), pts_s],
        ["filter layer, fresh − rotten", f"{n_test:,}", "–", g("sentiment_max_relative_error"), "–", pts_s],
        ["per-token maps (each filter over the embeddings)", 10, g("token_map_max_unit_error"), "n/a", "n/a",
         c.get("token_steps", 64) + 1],
        ["per-token sums vs the filter's layer conductance (absolute)", 10, "n/a", g("token_sum_max_abs_error"),
         g("token_sum_mean_abs_error"), c.get("token_steps", 64) + 1]])


# ----------------------------------------------------------------------------- transformer

def _short(layer: str) -> str:
    return (layer.replace("encoder.encoder.layer.", "block ").replace(".attention.output.dense:input", " heads")
            .replace(".intermediate", " FFN").replace("encoder.embeddings", "embeddings"))


def transformer_errors(d: dict) -> list[str]:
    """Per layer: completeness (cut layers) and per-unit error, median and max over snippets."""
    c = d["transformer-completeness"]
    rows = []
    for layer, u in c["unit_error"].items():
        r = c.get("relative_error", {}).get(layer)
        pooled = c.get("pooled_relative_error", {}).get(layer)
        rows.append([_short(layer), pct(u["median"], 1), pct(u["max"], 1),
                     "–" if r is None else pct(r["median"], 2), "–" if r is None else pct(r["max"], 1),
                     "–" if pooled is None else pct(pooled, 2), "above 5%" if u["max"] > 0.05 else "ok"])
    # pooled: sum over snippets of |completeness residual| / sum of |F(x) - F(x')|
    out = table(["layer", "per-unit median", "per-unit max", "completeness median", "completeness max",
                 "completeness pooled", "flag"], rows)
    out += ["", f"{len(c.get('warnings', []))} warning(s) (results.json, transformer-completeness/warnings)."]
    return out


def transformer_ablation(d: dict) -> list[str]:
    a = d["transformer-ablation"]
    m = d["transformer-model"]
    ks = list(next(iter(a["zero"]["accuracy"].values())))
    rows = []
    for mode in ("zero", "baseline"):
        acc = a[mode]["accuracy"]
        for k in ks:
            rows.append([mode, k, f"{a[mode]['unablated']:.3f}"] + [f"{acc[r][k]:.3f}" for r in acc])
    names = list(a["zero"]["accuracy"])
    out = table(["mode", "heads per class", "unablated"] + [LABELS.get(r, r) for r in names], rows)
    out += ["", f"Test accuracy {pct(m['test_accuracy'], 1)} ({m.get('n_eval')} snippets); "
                f"{d['transformer-top']['shared_top10_heads']} heads in the top 10 of both classes."]
    return out


TABLES: dict[str, tuple[str, Callable[[dict], list[str]]]] = {
    "photos": ("image-effnet-photos", photos),
    "pixels": ("image-effnet-pixels", pixels),
    "effnet-ablation": ("image-effnet-ablation", effnet_ablation),
    "effnet-means": ("image-effnet-ablation", effnet_means),
    "fashion-zero": ("image-fashion-ablation", fashion_zero),
    "fashion-baseline": ("image-fashion-ablation", fashion_baseline),
    "fashion-errors": ("image-fashion-ablation", fashion_errors),
    "selection": ("image-fashion-selection", selection),
    "text-model": ("text-model", text_model),
    "text-signs": ("text-signs", text_signs),
    "text-negation": ("text-negation", text_negation),
    "text-words": ("text-negation", text_words),
    "text-completeness": ("text-completeness", text_completeness),
    "transformer-errors": ("transformer-completeness", transformer_errors),
    "transformer-ablation": ("transformer-ablation", transformer_ablation),
}


def render(d: dict, names: Optional[list[str]] = None) -> dict[str, list[str]]:
    """The tables ``names`` (default all) whose results are in ``d``: {name: markdown lines}."""
    out = {}
    for name in names or list(TABLES):
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
        key, fn = TABLES[name]
        if key in d:
            out[name] = fn(d)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="?", help="results.json of `conductance reproduce`")
    ap.add_argument("tables", nargs="*", help="table names (default: all)")
    ap.add_argument("--list", action="store_true", help="list the table names and exit")
    args = ap.parse_args(argv)
    if args.list or not args.results:
        print("\n".join(f"{n}  (results key {k})" for n, (k, _) in TABLES.items()))
        return 0
    with open(args.results) as f:
        d = json.load(f)
    unknown = [t for t in args.tables if t not in TABLES]
    if unknown:
        ap.error(f"unknown table(s) {unknown}; known: {', '.join(TABLES)}")
    done = render(d, args.tables or None)
    for name in args.tables or list(TABLES):
        if name not in done:
            print(f"skipped {name}: no {TABLES[name][0]!r} in {args.results}", file=sys.stderr)
    settings = d.get("settings", {})
    print(f"<!-- from {args.results}: experiments {settings.get('experiments')}, quick {settings.get('quick')}, "
          f"seed {settings.get('seed')} -->")
    for name, lines in done.items():
        print(f"\n<!-- table: {name} -->")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
