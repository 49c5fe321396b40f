"""The public entry points :func:`layer_importance` and :func:`layer_conductance` for token models."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union, cast

import torch
from torch import nn

from ..errors import ConductanceError, ConductanceWarning, warn
from ..forward_args import ForwardArgs
from ..result import LayerResult
from .families import LayersArg, embedding_module, num_heads_of
from .path import (
    _MODEL,
    _baseline_embeddings,
    _check_ids,
    _check_vocabulary,
    _EmbeddingPath,
    _lean_lm_forward,
    _Plan,
    _plan_layers,
    _probes_attached,
)
from .result import TransformerResult
from .targets import _bind_target


def _renamed(exc: Exception, plan: _Plan) -> str:
    """An engine message with the wrapper's internal layer names replaced by the user's."""
    message = str(exc)
    pairs = sorted(zip(plan.engine_names, plan.user_names), key=lambda p: -len(p[0]))
    for engine_name, user_name in pairs:
        message = message.replace(f"'{engine_name}", f"'{user_name}")
    return message.replace(f"'{_MODEL}.", "'")

# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------

def layer_importance(model: nn.Module, input_ids: torch.Tensor, layers: LayersArg, *,
                     measure: Union[str, Sequence[str]] = "conductance",
                     units: Union[str, Mapping[str, str], None] = None,
                     embedding: Union[str, nn.Module, None] = None, baseline: Any = "auto",
                     pad_token_id: Optional[int] = None, forward_kwargs: Optional[dict] = None,
                     additional_forward_args: Any = None, target: Any = None, num_heads: Optional[int] = None,
                     tokens: Optional[list] = None, n_steps: Optional[int] = None, method: Optional[str] = None,
                     tolerance: Optional[float] = None, max_steps: Optional[int] = None,
                     internal_batch_size: Optional[int] = None, memory_budget: Optional[int] = None,
                     channels_last: Optional[bool] = None, progress: Optional[bool] = False
                     ) -> Union[TransformerResult, dict[str, TransformerResult]]:
    """Importance of heads, neurons, tokens or whole layers of a model that takes token ids.

    Parameters
    ----------
    model : nn.Module
        Called as ``model(input_ids, *additional_forward_args, **forward_kwargs)``; it must embed
        ``input_ids`` with its word-embedding module (not be given ``inputs_embeds``).
    input_ids : LongTensor (batch, tokens)
    layers : name, list of names, or dict name -> unit (e.g. :func:`layers`, :func:`bert_layers`)
        Module names of ``model``; ``"name[i]"`` picks a tuple element; ``"name:input"`` observes
        the module's first positional input.
    measure : str or list of str
        As :func:`conductance.layer_importance` ("conductance", "internal_influence", "activation",
        "gradient", "grad_x_activation", "layer_integrated_gradients").
    units : str or dict name -> unit, optional
        One of :data:`UNITS` for all layers, or per layer; default "neuron" (or the dict values of ``layers``).
    embedding : str, nn.Module or None
        The word-embedding module (default: ``model.get_input_embeddings()`` or the module named
        ``*word_embeddings``). Only its output is interpolated; position and token-type
        embeddings stay as the model computes them.
    baseline : "auto", "pad", "zeros", int, LongTensor of token ids (batch, tokens) or (tokens,), or embeddings
        Start of the path. "pad": the pad token's embedding at every position (``pad_token_id``
        or the model's ``config.pad_token_id``; an error when neither exists); "auto" (default):
        the pad token when one is known, else the eos token (``config.eos_token_id``: decoders
        such as GPT-2 and Llama have no pad token and pad with eos), else "zeros"; "zeros": the
        zero vector (singular for Llama-style models: see docs/transformers.md); an int: that token at
        every position (e.g. the tokenizer's mask or unk id); token ids are embedded by the model's
        embedding module (e.g. keep [CLS]/[SEP] and pad the rest); a float tensor broadcastable to (batch, tokens,
        hidden) is used as is. ``result.baseline`` says which was used.
    forward_kwargs : dict, optional
        Passed to the model unchanged at every path point (tensors whose first dimension is the
        batch size, such as ``attention_mask``, follow their example).
    target : as :func:`conductance.layer_conductance`, or a language-model target
        None: each example's top class of a (batch, classes) output; int / LongTensor (batch,);
        one index tuple per example into the output without the batch dimension, e.g.
        ``[(position, token), ...]`` for (batch, tokens, vocab); :func:`next_token` (or "logit",
        "logprob", "prob"); :func:`continuation`; a callable ``target(output)`` or
        ``target(output, examples)`` (examples: LongTensor (rows,), each row's example index)
        returning (rows,). ``result.target`` describes the named targets.
    num_heads : int, optional
        Heads for "head" units (default ``config.num_attention_heads``).
    tokens : optional list (batch) of lists of token strings, only used for unit names.
    n_steps, method, tolerance, max_steps, internal_batch_size, memory_budget, channels_last
        The path settings of :func:`conductance.layer_conductance` (default: adaptive to the default
        per-unit tolerance, 2%).
    progress : bool, optional
        A bar on stderr counting path points (tqdm); False (default) for none, None for a bar when
        stderr is a terminal (off by default, as for :func:`conductance.layer_conductance`).

    Returns
    -------
    TransformerResult for one measure, or dict measure -> TransformerResult.

    The model's hooks (the embedding replacement and the ``:input`` probes) are removed when the
    call returns or raises.
    """
    from ..attribute import DEFAULT_MAX_STEPS
    from ..attribute import layer_importance as _layer_importance
    from ..inputs import check_autograd_available

    input_ids = _check_ids(input_ids)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_autograd_available()
    emb_name, emb_module = embedding_module(model, embedding)
    plan = _plan_layers(model, layers, units)
    heads = num_heads if num_heads is not None else num_heads_of(model)
    if num_heads is not None and (not isinstance(num_heads, numbers.Integral) or num_heads < 1):
        raise ConductanceError(f"num_heads must be a positive integer, got {num_heads!r}")
    _check_vocabulary(input_ids, emb_module, emb_name, "input_ids")
    with torch.no_grad():
        embeds = emb_module(input_ids)
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or not embeds.is_floating_point():
        got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise ConductanceError(f"the embedding module {emb_name!r} maps input_ids to {got}; expected float "
                               "embeddings (batch, tokens, hidden): pass embedding= the word-embedding module")
    embeds = embeds.detach()
    base, baseline_used = _baseline_embeddings(emb_module, input_ids, embeds, baseline, model, pad_token_id)
    # checked here, before the target's own forward; the engine warns about doubtful per-example ones
    fargs = ForwardArgs.make(additional_forward_args, forward_kwargs, input_ids.shape[0], warn_ambiguous=False)
    target, target_used = _bind_target(target, model, input_ids, fargs)
    wrapper = _EmbeddingPath(model, emb_module, emb_name)
    # only the wrapper's own flag (the training-mode warning reads it): train() would set every
    # submodule of the user's model to the model's mode
    wrapper.training = model.training
    engine_target, engine_kwargs = _lean_lm_forward(model, wrapper, target, input_ids, fargs.kwargs)
    names = [measure] if isinstance(measure, str) else list(measure)
    with _probes_attached(wrapper, plan), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            results = _layer_importance(wrapper, embeds, plan.engine_names, measure=names, baselines=base,
                                        target=engine_target, additional_forward_args=(input_ids,) + fargs.args,
                                        forward_kwargs=engine_kwargs, n_steps=n_steps, method=method,
                                        tolerance=tolerance, max_steps=max_steps or DEFAULT_MAX_STEPS,
                                        units="neuron", internal_batch_size=internal_batch_size,
                                        memory_budget=memory_budget, channels_last=channels_last,
                                        progress=progress)
            results = cast(dict[str, LayerResult], results)  # a list of measures gives a dict of results
        except ConductanceError as exc:
            # say the layers as the user wrote them, not as the wrapper names them
            raise ConductanceError(_renamed(exc, plan)) from exc
    if wrapper.reported_target is not None:
        for r in results.values():
            if isinstance(r.target, torch.Tensor):
                r.target = wrapper.reported_target   # the positions in the sequence, not in the kept logits
    reported = getattr(target, "reported_pairs", None)
    if reported is not None:   # next_token("logit") of the top tokens: the (position, token) pairs chosen
        for r in results.values():
            r.target = reported()
    # the engine names layers inside the wrapper; say them as the user wrote them
    pairs = sorted(zip(plan.engine_names, plan.user_names), key=lambda p: -len(p[0]))
    for w in caught:
        message = str(w.message)
        if issubclass(w.category, ConductanceWarning):
            for engine_name, user_name in pairs:
                message = message.replace(engine_name, user_name)
            warn(message)
        else:
            warnings.warn_explicit(message, w.category, w.filename, w.lineno)
    mask = fargs.at()[1].get("attention_mask")
    out = {}
    for m in names:
        r = results[m]
        rename = dict(zip(plan.engine_names, plan.user_names))
        out[m] = TransformerResult(
            measure=m, layers=list(plan.user_names), units=dict(plan.units),
            elements={rename[k]: v for k, v in r.attributions.items()},
            delta={rename[k]: v for k, v in r.delta.items()},
            relative_error={rename[k]: v for k, v in r.relative_error.items()},
            is_cut={rename[k]: v for k, v in r.is_cut.items()}, output_diff=r.output_diff,
            num_heads=heads, raw=r, tokens=tokens,
            attention_mask=mask if isinstance(mask, torch.Tensor) else None, input_ids=input_ids,
            baseline=baseline_used, target=target_used,
            coarse={rename[k]: v for k, v in r.extra.get("coarse", {}).items()})
        out[m].bind(model)     # result[model.module] as well as result["name"]
        for layer, unit in plan.units.items():
            if unit in ("head", "head_token", "neuron", "token"):
                out[m][layer]  # validate the unit against the layer's shape now, not at first use
    return out[names[0]] if isinstance(measure, str) else out


def layer_conductance(model: nn.Module, input_ids: torch.Tensor, layers: LayersArg, **kwargs: Any
                      ) -> TransformerResult:
    """Conductance of heads, neurons, tokens or layers of a model taking token ids.

    Shorthand for :func:`layer_importance` with ``measure="conductance"``.

    Parameters
    ----------
    model : nn.Module
        Takes token ids (batch, tokens) as its first argument.
    input_ids : LongTensor, shape (batch, tokens)
    layers : str, list of str or dict str -> unit
        As in :func:`layer_importance`.
    **kwargs
        Every other keyword of :func:`layer_importance` but ``measure``.

    Returns
    -------
    TransformerResult
        ``result[layer]`` by the layer's unit: e.g. (batch, heads) for ``"head"``.

    Example::

        result = cd.hf.layer_conductance(model, enc["input_ids"], cd.hf.bert_layers(model),
                                         forward_kwargs={"attention_mask": enc["attention_mask"]},
                                         target=labels, n_steps=32)
        result.top(5, unit="head")        # [UnitScore(layer=..., name='L3.H5', value=...), ...]
    """
    if "measure" in kwargs:
        raise TypeError("layer_conductance computes conductance; use cd.hf.layer_importance(measure=...)")
    # one measure (a string) gives one result
    return cast(TransformerResult, layer_importance(model, input_ids, layers, measure="conductance", **kwargs))
