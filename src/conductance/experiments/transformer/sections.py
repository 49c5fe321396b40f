"""The transformer study's report sections: prose, tables and figures made from the measured numbers."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..report import Report, shorten
from .config import ABLATION_MODES


def model_section(report: Report, info: dict[str, Any], cfg: dict[str, Any], *, acc_eval: float, n_eval: int,
                  n_attr: int) -> None:
    """The MiniLM sentiment model and its held-out accuracy.

    Parameters
    ----------
    report : Report
    info : dict
        :func:`.model.sentiment_model`'s training information.
    cfg : dict
        :data:`SETTINGS` entry.
    acc_eval : float
    n_eval, n_attr : int
        Snippets evaluated and attributed.
    """
    sec = report.section("Transformer: MiniLM sentiment model", key="transformer-model")
    sec.text(
        "all-MiniLM-L6-v2 (6 blocks x 12 heads, FFN width 1536, pretrained and frozen) + masked mean pooling + a "
        f"linear sentiment head trained here (L2 logistic regression, LBFGS) on {info['n_train']} Rotten Tomatoes "
        "training snippets (a seeded subset: MiniLM encodes about 50 snippets/s on 2 CPU cores). The model's two "
        "logits are -s/2 and +s/2 for the head's score s, so each class's logit is half the decision margin "
        "toward it; attributions explain the logit of each snippet's true class. The path runs in the word-"
        "embedding space from the [PAD] embedding at every position (position and token-type embeddings stay "
        f"fixed), with the attention mask passed through; fixed Gauss-Legendre rule with {cfg['n_steps']} steps.")
    sec.table([["training snippets", info["n_train"]],
               ["training accuracy", info.get("train_accuracy", float("nan"))],
               [f"test accuracy ({n_eval} held-out test snippets)", acc_eval],
               ["head from cache", str(info.get("cached"))]], ["", "value"])
    sec.numbers(n_train=info["n_train"], train_accuracy=info.get("train_accuracy"), test_accuracy=acc_eval,
                n_eval=n_eval, n_attr=n_attr, n_steps=cfg["n_steps"])


def top_section(report: Report, cond: dict[str, np.ndarray], tops: dict[str, Any], attr_labels: np.ndarray, *,
                n_attr: int, seconds: float) -> None:
    """The top heads and FFN neurons of each class, and a figure of the heads.

    Parameters
    ----------
    report : Report
    cond : dict
        Conductance of ``heads`` (n, blocks, heads) and ``neurons`` (n, blocks, neurons).
    tops : dict
        :func:`.compute.top_by_class`'s result.
    attr_labels : np.ndarray
        Shape (n,).
    n_attr : int
    seconds : float
        Time of the attribution (every measure).
    """
    sec = report.section("Top heads and FFN neurons per class", key="transformer-top")
    sec.text(f"Conductance toward each snippet's true class, averaged over the {n_attr} attributed test "
             f"snippets of each class ({seconds:.0f} s for all measures). Heads are the slices of the input of "
             "each block's attention output projection (attention.output.dense), one per head; FFN neurons are "
             "the block's intermediate (post-GELU) units summed over tokens. L = block, H = head, N = neuron.")
    for label, cname in ((1, "positive"), (0, "negative")):
        sel = attr_labels == label
        head_rows, neuron_rows = tops[cname]["heads"], tops[cname]["neurons"]
        sec.table([[a, b, c, d] for (a, b), (c, d) in zip(head_rows, neuron_rows)],
                  ["head", "mean conductance", "FFN neuron", "mean conductance"],
                  caption=f"{cname} reviews ({int(sel.sum())} snippets): top 10 heads and FFN neurons")
    overlap = len({r[0] for r in tops["positive"]["heads"]} & {r[0] for r in tops["negative"]["heads"]})
    sec.text(f"{overlap} of the top-10 heads are shared by the two classes.")
    try:
        from ... import plots
        hm_all = cond["heads"].mean(0)
        fig = plots.top_units(hm_all.reshape(-1), k=15,
                              labels=[f"L{b}H{h}" for b in range(hm_all.shape[0]) for h in range(hm_all.shape[1])],
                              absolute=False, ylabel="mean conductance", xlabel="head",
                              title="Heads by mean conductance toward the true class")
        sec.figure(fig, "Top 15 heads by mean conductance (all attributed snippets)", name="transformer-heads")
    except ImportError:
        pass
    sec.numbers(top=tops, shared_top10_heads=overlap,
                head_mean_by_class={"positive": cond["heads"][attr_labels == 1].mean(0),
                                    "negative": cond["heads"][attr_labels == 0].mean(0)})


def completeness_section(report: Report, att: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Completeness of every cut layer and the estimated per-unit error of every layer.

    Parameters
    ----------
    report : Report
    att : dict
        :func:`.compute.attribute`'s result.
    cfg : dict
        :data:`SETTINGS` entry.
    """
    sec = report.section("Completeness per layer", key="transformer-completeness")
    scale = float(np.abs(att["output_diff"]).sum())
    pooled = {name: float(np.abs(att["delta"][name]).sum()) / scale for name in att["delta"]}
    rows = [[name, float(np.median(e)), pooled[name], float(np.max(e))] for name, e in att["relative_error"].items()]
    sec.text("Relative completeness error |sum of conductance - (F(x) - F(x'))| / |F(x) - F(x')| of every cut "
             "layer (the embedding output and each block's output), per snippet. Heads and FFN neurons are not "
             "cuts (the residual stream bypasses them), so they carry no completeness guarantee.")
    sec.table(rows, ["layer", "median relative error", "sum |delta| / sum |F(x)-F(x')|", "max relative error"])
    sec.text(f"The last block's output feeds the pooling and the linear head, which are linear, so its "
             f"completeness is exact; the other layers show the error of the {cfg['n_steps']}-step rule on "
             "this path, which is far from linear (a snippet whose F barely changes makes the relative error "
             "of its row large).")
    if att["warnings"]:
        sec.text(f"The library warned {len(att['warnings'])} time(s) that a cut layer missed completeness by "
                 "more than 5% with this fixed rule (the warnings are in results.json under "
                 "transformer-completeness/warnings).")
    unit_rows = [[name, float(np.median(e)), float(np.max(e)),
                  "above 5%: too coarse to rank these units" if float(np.max(e)) > 0.05 else "ok"]
                 for name, e in att["unit_error"].items()]
    sec.text(f"Estimated per-unit error (relative L2 distance of each snippet's vector of head, neuron or "
             f"layer values to the exact integral; result.unit_error) of every layer, cut or not, with the "
             f"{cfg['n_steps']}-step rule. Values above 5% are not accurate enough to rank those units.")
    sec.table(unit_rows, ["layer", "median per-unit error", "max per-unit error", "flag"])
    sec.numbers(warnings=att["warnings"])
    sec.numbers(unit_error={name: {"median": float(np.median(e)), "max": float(np.max(e))}
                            for name, e in att["unit_error"].items()})
    sec.numbers(pooled_relative_error=pooled,
                relative_error={name: {"median": float(np.median(e)), "mean": float(np.mean(e)),
                                       "max": float(np.max(e))}
                                for name, e in att["relative_error"].items()})


