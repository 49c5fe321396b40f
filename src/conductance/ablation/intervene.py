"""The :func:`ablate` context manager, masks and replacement values, and recording a layer (:func:`layer_values`,
:func:`layer_mean`)."""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..errors import ConductanceError
from ..forward_args import ForwardArgs
from ..layers import LayerRef, LayerSpec, resolve_layers
from ..sites import intervene, record

MODES = ("zero", "baseline", "mean")


UNIT_TYPES = ("neuron", "channel")


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
                                   "use units='neuron'")
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
            raise ConductanceError(f"indices must be unit indices (ints, a LongTensor) or a boolean mask; got a "
                                   f"{units.dtype} tensor (to rank units by scores use flip_count)")
        idx = units.long()
        if idx.dim() > 2:
            raise ConductanceError(f"a LongTensor of indices must be (k,) shared or (batch, k) per example; got "
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
                raise ConductanceError(f"indices must be ints, index tuples or a boolean mask; got {u!r}")
        rows = torch.tensor(flat, dtype=torch.long).reshape(1, -1)
    else:
        raise ConductanceError(f"indices must be a list of unit indices, a LongTensor or a boolean mask; got "
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
def ablate(model: nn.Module, layer: LayerSpec, indices: Any = None, *, units: Any = "neuron", mode: str = "zero",
           values: Any = None, unit_type: Optional[str] = None) -> Iterator[None]:
    """Ablate units of one layer's output while the block runs.

    Parameters
    ----------
    model : nn.Module
    layer : str, nn.Module or ("name", element)
        The layer whose output is modified (every time the module runs).
    indices : list, LongTensor or BoolTensor
        Which units to ablate. A list of flat unit indices (or, for neurons, index tuples into
        the layer's shape) or a 1-D LongTensor: shared by every example. A LongTensor
        (batch, k): per-example indices. A boolean mask of shape (*unit_shape) (shared) or
        (batch, *unit_shape) (per example); flattened (n_units,) / (batch, n_units) also work.
        The unit shape is the layer's shape without the batch for ``units="neuron"`` and
        (channels,) for ``"channel"``.
    units : {"neuron", "channel"}
        The kind of unit, as in :func:`conductance.layer_conductance` and :func:`flip_count`.
    mode : {"zero", "baseline", "mean"}
        "zero" sets the units to 0. "baseline" and "mean" set them to ``values``: the layer's
        value at the baseline input (:func:`layer_values`) or a mean over data
        (:func:`layer_mean`); the two differ only in what the values mean.
    values : Tensor, optional
        Shape (*layer_shape) (shared), (batch, *layer_shape) (per example) or, for channel
        units, (channels,) / (batch, channels) broadcast over positions.
    unit_type : {"neuron", "channel"}, optional
        Deprecated name of ``units`` (a DeprecationWarning; removed in the next release). Until
        then ``units=`` given a list or tensor is taken as ``indices=``, with a DeprecationWarning.

    Yields
    ------
    None
        The model is ablated inside the ``with`` block only.

    Raises
    ------
    ConductanceError
        Unknown mode or unit kind; no indices; values missing or of the wrong shape; a unit index
        out of range (checked when the layer first runs, since its shape is known only then). The
        hook is removed on exit, including on error. It acts only on forwards run in this thread (or
        in a copy of its context): another thread using the model meanwhile is not ablated.

    Example
    -------
    >>> with ablate(model, "features.3", [5, 17], units="channel"):
    ...     logits = model(x)
    """
    indices, units, kind_arg = _renamed_arguments(indices, units, unit_type)
    _check_unit_type(units, kind_arg)
    kind = str(units)
    _check_mode(mode, values)
    if mode == "baseline" and values is None:
        raise ConductanceError("mode='baseline' needs values: pass values=layer_values(model, baselines, layer) "
                               "(the layer's output at the baseline input)")
    ref = _one_layer(model, layer)

    def fn(t: torch.Tensor) -> torch.Tensor:
        batch, layer_shape = t.shape[0], tuple(t.shape[1:])
        mask = _mask_from_units(indices, batch, layer_shape, kind, ref)
        repl = None if mode == "zero" else _broadcast_values(values, batch, layer_shape, kind, ref, mode)
        return _apply(t, mask, repl, kind)

    with intervene(model, {ref: fn}):
        yield


def _renamed_arguments(indices: Any, units: Any, unit_type: Optional[str]) -> tuple[Any, Any, str]:
    """``ablate``'s (indices, units, name of the kind's argument) from its current and its old keywords.

    Before, ``units`` held the indices and ``unit_type`` the kind; both old forms keep working for one
    release with a DeprecationWarning naming the new keyword (stacklevel: the user's ``with`` line,
    above contextlib's ``__enter__``)."""
    kind_arg = "units"
    if unit_type is not None:
        warnings.warn("ablate(unit_type=...) is renamed units=... (the kind of unit, 'neuron' or 'channel', as "
                      "in layer_conductance and flip_count); unit_type= will be removed in the next release",
                      DeprecationWarning, stacklevel=4)
        kind_arg = "unit_type"
    if not isinstance(units, str):
        if indices is not None:
            raise ConductanceError("ablate got indices and a non-string units=: units= is the kind of unit ('neuron' "
                                   "or 'channel') and indices= the units to ablate")
        warnings.warn("ablate(units=<indices>) is renamed indices=<indices>: units= now names the kind of unit "
                      "('neuron' or 'channel', formerly unit_type=); the old form will be removed in the next release",
                      DeprecationWarning, stacklevel=4)
        return units, (unit_type if unit_type is not None else "neuron"), kind_arg
    if unit_type is not None:
        if units not in ("neuron", unit_type):
            raise ConductanceError(f"ablate got units={units!r} and unit_type={unit_type!r}; unit_type is the old "
                                   "name of units: pass units= only")
        units = unit_type
    if indices is None:
        raise ConductanceError("ablate needs the units to ablate: indices= a list of unit indices, a LongTensor "
                               "or a boolean mask, e.g. ablate(model, layer, [3, 7], units='channel')")
    return indices, units, kind_arg


# --------------------------------------------------------------------------------------------
# recording a layer


def _record(model: nn.Module, ref: LayerRef, inputs: torch.Tensor, args: tuple, kwargs: dict
            ) -> tuple[Any, torch.Tensor]:
    """One no-grad forward with the model's own arguments (from :meth:`ForwardArgs.at`); returns (model
    output, the layer's output tensor)."""
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

    With baseline inputs (e.g. zeros) this is the baseline activation that ``mode="baseline"``
    substitutes.

    Parameters
    ----------
    model : nn.Module
    inputs : Tensor, shape (batch, *input_shape)
    layer : str, nn.Module or ("name", element)
    additional_forward_args : Any, optional
        Extra positional arguments of the model, after ``inputs``.
    forward_kwargs : dict, optional
        Keyword arguments of the model.

    Returns
    -------
    Tensor, shape (batch, *layer_shape)
        Detached.
    """
    ref = _one_layer(model, layer)
    inputs = _check_batch_inputs(inputs)
    args, kwargs = ForwardArgs.make(additional_forward_args, forward_kwargs, inputs.shape[0],
                                    warn_ambiguous=False).at()
    _, value = _record(model, ref, inputs, args, kwargs)
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
    additional_forward_args, forward_kwargs : optional
        As in :func:`layer_values`, passed with every batch.

    Returns
    -------
    Tensor, shape (*layer_shape) or (channels,)
        In the layer's dtype (summed in float64).
    """
    _check_unit_type(units, "units")
    ref = _one_layer(model, layer)
    # the same arguments for every batch (nothing indexed: batches need not match one batch size)
    args, kwargs = ForwardArgs.make(additional_forward_args, forward_kwargs, 0, warn_ambiguous=False).at()
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
