"""Conductance of attention heads and FFN neurons of a real transformer (all-MiniLM-L6-v2).

The attributed model is MiniLM (frozen, pretrained) + attention-masked mean pooling + a linear
sentiment head trained here on Rotten Tomatoes snippets, as one ``nn.Module`` taking
``input_ids`` and ``attention_mask``. Its two logits are ``(-s/2, +s/2)`` for the head's score
``s``, so the logit of either class is half the decision margin toward that class, and
explaining the true class explains the margin of the right decision.

Sections: the head's accuracy; top heads and FFN neurons toward positive and toward negative
reviews (conductance toward each example's true class, averaged per class); completeness per
layer; per-token conductance of the top neurons; accuracy after ablating the top heads ranked by
conductance, by the other measures, and at random.

The package: :mod:`.config` (settings), :mod:`.model` (the attributed model and its cache),
:mod:`.compute` (the measurements), :mod:`.sections` (the report sections made from them);
:func:`run` only orders them.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from ..report import Report
from .compute import attribute, head_ablation, rank_heads, split_test, token_rows, top_by_class
from .config import ABLATION_MODES, MAX_LENGTH, MINILM_PACKAGE, RANK_MEASURES, SETTINGS
from .model import Evaluator, SentimentModel, accuracy, encode, load_minilm, minilm_path, sentiment_model, train_head
from .sections import ablation_section, completeness_section, model_section, tokens_section, top_section

__all__ = ["MINILM_PACKAGE", "MAX_LENGTH", "RANK_MEASURES", "ABLATION_MODES", "SETTINGS", "minilm_path",
           "load_minilm", "SentimentModel", "encode", "train_head", "sentiment_model", "Evaluator", "accuracy",
           "attribute", "rank_heads", "split_test", "top_by_class", "token_rows", "head_ablation", "run"]


def run(report: Report, *, quick: bool, weights: Optional[str] = None, seed: int = 0,
        progress: Optional[bool] = None) -> None:
    """Add the transformer sections to ``report`` (``weights`` is unused: MiniLM ships in a package).

    Parameters
    ----------
    report : Report
    quick : bool
    weights : str, optional
    seed : int
    progress : bool, optional
        tqdm bars on stderr for the snippets encoded and attributed and the ablation runs (None: when
        stderr is a terminal).
    """
    from ...datasets import load_rotten_tomatoes

    cfg = SETTINGS[bool(quick)]
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    model, tokenizer, info = sentiment_model(cfg["n_train"], seed, progress=progress)
    test_texts, test_labels = load_rotten_tomatoes("test")
    attr_idx, eval_idx = split_test(test_labels, cfg["n_attr"], cfg["n_eval"], seed)
    attr_texts = [test_texts[i] for i in attr_idx]
    attr_labels = test_labels[attr_idx]
    eval_texts = [test_texts[i] for i in eval_idx]
    eval_labels = test_labels[eval_idx]

    acc_eval = accuracy(model, tokenizer, eval_texts, eval_labels)
    model_section(report, info, cfg, acc_eval=acc_eval, n_eval=len(eval_texts), n_attr=len(attr_texts))

    t0 = time.perf_counter()
    att = attribute(model, tokenizer, attr_texts, attr_labels, n_steps=cfg["n_steps"], batch=cfg["attr_batch"],
                    progress=progress)
    attr_seconds = time.perf_counter() - t0
    cond = att["measures"]["conductance"]
    tops = top_by_class(cond, attr_labels)
    top_section(report, cond, tops, attr_labels, n_attr=len(attr_texts), seconds=attr_seconds)
    completeness_section(report, att, cfg)
    tokens_section(report, token_rows(att, tops, attr_texts, attr_labels, cfg["token_examples"]))

    t0 = time.perf_counter()
    table, numbers, names = head_ablation(model, tokenizer, att, attr_labels, eval_texts, eval_labels, cfg, seed,
                                          progress=progress)
    ablation_section(report, table, numbers, names, cfg, n_eval=len(eval_texts), t0=t0, t_start=t_start)
