"""The text experiments' measurements: filter and per-token conductance of the sentiment CNN, the sign
statistic, the filters' n-grams and the negation shares (everything that runs the network and returns numbers).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch

from ...errors import ConductanceError
from ...progress import Progress
from .config import CONTROL_SENTENCES, NEGATION_SENTENCES, PURITY, THRESHOLD, TOKEN_STEPS
from .network import SentimentCNN
from .tokens import has_negation


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


def _top_reviews(values: np.ndarray, unit: int, k: int) -> np.ndarray:
    """Indices of the k examples with the highest conductance of ``unit``, highest first."""
    col = values[:, unit]
    order = np.argsort(-col, kind="stable")[:k]
    return order[col[order] > 0]


def sign_conductance(model: SentimentCNN, test_texts: Sequence[str], settings: dict, seed: int,
                     progress: Optional[bool] = None) -> dict[str, Any]:
    """Filter conductance of the heat-map reviews for the predicted logit and the sentiment score, with the
    sign statistics and the dense layer's weight signs they are compared with.

    Parameters
    ----------
    model : SentimentCNN
    test_texts : sequence of str
    settings : dict
        :data:`QUICK` or :data:`FULL` (``heat_examples``, ``heat_rows``).
    seed : int
        Seeds the choice of reviews and of the heat map's rows.
    progress : bool, optional

    Returns
    -------
    dict
        ``texts`` (the n reviews), ``pred_run`` and ``score_run`` (:func:`filter_conductance` results,
        values of shape (n, filters)), ``stat`` and ``stat_score`` (:func:`sign_statistic`), ``w_diff``
        (filters,), the sign agreements, ``sub`` (the heat map's rows) and ``seconds``.
    """
    rng = np.random.RandomState(seed)
    n_heat = settings["heat_examples"]
    chosen = (np.arange(len(test_texts)) if n_heat is None or n_heat >= len(test_texts)
              else np.sort(rng.choice(len(test_texts), n_heat, replace=False)))
    texts = [test_texts[int(i)] for i in chosen]
    start = time.perf_counter()
    pred_run = filter_conductance(model, texts, progress=progress)
    score_run = filter_conductance(model, texts, target=sentiment_score, progress=progress)
    heat_seconds = time.perf_counter() - start
    stat = sign_statistic(pred_run["values"])
    stat_score = sign_statistic(score_run["values"])
    w = model.network.fc.weight.detach().numpy()
    w_diff = w[1] - w[0]
    # For a fixed linear target the sign is the weight's sign times that of h(x) - h(x'), and
    # h(x) >= h(x') by construction (see .network): check it instead of assuming it.
    nz = np.abs(score_run["values"]) >= THRESHOLD
    agree = float((np.sign(score_run["values"])[nz] == np.sign(np.broadcast_to(w_diff, nz.shape))[nz]).mean()
                  ) if nz.any() else float("nan")
    opposite_weights = int((np.sign(w[0]) != np.sign(w[1])).sum())
    nz_pred = np.abs(pred_run["values"]) >= THRESHOLD
    w_pred = w[pred_run["predicted"]]  # (n, filters): each review's predicted-class weights
    agree_pred = float((np.sign(pred_run["values"])[nz_pred] == np.sign(w_pred)[nz_pred]).mean()
                       ) if nz_pred.any() else float("nan")
    rows_shown = min(len(texts), settings["heat_rows"])
    sub = rng.choice(len(texts), rows_shown, replace=False) if rows_shown < len(texts) else np.arange(len(texts))
    return {"texts": texts, "pred_run": pred_run, "score_run": score_run, "seconds": heat_seconds, "stat": stat,
            "stat_score": stat_score, "w_diff": w_diff, "agree": agree, "agree_pred": agree_pred,
            "opposite_weights": opposite_weights, "rows_shown": rows_shown, "sub": sub}


def negation_study(model: SentimentCNN, signs: dict[str, Any], test_texts: Sequence[str], test_labels: np.ndarray,
                   settings: dict, n_filters: int) -> dict[str, Any]:
    """The negation sentences' top filters, their per-token conductance, the filters conducting most through
    'not', and how often the filters' favourite test reviews contain a negation word.

    Parameters
    ----------
    model : SentimentCNN
    signs : dict
        :func:`sign_conductance`'s result (its reviews and their conductance for the predicted logit).
    test_texts : sequence of str
    test_labels : np.ndarray
        Shape (len(test_texts),), 0 rotten, 1 fresh.
    settings : dict
        ``top_filters`` and ``top_reviews``.
    n_filters : int

    Returns
    -------
    dict
        Every number the negation and completeness sections show.
    """
    texts = signs["texts"]
    k = settings["top_filters"]
    n_top = settings["top_reviews"]
    sentences = list(NEGATION_SENTENCES) + list(CONTROL_SENTENCES)
    sent_run = filter_conductance(model, sentences, progress=False)
    ngrams_test = filter_ngrams(model, texts)
    values = signs["pred_run"]["values"]
    base_rate = negation_share(texts)
    base_rate_all = negation_share(test_texts)

    def filter_profile(unit: int) -> dict:
        top = _top_reviews(values, unit, n_top)
        grams = [ngrams_test[i][unit] for i in top]
        distinct = list(dict.fromkeys(g for g in grams if g))  # in rank order
        return {"top": top, "share": negation_share([texts[i] for i in top]),
                "gram_share": float(np.mean([has_negation(g) for g in grams])) if len(grams) else float("nan"),
                "grams": distinct[:3]}

    profiles = {u: filter_profile(u) for u in range(n_filters)}
    all_shares = np.array([p["share"] for p in profiles.values()], dtype=float)
    all_gram_shares = np.array([p["gram_share"] for p in profiles.values()], dtype=float)

    sentence_numbers: dict[str, dict[str, Any]] = {}
    chosen_filters: list[int] = []
    for i, s in enumerate(sentences):
        logits = sent_run["logits"][i]
        pred = int(sent_run["predicted"][i])
        top = np.argsort(-sent_run["values"][i], kind="stable")[:k]
        sentence_numbers[s] = {"predicted": ("rotten", "fresh")[pred], "logits": logits,
                               "output_diff": sent_run["output_diff"][i], "top_filters": top,
                               "top_values": sent_run["values"][i][top],
                               "relative_error": sent_run["relative_error"][i]}
        if s in NEGATION_SENTENCES:
            chosen_filters += [int(u) for u in top if int(u) not in chosen_filters]

    # per-token conductance of the chosen filters on the two sentences
    token_errors, token_unit_errors = [], []
    for i, s in enumerate(NEGATION_SENTENCES):
        top_units = [int(u) for u in sentence_numbers[s]["top_filters"]]
        scores, tokens, unit_err = token_conductance(model, [s], top_units)
        token_unit_errors.append(unit_err[:, 0])
        per_token = scores[:, 0, :len(tokens[0])]
        layer_vals = sent_run["values"][i][top_units]
        token_errors.append(np.abs(scores[:, 0].sum(-1) - layer_vals))
        sentence_numbers[s]["per_token"] = per_token
        sentence_numbers[s]["tokens"] = tokens[0]

    # the filters whose conductance flows most through the negation token itself
    not_filters: list[int] = []
    through_not_numbers: dict[str, dict[str, Any]] = {}
    through_all: dict[str, np.ndarray] = {}
    for s in NEGATION_SENTENCES:
        scores, tokens, _ = token_conductance(model, [s], list(range(n_filters)))
        through = scores[:, 0, tokens[0].index("not")]
        order = np.argsort(-np.abs(through), kind="stable")[:k]
        through_all[s] = through
        through_not_numbers[s] = {"filters": order, "through_not": through[order],
                                  "share_of_output_diff": float(through.sum() / sentence_numbers[s]["output_diff"])}
        for u in order:
            u = int(u)
            not_filters += [u] if u not in not_filters else []

    neg_mask = np.array([has_negation(t) for t in test_texts])
    correct = model.predict(list(test_texts)).argmax(1).numpy() == test_labels
    return {"sentences": sentences, "sent_run": sent_run, "ngrams": ngrams_test, "profiles": profiles,
            "all_shares": all_shares, "all_gram_shares": all_gram_shares, "base_rate": base_rate,
            "base_rate_all": base_rate_all, "sentence_numbers": sentence_numbers, "chosen_filters": chosen_filters,
            "token_err": np.concatenate(token_errors), "token_unit_err": np.concatenate(token_unit_errors),
            "not_filters": not_filters, "through_not": through_not_numbers, "through_all": through_all,
            "neg_mask": neg_mask, "acc_neg": float(correct[neg_mask].mean()),
            "acc_plain": float(correct[~neg_mask].mean())}
