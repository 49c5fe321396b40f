"""Ablation: switch hidden units off and watch the prediction.

The paper judges a ranking of units by removing them in ranking order until the
top-1 label changes (Dhamdhere et al., section on ablation). This module provides

- :func:`ablate`, a context manager that overwrites chosen units of one layer's output
  while the model runs (modes "zero", "baseline", "mean");
- :func:`layer_values` and :func:`layer_mean`, which record a layer's output (for the
  baseline activation or a dataset mean);
- :func:`flip_count`, the number of units removed cumulatively in ranking order until
  the label changes, evaluated for many prefix lengths per forward pass;
- :func:`deletion_curve` / :func:`insertion_curve`, the target logit and the top-1
  agreement as the top-k units are removed (or are the only ones kept), against random
  rankings, with the area under each curve;
- :func:`ablation_summary` and :func:`compare_rankings`, the side-by-side table the
  paper reports (mean flips, how many need more than 10, the maximum, and the share
  flipped by removing the top 10).

Units are addressed by *flat* index: for ``unit_type="neuron"`` the row-major index into
the layer's shape without the batch dimension (as ``LayerResult.top`` reports it); for
``"channel"`` the index along dimension 1, every position of the channel ablated together.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .engine import _index_args, call_target, logits_of
from .errors import ConductanceError
from .inputs import Target, check_baselines, resolve_target
from .layers import LayerRef, LayerSpec, resolve_layers
from .progress import Progress, check_progress
from .result import ResultProtocol, pandas
from .sites import intervene, record, warn_training

MODES = ("zero", "baseline", "mean")
UNIT_TYPES = ("neuron", "channel")
#: Rows (example, prefix) per forward pass when no ``batch_size`` is given: about this many
#: input elements per forward, at most MAX_DEFAULT_ROWS rows.
DEFAULT_ROW_ELEMENTS = 2 ** 23
MAX_DEFAULT_ROWS = 1024
#: Points of the default k grid of the curves (0 .. number of units).
DEFAULT_CURVE_POINTS = 33
#: First prefix window of flip_count when the layers below run once per example (rows are cheap).
EXPANDED_FIRST_WINDOW = 8

Ranking = Union[torch.Tensor, Sequence[int], Mapping]


# --------------------------------------------------------------------------------------------
# checks shared by every entry point


def _check_mode(mode: Any, values: Any) -> None:
    if mode not in MODES:
        raise ConductanceError(f"unknown ablation mode {mode!r}; choose 'zero' (set units to 0), 'baseline' "
                               "(their value at the baseline input) or 'mean' (a mean over data)")
    if mode == "zero" and values is not None:
        raise ConductanceError("values are only used by mode='baseline' or mode='mean'; drop values, or set "
                               "the mode that matches them")
    if mode == "mean" and values is None:
        raise ConductanceError("mode='mean' needs values: pass values=layer_mean(model, batches, layer) (a mean "
                               "over your data) or a mean of your own of the layer's shape")


def _check_unit_type(unit_type: Any, arg: str) -> None:
    if unit_type not in UNIT_TYPES:
        raise ConductanceError(f"unknown {arg} {unit_type!r}; choose 'neuron' (each element of the layer's "
                               "output) or 'channel' (dimension 1, all positions together)")


def _one_layer(model: nn.Module, layer: LayerSpec) -> LayerRef:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(layer, (list,)):
        if len(layer) != 1:
            raise ConductanceError(f"ablation works on one layer at a time; got {len(layer)} layers")
        layer = layer[0]
    return resolve_layers(model, layer)[0]


def _unit_info(ref: LayerRef, shape: Sequence[int], unit_type: str) -> tuple[tuple[int, ...], int]:
    """(unit shape, number of units) of a layer output of ``shape`` (batch included)."""
    layer_shape = tuple(shape[1:])
    if unit_type == "channel":
        if len(layer_shape) < 1:
            raise ConductanceError(f"layer {ref.name!r} has output shape {tuple(shape)}: no channel dimension; "
                                   "use unit_type/units='neuron'")
        return (layer_shape[0],), layer_shape[0]
    return layer_shape, int(math.prod(layer_shape))


def _describe(ref: LayerRef, layer_shape: tuple, unit_type: str, n_units: int) -> str:
    if unit_type == "channel":
        return f"layer {ref.name!r} (output shape (batch, {', '.join(map(str, layer_shape))})) has {n_units} channels"
    return f"layer {ref.name!r} (output shape (batch, {', '.join(map(str, layer_shape))})) has {n_units} neurons"


# --------------------------------------------------------------------------------------------
# masks and replacement values


def _mask_from_units(units: Any, batch: int, layer_shape: tuple, unit_type: str, ref: LayerRef) -> torch.Tensor:
    """Boolean (1 or batch, n_units): which units to ablate, per row."""
    unit_shape, n = _unit_info(ref, (batch,) + layer_shape, unit_type)
    where = _describe(ref, layer_shape, unit_type, n)
    if isinstance(units, torch.Tensor) and units.dtype == torch.bool:
        shape = tuple(units.shape)
        if shape in (unit_shape, (n,)):
            return units.reshape(1, n)
        if shape in ((batch,) + unit_shape, (batch, n)):
            return units.reshape(batch, n)
        raise ConductanceError(f"a boolean unit mask of shape {shape} does not fit: {where}; pass a mask of "
                               f"shape {unit_shape} (shared by the batch) or {(batch,) + unit_shape} "
                               "(one row per example)")
    if isinstance(units, torch.Tensor):
        if units.is_floating_point() or units.is_complex():
            raise ConductanceError(f"units must be unit indices (ints, a LongTensor) or a boolean mask; got a "
                                   f"{units.dtype} tensor (to rank units by scores use flip_count)")
        idx = units.long()
        if idx.dim() > 2:
            raise ConductanceError(f"a LongTensor of units must be (k,) shared or (batch, k) per example; got "
                                   f"shape {tuple(idx.shape)}")
        if idx.dim() == 2 and idx.shape[0] != batch:
            raise ConductanceError(f"per-example unit indices of shape {tuple(idx.shape)} do not match the batch "
                                   f"of {batch}; pass (batch, k) = ({batch}, k), or a 1-D list shared by the batch")
        rows = idx.reshape(1, -1) if idx.dim() <= 1 else idx
    elif isinstance(units, (list, tuple, range)):
        flat = []
        for u in units:
            if isinstance(u, (tuple, list)):
                if unit_type == "channel" or len(u) != len(unit_shape):
                    raise ConductanceError(f"unit {tuple(u)} is not an index for this layer: {where}; give "
                                           + ("channel numbers" if unit_type == "channel" else
                                              f"flat indices or index tuples of length {len(unit_shape)}"))
                if any(not 0 <= int(c) < s for c, s in zip(u, unit_shape)):
                    raise ConductanceError(f"unit {tuple(u)} is out of range for the unit shape {unit_shape} of "
                                           f"layer {ref.name!r}")
                flat.append(int(np.ravel_multi_index(tuple(int(c) for c in u), unit_shape)))
            elif isinstance(u, (numbers.Integral, torch.Tensor, np.integer)) and not isinstance(u, bool):
                flat.append(int(u))
            else:
                raise ConductanceError(f"units must be ints, index tuples or a boolean mask; got {u!r}")
        rows = torch.tensor(flat, dtype=torch.long).reshape(1, -1)
    else:
        raise ConductanceError(f"units must be a list of unit indices, a LongTensor or a boolean mask; got "
                               f"{type(units).__name__}")
    if rows.numel() and (rows.min() < 0 or rows.max() >= n):
        bad = rows[(rows < 0) | (rows >= n)].unique().tolist()[:10]
        raise ConductanceError(f"unit index {bad} out of range: {where}, so valid indices are 0..{n - 1}"
                               + (" (flat, row-major)" if unit_type == "neuron" and len(unit_shape) > 1 else ""))
    mask = torch.zeros(rows.shape[0], n, dtype=torch.bool)
    mask.scatter_(1, rows, True)
    return mask


def _broadcast_values(values: Any, batch: int, layer_shape: tuple, unit_type: str, ref: LayerRef,
                      mode: str) -> torch.Tensor:
    """``values`` as a tensor (1 or batch, ...) that broadcasts against the layer output."""
    v = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    v = v.detach()
    shape = tuple(v.shape)
    if shape == layer_shape:
        out = v.unsqueeze(0)
    elif shape == (batch,) + layer_shape:
        out = v
    elif unit_type == "channel" and len(layer_shape) >= 1 and shape in ((layer_shape[0],), (batch, layer_shape[0])):
        out = v.reshape((-1, layer_shape[0]) + (1,) * (len(layer_shape) - 1))
    else:
        expected = f"{layer_shape} (shared by the batch) or {(batch,) + layer_shape} (one per example)"
        if unit_type == "channel" and layer_shape:
            expected += f", or ({layer_shape[0]},) / ({batch}, {layer_shape[0]}) (one value per channel)"
        helper = "layer_values(model, baselines, layer)" if mode == "baseline" else "layer_mean(model, batches, layer)"
        raise ConductanceError(f"values for mode={mode!r} have shape {shape}, but layer {ref.name!r} outputs "
                               f"(batch, {', '.join(map(str, layer_shape))}); expected {expected}. Compute them "
                               f"with {helper}")
    if not torch.isfinite(out).all():
        raise ConductanceError(f"values for mode={mode!r} contain NaN or Inf")
    return out


def _apply(t: torch.Tensor, mask: torch.Tensor, repl: Optional[torch.Tensor], unit_type: str) -> torch.Tensor:
    """``t`` (rows, *layer_shape) with masked units replaced (by 0 when ``repl`` is None)."""
    layer_shape = tuple(t.shape[1:])
    mask = mask.to(t.device)
    if unit_type == "neuron":
        m = mask.reshape((mask.shape[0],) + layer_shape)
    else:
        m = mask.reshape((mask.shape[0], layer_shape[0]) + (1,) * (len(layer_shape) - 1))
    if repl is None:
        return t.masked_fill(m, 0)
    return torch.where(m, repl.to(device=t.device, dtype=t.dtype), t)


@contextlib.contextmanager
def ablate(model: nn.Module, layer: LayerSpec, units: Any, *, mode: str = "zero", values: Any = None,
           unit_type: str = "neuron") -> Iterator[None]:
    """Ablate units of one layer's output while the block runs.

    Parameters
    ----------
    model : nn.Module
    layer : str, nn.Module or ("name", element)
        The layer whose output is modified (every time the module runs).
    units : list, LongTensor or BoolTensor
        Which units to ablate. A list of flat unit indices (or, for neurons, index tuples into
        the layer's shape) or a 1-D LongTensor: shared by every example. A LongTensor
        (batch, k): per-example indices. A boolean mask of shape (*unit_shape) (shared) or
        (batch, *unit_shape) (per example); flattened (n_units,) / (batch, n_units) also work.
        The unit shape is the layer's shape without the batch for ``unit_type="neuron"`` and
        (channels,) for ``"channel"``.
    mode : {"zero", "baseline", "mean"}
        "zero" sets the units to 0. "baseline" and "mean" set them to ``values``: the layer's
        value at the baseline input (:func:`layer_values`) or a mean over data
        (:func:`layer_mean`); the two differ only in what the values mean.
    values : Tensor, optional
        Shape (*layer_shape) (shared), (batch, *layer_shape) (per example) or, for channel
        units, (channels,) / (batch, channels) broadcast over positions.
    unit_type : {"neuron", "channel"}

    Raises
    ------
    ConductanceError
        Unknown mode or unit type; values missing or of the wrong shape; a unit index out of
        range (checked when the layer first runs, since its shape is known only then). The
        hook is removed on exit, including on error. It acts only on forwards run in this thread (or
        in a copy of its context): another thread using the model meanwhile is not ablated.

    Example
    -------
    >>> with ablate(model, "features.3", [5, 17], unit_type="channel"):
    ...     logits = model(x)
    """
    _check_unit_type(unit_type, "unit_type")
    _check_mode(mode, values)
    if mode == "baseline" and values is None:
        raise ConductanceError("mode='baseline' needs values: pass values=layer_values(model, baselines, layer) "
                               "(the layer's output at the baseline input)")
    ref = _one_layer(model, layer)

    def fn(t: torch.Tensor) -> torch.Tensor:
        batch, layer_shape = t.shape[0], tuple(t.shape[1:])
        mask = _mask_from_units(units, batch, layer_shape, unit_type, ref)
        repl = None if mode == "zero" else _broadcast_values(values, batch, layer_shape, unit_type, ref, mode)
        return _apply(t, mask, repl, unit_type)

    with intervene(model, {ref: fn}):
        yield


# --------------------------------------------------------------------------------------------
# recording a layer


def _as_args(additional_forward_args: Any) -> tuple:
    if additional_forward_args is None:
        return ()
    return additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)


def _record(model: nn.Module, ref: LayerRef, inputs: torch.Tensor, args: tuple, kwargs: dict
            ) -> tuple[Any, torch.Tensor]:
    """One no-grad forward; returns (model output, the layer's output tensor)."""
    with torch.no_grad(), record(model, ref, need="an ablation") as rec:
        out = model(inputs, *args, **kwargs)
    rec.require()
    return out, rec.values[ref.name]


def _check_batch_inputs(inputs: Any) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor of shape (batch, ...), got {type(inputs).__name__}")
    if inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ConductanceError(f"inputs must have a batch dimension with at least one example; got shape "
                               f"{tuple(inputs.shape)}")
    return inputs.detach()


def layer_values(model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, *,
                 additional_forward_args: Any = None, forward_kwargs: Optional[dict] = None) -> torch.Tensor:
    """The output of ``layer`` for ``inputs``, from one forward pass without autograd.

    Returns a detached Tensor (batch, *layer_shape). With baseline inputs (e.g. zeros) this is
    the baseline activation that ``mode="baseline"`` substitutes.
    """
    ref = _one_layer(model, layer)
    inputs = _check_batch_inputs(inputs)
    _, value = _record(model, ref, inputs, _as_args(additional_forward_args), dict(forward_kwargs or {}))
    return value


def layer_mean(model: nn.Module, batches: Any, layer: LayerSpec, *, units: str = "neuron",
               additional_forward_args: Any = None, forward_kwargs: Optional[dict] = None) -> torch.Tensor:
    """Mean output of ``layer`` over every example of ``batches``, for ``mode="mean"``.

    Parameters
    ----------
    batches : Tensor (batch, ...) or an iterable of them
        An iterable may also yield tuples or lists whose first item is the input (a
        ``DataLoader`` of ``(x, y)`` pairs).
    units : {"neuron", "channel"}
        "neuron": the mean of each element, shape (*layer_shape). "channel": the mean of each
        channel over examples and positions, shape (channels,).
    """
    _check_unit_type(units, "units")
    ref = _one_layer(model, layer)
    args, kwargs = _as_args(additional_forward_args), dict(forward_kwargs or {})
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    total: Optional[torch.Tensor] = None
    count = 0
    dtype = None
    for item in batches:
        x = item[0] if isinstance(item, (tuple, list)) else item
        x = _check_batch_inputs(x)
        _, value = _record(model, ref, x, args, kwargs)
        dtype = value.dtype
        if units == "channel":
            if value.dim() < 2:
                raise ConductanceError(f"layer {ref.name!r} has no channel dimension; use units='neuron'")
            part = value.double().transpose(0, 1).reshape(value.shape[1], -1)
            s, c = part.sum(1), part.shape[1]
        else:
            s, c = value.double().sum(0), value.shape[0]
        if total is not None and s.shape != total.shape:
            raise ConductanceError(f"layer {ref.name!r} changed shape between batches ({tuple(total.shape)} -> "
                                   f"{tuple(s.shape)}); a mean needs one shape")
        total = s if total is None else total + s
        count += c
    if total is None:
        raise ConductanceError("layer_mean got no batches; pass a tensor or a non-empty iterable of inputs")
    return (total / count).to(dtype)


# --------------------------------------------------------------------------------------------
# rankings


def _orders(ranking: Any, ref: LayerRef, batch: int, n: int, layer_shape: tuple, unit_shape: tuple, units: str,
            device: torch.device) -> torch.Tensor:
    """Turn a ranking into orders (batch, L) of flat unit indices, most important first."""
    if isinstance(ranking, Mapping):
        result_units = getattr(ranking, "units", None)
        if result_units is not None and result_units != units:
            raise ConductanceError(f"the ranking was computed with units={result_units!r} but the ablation uses "
                                   f"units={units!r}; compute both with the same units")
        if ref.name not in ranking:
            raise ConductanceError(f"the ranking has no entry for layer {ref.name!r} (it has {list(ranking)})")
        ranking = ranking[ref.name]
    if isinstance(ranking, np.ndarray):
        ranking = torch.from_numpy(ranking)
    if isinstance(ranking, (list, tuple, range)):
        ranking = torch.as_tensor(list(ranking))
    if not isinstance(ranking, torch.Tensor):
        raise ConductanceError(f"a ranking must be a tensor of scores (batch, n_units), a LayerResult, or a list / "
                               f"LongTensor of unit indices; got {type(ranking).__name__}")
    where = _describe(ref, layer_shape, units, n)
    if ranking.is_floating_point():
        shape = tuple(ranking.shape)
        if shape in (unit_shape, (n,)):
            scores = ranking.reshape(1, n).expand(batch, n)
        elif shape in ((batch,) + unit_shape, (batch, n)):
            scores = ranking.reshape(batch, n)
        else:
            raise ConductanceError(f"a ranking of scores has shape {shape}, but the layer has {n} units "
                                   f"({units}); pass scores of shape ({batch}, {n}) (one row per example), "
                                   f"{(batch,) + unit_shape}, or ({n},) shared, computed with units={units!r} "
                                   "on this layer")
        if not torch.isfinite(scores).all():
            raise ConductanceError("the ranking scores contain NaN or Inf; rank by finite scores")
        return torch.argsort(scores.to(device), dim=1, descending=True, stable=True)
    if ranking.dtype == torch.bool or ranking.is_complex():
        raise ConductanceError(f"a ranking must hold scores (floating point) or unit indices (integers); got "
                               f"{ranking.dtype}")
    order = ranking.long().to(device)
    if order.dim() == 1:
        order = order.unsqueeze(0).expand(batch, -1)
    elif order.dim() != 2 or order.shape[0] != batch:
        raise ConductanceError(f"an order of unit indices must be (L,) shared or ({batch}, L) per example; got "
                               f"shape {tuple(order.shape)}")
    if order.shape[1] == 0:
        raise ConductanceError("the ranking is empty; give at least one unit")
    if order.shape[1] > n:
        raise ConductanceError(f"the ranking lists {order.shape[1]} units but {where}; rank this layer's units "
                               f"(with units={units!r}), at most {n} of them")
    if order.min() < 0 or order.max() >= n:
        raise ConductanceError(f"the ranking holds unit indices outside 0..{n - 1}: {where}; rank this layer's "
                               "units with flat indices")
    srt = order.sort(1).values
    if (srt[:, 1:] == srt[:, :-1]).any():
        raise ConductanceError("the ranking lists a unit twice; each unit may appear once per example")
    return order


def _positions(order: torch.Tensor, n: int) -> torch.Tensor:
    """pos[b, u] = rank of unit u for example b (0 = most important); units not ranked get n."""
    pos = torch.full((order.shape[0], n), n, dtype=torch.long, device=order.device)
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return pos.scatter_(1, order, ranks)


def _random_orders(batch: int, n: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    return torch.argsort(torch.rand(batch, n, generator=gen), dim=1).to(device)


def _seeds(random_seeds: Any) -> list[int]:
    if random_seeds is None or random_seeds is False:
        return []
    if isinstance(random_seeds, numbers.Integral):
        if random_seeds < 0:
            raise ConductanceError(f"random_seeds must be >= 0 (how many random rankings) or a list of seeds; got "
                                   f"{random_seeds}")
        return list(range(int(random_seeds)))
    return [int(s) for s in random_seeds]


# --------------------------------------------------------------------------------------------
# the batched runner


class _ExpandFailed(Exception):
    """The model cannot take a layer output expanded to more rows than the layers below computed."""


def _tensor_leaves(obj: Any) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensor_leaves(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensor_leaves(o)]
    return []


@contextlib.contextmanager
def _shrink_inputs(model: nn.Module, swap: dict) -> Iterator[None]:
    """Pre-hooks on every submodule: a module called with one of the full-row tensors in ``swap``
    (by identity) gets the tensor with one row per distinct example instead."""
    def swap_one(value: Any) -> Any:
        return swap.get(id(value), value) if isinstance(value, torch.Tensor) else value

    def edit(args: tuple, kwargs: dict) -> Any:
        if any(isinstance(a, torch.Tensor) and id(a) in swap for a in args) or any(
                isinstance(v, torch.Tensor) and id(v) in swap for v in kwargs.values()):
            return tuple(swap_one(a) for a in args), {k: swap_one(v) for k, v in kwargs.items()}
        return None

    submodules = [LayerRef(name, module, None, True) for name, module in model.named_modules() if name]
    if not submodules:
        yield
        return
    with intervene(model, dict.fromkeys(submodules, edit), whole=True):
        yield


class _Session:
    """One model, batch and layer: the unablated forward, and batched ablated forwards.

    A forward evaluates rows; a row is (example, set of ablated units), and rows are kept
    ordered by example. Two ways to run them:

    - plain: each row repeats its example's inputs, the hook on the layer masks row by row;
    - expanded: the model is called with one input row per row (so code such as
      ``x.view(inputs.size(0), -1)`` sees the right batch), but every submodule that is
      handed the inputs (or a per-example forward argument) receives them with one row per
      distinct example, so the layers below the ablated one run once per example; the hook
      expands the layer's output to one row per (example, ablation). For a deep layer this
      skips most of the work.

    ``expand_at_layer=None`` decides once, by a probe on two examples: the expanded run must
    go through and give the same scores as the plain run (else plain is used).
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, *, mode: str, values: Any,
                 units: str, baselines: Any, additional_forward_args: Any, forward_kwargs: Optional[dict],
                 batch_size: Optional[int], expand_at_layer: Optional[bool]):
        _check_unit_type(units, "units")
        _check_mode(mode, values)
        self.ref = _one_layer(model, layer)
        self.model = model
        self.inputs = _check_batch_inputs(inputs)
        self.batch = int(self.inputs.shape[0])
        self.device = self.inputs.device
        self.bar: Optional[Progress] = None   # counts ablated rows while a public call runs
        self.args = _as_args(additional_forward_args)
        self.kwargs = dict(forward_kwargs or {})
        self.mode, self.units = mode, units
        if batch_size is None:
            per = max(1, self.inputs[0].numel())
            batch_size = int(max(1, min(MAX_DEFAULT_ROWS, DEFAULT_ROW_ELEMENTS // per)))
        if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConductanceError(f"batch_size must be a positive integer (rows per forward pass); got {batch_size!r}")
        self.batch_size = int(batch_size)
        if expand_at_layer not in (None, True, False):
            raise ConductanceError(f"expand_at_layer must be None (probe and decide), True or False; got "
                                   f"{expand_at_layer!r}")
        self.expand: Optional[bool] = expand_at_layer
        self.expand_note = "requested" if expand_at_layer is not None else "not probed yet"
        warn_training(model, "ablation results")
        self.output, layer_out = _record(model, self.ref, self.inputs, self.args, self.kwargs)
        scores = logits_of(self.output)
        if scores.dim() != 2 or scores.shape[0] != self.batch:
            raise ConductanceError(f"ablation compares top-1 labels, so the model must return scores of shape "
                                   f"(batch, classes); it returned {tuple(scores.shape)}")
        self.labels = scores.argmax(1)
        self.layer_shape = tuple(layer_out.shape[1:])
        self.unit_shape, self.n_units = _unit_info(self.ref, layer_out.shape, units)
        self.values: Optional[torch.Tensor] = None
        if mode == "baseline" and values is None:
            if baselines is None:
                base = torch.zeros_like(self.inputs)
            elif self.inputs.is_floating_point():
                base = check_baselines(baselines, self.inputs)
            else:  # e.g. token ids: a pad-token baseline
                base = torch.as_tensor(baselines, device=self.device).expand_as(self.inputs)
            _, values = _record(model, self.ref, base, self.args, self.kwargs)
        if mode != "zero":
            self.values = _broadcast_values(values, self.batch, self.layer_shape, units, self.ref, mode).to(self.device)
        self.n_forwards = 0
        self.rows_evaluated = 0

    # -- rankings

    def orders(self, ranking: Any) -> torch.Tensor:
        return _orders(ranking, self.ref, self.batch, self.n_units, self.layer_shape, self.unit_shape, self.units,
                       self.device)

    def check_k(self, k: Any, limit: int, what: str) -> int:
        if isinstance(k, (np.integer, torch.Tensor)):
            k = k.item()
        if not isinstance(k, numbers.Integral) or isinstance(k, bool):
            raise ConductanceError(f"{what} must be an integer, got {k!r}")
        if k < 0:
            raise ConductanceError(f"{what}={k} is negative; give a number of units between 0 and {limit}")
        if k > limit:
            if limit < self.n_units:
                raise ConductanceError(f"{what}={k} is larger than the ranking's {limit} units; rank more units "
                                       f"or lower {what} to at most {limit}")
            raise ConductanceError(f"{what}={k} is larger than the number of units: "
                                   f"{_describe(self.ref, self.layer_shape, self.units, self.n_units)}; use at most "
                                   f"{limit}")
        return int(k)

    # -- forwards

    def run(self, rows_ex: torch.Tensor, mask_fn: Callable[[slice], torch.Tensor]) -> torch.Tensor:
        """Scores (rows, classes) for rows of examples ``rows_ex`` (sorted), ablating ``mask_fn(chunk)``."""
        if self.expand is None:
            self._probe()
        outs = []
        for start in range(0, rows_ex.shape[0], self.batch_size):
            chunk = slice(start, min(start + self.batch_size, rows_ex.shape[0]))
            try:
                outs.append(self._forward(rows_ex[chunk], mask_fn(chunk), bool(self.expand)))
                if self.bar is not None:
                    self.bar.update(chunk.stop - chunk.start)
            except (_ExpandFailed, RuntimeError) as exc:
                if not self.expand:
                    raise
                raise ConductanceError(f"the model cannot run with layer {self.ref.name!r}'s output expanded to "
                                       f"more rows than the layers below computed ({str(exc).splitlines()[0][:200]}); "
                                       "use expand_at_layer=False (every row repeats the whole forward)") from exc
        return torch.cat(outs)

    def _repl(self, rows_ex: torch.Tensor) -> Optional[torch.Tensor]:
        if self.values is None:
            return None
        return self.values if self.values.shape[0] == 1 else self.values[rows_ex]

    def _probe(self) -> None:
        """Decide ``expand``: two examples, two rows each (nothing ablated; every other unit ablated)."""
        ex = torch.arange(min(2, self.batch), device=self.device).repeat_interleave(2)
        mask = torch.zeros(ex.shape[0], self.n_units, dtype=torch.bool, device=self.device)
        mask[1::2, ::2] = True
        try:
            expanded = self._forward(ex, mask, True)
        except ConductanceError:
            raise
        except (_ExpandFailed, RuntimeError) as exc:
            self.expand, self.expand_note = False, f"probe failed: {str(exc).splitlines()[0][:200]}"
            return
        plain = self._forward(ex, mask, False)
        scale = float(plain.abs().max().clamp(min=1e-12))
        if torch.allclose(expanded, plain, rtol=1e-3, atol=1e-4 * scale):
            self.expand, self.expand_note = True, "probe agreed with the plain run"
        else:
            diff = float((expanded - plain).abs().max())
            self.expand, self.expand_note = False, f"probe differed from the plain run by {diff:.3g}"

    def _forward(self, rows_ex: torch.Tensor, mask: torch.Tensor, expand: bool) -> torch.Tensor:
        rows = rows_ex.shape[0]
        repl = self._repl(rows_ex)
        x = self.inputs[rows_ex]
        args = _index_args(self.args, rows_ex, self.batch)
        kwargs = _index_args(self.kwargs, rows_ex, self.batch)
        feed_ex, local = torch.unique_consecutive(rows_ex, return_inverse=True)
        shrink = expand and feed_ex.shape[0] < rows

        def fn(t: torch.Tensor) -> torch.Tensor:
            if shrink and t.shape[0] == feed_ex.shape[0]:
                t = t[local]
            elif t.shape[0] != rows:
                raise _ExpandFailed(f"layer {self.ref.name!r} produced {t.shape[0]} rows for {rows} rows of "
                                    f"{feed_ex.shape[0]} examples")
            return _apply(t, mask, repl, self.units)

        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if shrink:
                swap = {id(x): self.inputs[feed_ex]}
                small = _tensor_leaves((_index_args(self.args, feed_ex, self.batch),
                                        _index_args(self.kwargs, feed_ex, self.batch)))
                for full, part in zip(_tensor_leaves((args, kwargs)), small):
                    if full.shape[:1] == (rows,) and part.shape[:1] == feed_ex.shape:
                        swap[id(full)] = part
                stack.enter_context(_shrink_inputs(self.model, swap))
            hooked = stack.enter_context(intervene(self.model, {self.ref: fn}, once=True, need="an ablation"))
            out = self.model(x, *args, **kwargs)
        self.n_forwards += 1
        self.rows_evaluated += rows
        hooked.require()
        scores = logits_of(out)
        if scores.dim() != 2 or scores.shape[0] != rows:
            if expand:
                raise _ExpandFailed(f"the output has shape {tuple(scores.shape)} for {rows} rows")
            raise ConductanceError(f"the model returned scores of shape {tuple(scores.shape)} for {rows} input "
                                   "rows; ablation needs (rows, classes)")
        return scores

    # -- experiments

    def flip_counts(self, pos: torch.Tensor, max_units: int) -> torch.Tensor:
        flips = torch.full((self.batch,), math.inf, dtype=torch.float32, device=self.device)
        active = torch.arange(self.batch, device=self.device)
        if self.expand is None:
            self._probe()
        # expanded rows are cheap next to the layers below: start with wider prefix windows
        k0, width = 1, (EXPANDED_FIRST_WINDOW if self.expand else 1)
        while active.numel() and k0 <= max_units:
            w = min(width, max_units - k0 + 1, max(1, self.batch_size // active.numel()))
            rows_ex = active.repeat_interleave(w)
            rows_k = torch.arange(k0, k0 + w, device=self.device).repeat(active.numel())

            def mask_fn(chunk: slice) -> torch.Tensor:
                return pos[rows_ex[chunk]] < rows_k[chunk, None]

            labels = self.run(rows_ex, mask_fn).argmax(1)
            changed = (labels != self.labels[rows_ex]).view(active.numel(), w)
            hit = changed.any(1)
            first = changed.float().argmax(1)  # index of the first True
            flips[active[hit]] = (k0 + first[hit]).float()
            active = active[~hit]
            k0 += w
            width *= 2
        return flips

    def at_k(self, pos_list: Sequence[torch.Tensor], ks: Sequence[int], keep: bool) -> torch.Tensor:
        """Scores for every (ranking, example, k): (R, B, n_k, classes). Rows run ordered by example."""
        R, B, K = len(pos_list), self.batch, len(ks)
        pos_all = torch.stack(pos_list)  # (R, B, n)
        grid = torch.arange(B * R * K, device=self.device)
        rows_ex = grid // (R * K)
        rows_r = (grid // K) % R
        rows_k = torch.as_tensor(list(ks), device=self.device)[grid % K]

        def mask_fn(chunk: slice) -> torch.Tensor:
            p = pos_all[rows_r[chunk], rows_ex[chunk]]
            k = rows_k[chunk, None]
            return p >= k if keep else p < k

        scores = self.run(rows_ex, mask_fn)
        return scores.view(B, R, K, -1).transpose(0, 1)


def _session(model, inputs, layer, mode, values, units, baselines, additional_forward_args, forward_kwargs,
             batch_size, expand_at_layer) -> _Session:
    return _Session(model, inputs, layer, mode=mode, values=values, units=units, baselines=baselines,
                    additional_forward_args=additional_forward_args, forward_kwargs=forward_kwargs,
                    batch_size=batch_size, expand_at_layer=expand_at_layer)


# --------------------------------------------------------------------------------------------
# flip counts


@contextlib.contextmanager
def _counting(s: _Session, progress: Optional[bool], what: str, total: Optional[int] = None) -> Iterator[None]:
    """A bar counting the ablated rows ``s`` evaluates in this block (see :class:`Progress`)."""
    with Progress(progress, total, f"{what} of {s.ref.name}", "rows") as bar:
        s.bar = bar
        try:
            yield
        finally:
            s.bar = None


def flip_count(model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, ranking: Ranking, *,
               mode: str = "zero", values: Any = None, units: str = "neuron", max_units: Optional[int] = None,
               baselines: Any = None, additional_forward_args: Any = None, forward_kwargs: Optional[dict] = None,
               batch_size: Optional[int] = None, expand_at_layer: Optional[bool] = None,
               progress: Optional[bool] = None) -> torch.Tensor:
    """How many top-ranked units must be ablated before each example's top-1 label changes.

    For each example, units are ablated cumulatively in ranking order; the count is the
    first k at which the model's top-1 label differs from its unablated label. Every
    prefix k = 1, 2, ... is evaluated in order (a label can change back, so a search
    that assumes monotone flips would be wrong); many (example, prefix) rows share each
    forward pass, the prefix window of the examples still unflipped doubles each round,
    and the run stops as soon as every example has flipped.

    Parameters
    ----------
    ranking : Tensor, LayerResult or list of ints
        Scores (batch, n_units) or (batch, *unit_shape), highest first, per example
        (ties: lower index first); scores (n_units,) shared; or unit indices, most
        important first: a list / 1-D LongTensor shared by the batch, or a LongTensor
        (batch, L) per example. An index order may list fewer units than the layer has.
        A LayerResult is indexed by the layer's name.
    mode, values : see :func:`ablate`. With mode="baseline" and no values, the layer's
        output at ``baselines`` (default zeros) is used.
    units : {"neuron", "channel"}
    max_units : int, optional
        Largest prefix tried; default all ranked units.
    batch_size : int, optional
        Rows (example, prefix) per forward pass; default about 8M input elements, at most 1024.
    expand_at_layer : bool, optional
        True: the layers below the ablated one run once per example and the layer's output is
        expanded to one row per prefix (submodules handed the inputs get one row per example;
        the model itself still sees one input row per prefix). False: every row repeats the
        whole forward. None (default): a probe on two examples decides; expansion is kept only
        if it runs and gives the plain run's scores (a skip connection from the inputs to
        above the layer, for instance, makes it fail and the plain run is used).
    progress : bool, optional
        A bar on stderr counting the ablated rows evaluated (the total is known only at the end:
        the run stops when every example has flipped); None (default): when stderr is a terminal.

    Returns
    -------
    Tensor (batch,), float32
        The count per example, ``inf`` where the label never changed within ``max_units``.
    """
    check_progress(progress)
    s = _session(model, inputs, layer, mode, values, units, baselines, additional_forward_args, forward_kwargs,
                 batch_size, expand_at_layer)
    order = s.orders(ranking)
    limit = order.shape[1]
    k_max = limit if max_units is None else s.check_k(max_units, limit, "max_units")
    with _counting(s, progress, "flip counts"):
        return s.flip_counts(_positions(order, s.n_units), k_max)


def flipped_by_top_k(model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, ranking: Ranking, k: int = 10, *,
                     mode: str = "zero", values: Any = None, units: str = "neuron", baselines: Any = None,
                     additional_forward_args: Any = None, forward_kwargs: Optional[dict] = None,
                     batch_size: Optional[int] = None, expand_at_layer: Optional[bool] = None) -> torch.Tensor:
    """Whether ablating each example's top ``k`` units at once changes its top-1 label: BoolTensor (batch,).

    This is the paper's "removing the top 10 filters flipped 5 of 100" test. It is not the same
    as ``flip_count <= k``: a label that changed at a smaller prefix can change back by k.
    """
    s = _session(model, inputs, layer, mode, values, units, baselines, additional_forward_args, forward_kwargs,
                 batch_size, expand_at_layer)
    order = s.orders(ranking)
    k = s.check_k(k, order.shape[1], "k")
    return _flipped_at(s, _positions(order, s.n_units), k)


def _flipped_at(s: _Session, pos: torch.Tensor, k: int) -> torch.Tensor:
    scores = s.at_k([pos], [k], keep=False)[0, :, 0]
    return scores.argmax(1) != s.labels


# --------------------------------------------------------------------------------------------
# deletion and insertion curves


def _trapezoid(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Area under y over x (last axis), x rescaled to [0, 1]; a single point gives its height."""
    if x.shape[0] == 1:
        return y[..., 0]
    t = (x - x[0]) / (x[-1] - x[0])
    return (0.5 * (y[..., 1:] + y[..., :-1]) * np.diff(t)).sum(-1)


class ExampleArea(NamedTuple):
    """One row of :meth:`AblationCurve.top`."""

    example: int
    auc_logit: float          #: the example's area under its target-score curve
    unablated_logit: float    #: its target score without ablation


@dataclass(eq=False)
class AblationCurve(ResultProtocol):
    """A deletion or insertion curve of one ranking, with random rankings as the floor.

    Attributes
    ----------
    kind : "deletion" (the top-k units ablated) or "insertion" (all units ablated but the top k)
    layer, mode, units, n_units : what was ablated
    ks : int array (n_k,), the k grid
    logit : (batch, n_k) the target score per example at each k
    agreement : (batch, n_k) 1.0 where the top-1 label equals the unablated label
    unablated_logit : (batch,) the target score without ablation
    target : (batch,) the class whose score is tracked (None for a callable target)
    random_logit, random_agreement : (seeds, batch, n_k), the same for each random ranking
        (a fresh random order per example and seed), or None without seeds
    seeds : the random seeds used

    The areas (``auc_*``) use the trapezoid rule over k rescaled so the grid spans [0, 1]:
    each area is the curve's average height over the grid (with the default grid, from no
    unit to every unit).
    """

    kind: str
    layer: str
    mode: str
    units: str
    n_units: int
    ks: np.ndarray
    logit: np.ndarray
    agreement: np.ndarray
    unablated_logit: np.ndarray
    target: Optional[np.ndarray]
    random_logit: Optional[np.ndarray]
    random_agreement: Optional[np.ndarray]
    seeds: list[int] = field(default_factory=list)

    FORMAT: ClassVar[str] = "conductance.ablation_curve/1"

    def _layer_names(self) -> list[str]:
        return [self.layer]

    def _check_layer(self, layer: Any) -> None:
        if layer is not None and self._name_of(layer) != self.layer:
            raise ConductanceError(f"this curve is of layer {self.layer!r} only, not {layer!r}")

    def top(self, k: int = 5, layer: Union[str, nn.Module, None] = None) -> list[ExampleArea]:
        """The ``k`` examples the ranking moves most: for a deletion curve the smallest area under
        the target score (it falls fastest as top units go), for an insertion curve the largest
        (it recovers fastest as top units come back).

        A curve has one layer: ``layer`` may only name it (or be None). Returns
        :class:`ExampleArea` rows, most moved first.
        """
        self._check_layer(layer)
        area = self.auc_logit_per_example
        order = np.argsort(area if self.kind == "deletion" else -area, kind="stable")[:int(k)]
        return [ExampleArea(int(i), float(area[i]), float(self.unablated_logit[i])) for i in order]

    def to_dataframe(self) -> Any:
        """A tidy pandas table, one row per (ranking, seed, example, k): ``ranking`` ("ranking", or
        "random" for the random rankings), ``seed`` (None for the ranking), ``example``, ``k``,
        ``logit`` (target score) and ``agreement`` (1.0 where the top-1 label is unchanged). Needs pandas."""
        pd = pandas()
        batch, n_k = self.logit.shape

        def frame(ranking: str, seed: Any, logit: np.ndarray, agreement: np.ndarray) -> Any:
            return pd.DataFrame({"ranking": ranking, "seed": seed, "example": np.repeat(np.arange(batch), n_k),
                                 "k": np.tile(np.asarray(self.ks), batch), "logit": np.asarray(logit).reshape(-1),
                                 "agreement": np.asarray(agreement).reshape(-1)})

        frames = [frame("ranking", None, self.logit, self.agreement)]
        if self.random_logit is not None and self.random_agreement is not None:
            frames += [frame("random", seed, self.random_logit[i], self.random_agreement[i])
                       for i, seed in enumerate(self.seeds)]
        return pd.concat(frames, ignore_index=True)

    @property
    def mean_logit(self) -> np.ndarray:
        return self.logit.mean(0)

    @property
    def mean_agreement(self) -> np.ndarray:
        return self.agreement.mean(0)

    @property
    def random_mean_logit(self) -> Optional[np.ndarray]:
        return None if self.random_logit is None else self.random_logit.mean((0, 1))

    @property
    def random_mean_agreement(self) -> Optional[np.ndarray]:
        return None if self.random_agreement is None else self.random_agreement.mean((0, 1))

    @property
    def auc_logit(self) -> float:
        return float(_trapezoid(self.ks, self.mean_logit))

    @property
    def auc_agreement(self) -> float:
        return float(_trapezoid(self.ks, self.mean_agreement))

    @property
    def auc_logit_per_example(self) -> np.ndarray:
        return _trapezoid(self.ks, self.logit)

    @property
    def random_auc_logit(self) -> Optional[float]:
        return None if self.random_logit is None else float(_trapezoid(self.ks, self.random_mean_logit))

    @property
    def random_auc_agreement(self) -> Optional[float]:
        return None if self.random_agreement is None else float(_trapezoid(self.ks, self.random_mean_agreement))

    @property
    def random_auc_logit_per_seed(self) -> Optional[np.ndarray]:
        return None if self.random_logit is None else _trapezoid(self.ks, self.random_logit.mean(1))

    def to_dict(self) -> dict:
        """Plain lists and numbers (JSON-ready): the settings, mean curves, per-example curves and areas."""
        def arr(a: Optional[np.ndarray]) -> Any:
            return None if a is None else np.asarray(a).tolist()

        return {
            "kind": self.kind, "layer": self.layer, "mode": self.mode, "units": self.units,
            "n_units": self.n_units, "ks": arr(self.ks), "seeds": list(self.seeds),
            "mean_logit": arr(self.mean_logit), "mean_agreement": arr(self.mean_agreement),
            "random_mean_logit": arr(self.random_mean_logit), "random_mean_agreement": arr(self.random_mean_agreement),
            "auc_logit": self.auc_logit, "auc_agreement": self.auc_agreement,
            "random_auc_logit": self.random_auc_logit, "random_auc_agreement": self.random_auc_agreement,
            "random_auc_logit_per_seed": arr(self.random_auc_logit_per_seed),
            "logit": arr(self.logit), "agreement": arr(self.agreement),
            "unablated_logit": arr(self.unablated_logit), "target": arr(self.target),
        }

    def plot(self, what: str = "logit", *, label: str = "ranking", random: bool = True, ax: Any = None,
             title: Optional[str] = None, **kwargs: Any) -> Any:
        """The mean curve against k, with the random rankings' mean and min-max band over seeds.

        ``what``: "logit" (the target score) or "agreement" (share keeping the unablated top-1
        label). To compare rankings on one axes, call it for each curve with the same ``ax``,
        a ``label`` per ranking and ``random=False`` after the first. ``kwargs`` go to the
        ranking's ``ax.plot`` (e.g. ``color="red"``), not to the random rankings'. Returns the
        Figure (no pyplot figure left open).
        """
        from .plots import curves

        if what not in ("logit", "agreement"):
            raise ConductanceError(f"what must be 'logit' or 'agreement', got {what!r}")
        mine, rand = (self.logit, self.random_logit) if what == "logit" else (self.agreement, self.random_agreement)
        area = self.auc_logit if what == "logit" else self.auc_agreement
        series = {f"{label}, area {area:.3g}": (self.ks, mine.mean(0))}
        if random and rand is not None:
            rand_area = self.random_auc_logit if what == "logit" else self.random_auc_agreement
            # one mean curve per seed: the band shows how much random rankings vary
            series[f"random rankings, area {rand_area:.3g}"] = (self.ks, rand.mean(1))
        verb = "removed" if self.kind == "deletion" else "kept"
        if title is None:
            title = f"{self.kind} curve of {self.layer!r} ({self.mode} ablation, {self.logit.shape[0]} examples)"
        styles = {next(iter(series)): kwargs}
        return curves(series, f"top-k {self.units}s {verb}",
                      "mean target score" if what == "logit" else "share with unchanged top-1 label",
                      ax=ax, title=title, styles=styles)

    def summary(self) -> str:
        """A short text: the areas of the ranking and of the random rankings."""
        ks = self.ks.tolist()
        grid = str(ks) if len(ks) <= 12 else str(ks[:6])[:-1] + f", ..., {ks[-1]}]"
        lines = [f"{self.kind} curve, layer {self.layer!r}, mode {self.mode!r}, {self.n_units} {self.units}s, "
                 f"{self.logit.shape[0]} examples, k = {grid}"]
        lines.append(f"  area, target logit:    ranking {self.auc_logit:.4g}"
                     + (f"   random {self.random_auc_logit:.4g} ({len(self.seeds)} seeds)" if self.seeds else ""))
        lines.append(f"  area, top-1 agreement: ranking {self.auc_agreement:.4g}"
                     + (f"   random {self.random_auc_agreement:.4g}" if self.seeds else ""))
        return "\n".join(lines)


def _curve(kind: str, model, inputs, layer, ranking, *, ks, mode, values, units, target, random_seeds, baselines,
           additional_forward_args, forward_kwargs, batch_size, expand_at_layer, progress) -> AblationCurve:
    check_progress(progress)
    s = _session(model, inputs, layer, mode, values, units, baselines, additional_forward_args, forward_kwargs,
                 batch_size, expand_at_layer)
    order = s.orders(ranking)
    limit = order.shape[1]
    if ks is None:
        ks = np.unique(np.round(np.linspace(0, limit, min(limit + 1, DEFAULT_CURVE_POINTS))).astype(int))
    ks_list = [s.check_k(k.item() if isinstance(k, (np.integer, torch.Tensor)) else k, limit, "k")
               for k in (ks.tolist() if isinstance(ks, (np.ndarray, torch.Tensor)) else list(ks))]
    if not ks_list:
        raise ConductanceError("ks is empty; give the numbers of units to ablate, e.g. ks=range(0, 11)")
    ks_list = sorted(set(ks_list))
    seeds = _seeds(random_seeds)
    tgt = resolve_target(target, s.output, s.batch, s.device)
    pos_list = [_positions(order, s.n_units)]
    pos_list += [_positions(_random_orders(s.batch, s.n_units, seed, s.device), s.n_units) for seed in seeds]
    with _counting(s, progress, f"{kind} curve", len(pos_list) * s.batch * len(ks_list)):
        scores = s.at_k(pos_list, ks_list, keep=(kind == "insertion"))  # (R, B, K, classes)
    R, B, K, C = scores.shape
    labels = scores.argmax(-1)
    agree = (labels == s.labels.view(1, B, 1)).double()
    base_scores = logits_of(s.output)
    if callable(tgt):
        rows_ex = torch.arange(B, device=scores.device).view(1, B, 1).expand(R, B, K).reshape(-1)
        flat = call_target(tgt, scores.reshape(R * B * K, C), rows_ex)
        if not isinstance(flat, torch.Tensor) or flat.shape != (R * B * K,):
            raise ConductanceError("the target callable must return one score per row of a (rows, classes) output")
        logit = flat.view(R, B, K)
        unabl = call_target(tgt, base_scores, torch.arange(B, device=scores.device))
        target_arr = None
    else:
        logit = scores.gather(-1, tgt.view(1, B, 1, 1).expand(R, B, K, 1)).squeeze(-1)
        unabl = base_scores.gather(1, tgt.view(B, 1)).squeeze(1)
        target_arr = tgt.cpu().numpy()
    logit = logit.double().cpu().numpy()
    agree = agree.cpu().numpy()
    return AblationCurve(kind=kind, layer=s.ref.name, mode=mode, units=units, n_units=s.n_units,
                         ks=np.asarray(ks_list), logit=logit[0], agreement=agree[0],
                         unablated_logit=unabl.detach().double().cpu().numpy(), target=target_arr,
                         random_logit=logit[1:] if seeds else None, random_agreement=agree[1:] if seeds else None,
                         seeds=seeds).bind(model)


def deletion_curve(model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, ranking: Ranking, *,
                   ks: Optional[Iterable[int]] = None, mode: str = "zero", values: Any = None,
                   units: str = "neuron", target: Target = None, random_seeds: Union[int, Sequence[int]] = 5,
                   baselines: Any = None, additional_forward_args: Any = None,
                   forward_kwargs: Optional[dict] = None, batch_size: Optional[int] = None,
                   expand_at_layer: Optional[bool] = None, progress: Optional[bool] = None) -> AblationCurve:
    """The target score and top-1 agreement as each example's top-k units are ablated.

    ``ks``: the grid of k (0 <= k <= ranked units; default up to 33 evenly spaced values from
    0 to all units). ``target``: None tracks each example's unablated top class; an int, a
    LongTensor (batch,) or a callable ``scores (rows, classes) -> (rows,)`` also work.
    ``random_seeds``: how many random rankings (or a list of seeds) to evaluate alongside.
    A good ranking makes the deletion curve fall fast: its area is below the random area.
    Every (ranking, example, k) is one row of a batched forward pass (``progress`` counts them).
    Other arguments as in :func:`flip_count`.
    """
    return _curve("deletion", model, inputs, layer, ranking, ks=ks, mode=mode, values=values, units=units,
                  target=target, random_seeds=random_seeds, baselines=baselines,
                  additional_forward_args=additional_forward_args, forward_kwargs=forward_kwargs,
                  batch_size=batch_size, expand_at_layer=expand_at_layer, progress=progress)


def insertion_curve(model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, ranking: Ranking, *,
                    ks: Optional[Iterable[int]] = None, mode: str = "zero", values: Any = None,
                    units: str = "neuron", target: Target = None, random_seeds: Union[int, Sequence[int]] = 5,
                    baselines: Any = None, additional_forward_args: Any = None,
                    forward_kwargs: Optional[dict] = None, batch_size: Optional[int] = None,
                    expand_at_layer: Optional[bool] = None, progress: Optional[bool] = None) -> AblationCurve:
    """Like :func:`deletion_curve`, but every unit is ablated except each example's top k.

    A good ranking makes the insertion curve rise fast: its area is above the random area.
    """
    return _curve("insertion", model, inputs, layer, ranking, ks=ks, mode=mode, values=values, units=units,
                  target=target, random_seeds=random_seeds, baselines=baselines,
                  additional_forward_args=additional_forward_args, forward_kwargs=forward_kwargs,
                  batch_size=batch_size, expand_at_layer=expand_at_layer, progress=progress)


# --------------------------------------------------------------------------------------------
# the paper's summary


@dataclass(eq=False)
class AblationSummary(ResultProtocol):
    """Flip statistics per measure, reported the way the paper does.

    ``rows[name]`` holds: ``examples``; ``flipped`` (finite counts); ``mean_flips`` and
    ``median_flips`` over the examples that flipped (``inf`` counts are left out of both and
    reported as ``never``); ``more_than_k`` (counts above k, *including* the never-flipped,
    which needed more units than were tried); ``never``; ``max_flips`` (the largest finite
    count, None if none flipped); ``top_k_flipped`` (examples whose label changed when their
    top k units were ablated at once) and ``top_k_share``; ``top_k_exact`` (False when that
    column was estimated as ``count <= k`` from the flip counts, which can only overstate it).
    """

    rows: dict[str, dict]
    k: int
    flip_counts: dict[str, torch.Tensor]
    top_k: dict[str, torch.Tensor]
    layer: Optional[str] = None
    mode: Optional[str] = None

    FORMAT: ClassVar[str] = "conductance.ablation_summary/1"

    def _layer_names(self) -> list[str]:
        return [self.layer] if self.layer else []

    def summary(self) -> str:
        """The paper's table (:meth:`format_table`)."""
        return self.format_table()

    def top(self, k: int = 5, layer: Union[str, nn.Module, None] = None) -> list[tuple[str, dict]]:
        """The ``k`` best measures, as ``(name, rows[name])``: the largest share of examples whose
        label the removal of their top ``self.k`` units changes, ties broken by the smaller median
        flip count (measures that never flipped last).

        A summary has (at most) one layer: ``layer`` may only name it (or be None).
        """
        if layer is not None and self._name_of(layer) != self.layer:
            raise ConductanceError(f"this summary is of layer {self.layer!r} only, not {layer!r}")

        def key(item: tuple[str, dict]) -> tuple:
            r = item[1]
            median = r["median_flips"] if r["median_flips"] is not None else math.inf
            return (-r["top_k_share"], median)

        return sorted(self.rows.items(), key=key)[:int(k)]

    def to_dataframe(self) -> Any:
        """A tidy pandas table, one row per (measure, example): ``measure``, ``example``,
        ``flip_count`` (units removed until the label changed; inf: never within the units tried)
        and ``top_k_flipped`` (whether removing its top ``k`` units changed it). Needs pandas."""
        pd = pandas()
        frames = [pd.DataFrame({"measure": name, "example": np.arange(counts.numel()),
                                "flip_count": counts.double().numpy(),
                                "top_k_flipped": self.top_k[name].bool().numpy()})
                  for name, counts in self.flip_counts.items()]
        return pd.concat(frames, ignore_index=True)

    def format_table(self) -> str:
        head = ["measure", "flipped", "mean flips", "median", f"> {self.k}", "never", "max",
                f"top-{self.k} removal flips"]
        body = []
        for name, r in self.rows.items():
            star = "" if r["top_k_exact"] else "*"
            body.append([name, f"{r['flipped']}/{r['examples']}",
                         "-" if r["mean_flips"] is None else f"{r['mean_flips']:.2f}",
                         "-" if r["median_flips"] is None else f"{r['median_flips']:g}",
                         str(r["more_than_k"]), str(r["never"]),
                         "-" if r["max_flips"] is None else f"{r['max_flips']:g}",
                         f"{r['top_k_flipped']}/{r['examples']} ({100 * r['top_k_share']:.0f}%){star}"])
        widths = [max(len(str(row[i])) for row in [head] + body) for i in range(len(head))]
        fmt = lambda row: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(row, widths)))
        title = "ablation" + (f" of layer {self.layer!r}" if self.layer else "") + (
            f", mode {self.mode!r}" if self.mode else "")
        lines = [title, fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
        lines.append("mean and median over the examples that flipped; 'never' = no flip within the units tried "
                     f"(counted in '> {self.k}')")
        if any(not r["top_k_exact"] for r in self.rows.values()):
            lines.append(f"* estimated as flip count <= {self.k} (an upper bound: a label can flip back)")
        return "\n".join(lines)

    def plot(self, ax: Any = None, title: Optional[str] = None, **kwargs: Any) -> Any:
        """Share of examples whose label has changed after removing up to n units, one step curve per
        measure, with a line at ``k``. ``kwargs`` go to every ``ax.plot`` (e.g. ``color="red"``).
        Returns the matplotlib Figure (no pyplot figure left open)."""
        from .plots import flip_share

        if title is None:
            title = "label changes under ablation" + (f" of {self.layer!r}" if self.layer else "") + (
                f" ({self.mode})" if self.mode else "")
        return flip_share(self.flip_counts, k=self.k, ax=ax, title=title, **kwargs)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "mode": self.mode, "k": self.k, "rows": self.rows,
                "flip_counts": {n: [None if math.isinf(v) else v for v in c.tolist()]
                                for n, c in self.flip_counts.items()}}

    def __str__(self) -> str:
        return self.format_table()


