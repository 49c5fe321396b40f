"""Settings of the knowledge-neurons study: special tokens, the quick and full sizes, the integration points."""

from __future__ import annotations

#: Version of the vocabulary, model code and training recipe; part of every cache key.
CACHE_VERSION = "kn-gpt2-1"


SPECIALS = ("[PAD]", "[UNK]", "[BOS]")


PAD, UNK, BOS = 0, 1, 2


KN_STEPS = 20


REFERENCE_POINTS = 512


SETTINGS = {
    # quick: about half a minute on one idle core from an empty cache
    True: dict(model=dict(n_layer=2, n_embd=64, n_head=4, n_inner=256, n_positions=32, vocab_size=1500,
                          n_train=4000, epochs=2, batch=32, lr=3e-3),
               n_prompts=8, ks=(1, 5, 10), head_ks=(1, 2), random_draws=3, n_error=2),
    False: dict(model=dict(n_layer=4, n_embd=128, n_head=4, n_inner=512, n_positions=48, vocab_size=3000,
                           n_train=0, epochs=3, batch=32, lr=2e-3),
                n_prompts=40, ks=(1, 5, 10, 20), head_ks=(1, 2, 4), random_draws=5, n_error=6),
}


#: Neuron rankings, head rankings and interventions of the study.
RANKS = ("conductance", "grad_x_activation", "kn_ig", "random")
HEAD_RANKS = ("conductance", "grad_x_activation", "random")
ACTIONS = ("suppress", "baseline", "amplify")
