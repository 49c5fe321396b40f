"""Conductance of attention heads, FFN neurons, tokens and layers of Hugging Face transformers.

Token ids cannot be interpolated, so the path runs in the space of the **word embeddings**:
:func:`layer_conductance` wraps the model in a small module whose input is the word-embedding
tensor ``(batch, tokens, hidden)``; a forward hook on the model's word-embedding module replaces
that module's output with the interpolated embeddings, and the model is otherwise called exactly
as the user would call it (``model(input_ids, **forward_kwargs)``, attention masks and other
arguments passed through unchanged). Position and token-type embeddings are added by the model
after the hook, so they stay fixed along the path: only the word embeddings move from the
baseline to the input.

Units are views of a layer's value ``(batch, tokens, hidden)``, computed after integration (every
unit below is a sum of element-level conductances, and conductance is additive, so reducing after
integrating is exact):

=============  ==============================  =================================================
unit           shape                           meaning
=============  ==============================  =================================================
"neuron"       (batch, hidden)                 each hidden unit summed over tokens (FFN neurons)
"head"         (batch, heads)                  hidden split into ``heads`` contiguous slices
"head_token"   (batch, tokens, heads)          each head at each position
"token"        (batch, tokens)                 each position summed over hidden (residual stream)
"layer"        (batch, 1)                      the whole layer
"element"      (batch, tokens, hidden)         no reduction
=============  ==============================  =================================================

A layer is named as in :func:`conductance.layer_conductance` (dotted module name, ``"name[0]"`` for
an element of a tuple output); ``"name:input"`` observes the module's first positional input
instead of its output, e.g. ``"encoder.layer.3.attention.output.dense:input"``, the concatenated
per-head context vectors that BERT's attention output projection receives.

:func:`layers` lists the blocks, heads and MLP neurons of GPT-2, Llama-style (Llama, Mistral,
Qwen2), BERT, RoBERTa and DistilBERT models, found from their modules (:func:`family`);
:func:`next_token` and :func:`continuation` are the language-model targets; :func:`ablate_heads`
and :func:`ablate_neurons` switch units off.

The package holds one concept per module: :mod:`.families` (finding the layers of a model),
:mod:`.path` (the embedding path and baselines), :mod:`.result` (:class:`TransformerResult`),
:mod:`.targets` (language-model targets), :mod:`.ablation` (head and neuron ablation) and
:mod:`.api` (:func:`layer_importance`, :func:`layer_conductance`).
"""

from ..layers import INPUT_SUFFIX
from .ablation import ablate_heads, ablate_neurons, head_inputs
from .api import layer_conductance, layer_importance
from .families import (
                       ATTENTION_PROJECTIONS,
                       HEAD_PROJECTION,
                       KINDS,
                       MLP_PROJECTIONS,
                       Family,
                       LayersArg,
                       bert_layers,
                       embedding_module,
                       family,
                       layer_index,
                       layers,
                       num_heads_of,
)
from .result import UNITS, TransformerResult, UnitScore, reduce_layer
from .targets import TOKEN_SCORES, Continuation, NextToken, continuation, next_token

__all__ = ["layer_conductance", "layer_importance", "TransformerResult", "UnitScore", "bert_layers", "layer_index",
           "reduce_layer", "ablate_heads", "head_inputs", "embedding_module", "num_heads_of", "UNITS",
           "INPUT_SUFFIX", "layers", "family", "Family", "KINDS", "ablate_neurons", "next_token", "continuation",
           "NextToken", "Continuation", "TOKEN_SCORES", "ATTENTION_PROJECTIONS", "HEAD_PROJECTION", "MLP_PROJECTIONS",
           "LayersArg"]