def ablation_summary(flip_counts: Mapping[str, torch.Tensor],
                     top10_flipped: Optional[Mapping[str, torch.Tensor]] = None, *, k: int = 10,
                     layer: Optional[str] = None, mode: Optional[str] = None) -> AblationSummary:
    """Put flip counts of several measures side by side, as the paper reports them.

    Parameters
    ----------
    flip_counts : dict name -> Tensor (examples,)
        From :func:`flip_count`; ``inf`` marks examples that never flipped.
    top10_flipped : dict name -> BoolTensor (examples,), optional
        From :func:`flipped_by_top_k` with the same ``k``. For a name missing here the column
        is estimated as ``count <= k`` and marked with ``*``.
    k : the threshold of the "more than k" and "top-k removal" columns (the paper: 10).
    """
    if not flip_counts:
        raise ConductanceError("flip_counts is empty; pass {measure name: flip_count(...)}")
    top10_flipped = dict(top10_flipped or {})
    unknown = set(top10_flipped) - set(flip_counts)
    if unknown:
        raise ConductanceError(f"top10_flipped has measures {sorted(unknown)} with no flip counts")
    rows, counts_out, top_out = {}, {}, {}
    for name, counts in flip_counts.items():
        c = torch.as_tensor(counts, dtype=torch.float64).flatten().cpu()
        if torch.isnan(c).any() or (c < 1).any():
            raise ConductanceError(f"flip counts of {name!r} must be >= 1 or inf (from flip_count)")
        finite = c[torch.isfinite(c)]
        if name in top10_flipped:
            top = torch.as_tensor(top10_flipped[name]).flatten().bool().cpu()
            if top.shape != c.shape:
                raise ConductanceError(f"top10_flipped[{name!r}] has {top.numel()} examples, flip_counts "
                                       f"{c.numel()}; give one value per example")
            exact = True
        else:
            top, exact = c <= k, False
        rows[name] = {
            "examples": int(c.numel()), "flipped": int(finite.numel()),
            "mean_flips": float(finite.mean()) if finite.numel() else None,
            "median_flips": float(finite.median()) if finite.numel() else None,
            "more_than_k": int((c > k).sum()), "never": int(torch.isinf(c).sum()),
            "max_flips": float(finite.max()) if finite.numel() else None,
            "top_k_flipped": int(top.sum()), "top_k_share": float(top.double().mean()), "top_k_exact": exact,
        }
        counts_out[name], top_out[name] = c.float(), top
    return AblationSummary(rows=rows, k=k, flip_counts=counts_out, top_k=top_out, layer=layer, mode=mode)


