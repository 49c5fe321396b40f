"""Which MLP neurons and heads of a small trained GPT-2 carry a next-token prediction (Knowledge-Neurons protocol).

A GPT-2-architecture language model (transformers' ``GPT2LMHeadModel`` from a ``GPT2Config``) is
trained here on the Rotten Tomatoes review snippets with a word-level vocabulary built from the
training split, and cached in ``$CONDUCTANCE_CACHE``. For held-out prompts whose next word the
model predicts correctly (top-1), the units pushing the probability of that word up are ranked by

- conductance at our default accuracy (adaptive rule, tolerance 0.02), all layers in one path;
- gradient x activation;
- the 20-step integrated gradients of Knowledge Neurons (Dai et al. 2022): one layer at a time,
  the layer's MLP activations at the predicting position scaled from 0 to their value, right
  Riemann sum of the gradient of the target probability (see :func:`kn_integrated_gradients`);
- random units (seeded draws);

then the top-k units are suppressed (zeroed) or amplified (doubled) and the relative change of the
target probability is measured, as Dai et al. do. A last section compares the per-unit error and
the cost of conductance at the default accuracy with those of the 20-step rule, both measured
against converged references (512-point Gauss-Legendre) of their own integrals.

The package: :mod:`.config` (settings), :mod:`.model` (the language model, its training and cache),
:mod:`.compute` (the measurements), :mod:`.sections` (the report sections made from them);
:func:`run` only orders them.
"""

from __future__ import annotations

import time
from typing import Optional

from ..report import Report
from .compute import (
    attribute_prompt,
    intervene,
    interventions,
    kn_integrated_gradients,
    mlp_inputs,
    perplexities,
    select_prompts,
    target_prob,
    top_units,
    unit_errors,
)
from .config import BOS, CACHE_VERSION, KN_STEPS, PAD, REFERENCE_POINTS, SETTINGS, SPECIALS, UNK
from .model import LMConfig, Vocabulary, build_model, cache_path, load_or_train, tokenize, train, training_texts
from .sections import accuracy_section, interventions_section, model_section

__all__ = ["CACHE_VERSION", "SPECIALS", "PAD", "UNK", "BOS", "KN_STEPS", "REFERENCE_POINTS", "SETTINGS", "tokenize",
           "Vocabulary", "LMConfig", "build_model", "train", "training_texts", "cache_path", "load_or_train",
           "perplexities", "select_prompts", "target_prob", "kn_integrated_gradients", "attribute_prompt",
           "top_units", "mlp_inputs", "intervene", "interventions", "unit_errors", "run"]


def run(report: Report, *, quick: bool, weights: Optional[str] = None, seed: int = 0,
        settings: Optional[dict] = None, progress: Optional[bool] = None) -> None:
    """Add the knowledge-neurons sections to ``report`` (``weights`` is unused: the LM is trained here).

    ``settings`` overrides entries of :data:`SETTINGS` (tests use a smaller configuration).

    Parameters
    ----------
    report : Report
    quick : bool
    weights : str, optional
    seed : int
    settings : dict, optional
    progress : bool, optional
        tqdm bars on stderr for the training batches and the prompts studied (None: when stderr is a terminal).
    """
    from ...datasets import load_rotten_tomatoes

    cfg = {**SETTINGS[bool(quick)], **(settings or {})}
    t_start = time.perf_counter()
    config = LMConfig(**cfg["model"], seed=seed)
    model, vocab, info = load_or_train(config, progress=progress)
    test_texts, _ = load_rotten_tomatoes("test")
    ppl = perplexities(model, vocab, training_texts(config), test_texts)
    model_section(report, config, info, vocab, ppl, seed)

    prompts = select_prompts(model, vocab, test_texts, cfg["n_prompts"])
    if not prompts:
        raise RuntimeError("no test snippet has a word the model predicts top-1; the model did not learn")
    change, attributions, probs = interventions(model, prompts, cfg, seed, progress=progress)
    interventions_section(report, prompts, change, attributions, probs, cfg)

    errs, costs = unit_errors(model, prompts, attributions, cfg["n_error"])
    accuracy_section(report, prompts, errs, costs, t_start=t_start)
