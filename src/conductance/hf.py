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
"""

from __future__ import annotations

import contextlib
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

from .errors import ConductanceError, ConductanceWarning, warn
from .layers import _ELEMENT, _suggest
from .result import LayerResult

__all__ = ["layer_conductance", "layer_importance", "TransformerResult", "UnitScore", "bert_layers", "layer_index",
           "reduce_layer", "ablate_heads", "head_inputs", "embedding_module", "num_heads_of", "UNITS",
           "INPUT_SUFFIX"]

#: Unit views of a layer value (batch, tokens, hidden); see the module docstring.
UNITS = ("neuron", "head", "head_token", "token", "layer", "element")
#: Suffix of a layer name that observes the module's first positional input instead of its output.
INPUT_SUFFIX = ":input"
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
        fired = []

        def replace(module: nn.Module, inputs: Any, output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor) or output.shape != embeds.shape:
                got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ConductanceError(
                    f"the embedding module {self._embedding_name!r} returned {got} but the path holds embeddings "
                    f"of shape {tuple(embeds.shape)}; pass embedding= the module mapping token ids (batch, tokens) "
                    "to vectors (batch, tokens, hidden)")
            fired.append(True)
            # each layer keeps its own device: only the embeddings move, to where the model put them
            return embeds.to(device=output.device, dtype=output.dtype)

        handle = self._embedding.register_forward_hook(replace, prepend=True)
        try:
            output = self.model(input_ids, *args, **kwargs)
        finally:
            handle.remove()
        if not fired:
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
                                   "cd.hf.bert_layers(model)")
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
    handles = []
    try:
        for key, module in plan.probes:
            probe = nn.Identity()
            wrapper.probes[key] = probe

            def pre_hook(mod: nn.Module, args: tuple, probe: nn.Module = probe) -> tuple:
                if not args or not isinstance(args[0], torch.Tensor):
                    raise ConductanceError(f"{type(mod).__name__} receives no tensor as its first positional "
                                           "input; ':input' observes the first positional argument")
                return (probe(args[0]),) + tuple(args[1:])

            handles.append(module.register_forward_pre_hook(pre_hook))
        yield
    finally:
        for h in handles:
            h.remove()
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


def _pad_id(model: nn.Module, pad_token_id: Optional[int]) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    for module in model.modules():
        value = getattr(getattr(module, "config", None), "pad_token_id", None)
        if isinstance(value, numbers.Integral):
            return int(value)
    raise ConductanceError("baseline='pad' needs the pad token id: the model's config has none; pass "
                           "pad_token_id=... or baseline='zeros'")


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
                         pad_id: Any) -> torch.Tensor:
    if isinstance(baseline, str):
        if baseline == "zeros":
            return torch.zeros_like(embeds)
        if baseline == "pad":
            pads = torch.full_like(input_ids, pad_id())
            _check_vocabulary(pads, embedding, "word embedding", "the pad token id (baseline='pad')")
            with torch.no_grad():
                return embedding(pads).detach()
        raise ConductanceError(f"unknown baseline {baseline!r}; use 'pad', 'zeros', token ids (batch, tokens) "
                               "or embeddings (batch, tokens, hidden)")
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
                return embedding(ids).detach()
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
        return out.detach().contiguous()
    raise TypeError(f"baseline must be 'pad', 'zeros' or a tensor, got {type(baseline).__name__}")


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------

class UnitScore(NamedTuple):
    """One row of :meth:`TransformerResult.table` / :meth:`TransformerResult.top`."""

    layer: str                 #: layer name as requested
    block: Optional[int]       #: transformer block index parsed from the name (None if there is none)
    unit: str                  #: unit kind ("head", "neuron", ...)
    index: Any                 #: int, or (token, head) for "head_token", (token, hidden) for "element"
    name: str                  #: readable name, e.g. "L3 head 5"
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


@dataclass
class TransformerResult:
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

    def __getitem__(self, layer: str) -> torch.Tensor:
        return self.reduce(layer, self.units[self._check(layer)])

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def _check(self, layer: str) -> str:
        if layer not in self.elements:
            raise KeyError(f"no layer {layer!r} in this result; it has {self.layers}")
        return layer

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
        prefix = f"L{block} " if block is not None else f"{layer} "
        shape = self[layer].shape[1:]
        tok = self.tokens[example] if self.tokens is not None else None

        def token(t: int) -> str:
            return f"token {t}" + (f" {tok[t]!r}" if tok is not None and t < len(tok) else "")

        if unit == "layer":
            return [prefix + "total"]
        if unit in ("neuron", "head"):
            return [f"{prefix}{unit} {i}" for i in range(shape[0])]
        if unit == "token":
            return [prefix + token(t) for t in range(shape[0])]
        if unit == "head_token":
            return [f"{prefix}head {h} {token(t)}" for t in range(shape[0]) for h in range(shape[1])]
        return [f"{prefix}{token(t)} dim {d}" for t in range(shape[0]) for d in range(shape[1])]

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

    def top(self, k: int = 10, unit: Optional[str] = None, layers: Optional[Sequence[str]] = None,
            example: Optional[int] = None, examples: Any = None, absolute: bool = False) -> list[UnitScore]:
        """The ``k`` largest units across the chosen layers (optionally only one unit kind).

        Ranked by value (largest first) or, with ``absolute=True``, by magnitude; values are one
        example's or the mean over ``examples`` (default all).
        """
        chosen = [l for l in (layers or self.layers) if unit is None or self.units[l] == unit]
        if not chosen:
            raise ConductanceError(f"no layer with unit {unit!r}; units are {self.units}")
        rows = self.table(example=example, examples=examples, layers=chosen)
        rows.sort(key=lambda r: -abs(r.value) if absolute else -r.value)
        return rows[:k]

    def completeness(self) -> list[tuple[str, bool, float, float]]:
        """Per layer: (name, is_cut, mean and max relative completeness error over examples)."""
        return [(n, bool(self.is_cut[n]), float(self.relative_error[n].mean()), float(self.relative_error[n].max()))
                for n in self.layers]

    def summary(self) -> str:
        lines = [f"{self.measure} of {len(self.layers)} layers, {self.raw.method}"
                 + (f" n_steps={self.raw.n_steps}" if self.raw.n_steps else "")
                 + f", points per example {self.raw.n_points.tolist()}"]
        for n, cut, mean, worst in self.completeness():
            lines.append(f"  {n} [{self.units[n]}] shape {tuple(self[n].shape)}"
                         + (f", cut, relative completeness error max {100 * worst:.2f}%" if cut else ", not a cut"))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"TransformerResult({self.summary()})"


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------

def layer_importance(model: nn.Module, input_ids: torch.Tensor, layers: LayersArg, *,
                     measure: Union[str, Sequence[str]] = "conductance",
                     units: Union[str, Mapping[str, str], None] = None,
                     embedding: Union[str, nn.Module, None] = None, baseline: Any = "pad",
                     pad_token_id: Optional[int] = None, forward_kwargs: Optional[dict] = None,
                     additional_forward_args: Any = None, target: Any = None, num_heads: Optional[int] = None,
                     tokens: Optional[list] = None, n_steps: Optional[int] = None, method: Optional[str] = None,
                     tolerance: Optional[float] = None, max_steps: Optional[int] = None,
                     internal_batch_size: Optional[int] = None
                     ) -> Union[TransformerResult, dict[str, TransformerResult]]:
    """Importance of heads, neurons, tokens or whole layers of a model that takes token ids.

    Parameters
    ----------
    model : nn.Module
        Called as ``model(input_ids, *additional_forward_args, **forward_kwargs)``; it must embed
        ``input_ids`` with its word-embedding module (not be given ``inputs_embeds``).
    input_ids : LongTensor (batch, tokens)
    layers : name, list of names, or dict name -> unit (e.g. :func:`bert_layers`)
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
    baseline : "pad", "zeros", LongTensor of token ids (batch, tokens) or (tokens,), or embeddings
        Start of the path. "pad": the pad token's embedding at every position (``pad_token_id``
        or the model's ``config.pad_token_id``); "zeros": the zero vector; token ids are embedded
        by the model's embedding module (e.g. keep [CLS]/[SEP] and pad the rest); a float tensor
        broadcastable to (batch, tokens, hidden) is used as is.
    forward_kwargs : dict, optional
        Passed to the model unchanged at every path point (tensors whose first dimension is the
        batch size, such as ``attention_mask``, follow their example).
    target : as :func:`conductance.layer_conductance` (None: each example's top class).
    num_heads : int, optional
        Heads for "head" units (default ``config.num_attention_heads``).
    tokens : optional list (batch) of lists of token strings, only used for unit names.
    n_steps, method, tolerance, max_steps, internal_batch_size
        The path settings of :func:`conductance.layer_conductance` (default: adaptive to 1%).

    Returns
    -------
    TransformerResult for one measure, or dict measure -> TransformerResult.

    The model's hooks (the embedding replacement and the ``:input`` probes) are removed when the
    call returns or raises.
    """
    from .attribute import DEFAULT_MAX_STEPS
    from .attribute import layer_importance as _layer_importance

    input_ids = _check_ids(input_ids)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
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
    base = _baseline_embeddings(emb_module, input_ids, embeds, baseline, lambda: _pad_id(model, pad_token_id))
    extra = additional_forward_args
    extra = () if extra is None else extra if isinstance(extra, tuple) else (extra,)
    wrapper = _EmbeddingPath(model, emb_module, emb_name)
    wrapper.train(model.training)
    names = [measure] if isinstance(measure, str) else list(measure)
    with _probes_attached(wrapper, plan), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = _layer_importance(wrapper, embeds, plan.engine_names, measure=names, baselines=base,
                                    target=target, additional_forward_args=(input_ids,) + tuple(extra),
                                    forward_kwargs=forward_kwargs, n_steps=n_steps, method=method,
                                    tolerance=tolerance, max_steps=max_steps or DEFAULT_MAX_STEPS,
                                    units="neuron", internal_batch_size=internal_batch_size)
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
            attention_mask=mask if isinstance(mask, torch.Tensor) else None, input_ids=input_ids)
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
        result.top(5, unit="head")        # [UnitScore(layer=..., name='L3 head 5', value=...), ...]
    """
    if "measure" in kwargs:
        raise TypeError("layer_conductance computes conductance; use cd.hf.layer_importance(measure=...)")
    return layer_importance(model, input_ids, layers, measure="conductance", **kwargs)


# ----------------------------------------------------------------------------------------------
# head ablation
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def ablate_heads(model: nn.Module, heads: Union[Iterable[tuple[int, int]], Mapping[int, Sequence[int]]], *,
                 module: str = HEAD_PROJECTION, num_heads: Optional[int] = None,
                 values: Optional[Mapping[int, torch.Tensor]] = None) -> Iterator[None]:
    """Ablate attention heads while the block runs: a forward pre-hook on each block's output projection.

    The projection's input is the concatenation of the heads' context vectors
    (batch, tokens, heads x head_dim); a head is ablated by zeroing its slice (the projection's
    bias stays), or by setting it to the slice of ``values``.

    Parameters
    ----------
    heads : iterable of (block, head) pairs, or dict block -> list of heads
    module : the projection's name; ``{block}`` stands for a block's name (BERT-style models) and
        ``{i}`` for its index, e.g. ``"transformer.h.{i}.attn.c_proj"``.
    num_heads : default ``config.num_attention_heads``.
    values : dict block -> Tensor broadcastable to the projection's input (batch, tokens, hidden), optional
        Replacement values (e.g. from :func:`head_inputs` at a baseline input) instead of zeros.

    Hooks are removed on exit, also on error.
    """
    pairs = [(int(b), int(h)) for b, hs in heads.items() for h in hs] if isinstance(heads, Mapping) \
        else [(int(b), int(h)) for b, h in heads]
    n = num_heads if num_heads is not None else num_heads_of(model)
    if n is None:
        raise ConductanceError("ablate_heads needs the number of heads; pass num_heads=")
    modules = _module_names(model)
    by_block: dict[int, list[int]] = {}
    for b, h in pairs:
        if not 0 <= h < n:
            raise ConductanceError(f"head {h} out of range: the model has {n} heads per block")
        by_block.setdefault(b, []).append(h)
    blocks = _bert_blocks(model) if "{block}" in module else None
    handles = []
    try:
        for b, hs in by_block.items():
            if blocks is not None and not 0 <= b < len(blocks):
                raise ConductanceError(f"block {b} out of range: the model has {len(blocks)} blocks")
            name = module.format(block=blocks[b] if blocks is not None else "", i=b)
            if name not in modules:
                raise ConductanceError(f"the model has no module named {name!r}. {_suggest(name, list(modules))}")
            idx = sorted(set(hs))

            def pre_hook(mod: nn.Module, args: tuple, idx: list = idx, b: int = b) -> tuple:
                x = args[0]
                if x.shape[-1] % n:
                    raise ConductanceError(f"{n} heads do not divide the projection's input size {x.shape[-1]}")
                d = x.shape[-1] // n
                keep = torch.ones(n, dtype=x.dtype, device=x.device)
                keep[idx] = 0
                keep = keep.repeat_interleave(d)
                if values is None:
                    return (x * keep,) + tuple(args[1:])
                if b not in values:
                    raise ConductanceError(f"values has no entry for block {b}")
                v = values[b].to(device=x.device, dtype=x.dtype)
                try:
                    torch.broadcast_shapes(v.shape, x.shape)
                except RuntimeError:
                    raise ConductanceError(f"values[{b}] of shape {tuple(v.shape)} do not broadcast to the "
                                           f"projection's input {tuple(x.shape)}") from None
                return (x * keep + v * (1 - keep),) + tuple(args[1:])

            handles.append(modules[name].register_forward_pre_hook(pre_hook))
        yield
    finally:
        for h in handles:
            h.remove()


def head_inputs(model: nn.Module, input_ids: torch.Tensor, *, module: str = HEAD_PROJECTION,
                forward_kwargs: Optional[dict] = None) -> dict[int, torch.Tensor]:
    """Each block's attention-output-projection input (batch, tokens, hidden) at ``input_ids``.

    For :func:`ablate_heads` ``values=``: e.g. the heads' values at a baseline input (all [PAD]
    ids with the same attention mask). One forward without autograd; hooks removed on exit.
    """
    blocks = _bert_blocks(model) if "{block}" in module else None
    modules = _module_names(model)
    if blocks is None:
        raise ConductanceError("head_inputs needs a BERT-style model (module='{block}...')")
    found: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for i, b in enumerate(blocks):
            name = module.format(block=b, i=i)
            if name not in modules:
                raise ConductanceError(f"the model has no module named {name!r}. {_suggest(name, list(modules))}")

            def pre_hook(mod: nn.Module, args: tuple, i: int = i) -> None:
                found[i] = args[0].detach()

            handles.append(modules[name].register_forward_pre_hook(pre_hook))
        with torch.no_grad():
            model(input_ids, **(forward_kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    return found