def compare_rankings(model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, rankings: Mapping[str, Ranking], *,
                     mode: str = "zero", values: Any = None, units: str = "neuron", max_units: Optional[int] = None,
                     k: int = 10, random_seeds: Union[int, Sequence[int]] = 1, baselines: Any = None,
                     additional_forward_args: Any = None, forward_kwargs: Optional[dict] = None,
                     batch_size: Optional[int] = None, expand_at_layer: Optional[bool] = None,
                     progress: Optional[bool] = None) -> AblationSummary:
    """Flip counts and top-k removal for several rankings of one layer, plus random rankings.

    ``rankings``: {name: ranking} (each as in :func:`flip_count`). A row "random" pools the
    examples of ``random_seeds`` random rankings (a fresh order per example and seed). ``k`` is
    lowered to the number of units for a layer with fewer than ``k`` units (the table says
    which k was used). ``progress`` counts the ablated rows of all rankings (see
    :func:`flip_count`). Returns an :class:`AblationSummary`; print ``.format_table()``.
    """
    if not isinstance(rankings, Mapping) or not rankings:
        raise ConductanceError("rankings must be a non-empty dict {name: ranking}")
    check_progress(progress)
    s = _session(model, inputs, layer, mode, values, units, baselines, additional_forward_args, forward_kwargs,
                 batch_size, expand_at_layer)
    if "random" in rankings and random_seeds:
        raise ConductanceError("a ranking is named 'random', which is the name of the random row; rename it")
    k = min(s.check_k(k, max(k, 0), "k"), s.n_units)
    with _counting(s, progress, "rankings compared"):
        counts, tops = _compare(s, rankings, max_units, k, _seeds(random_seeds))
    return ablation_summary(counts, tops, k=k, layer=s.ref.name, mode=mode)


def _compare(s: _Session, rankings: Mapping[str, Ranking], max_units: Optional[int], k: int, seeds: list
             ) -> tuple[dict, dict]:
    counts, tops = {}, {}
    for name, ranking in rankings.items():
        order = s.orders(ranking)
        limit = order.shape[1]
        k_max = limit if max_units is None else s.check_k(max_units, limit, "max_units")
        pos = _positions(order, s.n_units)
        counts[name] = s.flip_counts(pos, k_max)
        tops[name] = _flipped_at(s, pos, s.check_k(k, limit, "k"))
    if seeds:
        k_max = s.n_units if max_units is None else s.check_k(max_units, s.n_units, "max_units")
        rc, rt = [], []
        for seed in seeds:
            pos = _positions(_random_orders(s.batch, s.n_units, seed, s.device), s.n_units)
            rc.append(s.flip_counts(pos, k_max))
            rt.append(_flipped_at(s, pos, k))
        counts["random"], tops["random"] = torch.cat(rc), torch.cat(rt)
    return counts, tops
