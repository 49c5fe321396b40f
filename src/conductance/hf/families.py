"""Finding things in a transformer: the word embeddings, heads, blocks and the model families
(:class:`Family`, :func:`layers`)."""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Union, cast

import torch
from torch import nn

from ..errors import ConductanceError
from ..layers import INPUT_SUFFIX, _suggest

#: Default name of the attention output projection of a BERT-style block (``{block}``: the block's name).
HEAD_PROJECTION = "{block}.attention.output.dense"


_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|\[|:|$)")

LayersArg = Union[str, Sequence[str], Mapping[str, str]]


# ----------------------------------------------------------------------------------------------
# finding things in a model
# ----------------------------------------------------------------------------------------------

def _module_names(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def embedding_module(model: nn.Module, embedding: Union[str, nn.Module, None] = None) -> tuple[str, nn.Module]:
    """The word-embedding module of ``model`` and its dotted name.

    Parameters
    ----------
    embedding : str, nn.Module or None
        A dotted name (``"embeddings.word_embeddings"``), the module itself, or None to use
        ``model.get_input_embeddings()`` (Hugging Face models) or the only module whose name ends
        with ``word_embeddings``.

    Returns
    -------
    name : str
        Its dotted name in ``model``.
    module : nn.Module
        Maps token ids (batch, tokens) to embeddings (batch, tokens, hidden).
    """
    modules = _module_names(model)
    by_id = {id(m): n for n, m in modules.items()}
    if embedding is None:
        getter = getattr(model, "get_input_embeddings", None)
        found = None
        if callable(getter):
            try:
                found = getter()
            except (NotImplementedError, AttributeError):
                found = None
        if found is None or id(found) not in by_id:
            candidates = [n for n in modules if n.endswith("word_embeddings")]
            if len(candidates) != 1:
                raise ConductanceError(
                    "cannot tell which module embeds the token ids (found "
                    f"{candidates or 'no module named *word_embeddings'}); pass embedding='dotted.name' of the "
                    "model's word-embedding module")
            found = modules[candidates[0]]
        embedding = found
    if isinstance(embedding, str):
        if embedding not in modules:
            raise ConductanceError(f"the model has no embedding module named {embedding!r}. "
                                   f"{_suggest(embedding, list(modules))}")
        name, module = embedding, modules[embedding]
    elif isinstance(embedding, nn.Module):
        if id(embedding) not in by_id:
            raise ConductanceError("the embedding module given is not part of the model; pass a submodule of "
                                   "the model or its dotted name")
        name, module = by_id[id(embedding)], embedding
    else:
        raise TypeError(f"embedding must be a dotted name, an nn.Module or None, got {type(embedding).__name__}")
    return name, module


def num_heads_of(model: nn.Module) -> Optional[int]:
    """``config.num_attention_heads`` (or ``n_head`` / ``num_heads``) of the model or a submodule, else None.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    int or None
        The first positive count found, modules in ``model.modules()`` order.
    """
    for module in model.modules():
        config = getattr(module, "config", None)
        for attr in ("num_attention_heads", "n_head", "num_heads"):
            value = getattr(config, attr, None) if config is not None else None
            if isinstance(value, numbers.Integral) and int(value) > 0:
                return int(value)
    return None


def _bert_blocks(model: nn.Module) -> list[str]:
    """Dotted names of the transformer blocks of a BERT-style encoder (``...encoder.layer.<i>``)."""
    modules = _module_names(model)
    lists = [n for n, m in modules.items()
             if isinstance(m, nn.ModuleList) and n.split(".")[-2:] == ["encoder", "layer"]]
    if len(lists) != 1:
        raise ConductanceError(
            "bert_layers() recognises BERT-style encoders (BERT, RoBERTa, MiniLM, ELECTRA: blocks at "
            f"'...encoder.layer.<i>'); this model has {len(lists) or 'no'} such block list. Name the layers "
            "yourself, e.g. {'transformer.h.0.attn.c_proj:input': 'head'}")
    return [f"{lists[0]}.{i}" for i in range(len(cast(nn.ModuleList, modules[lists[0]])))]


def bert_layers(model: nn.Module, *kinds: str) -> dict[str, str]:
    """Layer names and units of a BERT-style model, ready to pass as ``layers``.

    Parameters
    ----------
    kinds : any of
        ``"heads"``: the input of each block's attention output projection
        (``attention.output.dense:input``, hidden = heads x head_dim), units "head";
        ``"ffn"``: each block's intermediate (post-activation) FFN neurons, units "neuron";
        ``"layers"``: each block's output (the residual stream after the block), units "layer";
        ``"tokens"``: the same block outputs, units "token";
        ``"embeddings"``: the embedding layer's output (word + position + type, normalised), units
        "token". Default: ``("heads", "ffn", "layers")``.

    Returns
    -------
    dict name -> unit, in block order.
    """
    kinds = kinds or ("heads", "ffn", "layers")
    blocks = _bert_blocks(model)
    modules = _module_names(model)
    templates = {"heads": ("{b}.attention.output.dense" + INPUT_SUFFIX, "head"),
                 "ffn": ("{b}.intermediate", "neuron"),
                 "layers": ("{b}", "layer"),
                 "tokens": ("{b}", "token")}
    out: dict[str, str] = {}
    for kind in kinds:
        if kind == "embeddings":
            prefix = blocks[0].rsplit("encoder.layer.", 1)[0]
            name = prefix + "embeddings"
            if name not in modules:
                raise ConductanceError(f"no embedding layer {name!r} in this model")
            out[name] = "token"
            continue
        if kind not in templates:
            raise ConductanceError(f"unknown kind {kind!r}; choose from {sorted(templates) + ['embeddings']}")
        template, unit = templates[kind]
        for b in blocks:
            name = template.format(b=b)
            base = name[:-len(INPUT_SUFFIX)] if name.endswith(INPUT_SUFFIX) else name
            if base not in modules:
                raise ConductanceError(f"expected a module {base!r} in this BERT-style model; name the layers "
                                       "yourself")
            if name in out and out[name] != unit:
                raise ConductanceError(f"{kind!r} and another kind both ask for layer {name!r} with different "
                                       "units; request them in two calls or read result.reduce(name, unit)")
            out[name] = unit
    return out


def layer_index(name: str) -> Optional[int]:
    """The block index in a layer name (the first all-digit component), e.g. 3 for ``encoder.layer.3.output``.

    Parameters
    ----------
    name : str
        A dotted layer name (with an optional ``:input`` or element suffix).

    Returns
    -------
    int or None
        None when no component is all digits.
    """
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------
# model families, found from the module structure
# ----------------------------------------------------------------------------------------------

#: Where a block keeps its attention output projection (its input: the heads' context vectors side by
#: side), relative to the block, in the order tried: GPT-2; Llama / Mistral / Qwen2 / OPT; BERT /
#: RoBERTa / ELECTRA / MiniLM; DistilBERT; GPT-J / GPT-Neo; Falcon / BLOOM.
ATTENTION_PROJECTIONS = ("attn.c_proj", "self_attn.o_proj", "attention.output.dense", "attention.out_lin",
                         "attn.out_proj", "self_attn.out_proj", "attn.attention.out_proj", "self_attention.dense")


#: Where a block keeps its MLP down projection (its input: the MLP neurons after the activation), in
#: the order tried: GPT-2; Llama-style; BERT-style; DistilBERT; GPT-J; OPT; Falcon / BLOOM.
MLP_PROJECTIONS = ("mlp.c_proj", "mlp.down_proj", "output.dense", "ffn.lin2", "mlp.fc_out", "fc2",
                   "mlp.dense_4h_to_h")


#: Kinds of :func:`layers`.
KINDS = ("block", "attention", "mlp", "embeddings")


@dataclass
class Family:
    """The transformer blocks of a model and where their heads and MLP neurons are, found from its modules.

    Attributes
    ----------
    model_type : str, ``config.model_type`` (or the model's class name); only shown in messages
    blocks : dotted names of the blocks, in order
    attention : dotted names of each block's attention output projection
    mlp : dotted names of each block's MLP down projection
    num_heads : query heads per block (grouped-query models share key/value heads between them;
        the projection's input holds one slice per query head)
    head_dim, num_neurons : sizes of a head's slice and of a block's MLP
    embedding : dotted name of the word-embedding module
    """

    model_type: str
    blocks: list[str]
    attention: list[str]
    mlp: list[str]
    num_heads: int
    head_dim: int
    num_neurons: int
    embedding: str


def _in_features(module: nn.Module) -> Optional[int]:
    """Input size of a projection: ``nn.Linear.in_features``, or the first weight dimension of a GPT-2 ``Conv1D``."""
    size = getattr(module, "in_features", None)
    if isinstance(size, numbers.Integral):
        return int(size)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return None


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]


