"""Switching heads and FFN neurons off (:func:`ablate_heads`, :func:`ablate_neurons`) and :func:`head_inputs`."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import ConductanceError
from ..forward_args import ForwardArgs
from ..layers import LayerRef, _suggest
from ..sites import Edit, Site, intervene
from .families import _bert_blocks, _in_features, _module_names, family, num_heads_of

# ----------------------------------------------------------------------------------------------
# head ablation
# ----------------------------------------------------------------------------------------------

def _pairs(units: Any, what: str) -> dict[int, list[int]]:
    pairs = [(b, u) for b, us in units.items() for u in us] if isinstance(units, Mapping) else list(units)
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
    edits: dict[Site, Edit] = {}
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

    Yields
    ------
    None
        The heads are ablated inside the ``with`` block only.

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

    Yields
    ------
    None
        The neurons are ablated inside the ``with`` block only.

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

    Parameters
    ----------
    model : nn.Module
    input_ids : LongTensor, shape (batch, tokens)
    module : str, optional
        As in :func:`ablate_heads` (default: the model's own projection).
    forward_kwargs : dict, optional
        Keyword arguments of the model (e.g. ``attention_mask``).

    Returns
    -------
    dict int -> Tensor
        Block index -> the projection's input (batch, tokens, hidden), detached.
    """
    projections = _head_projections(model, module, "heads")
    modules = _module_names(model)
    found: dict[int, torch.Tensor] = {}

    def observer(i: int) -> Callable[[torch.Tensor], None]:
        def observe(x: torch.Tensor) -> None:
            found[i] = x.detach()
        return observe

    # each projection's first positional input
    edits: dict[Site, Edit] = {LayerRef(name, modules[name], None, True): observer(i)
                               for i, name in projections.items()}
    _, kwargs = ForwardArgs.make(None, forward_kwargs, input_ids.shape[0], warn_ambiguous=False).at()
    with (intervene(model, edits) if edits else contextlib.nullcontext()), torch.no_grad():
        model(input_ids, **kwargs)
    return found
