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
"""

from __future__ import annotations

import contextlib
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from .errors import ConductanceError, ConductanceWarning, warn
from .layers import _ELEMENT, INPUT_SUFFIX, LayerRef, _suggest
from .result import LayerResult, ResultProtocol, pandas, plain
from .sites import intervene

__all__ = ["layer_conductance", "layer_importance", "TransformerResult", "UnitScore", "bert_layers", "layer_index",
           "reduce_layer", "ablate_heads", "head_inputs", "embedding_module", "num_heads_of", "UNITS",
           "INPUT_SUFFIX", "layers", "family", "Family", "KINDS", "ablate_neurons", "next_token", "continuation",
           "NextToken", "Continuation", "TOKEN_SCORES"]

#: Unit views of a layer value (batch, tokens, hidden); see the module docstring.
UNITS = ("neuron", "head", "head_token", "token", "layer", "element")
_MODEL = "model"
#: Default name of the attention output projection of a BERT-style block (``{block}``: the block's name).
HEAD_PROJECTION = "{block}.attention.output.dense"
_PROBES = "probes"
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|\[|:|$)")

LayersArg = Union[str, Sequence[str], Mapping[str, str]]


# ----------------------------------------------------------------------------------------------
# finding things in a model
# ----------------------------------------------------------------------------------------------

def _module_names(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def embedding_module(model: nn.Module, embedding: Union[str, nn.Module, None] = None) -> tuple[str, nn.Embedding]:
    """The word-embedding module of ``model`` and its dotted name.

    Parameters
    ----------
    embedding : str, nn.Module or None
        A dotted name (``"embeddings.word_embeddings"``), the module itself, or None to use
        ``model.get_input_embeddings()`` (Hugging Face models) or the only module whose name ends
        with ``word_embeddings``.
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
    """``config.num_attention_heads`` (or ``n_head`` / ``num_heads``) of the model or a submodule, else None."""
    for module in model.modules():
        config = getattr(module, "config", None)
        for attr in ("num_attention_heads", "n_head", "num_heads"):
            value = getattr(config, attr, None) if config is not None else None
            if isinstance(value, numbers.Integral) and value > 0:
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
    return [f"{lists[0]}.{i}" for i in range(len(modules[lists[0]]))]


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
    """The block index in a layer name (the first all-digit component), e.g. 3 for ``encoder.layer.3.output``."""
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
    size = sizes.pop()
    if size % heads:
        raise _unknown_family(model, f"{heads} heads do not divide the attention projection's input size {size}")
    emb_name, _ = embedding_module(model)
    return Family(_model_type(model), [f"{name}.{i}" for i in range(len(blocks))], attn_names, mlp_names, heads,
                  size // heads, neurons.pop(), emb_name)


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
            out.update({b: "layer" for b in fam.blocks})
        elif k == "attention":
            out.update({a + INPUT_SUFFIX: "head" for a in fam.attention})
        elif k == "mlp":
            out.update({m + INPUT_SUFFIX: "neuron" for m in fam.mlp})
        else:
            out[fam.embedding] = "token"
    return out


# ----------------------------------------------------------------------------------------------
# the embedding-space path
# ----------------------------------------------------------------------------------------------

class _EmbeddingPath(nn.Module):
    """``forward(embeds, input_ids, *args, **kwargs)``: the user's model with its word embeddings replaced.

    The replacement hook is registered for one forward and removed in ``finally``; it is put in
    front of any other hook on the embedding module (``prepend=True``), so hooks that observe the
    embedding module see the replaced value.
    """

    def __init__(self, model: nn.Module, embedding: nn.Module, embedding_name: str):
        super().__init__()
        self.model = model
        self.probes = nn.ModuleDict()
        # a plain attribute: the module is already registered under self.model
        object.__setattr__(self, "_embedding", embedding)
        self._embedding_name = embedding_name

    def forward(self, embeds: torch.Tensor, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        def replace(output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor) or output.shape != embeds.shape:
                got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ConductanceError(
                    f"the embedding module {self._embedding_name!r} returned {got} but the path holds embeddings "
                    f"of shape {tuple(embeds.shape)}; pass embedding= the module mapping token ids (batch, tokens) "
                    "to vectors (batch, tokens, hidden)")
            # each layer keeps its own device: only the embeddings move, to where the model put them
            return embeds.to(device=output.device, dtype=output.dtype)

        site = LayerRef(self._embedding_name, self._embedding)
        with intervene(self.model, {site: replace}, whole=True, prepend=True) as hooked:
            output = self.model(input_ids, *args, **kwargs)
        if not hooked.calls[site.name]:
            raise ConductanceError(
                f"the model never called its embedding module {self._embedding_name!r} (were inputs_embeds passed "
                "in forward_kwargs?); pass token ids only, and embedding= the module that embeds them")
        return output


@dataclass
class _Plan:
    user_names: list[str]                 # as the user wrote them
    engine_names: list[str]               # names inside the wrapper
    units: dict[str, str]                 # user name -> unit
    probes: list[tuple[str, nn.Module]]   # (probe key, module whose input it observes)


def _plan_layers(model: nn.Module, layers: Any, units: Union[str, Mapping[str, str], None]) -> _Plan:
    if isinstance(layers, Mapping):
        spec = dict(layers)
        if units is not None and not isinstance(units, Mapping):
            spec = {k: units for k in spec}
    else:
        if isinstance(layers, (str, nn.Module)):
            layers = [layers]
        layers = list(layers)
        if not layers:
            raise ConductanceError("no layers given: pass names such as 'encoder.layer.0.intermediate' or "
                                   "cd.hf.layers(model)")
        modules_by_id = {id(m): n for n, m in model.named_modules()}
        names = []
        for item in layers:
            if isinstance(item, nn.Module):
                if id(item) not in modules_by_id:
                    raise ConductanceError(f"the module {type(item).__name__} given as a layer is not part of the "
                                           "model; pass a submodule of the model or its dotted name")
                item = modules_by_id[id(item)]
            if not isinstance(item, str):
                raise TypeError(f"a layer must be a dotted name or a module, got {type(item).__name__}")
            names.append(item)
        if isinstance(units, Mapping):
            missing = [n for n in names if n not in units]
            if missing:
                raise ConductanceError(f"units has no entry for layer(s) {missing}; give a unit for every layer")
            spec = {n: units[n] for n in names}
        else:
            spec = {n: (units or "neuron") for n in names}
    if len(spec) != len(set(spec)):
        raise ConductanceError("a layer is listed twice")
    modules = _module_names(model)
    plan = _Plan([], [], {}, [])
    for name, unit in spec.items():
        if unit not in UNITS:
            raise ConductanceError(f"unknown unit {unit!r} for layer {name!r}; choose from {UNITS}")
        if name.endswith(INPUT_SUFFIX):
            base = name[:-len(INPUT_SUFFIX)]
            if base not in modules:
                raise ConductanceError(f"the model has no module named {base!r} (in layer {name!r}). "
                                       f"{_suggest(base, list(modules))}")
            key = f"p{len(plan.probes)}"
            plan.probes.append((key, modules[base]))
            engine = f"{_PROBES}.{key}"
        else:
            match = _ELEMENT.match(name)
            base = match.group("name") if match and match.group("name") in modules else name
            if base not in modules:
                raise ConductanceError(f"the model has no layer named {name!r}. {_suggest(base, list(modules))}")
            engine = _MODEL if name == "" else f"{_MODEL}.{name}" if base else f"{_MODEL}{name}"
        plan.user_names.append(name)
        plan.engine_names.append(engine)
        plan.units[name] = unit
    return plan


@contextlib.contextmanager
def _probes_attached(wrapper: _EmbeddingPath, plan: _Plan) -> Iterator[None]:
    """Route the first positional input of each probed module through an identity probe module."""
    edits = {}
    try:
        for key, module in plan.probes:
            probe = nn.Identity()
            wrapper.probes[key] = probe

            def route(args: tuple, kwargs: dict, probe: nn.Module = probe, mod: nn.Module = module) -> tuple:
                if not args or not isinstance(args[0], torch.Tensor):
                    raise ConductanceError(f"{type(mod).__name__} receives no tensor as its first positional "
                                           "input; ':input' observes the first positional argument")
                return (probe(args[0]),) + tuple(args[1:]), kwargs

            edits[LayerRef(key, module, None, True)] = route
        if edits:
            with intervene(wrapper, edits, whole=True):
                yield
        else:
            yield
    finally:
        for key, _ in plan.probes:
            if key in wrapper.probes:
                del wrapper.probes[key]


def _check_ids(input_ids: Any) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a LongTensor (batch, tokens), got {type(input_ids).__name__}")
    if input_ids.is_floating_point():
        raise ConductanceError(
            f"input_ids has dtype {input_ids.dtype}: cd.hf functions take token ids (an integer tensor "
            "(batch, tokens)) and embed them with the model's own embedding module. If you already have "
            "embeddings, call cd.layer_conductance on a model that takes embeddings")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise ConductanceError(f"input_ids must have shape (batch, tokens) with at least one example; got "
                               f"{tuple(input_ids.shape)}")
    return input_ids


def _pad_id(model: nn.Module, pad_token_id: Optional[int]) -> tuple[Optional[int], str]:
    """The pad token id and where it came from (``pad_token_id=``, then the config), or (None, why not)."""
    if pad_token_id is not None:
        if not isinstance(pad_token_id, numbers.Integral) or isinstance(pad_token_id, bool):
            raise ConductanceError(f"pad_token_id must be an integer token id, got {pad_token_id!r}")
        return int(pad_token_id), "pad_token_id="
    for module in model.modules():
        value = getattr(getattr(module, "config", None), "pad_token_id", None)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value), "config.pad_token_id"
    return None, "the config has no pad_token_id"


def _eos_id(model: nn.Module) -> Optional[int]:
    for module in model.modules():
        value = getattr(getattr(module, "config", None), "eos_token_id", None)
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    return None


def _token_embeddings(embedding: nn.Module, input_ids: torch.Tensor, token: int, what: str) -> torch.Tensor:
    ids = torch.full_like(input_ids, token)
    _check_vocabulary(ids, embedding, "word embedding", what)
    with torch.no_grad():
        return embedding(ids).detach()


def _check_vocabulary(ids: torch.Tensor, embedding: nn.Module, name: str, what: str) -> None:
    """Token ids must index rows of the embedding table; checked before the model runs."""
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None:
        weight = getattr(embedding, "weight", None)
        rows = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
    if rows is None or ids.numel() == 0 or ids.device.type == "meta":
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= rows:
        bad = ((ids < 0) | (ids >= rows)).nonzero()[:5].tolist()
        raise ConductanceError(f"{what} hold ids outside the vocabulary: the embedding {name!r} has {rows} rows "
                               f"(valid ids 0..{rows - 1}), got ids from {low} to {high} (at [example, token] "
                               f"{bad}). Tokenize with this model's own tokenizer")


def _baseline_embeddings(embedding: nn.Module, input_ids: torch.Tensor, embeds: torch.Tensor, baseline: Any,
                         model: nn.Module, pad_token_id: Optional[int]) -> tuple[torch.Tensor, str]:
    """The baseline embeddings (batch, tokens, hidden) and a description of the choice."""
    if isinstance(baseline, str):
        if baseline == "zeros":
            return torch.zeros_like(embeds), "zeros"
        if baseline in ("pad", "auto"):
            pad, source = _pad_id(model, pad_token_id)
            if pad is not None:
                return (_token_embeddings(embedding, input_ids, pad, f"the pad token id ({source})"),
                        f"pad token {pad} ({source})")
            if baseline == "auto":
                # Decoders usually have no pad token and pad with their eos token. The zero embedding comes
                # last: in a model without position embeddings (Llama-style, rotary) it makes the first
                # RMSNorm's input zero, a near-singular start where the integrand is a spike of width
                # ~sqrt(eps) / |embedding| in alpha (measured: 1e6-fold completeness errors at 128 steps).
                eos = _eos_id(model)
                if eos is not None:
                    return (_token_embeddings(embedding, input_ids, eos, "the eos token id (baseline='auto')"),
                            f"eos token {eos} (config.eos_token_id; the config has no pad_token_id)")
                return torch.zeros_like(embeds), "zeros (the config has no pad_token_id and no eos_token_id)"
            raise ConductanceError(
                "baseline='pad' needs the pad token id, and the model's config has none (decoders such as GPT-2 "
                "and Llama usually have no pad token). Pass pad_token_id=..., a token id as the baseline "
                "(baseline=tokenizer.unk_token_id or the mask token id: that token at every position), "
                "baseline='zeros' (the zero embedding), or baseline='auto' (pad if known, else zeros)")
        raise ConductanceError(f"unknown baseline {baseline!r}; use 'auto', 'pad', 'zeros', a token id (int), token "
                               "ids (batch, tokens) or embeddings (batch, tokens, hidden)")
    if isinstance(baseline, numbers.Integral) and not isinstance(baseline, bool):
        return (_token_embeddings(embedding, input_ids, int(baseline), "the baseline token id"),
                f"token {int(baseline)} at every position")
    if isinstance(baseline, torch.Tensor):
        if not baseline.is_floating_point():
            ids = baseline.to(input_ids.device)
            if ids.dim() == 1:
                ids = ids.unsqueeze(0).expand_as(input_ids)
            if ids.shape != input_ids.shape:
                raise ConductanceError(f"baseline token ids of shape {tuple(baseline.shape)} do not match input_ids "
                                       f"{tuple(input_ids.shape)}; give one baseline id per token")
            _check_vocabulary(ids, embedding, "word embedding", "the baseline token ids")
            with torch.no_grad():
                return embedding(ids).detach(), "token ids given"
        if baseline.dim() == 2 and baseline.shape == input_ids.shape and embeds.shape[-1] != input_ids.shape[-1]:
            raise ConductanceError(
                f"the baseline has the shape of input_ids {tuple(input_ids.shape)} but holds floats: token ids "
                "must be an integer tensor; embeddings must be (batch, tokens, hidden) = "
                f"{tuple(embeds.shape)}")
        try:
            out = torch.broadcast_to(baseline.to(embeds.device, embeds.dtype), embeds.shape)
        except RuntimeError:
            raise ConductanceError(f"baseline embeddings of shape {tuple(baseline.shape)} do not broadcast to the "
                                   f"embeddings {tuple(embeds.shape)} (batch, tokens, hidden)") from None
        return out.detach().contiguous(), "embeddings given"
    raise TypeError(f"baseline must be 'auto', 'pad', 'zeros', a token id or a tensor, got {type(baseline).__name__}")


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------

class UnitScore(NamedTuple):
    """One row of :meth:`TransformerResult.table` / :meth:`TransformerResult.top`."""

    layer: str                 #: layer name as requested
    block: Optional[int]       #: transformer block index parsed from the name (None if there is none)
    unit: str                  #: unit kind ("head", "neuron", ...)
    index: Any                 #: int, or (token, head) for "head_token", (token, hidden) for "element"
    name: str                  #: readable name, e.g. "L3.H5" (head 5 of block 3), "L3.N1024" (MLP neuron)
    value: float


def reduce_layer(values: torch.Tensor, unit: str, num_heads: Optional[int], name: str = "layer") -> torch.Tensor:
    """Reduce element-level values (batch, tokens, hidden) to a unit view (see the module docstring).

    Reductions run on the tensor's own device.
    """
    if unit not in UNITS:
        raise ConductanceError(f"unknown unit {unit!r}; choose from {UNITS}")
    if unit == "layer":
        return values.flatten(1).sum(1, keepdim=True)
    if unit == "element":
        return values
    if values.dim() != 3:
        raise ConductanceError(f"layer {name!r} has values of shape {tuple(values.shape)}; unit {unit!r} needs "
                               "(batch, tokens, hidden). Use unit 'layer' or 'element', or observe another layer")
    if unit == "neuron":
        return values.sum(1)
    if unit == "token":
        return values.sum(2)
    B, T, H = values.shape
    if num_heads is None:
        raise ConductanceError(f"unit {unit!r} of layer {name!r} needs the number of heads: the model has no "
                               "config.num_attention_heads; pass num_heads=")
    if H % num_heads:
        raise ConductanceError(f"layer {name!r} has hidden size {H}, which {num_heads} heads do not divide; pass "
                               "the right num_heads or observe the heads' concatenated output "
                               "(e.g. 'attention.output.dense:input')")
    per = values.reshape(B, T, num_heads, H // num_heads).sum(3)
    return per if unit == "head_token" else per.sum(1)


@dataclass(eq=False)
class TransformerResult(ResultProtocol):
    """Per-unit values of one measure for the layers of a transformer.

    ``result[layer]`` is the layer's values in its requested unit (see :data:`UNITS`);
    ``result.elements[layer]`` keeps the element-level values (batch, tokens, hidden) so any other
    view can be read with :meth:`reduce` without another run.

    Attributes
    ----------
    measure : str
    layers : list of str, as requested
    units : dict layer -> unit
    elements : dict layer -> Tensor (batch, tokens, hidden) (or the layer's own shape)
    delta, relative_error : dict layer -> Tensor (batch,), completeness (see ``is_cut``)
    is_cut : dict layer -> bool; only cut layers (e.g. block outputs) must sum to F(x) - F(x')
    output_diff : Tensor (batch,), F(x) - F(x')
    num_heads : int or None
    tokens : optional list (batch) of lists of token strings, used in unit names
    raw : the engine's LayerResult (names inside the wrapper)
    coarse : dict layer -> Tensor, the element-level values on the coarse grid (see ``unit_error``)
    baseline : str, which baseline was used (see ``baseline=`` of :func:`layer_importance`)
    target : str, what was explained (empty for a target given as a tensor or a plain callable)
    """

    measure: str
    layers: list[str]
    units: dict[str, str]
    elements: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    relative_error: dict[str, torch.Tensor]
    is_cut: dict[str, bool]
    output_diff: torch.Tensor
    num_heads: Optional[int]
    raw: LayerResult
    tokens: Optional[list] = None
    attention_mask: Optional[torch.Tensor] = None
    input_ids: Optional[torch.Tensor] = field(default=None, repr=False)
    #: the path's start as used, e.g. "pad token 0 (config.pad_token_id)" or "zeros (no pad token known)"
    baseline: str = ""
    #: the explained scalar as used, e.g. "log-probability of the next token at positions [4, 6]"
    target: str = ""
    coarse: dict = field(default_factory=dict, repr=False)

    FORMAT: ClassVar[str] = "conductance.transformer_result/1"

    def _layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def unit_error(self) -> dict[str, torch.Tensor]:
        """Per layer, each example's estimated per-unit error in the layer's requested unit, (batch,)."""
        return {n: self.unit_error_of(n, self.units[n]) for n in self.layers}

    def unit_error_of(self, layer: str, unit: str) -> torch.Tensor:
        """The estimated per-unit error (batch,) of ``layer`` read in any unit view: the relative L2
        distance of the example's vector of unit values to the same rule on a grid with half the points
        (see :func:`conductance.engine.unit_error`)."""
        from .engine import unit_error
        coarse = reduce_layer(self.coarse[self._check(layer)], unit, self.num_heads, layer)
        scale = self.output_diff if self.measure in ("conductance", "layer_integrated_gradients") else None
        return unit_error(self.reduce(layer, unit), coarse, scale)

    def __getitem__(self, layer: Union[str, nn.Module]) -> torch.Tensor:
        """One layer's values in its requested unit, by name or by module: Tensor (batch, *unit_shape)."""
        layer = self._check(layer)
        return self.reduce(layer, self.units[layer])

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def _check(self, layer: Union[str, nn.Module]) -> str:
        name = self._name_of(layer)
        if not isinstance(name, str) or name not in self.elements:
            raise KeyError(f"no layer {layer!r} in this result; it has {self.layers}")
        return name

    def reduce(self, layer: str, unit: str) -> torch.Tensor:
        """The layer's values in any unit view, e.g. ``reduce(name, "head_token")`` (batch, tokens, heads)."""
        return reduce_layer(self.elements[self._check(layer)], unit, self.num_heads, layer)

    def per_token(self, layer: str, index: int) -> torch.Tensor:
        """Values of one neuron (unit "neuron") or head (unit "head") of ``layer`` at each token: (batch, tokens)."""
        unit = self.units[self._check(layer)]
        if unit == "neuron":
            return self.elements[layer][:, :, index]
        if unit == "head":
            return self.reduce(layer, "head_token")[:, :, index]
        raise ConductanceError(f"per_token reads a neuron or a head; layer {layer!r} has unit {unit!r} "
                               "(use reduce(layer, 'token') for positions)")

    def unit_names(self, layer: str, example: int = 0) -> list[str]:
        """Readable names of the units of ``layer`` (flattened in row-major order)."""
        unit = self.units[self._check(layer)]
        block = layer_index(layer)
        prefix = f"L{block}" if block is not None else layer
        shape = self[layer].shape[1:]
        tok = self.tokens[example] if self.tokens is not None else None

        def token(t: int) -> str:
            return f"token {t}" + (f" {tok[t]!r}" if tok is not None and t < len(tok) else "")

        if unit == "layer":
            return [prefix + " total"]
        if unit in ("neuron", "head"):
            letter = "N" if unit == "neuron" else "H"
            return [f"{prefix}.{letter}{i}" for i in range(shape[0])]
        if unit == "token":
            return [f"{prefix} {token(t)}" for t in range(shape[0])]
        if unit == "head_token":
            return [f"{prefix}.H{h} {token(t)}" for t in range(shape[0]) for h in range(shape[1])]
        return [f"{prefix} {token(t)} dim {d}" for t in range(shape[0]) for d in range(shape[1])]

    def mean(self, layer: str, examples: Any = None) -> torch.Tensor:
        """Mean over examples (all, or the chosen indices / boolean mask) of ``result[layer]``: (*unit_shape)."""
        values = self[layer]
        if examples is not None:
            values = values[torch.as_tensor(examples, device=values.device)
                            if not isinstance(examples, torch.Tensor) else examples.to(values.device)]
        if values.shape[0] == 0:
            raise ConductanceError("no examples selected")
        return values.mean(0)

    def table(self, example: Optional[int] = None, examples: Any = None,
              layers: Optional[Sequence[str]] = None) -> list[UnitScore]:
        """Every unit of every layer as a tidy list of :class:`UnitScore` rows.

        ``example``: one example's values; otherwise the mean over ``examples`` (default all).
        """
        rows: list[UnitScore] = []
        for layer in layers or self.layers:
            unit = self.units[self._check(layer)]
            values = self[layer][example] if example is not None else self.mean(layer, examples)
            shape = tuple(values.shape)
            flat = values.flatten().tolist()
            names = self.unit_names(layer, example or 0)
            for i, v in enumerate(flat):
                index: Any = i if len(shape) == 1 else \
                    tuple(int(j) for j in torch.unravel_index(torch.tensor(i), shape))
                rows.append(UnitScore(layer, layer_index(layer), unit, index, names[i], float(v)))
        return rows

    def top(self, k: int = 10, layer: Union[str, nn.Module, None] = None, *, unit: Optional[str] = None,
            layers: Optional[Sequence[Union[str, nn.Module]]] = None, example: Optional[int] = None,
            examples: Any = None, absolute: bool = False) -> list[UnitScore]:
        """The ``k`` largest units across the chosen layers (optionally only one unit kind).

        Parameters
        ----------
        k : int
            Rows returned in all (ranked across layers, not per layer).
        layer : str or nn.Module, optional
            One layer; None: every layer (or those in ``layers``).
        unit : str, optional
            Only layers whose unit is this kind ("head", "neuron", ...).
        example, examples : one example's values, or the mean over ``examples`` (default all).
        absolute : rank by magnitude instead of value.

        Returns
        -------
        list of :class:`UnitScore`, largest first.
        """
        if isinstance(layer, str) and layer in UNITS and layer not in self.elements and unit is None:
            unit, layer = layer, None          # the older top(k, unit)
        if layer is not None:
            layers = [layer]
        chosen = [n for n in (self._check(x) for x in (layers or self.layers)) if unit is None or self.units[n] == unit]
        if not chosen:
            raise ConductanceError(f"no layer with unit {unit!r}; units are {self.units}")
        rows = self.table(example=example, examples=examples, layers=chosen)
        rows.sort(key=lambda r: -abs(r.value) if absolute else -r.value)
        return rows[:k]

    def to_dataframe(self, example: Optional[int] = None) -> Any:
        """A tidy pandas table, one row per (layer, example, unit) in each layer's requested unit:
        ``layer``, ``block``, ``kind`` (the unit kind), ``example``, ``unit`` (flat index), ``name``
        (e.g. "L3.H5"), ``value`` and the example's per-unit error estimate ``unit_error`` (NaN
        without the coarse values). ``example``: only that example. Needs pandas."""
        pd = pandas()
        errors = self.unit_error if self.coarse else {}
        frames = []
        for name in self.layers:
            values = self[name].detach().cpu().flatten(1)
            batch, n = values.shape
            picked = range(batch) if example is None else [range(batch)[example]]
            for ex in picked:
                err = float(errors[name][ex]) if name in errors else float("nan")
                frames.append(pd.DataFrame({"layer": name, "block": layer_index(name), "kind": self.units[name],
                                            "example": ex, "unit": range(n), "name": self.unit_names(name, ex),
                                            "value": values[ex].double().numpy(), "unit_error": err}))
        return pd.concat(frames, ignore_index=True)

    def to_dict(self) -> dict:
        """Plain content (JSON-serialisable): settings, each layer's values in its unit, errors, tokens."""
        errors = self.unit_error if self.coarse else {}
        return plain({"measure": self.measure, "layers": self.layers, "units": self.units,
                      "values": {n: self[n] for n in self.layers}, "unit_error": errors, "delta": self.delta,
                      "relative_error": self.relative_error, "is_cut": self.is_cut, "output_diff": self.output_diff,
                      "num_heads": self.num_heads, "tokens": self.tokens, "baseline": self.baseline,
                      "target": self.target, "method": self.raw.method, "n_steps": self.raw.n_steps,
                      "n_points": self.raw.n_points})

    def plot(self, layer: Union[str, nn.Module, None] = None, example: Optional[int] = None, k: int = 10,
             ax: Any = None, **kwargs: Any) -> Any:
        """Bar chart of the ``k`` units of ``layer`` with the largest |value|, labelled with unit names.

        ``layer`` (name or module) may be omitted when the result has one layer; ``example``: one
        example's values, else the mean over all. ``kwargs`` go to :func:`conductance.plots.top_units`
        and on to ``ax.bar`` (e.g. ``color="red"``). Returns the Figure (no pyplot figure left open).
        """
        from .plots import top_units

        if layer is None:
            if len(self.layers) != 1:
                raise ConductanceError(f"this result has several layers {self.layers}; name one, "
                                       "e.g. result.plot('layer name')")
            layer = self.layers[0]
        name = self._check(layer)
        values = self[name][example] if example is not None else self.mean(name)
        which = f"example {example}" if example is not None else f"mean of {self[name].shape[0]} examples"
        title = kwargs.pop("title", None) or f"{self.measure} of {name!r} ({which}): top {k} {self.units[name]}s"
        return top_units(values, k=k, labels=self.unit_names(name, example or 0), ax=ax, title=title,
                         ylabel=self.measure, xlabel=self.units[name], **kwargs)

    def completeness(self) -> list[tuple[str, bool, float, float]]:
        """Per layer: (name, is_cut, mean and max relative completeness error over examples)."""
        return [(n, bool(self.is_cut[n]), float(self.relative_error[n].mean()), float(self.relative_error[n].max()))
                for n in self.layers]

    def summary(self) -> str:
        lines = [f"{self.measure} of {len(self.layers)} layers, {self.raw.method}"
                 + (f" n_steps={self.raw.n_steps}" if self.raw.n_steps else "")
                 + f", points per example {self.raw.n_points.tolist()}"]
        unit_errors = self.unit_error if self.coarse else {}
        for n, cut, mean, worst in self.completeness():
            lines.append(f"  {n} [{self.units[n]}] shape {tuple(self[n].shape)}"
                         + (f", max per-unit error {100 * float(unit_errors[n].max()):.2f}%" if n in unit_errors else "")
                         + (f", cut, relative completeness error max {100 * worst:.2f}%" if cut else ", not a cut"))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"TransformerResult({self.summary()})"



# ----------------------------------------------------------------------------------------------
# language-model targets
# ----------------------------------------------------------------------------------------------

#: What a :func:`next_token` target explains.
TOKEN_SCORES = ("logit", "logprob", "prob")


@dataclass(frozen=True)
class NextToken:
    """Target: the score of each example's next token at a position (see :func:`next_token`)."""

    kind: str
    position: Any
    token: Any


@dataclass(frozen=True)
class Continuation:
    """Target: the summed log-probability of each example's continuation (see :func:`continuation`)."""

    length: Any


def next_token(kind: str = "logprob", position: Union[int, torch.Tensor] = -1,
               token: Union[None, int, torch.Tensor] = None) -> NextToken:
    """A language-model target: each example's next token at a position, as logit, log-probability or probability.

    The model's output (batch, tokens, vocab) at position ``p`` scores the token after ``p``.

    Parameters
    ----------
    kind : {"logit", "logprob", "prob"}
        The explained scalar: the raw logit, ``log_softmax`` over the vocabulary, or its ``exp``.
    position : int or LongTensor (batch,)
        Counted over each example's real tokens (``attention_mask`` 1, or all tokens without a
        mask): -1 is each example's last real token, whatever the padding side; 0 its first.
    token : None, int or LongTensor (batch,)
        The token scored; None: each example's top prediction at the input.

    Pass the returned object as ``target=`` to :func:`layer_conductance`; the strings "logit",
    "logprob" and "prob" are short for ``next_token(kind)``.
    """
    if kind not in TOKEN_SCORES:
        raise ConductanceError(f"next_token kind must be one of {TOKEN_SCORES}, got {kind!r}")
    return NextToken(kind, position, token)


def continuation(length: Union[int, torch.Tensor]) -> Continuation:
    """A language-model target: the summed log-probability of a continuation, teacher-forced.

    ``input_ids`` hold prompt + continuation; the last ``length`` real tokens of each example are
    the continuation ``c_1..c_L`` and the explained scalar is ``sum_j log p(c_j | tokens before
    c_j)``, read from one forward (teacher forcing). Every token's embedding, continuation
    included, moves along the path.

    Parameters
    ----------
    length : int or LongTensor (batch,), >= 1 and below each example's number of real tokens
    """
    return Continuation(length)


def _per_example(value: Any, batch: int, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return torch.full((batch,), int(value), dtype=torch.long, device=device)
    if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool:
        t = value.to(device=device, dtype=torch.long).flatten()
        if t.numel() == 1:
            return t.expand(batch).clone()
        if t.shape == (batch,):
            return t
    raise ConductanceError(f"{name} must be an int or a LongTensor of shape ({batch},), got "
                           f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")


def _real_positions(input_ids: torch.Tensor, mask: Any) -> list[torch.Tensor]:
    if isinstance(mask, torch.Tensor) and mask.shape == input_ids.shape:
        return [row.nonzero().flatten().to(input_ids.device) for row in mask.bool()]
    return [torch.arange(input_ids.shape[1], device=input_ids.device)] * input_ids.shape[0]


def _float(t: torch.Tensor) -> torch.Tensor:
    """Scores in at least float32 (bf16 / fp16 models), float64 kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _bind_target(target: Any, model: nn.Module, input_ids: torch.Tensor, extra: tuple,
                 forward_kwargs: Optional[dict]) -> tuple[Any, str]:
    """Turn a language-model target into what the engine takes (index tuples or a callable(output, examples))."""
    if isinstance(target, str):
        if target not in TOKEN_SCORES:
            raise ConductanceError(f"unknown target {target!r}: the named targets are {TOKEN_SCORES} (the next "
                                   "token after each example's last real token), cd.hf.next_token(...) and "
                                   "cd.hf.continuation(...)")
        target = NextToken(target, -1, None)
    if not isinstance(target, (NextToken, Continuation)):
        return target, ""
    from .engine import logits_of

    B = input_ids.shape[0]
    device = input_ids.device
    real = _real_positions(input_ids, (forward_kwargs or {}).get("attention_mask"))
    if isinstance(target, Continuation):
        lengths = _per_example(target.length, B, "continuation length", device)
        L = int(lengths.max())
        pred = torch.zeros(B, L, dtype=torch.long, device=device)
        toks = torch.zeros(B, L, dtype=torch.long, device=device)
        valid = torch.zeros(B, L, dtype=torch.bool, device=device)
        for b in range(B):
            n = int(lengths[b])
            if not 1 <= n < len(real[b]):
                raise ConductanceError(f"continuation length {n} of example {b} must be >= 1 and below its "
                                       f"{len(real[b])} real tokens (a prompt token must precede it)")
            where = real[b][-n:]
            pred[b, :n], toks[b, :n], valid[b, :n] = real[b][-n - 1:-1], input_ids[b, where], True

        def summed_logprob(output: Any, examples: torch.Tensor) -> torch.Tensor:
            logits = logits_of(output)
            e = examples.to(logits.device)
            rows = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1)
            lp = torch.log_softmax(_float(logits[rows, pred.to(logits.device)[e]]), -1)
            picked = lp.gather(2, toks.to(logits.device)[e].unsqueeze(2)).squeeze(2)
            return (picked * valid.to(logits.device)[e]).sum(1)

        shown = lengths.tolist()
        return summed_logprob, (f"summed log-probability of the last {shown if B > 1 else shown[0]} tokens "
                                "(teacher-forced continuation)")
    position = _per_example(target.position, B, "position", device)
    pos = torch.empty(B, dtype=torch.long, device=device)
    for b in range(B):
        p, n = int(position[b]), len(real[b])
        if not -n <= p < n:
            raise ConductanceError(f"position {p} of example {b} is out of range: it has {n} real tokens "
                                   "(positions count over the tokens with attention_mask 1)")
        pos[b] = real[b][p]
    if target.token is None:
        with torch.no_grad():
            logits = logits_of(model(input_ids, *extra, **(forward_kwargs or {})))
        if logits.dim() != 3:
            raise ConductanceError(f"a next-token target needs a language model output (batch, tokens, vocab); "
                                   f"the model returns {tuple(logits.shape)}")
        token = logits[torch.arange(B, device=logits.device), pos.to(logits.device)].argmax(-1).to(device)
        which = "top predicted token"
    else:
        token = _per_example(target.token, B, "token", device)
        which = "token " + (str(token.tolist()) if B > 1 else str(int(token[0])))
    label = {"logit": "logit", "logprob": "log-probability", "prob": "probability"}[target.kind]
    shown = pos.tolist()
    description = f"{label} of the {which} after position {shown if B > 1 else shown[0]}"
    if target.kind == "logit":
        return torch.stack([pos, token], 1), description

    def score(output: Any, examples: torch.Tensor) -> torch.Tensor:
        logits = logits_of(output)
        e = examples.to(logits.device)
        rows = torch.arange(logits.shape[0], device=logits.device)
        lp = torch.log_softmax(_float(logits[rows, pos.to(logits.device)[e]]), -1)
        value = lp.gather(1, token.to(logits.device)[e].unsqueeze(1)).squeeze(1)
        return value.exp() if target.kind == "prob" else value

    return score, description


def _renamed(exc: Exception, plan: "_Plan") -> str:
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
                     channels_last: Optional[bool] = None
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
        zero vector (singular for Llama-style models: see docs/transformers.md); an int: that token at every position (e.g. the
        tokenizer's mask or unk id); token ids are embedded by the model's embedding module (e.g.
        keep [CLS]/[SEP] and pad the rest); a float tensor broadcastable to (batch, tokens,
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
        The path settings of :func:`conductance.layer_conductance` (default: adaptive to 1%).

    Returns
    -------
    TransformerResult for one measure, or dict measure -> TransformerResult.

    The model's hooks (the embedding replacement and the ``:input`` probes) are removed when the
    call returns or raises.
    """
    from .attribute import DEFAULT_MAX_STEPS
    from .attribute import layer_importance as _layer_importance

    from .inputs import check_autograd_available

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
    extra = additional_forward_args
    extra = () if extra is None else extra if isinstance(extra, tuple) else (extra,)
    target, target_used = _bind_target(target, model, input_ids, extra, forward_kwargs)
    wrapper = _EmbeddingPath(model, emb_module, emb_name)
    # only the wrapper's own flag (the training-mode warning reads it): train() would set every
    # submodule of the user's model to the model's mode
    wrapper.training = model.training
    names = [measure] if isinstance(measure, str) else list(measure)
    with _probes_attached(wrapper, plan), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            results = _layer_importance(wrapper, embeds, plan.engine_names, measure=names, baselines=base,
                                        target=target, additional_forward_args=(input_ids,) + tuple(extra),
                                        forward_kwargs=forward_kwargs, n_steps=n_steps, method=method,
                                        tolerance=tolerance, max_steps=max_steps or DEFAULT_MAX_STEPS,
                                        units="neuron", internal_batch_size=internal_batch_size,
                                        memory_budget=memory_budget, channels_last=channels_last)
        except ConductanceError as exc:
            # say the layers as the user wrote them, not as the wrapper names them
            raise ConductanceError(_renamed(exc, plan)) from exc
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
    mask = (forward_kwargs or {}).get("attention_mask")
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

    Shorthand for :func:`layer_importance` with ``measure="conductance"``; see there for the
    parameters. Example::

        result = cd.hf.layer_conductance(model, enc["input_ids"], cd.hf.bert_layers(model),
                                         forward_kwargs={"attention_mask": enc["attention_mask"]},
                                         target=labels, n_steps=32)
        result.top(5, unit="head")        # [UnitScore(layer=..., name='L3.H5', value=...), ...]
    """
    if "measure" in kwargs:
        raise TypeError("layer_conductance computes conductance; use cd.hf.layer_importance(measure=...)")
    return layer_importance(model, input_ids, layers, measure="conductance", **kwargs)


# ----------------------------------------------------------------------------------------------
# head ablation
# ----------------------------------------------------------------------------------------------

def _pairs(units: Any, what: str) -> dict[int, list[int]]:
    if isinstance(units, Mapping):
        pairs = [(b, u) for b, us in units.items() for u in us]
    else:
        pairs = list(units)
    by_block: dict[int, list[int]] = {}
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in pair)):
            raise ConductanceError(f"{what} must be (block, index) pairs of integers or a dict block -> list of "
                                   f"indices; got the entry {pair!r}")
        by_block.setdefault(int(pair[0]), []).append(int(pair[1]))
    return by_block


@contextlib.contextmanager
def _ablate_slices(model: nn.Module, projections: dict[int, str], by_block: dict[int, list[int]], n: int,
                   values: Optional[Mapping[int, torch.Tensor]], what: str) -> Iterator[None]:
    """Zero (or set from ``values``) slices of the last dimension of each projection's input while it runs.

    The input's last dimension holds ``n`` equal slices (heads; or n = its size for neurons)."""
    modules = _module_names(model)
    edits = {}
    for b, idx in by_block.items():
        if b not in projections:
            raise ConductanceError(f"block {b} out of range: the model has blocks {sorted(projections)}")
        name = projections[b]
        if name not in modules:
            raise ConductanceError(f"the model has no module named {name!r}. {_suggest(name, list(modules))}")
        idx = sorted(set(idx))

        def edit(x: torch.Tensor, idx: list = idx, b: int = b) -> torch.Tensor:
            if x.shape[-1] % n:
                raise ConductanceError(f"{n} {what} do not divide the projection's input size {x.shape[-1]}")
            keep = torch.ones(n, dtype=x.dtype, device=x.device)
            keep[idx] = 0
            keep = keep.repeat_interleave(x.shape[-1] // n)
            if values is None:
                return x * keep
            if b not in values:
                raise ConductanceError(f"values has no entry for block {b}")
            v = values[b].to(device=x.device, dtype=x.dtype)
            try:
                torch.broadcast_shapes(v.shape, x.shape)
            except RuntimeError:
                raise ConductanceError(f"values[{b}] of shape {tuple(v.shape)} do not broadcast to the "
                                       f"projection's input {tuple(x.shape)}") from None
            return x * keep + v * (1 - keep)

        # the first positional input of the projection
        edits[LayerRef(name, modules[name], None, True)] = edit
    if not edits:
        yield
        return
    with intervene(model, edits):
        yield


def _head_projections(model: nn.Module, module: Optional[str], what: str) -> dict[int, str]:
    """Block index -> name of the module whose input is ablated (``module`` given, or the model's family)."""
    if module is None:
        fam = family(model)
        return dict(enumerate(fam.attention if what == "heads" else fam.mlp))
    if "{block}" in module:
        blocks = _bert_blocks(model)
        return {i: module.format(block=b, i=i) for i, b in enumerate(blocks)}
    if "{i}" not in module:
        raise ConductanceError(f"module={module!r} must contain '{{i}}' (the block index) or '{{block}}' (a "
                               "BERT-style block's name), or be None to use the model's own projections")
    # no block list to bound the indices: every index the pattern names a module for is valid
    modules = _module_names(model)
    out, i = {}, 0
    while module.format(i=i) in modules:
        out[i] = module.format(i=i)
        i += 1
    if not out:
        raise ConductanceError(f"the model has no module named {module.format(i=0)!r}. "
                               f"{_suggest(module.format(i=0), list(modules))}")
    return out


@contextlib.contextmanager
def ablate_heads(model: nn.Module, heads: Union[Iterable[tuple[int, int]], Mapping[int, Sequence[int]]], *,
                 module: Optional[str] = None, num_heads: Optional[int] = None,
                 values: Optional[Mapping[int, torch.Tensor]] = None) -> Iterator[None]:
    """Ablate attention heads while the model runs: a forward pre-hook on each block's output projection.

    The projection's input is the concatenation of the heads' context vectors
    (batch, tokens, heads x head_dim); a head is ablated by zeroing its slice (the projection's
    bias stays), or by setting it to the slice of ``values``.

    Parameters
    ----------
    heads : iterable of (block, head) pairs, or dict block -> list of heads
    module : the projection's name pattern, optional. Default: the model's own attention output
        projection (see :func:`family`: GPT-2, Llama-style, BERT, RoBERTa, DistilBERT). Otherwise
        ``{block}`` stands for a BERT-style block's name and ``{i}`` for a block index, e.g.
        ``"transformer.h.{i}.attn.c_proj"``.
    num_heads : default ``config.num_attention_heads`` (query heads, also for grouped-query attention).
    values : dict block -> Tensor broadcastable to the projection's input (batch, tokens, hidden), optional
        Replacement values (e.g. from :func:`head_inputs` at a baseline input) instead of zeros.

    Hooks are removed on exit, also on error; they act only on forwards run in this thread (or a copy
    of its context), see :mod:`conductance.sites`.
    """
    by_block = _pairs(heads, "heads")
    n = num_heads if num_heads is not None else num_heads_of(model)
    if n is None:
        raise ConductanceError("ablate_heads needs the number of heads; pass num_heads=")
    for hs in by_block.values():
        bad = [h for h in hs if not 0 <= h < n]
        if bad:
            raise ConductanceError(f"head {bad[0]} out of range: the model has {n} heads per block")
    projections = _head_projections(model, module, "heads")
    with _ablate_slices(model, projections, by_block, n, values, "heads"):
        yield


@contextlib.contextmanager
def ablate_neurons(model: nn.Module, neurons: Union[Iterable[tuple[int, int]], Mapping[int, Sequence[int]]], *,
                   module: Optional[str] = None,
                   values: Optional[Mapping[int, torch.Tensor]] = None) -> Iterator[None]:
    """Ablate MLP neurons while the model runs: a forward pre-hook on each block's MLP down projection.

    The down projection's input (batch, tokens, neurons) holds the MLP neurons after the
    activation (GPT-2 ``mlp.c_proj``, Llama ``mlp.down_proj``, BERT ``output.dense``, DistilBERT
    ``ffn.lin2``); a neuron is ablated by zeroing its column, or setting it to ``values``.

    Parameters
    ----------
    neurons : iterable of (block, neuron) pairs, or dict block -> list of neurons
    module : name pattern with ``{i}`` for the block index, optional (default: the model's own MLP
        down projection, see :func:`family`)
    values : dict block -> Tensor broadcastable to (batch, tokens, neurons), optional

    Hooks are removed on exit, also on error; they act only on forwards run in this thread (or a copy
    of its context), see :mod:`conductance.sites`.
    """
    by_block = _pairs(neurons, "neurons")
    projections = _head_projections(model, module, "neurons")
    modules = _module_names(model)
    sizes = {b: _in_features(modules[projections[b]]) for b in by_block if b in projections}
    n = None
    for b, idx in by_block.items():
        size = sizes.get(b)
        if size is not None:
            bad = [j for j in idx if not 0 <= j < size]
            if bad:
                raise ConductanceError(f"neuron {bad[0]} of block {b} out of range: the MLP has {size} neurons")
            n = size if n is None else n
    if n is None:
        raise ConductanceError("cannot read the MLP size from the down projection; pass module= naming an "
                               "nn.Linear")
    with _ablate_slices(model, projections, by_block, n, values, "neurons"):
        yield


def head_inputs(model: nn.Module, input_ids: torch.Tensor, *, module: Optional[str] = None,
                forward_kwargs: Optional[dict] = None) -> dict[int, torch.Tensor]:
    """Each block's attention-output-projection input (batch, tokens, hidden) at ``input_ids``.

    For :func:`ablate_heads` ``values=``: e.g. the heads' values at a baseline input (all [PAD]
    ids with the same attention mask). One forward without autograd; hooks removed on exit.
    ``module``: as in :func:`ablate_heads` (default: the model's own projection).
    """
    projections = _head_projections(model, module, "heads")
    modules = _module_names(model)
    found: dict[int, torch.Tensor] = {}

    def observer(i: int) -> Callable[[torch.Tensor], None]:
        def observe(x: torch.Tensor) -> None:
            found[i] = x.detach()
        return observe

    # each projection's first positional input
    edits = {LayerRef(name, modules[name], None, True): observer(i) for i, name in projections.items()}
    with (intervene(model, edits) if edits else contextlib.nullcontext()), torch.no_grad():
        model(input_ids, **(forward_kwargs or {}))
    return found