def _model_type(model: nn.Module) -> str:
    for module in model.modules():
        kind = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(kind, str) and kind:
            return kind
    return type(model).__name__


def _unknown_family(model: nn.Module, why: str) -> ConductanceError:
    lists = _block_lists(model)
    hint = ""
    if lists:
        name, blocks = max(lists, key=lambda item: len(item[1]))
        inner = [n for n, m in blocks[0].named_modules()
                 if n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")]
        hint = (f" Its longest block list is {name!r} ({len(blocks)} blocks); the projections of block 0 are "
                f"{[f'{name}.0.{n}' for n in inner][:10]}.")
    return ConductanceError(
        f"cd.hf does not recognise the blocks of this {_model_type(model)} model: {why}.{hint} Name the layers by "
        "hand, e.g. layers={'<blocks>.3.<attention output projection>:input': 'head', "
        "'<blocks>.3.<MLP down projection>:input': 'neuron', '<blocks>.3': 'layer'} (the input of a projection "
        "holds the heads' context vectors side by side, or the MLP neurons), and pass num_heads= if the config "
        "has no num_attention_heads")


def family(model: nn.Module) -> Family:
    """Find the transformer blocks, their attention output and MLP down projections, and the head count.

    Recognised from the module structure (not the checkpoint's name): a list of blocks each holding
    an attention output projection at one of :data:`ATTENTION_PROJECTIONS` and an MLP down
    projection at one of :data:`MLP_PROJECTIONS`. This covers GPT-2, Llama, Mistral, Qwen2, BERT,
    RoBERTa, DistilBERT, MiniLM and models built like them, bare or wrapped in a user's module.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    Family
        Block, attention and MLP names, ``num_heads``, ``head_dim``, ``num_neurons``, the embedding.

    Raises
    ------
    ConductanceError
        For a model with no such block list (or several), naming the layers to pass by hand.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = []
    for name, blocks in _block_lists(model):
        first = dict(blocks[0].named_modules())
        attn = next((p for p in ATTENTION_PROJECTIONS if p in first), None)
        mlp = next((p for p in MLP_PROJECTIONS if p in first and p != attn), None)
        if attn is not None and mlp is not None:
            found.append((name, blocks, attn, mlp))
    if not found:
        raise _unknown_family(model, "no list of blocks with an attention output projection ("
                              f"{', '.join(ATTENTION_PROJECTIONS[:4])}, ...) and an MLP down projection ("
                              f"{', '.join(MLP_PROJECTIONS[:4])}, ...)")
    if len(found) > 1:
        raise ConductanceError(
            f"this model has {len(found)} lists of transformer blocks ({[f[0] for f in found]}, e.g. an encoder "
            "and a decoder); cd.hf.layers() lists one: name the layers by hand from the list you want")
    name, blocks, attn, mlp = found[0]
    heads = num_heads_of(model)
    if heads is None:
        raise _unknown_family(model, "its config has no num_attention_heads / n_head")
    attn_names, mlp_names, sizes, neurons = [], [], set(), set()
    for i, block in enumerate(blocks):
        inner = dict(block.named_modules())
        if attn not in inner or mlp not in inner:
            raise _unknown_family(model, f"block {i} of {name!r} lacks {attn!r} or {mlp!r}, which block 0 has")
        sizes.add(_in_features(inner[attn]))
        neurons.add(_in_features(inner[mlp]))
        attn_names.append(f"{name}.{i}.{attn}")
        mlp_names.append(f"{name}.{i}.{mlp}")
    if len(sizes) != 1 or None in sizes or len(neurons) != 1 or None in neurons:
        raise _unknown_family(model, f"the projections {attn!r} / {mlp!r} have input sizes {sorted(map(str, sizes))}"
                              f" / {sorted(map(str, neurons))} across blocks, or no readable input size")
    size, n_neurons = sizes.pop(), neurons.pop()
    assert size is not None and n_neurons is not None  # None in either set raised above
    if size % heads:
        raise _unknown_family(model, f"{heads} heads do not divide the attention projection's input size {size}")
    emb_name, _ = embedding_module(model)
    return Family(_model_type(model), [f"{name}.{i}" for i in range(len(blocks))], attn_names, mlp_names, heads,
                  size // heads, n_neurons, emb_name)


def layers(model: nn.Module, kind: Union[str, Sequence[str]] = ("block", "attention", "mlp")) -> dict[str, str]:
    """Layer names and units of a transformer, ready to pass as ``layers`` to :func:`layer_conductance`.

    Parameters
    ----------
    model : nn.Module
        GPT-2, Llama-style (Llama, Mistral, Qwen2), BERT, RoBERTa, DistilBERT or a model built like
        them, found from its modules (see :func:`family`).
    kind : str or list of str, from :data:`KINDS`
        ``"block"``: each block's output (the residual stream after it), unit "layer" (a cut:
        sums to F(x) - F(x')); ``"attention"``: the input of each block's attention output
        projection, unit "head" (``result[name]`` (batch, heads), names "L3.H5"); ``"mlp"``: the
        input of each block's MLP down projection, unit "neuron" (batch, neurons), names
        "L3.N1024"; ``"embeddings"``: the word-embedding module's output, unit "token".

    Returns
    -------
    dict name -> unit, kinds in the order given, blocks in order within each.
    """
    kinds = [kind] if isinstance(kind, str) else list(kind)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConductanceError(f"unknown kind {bad or kinds!r}; choose from {KINDS} (a string or a list of them)")
    fam = family(model)
    out: dict[str, str] = {}
    for k in kinds:
        if k == "block":
            out.update(dict.fromkeys(fam.blocks, "layer"))
        elif k == "attention":
            out.update({a + INPUT_SUFFIX: "head" for a in fam.attention})
        elif k == "mlp":
            out.update({m + INPUT_SUFFIX: "neuron" for m in fam.mlp})
        else:
            out[fam.embedding] = "token"
    return out
