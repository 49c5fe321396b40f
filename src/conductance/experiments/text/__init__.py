"""Text experiments of "How Important Is a Neuron?" on a Kim-style sentiment CNN.

The network (:mod:`.network`, tokens :mod:`.tokens`: 256 filters of widths 2-5 over 50-d GloVe
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
(``conductance reproduce text --out DIR``). The package: :mod:`.config` (settings), :mod:`.compute` (the
measurements), :mod:`.sections` (the report sections made from them); :func:`run` only orders them. The
public names of the former modules ``text`` and ``textcnn`` stay importable from here.
"""

from __future__ import annotations

from typing import Optional

import torch

from .compute import (
    filter_conductance,
    filter_ngrams,
    negation_share,
    negation_study,
    sentiment_score,
    sign_conductance,
    sign_statistic,
    token_conductance,
)
from .config import CONTROL_SENTENCES, FULL, NEGATION_SENTENCES, PAPER, PURITY, QUICK, THRESHOLD, TOKEN_STEPS  # noqa: F401
from .network import SentimentCNN, TextCNN, TrainConfig, accuracy, load_or_train  # noqa: F401
from .sections import completeness_section, model_section, negation_section, settings_section, signs_section
from .tokens import NEGATION_WORDS, Vocabulary, has_negation, negation_tokens, tokenize  # noqa: F401

__all__ = ["sign_statistic", "filter_conductance", "token_conductance", "filter_ngrams", "negation_share",
           "sentiment_score", "run", "NEGATION_SENTENCES", "QUICK", "FULL"]


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
    from ...datasets import load_rotten_tomatoes

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
    model_section(report, config, info, seed=seed, acc=acc, majority=majority, n_test=len(test_texts))

    sg = sign_conductance(model, test_texts, settings, seed, progress=progress)
    signs_section(report, sg, config)
    ng = negation_study(model, sg, test_texts, test_labels, settings, config.n_filters)
    negation_section(report, ng, sg, config, settings)
    completeness_section(report, sg, ng)
    settings_section(report, config, settings, quick=quick, seed=seed, log_lines=log_lines,
                     n_train=len(train_texts), n_test=len(test_texts), n_heat=len(sg["texts"]))
