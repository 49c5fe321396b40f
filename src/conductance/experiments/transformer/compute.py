"""The transformer study's measurements: conductance and the other measures of every head and FFN neuron,
the head rankings, the per-class top units and the head-ablation accuracies.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional, cast

import numpy as np
import torch

from ... import hf
from ...errors import ConductanceWarning
from ...progress import Progress
from .config import ABLATION_MODES, MAX_LENGTH, RANK_MEASURES
from .model import Evaluator, SentimentModel


def attribute(model: SentimentModel, tokenizer: Any, texts: Sequence[str], labels: np.ndarray, *, n_steps: int,
              batch: int, measures: Sequence[str] = RANK_MEASURES, progress: Optional[bool] = None
              ) -> dict[str, Any]:
    """Heads, FFN neurons and block outputs of every snippet toward its true class.

    Returns per measure: ``heads`` (n, blocks, heads), ``neurons`` (n, blocks, ffn), and for
    conductance also per-block completeness errors and per-example TransformerResults for the
    per-token views.

    Parameters
    ----------
    model : SentimentModel
    tokenizer : a Hugging Face tokenizer
    texts : sequence of str
        ``n`` snippets.
    labels : ndarray, shape (n,)
    n_steps : int
    batch : int
        Snippets per call.
    measures : sequence of str
    progress : bool, optional
        A bar counting the snippets attributed on stderr (None: when stderr is a terminal).

    Returns
    -------
    dict str -> Any
    """
    layers = hf.bert_layers(model, "heads", "ffn", "layers", "embeddings")
    head_layers = [n for n, u in layers.items() if u == "head"]
    ffn_layers = [n for n, u in layers.items() if u == "neuron"]
    cut_layers = [n for n, u in layers.items() if u in ("layer", "token")]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    n = len(texts)
    out: dict[str, Any] = {m: {"heads": None, "neurons": None} for m in measures}
    rel_err = {name: np.zeros(n) for name in cut_layers}
    delta = {name: np.zeros(n) for name in cut_layers}
    output_diff = np.zeros(n)
    per_example: dict[int, tuple] = {}
    unit_errors: dict[str, np.ndarray] = {}
    caught: list[str] = []
    bar = Progress(progress, n, f"{'+'.join(measures)} of MiniLM", "snippets")
    for s in range(0, n, batch):
        idx = order[s:s + batch]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt")
        # the fixed rule's accuracy warnings are kept for the report, which tabulates the errors
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always", ConductanceWarning)
            # a list of measures: one TransformerResult per measure
            results = cast(dict[str, hf.TransformerResult], hf.layer_importance(
                model, enc["input_ids"], layers, measure=list(measures),
                forward_kwargs={"attention_mask": enc["attention_mask"]}, target=torch.as_tensor(labels[idx]),
                n_steps=n_steps, baseline="pad",
                tokens=[tokenizer.convert_ids_to_tokens(row) for row in enc["input_ids"]]))
        caught += [f"snippets {idx}: {w.message}" for w in records if issubclass(w.category, ConductanceWarning)]
        for m, r in results.items():
            h = torch.stack([r[name] for name in head_layers], 1).double().numpy()
            f = torch.stack([r[name] for name in ffn_layers], 1).double().numpy()
            if out[m]["heads"] is None:
                out[m]["heads"] = np.zeros((n,) + h.shape[1:])
                out[m]["neurons"] = np.zeros((n,) + f.shape[1:])
            out[m]["heads"][idx] = h
            out[m]["neurons"][idx] = f
        cond = results["conductance"]
        unit_err = cond.unit_error
        for name in list(head_layers) + list(ffn_layers) + list(cut_layers):
            unit_errors.setdefault(name, np.zeros(n))[idx] = unit_err[name].double().numpy()
        for name in cut_layers:
            rel_err[name][idx] = cond.relative_error[name].double().numpy()
            delta[name][idx] = cond.delta[name].double().numpy()
        output_diff[idx] = cond.output_diff.double().numpy()
        for j, i in enumerate(idx):
            per_example[i] = (cond, j, int(enc["attention_mask"][j].sum()))
        bar.update(len(idx))
    bar.close()
    return {"measures": out, "relative_error": rel_err, "unit_error": unit_errors, "delta": delta,
            "output_diff": output_diff,
            "per_example": per_example, "head_layers": head_layers,
            "ffn_layers": ffn_layers, "cut_layers": cut_layers, "warnings": caught}


def rank_heads(values: np.ndarray, measure: str) -> list[tuple[int, int]]:
    """(block, head) pairs, most important first, from per-example values (n, blocks, heads).

    Signed mean (toward the true class) for every measure but activation, whose sign says nothing
    about the decision: it is ranked by mean magnitude.

    Parameters
    ----------
    values : ndarray, shape (n, blocks, heads)
    measure : str

    Returns
    -------
    list of (int, int)
    """
    score = np.abs(values).mean(0) if measure == "activation" else values.mean(0)
    flat = np.argsort(-score, axis=None, kind="stable")
    pairs = (np.unravel_index(i, score.shape) for i in flat)
    return [(int(block), int(head)) for block, head in pairs]


def split_test(test_labels: np.ndarray, n_attr: int, n_eval: int, seed: int) -> tuple[list[int], list[int]]:
    """A class-balanced attribution set and a disjoint evaluation set for ablation, both from the test split.

    Parameters
    ----------
    test_labels : np.ndarray
        Shape (n,), 0 negative, 1 positive.
    n_attr, n_eval : int
        Sizes of the two sets (``n_attr // 2`` of each class).
    seed : int
        The permutation is seeded with ``seed + 1``.

    Returns
    -------
    (attr_idx, eval_idx) : two lists of int
        Sorted attribution indices, and evaluation indices in permutation order.
    """
    rng = np.random.RandomState(seed + 1)
    perm = rng.permutation(len(test_labels))
    pos = [i for i in perm if test_labels[i] == 1][:n_attr // 2]
    neg = [i for i in perm if test_labels[i] == 0][:n_attr // 2]
    attr_idx = sorted(pos + neg)
    used = set(attr_idx)
    eval_idx = [int(i) for i in perm if i not in used][:n_eval]
    return attr_idx, eval_idx


def top_by_class(cond: dict[str, np.ndarray], attr_labels: np.ndarray, k: int = 10) -> dict[str, Any]:
    """The k heads and FFN neurons of largest mean conductance toward each class.

    Parameters
    ----------
    cond : dict
        ``heads`` (n, blocks, heads) and ``neurons`` (n, blocks, neurons): conductance toward the true class.
    attr_labels : np.ndarray
        Shape (n,).
    k : int

    Returns
    -------
    dict
        ``{"positive" | "negative": {"heads": [(name, mean), ...], "neurons": [...]}}``, largest first.
    """
    tops: dict[str, Any] = {}
    for label, cname in ((1, "positive"), (0, "negative")):
        sel = attr_labels == label
        hm = cond["heads"][sel].mean(0)
        nm = cond["neurons"][sel].mean(0)
        th = np.argsort(-hm, axis=None)[:k]
        tn = np.argsort(-nm, axis=None)[:k]
        head_rows = [(f"L{b} H{h}", float(hm[b, h])) for b, h in (np.unravel_index(i, hm.shape) for i in th)]
        neuron_rows = [(f"L{b} N{j}", float(nm[b, j])) for b, j in (np.unravel_index(i, nm.shape) for i in tn)]
        tops[cname] = {"heads": head_rows, "neurons": neuron_rows}
    return tops


def token_rows(att: dict[str, Any], tops: dict[str, Any], attr_texts: Sequence[str], attr_labels: np.ndarray,
               n_examples: int) -> list[tuple[int, dict[str, Any]]]:
    """Per-token conductance of each class's three top FFN neurons on its first ``n_examples`` snippets.

    Parameters
    ----------
    att : dict
        :func:`attribute`'s result.
    tops : dict
        :func:`top_by_class`'s result.
    attr_texts : sequence of str
    attr_labels : np.ndarray
        Shape (len(attr_texts),).
    n_examples : int

    Returns
    -------
    list of (int, dict)
        One per snippet: its index in ``attr_texts`` and ``class``, ``text``, ``tokens`` (length t), ``neurons``
        (3 names), ``scores`` (3, t).
    """
    rows = []
    for label, cname in ((1, "positive"), (0, "negative")):
        neurons = [r[0] for r in tops[cname]["neurons"][:3]]
        examples = [j for j in range(len(attr_texts)) if attr_labels[j] == label][:n_examples]
        for j in examples:
            res, pos_in_batch, length = att["per_example"][j]
            toks = res.tokens[pos_in_batch][:length]
            per_neuron = []
            for nm_ in neurons:
                b, k = nm_[1:].split(" N")
                layer = att["ffn_layers"][int(b)]
                per_neuron.append(res.per_token(layer, int(k))[pos_in_batch, :length].double().numpy())
            rows.append((j, {"class": cname, "text": attr_texts[j], "tokens": toks, "neurons": neurons,
                             "scores": np.stack(per_neuron)}))
    return rows


def head_ablation(model: SentimentModel, tokenizer: Any, att: dict[str, Any], attr_labels: np.ndarray,
                  eval_texts: Sequence[str], eval_labels: np.ndarray, cfg: dict[str, Any], seed: int,
                  progress: Optional[bool] = None) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Accuracy of each class's held-out snippets after ablating its top k heads, per ranking and ablation mode.

    Parameters
    ----------
    model : SentimentModel
    tokenizer : transformers tokenizer
    att : dict
        :func:`attribute`'s result (the measures ranking the heads).
    attr_labels : np.ndarray
        Shape (n_attr,).
    eval_texts : sequence of str
    eval_labels : np.ndarray
        Shape (len(eval_texts),).
    cfg : dict
        ``ks`` and ``random_draws`` of :data:`SETTINGS`.
    seed : int
        The random rankings are seeded with ``seed + 2``.
    progress : bool, optional

    Returns
    -------
    (table, numbers, names)
        ``table[mode][ranking][k]``: the accuracy averaged over the two classes; ``numbers``: the unablated
        accuracy, the per-class accuracies and the rankings; ``names``: the rankings, random last.
    """
    cond = att["measures"]["conductance"]
    n_blocks, n_heads = cond["heads"].shape[1:]
    all_heads = [(b, h) for b in range(n_blocks) for h in range(n_heads)]
    rr = np.random.RandomState(seed + 2)
    names = list(RANK_MEASURES) + ["random"]
    table: dict[str, dict[str, dict[int, float]]] = {}
    numbers: dict[str, Any] = {}
    evaluators: dict[int, Evaluator] = {}
    # one accuracy pass per class: unablated, then each ranking and each random draw at every k
    runs = len(ABLATION_MODES) * 2 * (1 + len(cfg["ks"]) * (len(RANK_MEASURES) + cfg["random_draws"]))
    bar = Progress(progress, runs, "head ablation", "accuracy runs")
    for mode in ABLATION_MODES:
        acc: dict[str, dict[int, list[float]]] = {m: {k: [] for k in cfg["ks"]} for m in names}
        base_acc = []
        for label, cname in ((1, "positive"), (0, "negative")):
            sel = attr_labels == label
            if label not in evaluators:
                evaluators[label] = Evaluator(model, tokenizer,
                                              [t for t, lab in zip(eval_texts, eval_labels) if lab == label],
                                              eval_labels[eval_labels == label])
            ev = evaluators[label]
            base_acc.append(ev.accuracy())
            bar.update(1)
            ranks = {m: rank_heads(att["measures"][m]["heads"][sel], m) for m in RANK_MEASURES}
            numbers.setdefault("rankings", {})[cname] = {m: r[:max(cfg["ks"])] for m, r in ranks.items()}
            for k in cfg["ks"]:
                for m in RANK_MEASURES:
                    acc[m][k].append(ev.accuracy(heads=ranks[m][:k], mode=mode))
                    bar.update(1)
                draws = [ev.accuracy(heads=[all_heads[i] for i in rr.choice(len(all_heads), size=k, replace=False)],
                                     mode=mode)
                         for _ in range(cfg["random_draws"])]
                acc["random"][k].append(float(np.mean(draws)))
                bar.update(cfg["random_draws"])
        # each class's accuracy on its own snippets, averaged over the two classes
        table[mode] = {m: {k: float(np.mean(v)) for k, v in per.items()} for m, per in acc.items()}
        numbers[mode] = {"unablated": float(np.mean(base_acc)), "accuracy": table[mode],
                         "per_class": {m: dict(per) for m, per in acc.items()}}
    bar.close()
    return table, numbers, names
