"""The knowledge-neurons study's report sections: prose, tables and figures made from the measured numbers."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np

from ..report import Report
from .compute import top_units
from .config import ACTIONS, KN_STEPS, REFERENCE_POINTS
from .model import LMConfig, Vocabulary


def _median_change(changes: dict) -> dict:
    return {r: {k: float(np.median(v)) for k, v in per.items()} for r, per in changes.items()}


def model_section(report: Report, config: LMConfig, info: dict[str, Any], vocab: Vocabulary, ppl: dict[str, Any],
                  seed: int) -> None:
    """The language model, its training and its test perplexity against a unigram model.

    Parameters
    ----------
    report : Report
    config : LMConfig
    info : dict
        :func:`.model.load_or_train`'s training information.
    vocab : Vocabulary
    ppl : dict
        :func:`.compute.perplexities`'s result.
    seed : int
    """
    sec = report.section("Knowledge neurons: the language model", key="kn-model")
    sec.text(f"A GPT-2-architecture decoder (transformers GPT2LMHeadModel, {config.n_layer} blocks, width "
             f"{config.n_embd}, {config.n_head} heads, MLP {config.n_inner}, context {config.n_positions}, "
             f"{info['parameters']:,} parameters) trained {config.epochs} epoch(s) with AdamW (lr {config.lr}, "
             f"batch {config.batch} windows) on {info['train_tokens']:,} tokens of Rotten Tomatoes training "
             "snippets (each preceded by [BOS], concatenated and cut into context-sized windows), next-token loss, "
             f"seed {seed}. Vocabulary: [PAD], [UNK], [BOS] and the {len(vocab) - 3} most frequent training "
             "words (lower-cased words and punctuation marks); [BOS] doubles as the end-of-text token and there "
             "is no pad token, as in GPT-2, so cd.hf's baseline=\"auto\" is the [BOS] embedding at every "
             "position. Perplexity per token on the held-out test snippets (each snippet alone, every token "
             "after [BOS]):")
    sec.table([["GPT-2 LM", ppl["lm"]], ["unigram (add-one, training counts)", ppl["unigram"]]],
              ["model", "test perplexity"], caption=f"{ppl['tokens']:,} test tokens")
    sec.numbers(perplexity=ppl, train=info, config=asdict(config), vocabulary=len(vocab))


def interventions_section(report: Report, prompts: list[dict], change: dict, attributions: list[dict[str, Any]],
                          probs: list[float], cfg: dict[str, Any]) -> None:
    """Median relative change of the target probability per ranking, intervention and k; the prompts.

    Parameters
    ----------
    report : Report
    prompts : list of dict
    change, attributions, probs
        :func:`.compute.interventions`'s result.
    cfg : dict
        :data:`SETTINGS` entry.
    """
    rows = []
    for pr, att, p0 in zip(prompts, attributions, probs):
        top = top_units(att["conductance"]["neurons"], 3)
        rows.append([pr["prompt"][-60:], pr["word"], p0, ", ".join(f"L{b}.N{i}" for b, i in top),
                     ", ".join(f"L{b}.N{i}" for b, i in top_units(att["kn_ig"]["neurons"], 3)),
                     att["conductance_points"]])
    sec = report.section("Knowledge neurons: suppressing and amplifying the top units", key="kn-interventions")
    sec.text(f"{len(prompts)} held-out test snippets, each cut before the first word (alphabetic, 3+ letters, "
             "after at least 4 words) that the model predicts top-1. Target: the probability of that word "
             "after the prompt (cd.hf.next_token(\"prob\", token=...)). Per prompt, the units with the largest "
             "values are those pushing the probability up; they are suppressed (zeroed at every position, "
             "cd.hf.ablate_neurons / cd.hf.ablate_heads, as Dai et al.), set to their values at the baseline "
             "input ([BOS] at every position: the reference conductance measures against; 'baseline'), or "
             "amplified (doubled at every position, values= twice their activations, as Dai et al.), and the "
             "relative change (p' - p) / p of the target probability is taken; the "
             f"tables show its median over the prompts. Rankings: conductance (adaptive rule at the default "
             f"tolerance 0.02, baseline {attributions[0]['baseline']!r}, the neuron summed over positions); "
             "gradient x activation (summed over positions); kn_ig: the Knowledge-Neurons 20-step integrated "
             "gradients of the MLP activations at the last position, scaled from 0 (one run per layer); random: "
             f"mean of {cfg['random_draws']} seeded draws per prompt.")
    medians = {f"{kind}-{a}": _median_change(change[(kind, a)]) for kind, a in change}
    for kind, a in change:
        ks = cfg["ks"] if kind == "neuron" else cfg["head_ks"]
        m = medians[f"{kind}-{a}"]
        sec.table([[r] + [m[r][k] for k in ks] for r in m], ["ranking"] + [f"k={k}" for k in ks],
                  caption=f"{a} the top-k MLP {kind}s of {len(attributions[0]['mlp_layers'])} layers: median "
                          f"relative change of the target probability" if kind == "neuron" else
                  f"{a} the top-k heads: median relative change of the target probability")
    sec.table(rows, ["prompt (end)", "next word", "p", "top conductance neurons", "top kn_ig neurons", "points"],
              caption="Prompts and their top neurons")
    try:
        from ... import plots
        for kind in ("neuron", "head"):
            ks = list(cfg["ks"] if kind == "neuron" else cfg["head_ks"])
            series = {f"{r} {a}": ([0] + ks, [0.0] + [medians[f"{kind}-{a}"][r][k] for k in ks])
                      for a in ACTIONS for r in medians[f"{kind}-{a}"]}
            # one colour per ranking, one line style per intervention
            colours = {"conductance": "C0", "grad_x_activation": "C1", "kn_ig": "C2", "random": "C7"}
            styles = {name: {"linestyle": "--" if name.endswith("amplify") else ":" if name.endswith("baseline")
                             else "-", "color": colours[name.rsplit(" ", 1)[0]]} for name in series}
            fig = plots.curves(series, xlabel=f"top {kind}s changed", ylabel="median relative change of p",
                               styles=styles, markers=True,
                               title=f"{kind}s: suppress (solid), baseline (dotted), amplify (dashed)")
            sec.figure(fig, f"Median relative change of the target probability after suppressing, baselining or "
                            f"amplifying the top-k {kind}s", name=f"kn-{kind}s")
    except ImportError:
        pass
    sec.numbers(median_relative_change=medians,
                per_prompt={f"{kind}-{a}": change[(kind, a)] for kind, a in change},
                prompts=[{k: v for k, v in p.items() if k != "ids"} for p in prompts])


def accuracy_section(report: Report, prompts: list[dict], errs: dict[str, list], costs: dict[str, list], *,
                     t_start: float) -> None:
    """Per-unit error and cost of conductance and of kn_ig.

    Parameters
    ----------
    report : Report
    prompts : list of dict
    errs, costs : dict
        :func:`.compute.unit_errors`'s result.
    t_start : float
        ``time.perf_counter()`` at the start of the study.
    """
    sec = report.section("Knowledge neurons: per-unit error and cost", key="kn-accuracy")
    err_rows = [[pr["word"], costs["conductance_points"][j], max(errs["conductance"][j]),
                 max(errs["conductance_estimate"][j]), costs["kn_points"][j], max(errs["kn_ig"][j]),
                 costs["conductance_seconds"][j], costs["kn_seconds"][j]]
                for j, pr in enumerate(prompts[:len(errs["conductance"])])]
    sec.text(f"For {len(err_rows)} prompts: the per-unit error of each MLP layer's neuron vector (relative L2 "
             "distance to a converged reference, floored at 1% of |F(x) - F(x')| as result.unit_error is; the "
             "table shows the worst layer). Conductance at the default accuracy (the adaptive rule, tolerance "
             "0.02: all MLP layers and heads from one path) is measured against conductance with "
             f"{REFERENCE_POINTS}-point Gauss-Legendre, and its own estimate (result.unit_error) is shown beside "
             f"it; the Knowledge-Neurons {KN_STEPS}-step right Riemann sum against the same integral with "
             f"{REFERENCE_POINTS}-point Gauss-Legendre (its F(x) - F(x') is P(w) - P(0)). Points: forward and "
             "backward passes on the path (conductance: one path for every layer; kn_ig: 20 per layer). The "
             "two are different integrals (conductance: input-embedding path, all positions; kn_ig: one "
             "layer's activations at one position), so only their accuracy and cost compare.")
    sec.table(err_rows, ["next word", "conductance points", "conductance error", "conductance estimate",
                         "kn_ig points", "kn_ig error", "conductance seconds", "kn_ig seconds"])
    summary = {k: {"median": float(np.median(np.max(v, 1))), "max": float(np.max(v))} for k, v in errs.items()}
    sec.text(f"Median over prompts of the worst layer's error: conductance {summary['conductance']['median']:.4f} "
             f"(estimate {summary['conductance_estimate']['median']:.4f}), kn_ig {summary['kn_ig']['median']:.4f}.")
    sec.numbers(error=errs, error_summary=summary,
                cost={k: {"median": float(np.median(v)), "values": v} for k, v in costs.items()},
                total_seconds=round(time.perf_counter() - t_start, 1))
