"""The path in word-embedding space: the wrapper module, the layer plan and probes, token ids and baselines."""

from __future__ import annotations

import contextlib
import inspect
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from ..engine import logits_of
from ..errors import ConductanceError
from ..layers import _ELEMENT, INPUT_SUFFIX, LayerRef, _suggest
from ..sites import Edit, Site, intervene
from .families import _module_names
from .result import UNITS

_MODEL = "model"


_PROBES = "probes"


# ----------------------------------------------------------------------------------------------
# the embedding-space path
# ----------------------------------------------------------------------------------------------

class _EmbeddingPath(nn.Module):
    """``forward(embeds, input_ids, *args, **kwargs)``: the user's model with its word embeddings replaced.

    The replacement hook is registered for one forward and removed in ``finally``; it is put in
    front of any other hook on the embedding module (``prepend=True``), so hooks that observe the
    embedding module see the replaced value.
    """

    _embedding: nn.Module  # set with object.__setattr__ (not a submodule: the model holds it)

    def __init__(self, model: nn.Module, embedding: nn.Module, embedding_name: str):
        super().__init__()
        self.model = model
        self.probes = nn.ModuleDict()
        # a plain attribute: the module is already registered under self.model
        object.__setattr__(self, "_embedding", embedding)
        self._embedding_name = embedding_name
        #: positions per example the model was asked to compute logits for (``logits_to_keep``), or None
        self.kept_positions: Optional[int] = None
        #: the (position, token) pairs (batch, 2) as the user meant them, when the engine reads kept positions
        self.reported_target: Optional[torch.Tensor] = None

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
        if self.kept_positions is not None:
            # the target reads the kept logits by their place in the kept list: a model that computed
            # every position's logits anyway would be read at the wrong positions
            logits = logits_of(output)
            if logits.dim() != 3 or logits.shape[1] != self.kept_positions:
                raise ConductanceError(
                    f"the model was asked for the logits of {self.kept_positions} position(s) per example "
                    f"(logits_to_keep) but returned logits of shape {tuple(logits.shape)}; pass "
                    "forward_kwargs={'logits_to_keep': 0} to have it compute every position")
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
            spec = dict.fromkeys(spec, units)
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
            spec = dict.fromkeys(names, units or "neuron")
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
    edits: dict[Site, Edit] = {}
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
# a leaner forward for language-model targets
# ----------------------------------------------------------------------------------------------

def _forward_parameters(model: nn.Module) -> set[str]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _vocabulary_size(model: nn.Module) -> Optional[int]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, numbers.Integral) else None


def _index_pairs(target: Any, batch: int) -> Optional[torch.Tensor]:
    """A target of (position, token) pairs as a LongTensor (batch, 2), or None for any other form (the
    engine then checks it as given)."""
    def is_int(v: Any) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if isinstance(target, torch.Tensor):
        if target.dtype in (torch.int32, torch.int64) and tuple(target.shape) == (batch, 2):
            return target.long()
        return None
    if isinstance(target, tuple) and len(target) == 2 and all(is_int(v) for v in target):
        return torch.tensor([[int(v) for v in target]] * batch, dtype=torch.long)
    if isinstance(target, (list, tuple)) and len(target) == batch:
        rows = [r.tolist() if isinstance(r, torch.Tensor) else r for r in target]
        if all(isinstance(r, (list, tuple)) and len(r) == 2 and all(is_int(v) for v in r) for r in rows):
            return torch.tensor([[int(v) for v in r] for r in rows], dtype=torch.long)
    return None


def _per_example_keep() -> bool:
    """Whether this transformers version reads a (batch, k) ``logits_to_keep`` as positions per example."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401
    except ImportError:
        return False
    return True


def _lean_lm_forward(model: nn.Module, wrapper: _EmbeddingPath, target: Any, input_ids: torch.Tensor,
                     forward_kwargs: dict) -> tuple[Any, dict]:
    """Forward keywords that spare a Hugging Face model work no target reads, and the target to match.

    - ``use_cache=False`` where the model's forward takes ``use_cache``: the key/value cache of every
      path point is never used.
    - ``logits_to_keep``: a language-model head projects every position onto the vocabulary (for
      GPT-2-sized models a large share of the forward and backward), but a (position, token) target,
      :func:`next_token` and :func:`continuation` read a few positions per example. Where the model
      takes ``logits_to_keep``, only those positions' logits are computed and the target reads them
      by their place in the kept list; ``wrapper`` checks that the model did keep them.

    Nothing is changed where the user set these keywords, passes ``labels``, or the target's
    positions or tokens are out of range (the engine then reports it on the full output).

    Parameters
    ----------
    model : nn.Module
    wrapper : _EmbeddingPath
    target : the bound target (index tuples, a callable from :func:`_bind_target`, or the user's)
    input_ids : LongTensor (batch, tokens)
    forward_kwargs : dict

    Returns
    -------
    target : the target to pass to the engine
    forward_kwargs : dict
    """
    kwargs = dict(forward_kwargs)
    params = _forward_parameters(model)
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    if "logits_to_keep" not in params or "logits_to_keep" in kwargs or "labels" in kwargs:
        return target, kwargs
    B, T = input_ids.shape
    bound = callable(target) and isinstance(getattr(target, "positions", None), torch.Tensor)
    if bound:
        positions = target.positions.to(input_ids.device)
    else:
        pairs = _index_pairs(target, B)
        vocab = _vocabulary_size(model)
        if pairs is None or vocab is None:
            return target, kwargs
        pairs = pairs.to(input_ids.device)
        pos, tok = pairs[:, 0], pairs[:, 1]
        if not bool(((pos >= -T) & (pos < T) & (tok >= -vocab) & (tok < vocab)).all()):
            return target, kwargs
        positions = torch.where(pos < 0, pos + T, pos).unsqueeze(1)
    k = int(positions.shape[1])
    if k == 1 and bool((positions == T - 1).all()):
        kwargs["logits_to_keep"] = 1          # the last position: an int, which every version takes
    elif _per_example_keep():
        kwargs["logits_to_keep"] = positions  # (batch, k): follows its example along the path
    else:
        return target, kwargs
    wrapper.kept_positions = k
    read = torch.arange(k, device=input_ids.device).expand(B, k)
    if bound:
        target.read_at = read
        return target, kwargs
    wrapper.reported_target = torch.stack([positions[:, 0], tok], 1)
    return torch.stack([read[:, 0], tok], 1), kwargs