def tokens_section(report: Report, rows: list[tuple[int, dict[str, Any]]]) -> None:
    """Per-token conductance maps of the top FFN neurons (a text line per snippet without matplotlib).

    Parameters
    ----------
    report : Report
    rows : list of (int, dict)
        :func:`.compute.token_rows`'s result.
    """
    sec = report.section("Per-token conductance of the top FFN neurons", key="transformer-tokens")
    sec.text("Conductance of the three top FFN neurons of each class at each token of a few snippets of that "
             "class (one row per neuron).")
    for j, row in rows:
        cname, text, toks, scores = row["class"], row["text"], row["tokens"], row["scores"]
        try:
            from ... import plots
            fig = plots.token_map(toks, scores, row_labels=row["neurons"], title=f"{cname}: {shorten(text, 70)}")
            sec.figure(fig, f"{cname} snippet: per-token conductance of its class's top neurons",
                       name=f"transformer-tokens-{cname}-{j}")
        except ImportError:
            top_tok = [toks[t] for t in np.argsort(-scores.sum(0))[:3]]
            sec.text(f"{cname}: {text!r}: largest tokens {top_tok}")
    sec.numbers(examples=[row for _, row in rows])


def ablation_section(report: Report, table: dict[str, Any], numbers: dict[str, Any], names: list[str],
                     cfg: dict[str, Any], *, n_eval: int, t0: float, t_start: float) -> None:
    """Accuracy after ablating the top heads of each ranking, as tables and curves.

    Parameters
    ----------
    report : Report
    table, numbers, names
        :func:`.compute.head_ablation`'s result.
    cfg : dict
        :data:`SETTINGS` entry.
    n_eval : int
    t0, t_start : float
        ``time.perf_counter()`` at the start of the ablation and of the whole study.
    """
    sec = report.section("Ablating the top heads", key="transformer-ablation")
    sec.text(
        f"For each class, the k heads with the largest mean value toward that class on its attributed snippets "
        f"are ablated, and the accuracy on that class's held-out test snippets ({n_eval} in all, disjoint "
        "from the attributed ones) is measured; the table shows the mean of the two classes (lower: the ranking "
        "found heads the decision needs). Rankings: signed mean for conductance, internal influence, gradient x "
        f"activation and gradient; mean magnitude for activation; random: mean of {cfg['random_draws']} draws. "
        "Two ablations: 'zero' zeroes the head's slice of the attention output projection's input (a forward "
        "pre-hook); 'baseline' sets the slice to its value at the attribution baseline (every token [PAD], same "
        "attention mask), the reference conductance is measured against.")
    for mode in ABLATION_MODES:
        sec.table([[m] + [table[mode][m][k] for k in cfg["ks"]] for m in names],
                  ["ranking"] + [f"k={k}" for k in cfg["ks"]],
                  caption=f"{mode} ablation: accuracy after ablating k heads (unablated "
                          f"{numbers[mode]['unablated']:.3f})")
    try:
        from ... import plots
        if len(cfg["ks"]) > 1:
            for mode in ABLATION_MODES:
                fig = plots.curves({m: ([0] + list(cfg["ks"]),
                                        [numbers[mode]["unablated"]] + [table[mode][m][k] for k in cfg["ks"]])
                                    for m in names}, xlabel="heads ablated per class", ylabel="accuracy",
                                   title=f"{mode} ablation")
                sec.figure(fig, f"{mode} ablation: accuracy against the number of ablated heads",
                           name=f"transformer-ablation-{mode}")
    except ImportError:
        pass
    best = {mode: {k: min(names, key=lambda m: table[mode][m][k]) for k in cfg["ks"]} for mode in ABLATION_MODES}
    sec.text("Most damaging ranking: " + "; ".join(
        f"{mode}: " + ", ".join(f"k={k} {best[mode][k]}" for k in cfg["ks"]) for mode in ABLATION_MODES) + ".")
    sec.numbers(**numbers, most_damaging=best, seconds=round(time.perf_counter() - t0, 1),
                total_seconds=round(time.perf_counter() - t_start, 1))
