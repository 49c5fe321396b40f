"""The path-integral engine.

One engine serves every path-based measure: it evaluates points ``(example, a)`` of
the straight path in chunks, with hooks on all requested layers, and hands each
point's layer values ``y`` and gradients ``g = dF/dy`` to small measure functions
(see :mod:`conductance.measures`). Two drivers sit on top of the point evaluator:

- :func:`integrate_fixed` streams a fixed grid through the model, keeping only the
  last point of each example between chunks, so memory does not grow with the
  number of steps.
- :func:`conductance.adaptive.integrate_adaptive` keeps every evaluated point and bisects
  each example's path where its per-unit error estimate or its completeness residual is
  largest, until both meet the requested tolerance.

Both drivers also sum the rule on coarser grids and give, in :attr:`Integral.coarse`, the
comparison values the per-unit error estimate :func:`unit_error` measures against (see
:func:`comparison_values`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from . import kernels
from .errors import ConductanceError, not_dependent, warn
from .forward_args import Shared, ambiguous_args, shared, take_rows, unwrap_shared  # noqa: F401 (re-exported)
from .layers import LayerRef
from .measures import ACCUMULATORS
from .paths import Grid, coarse_positions, quarter_positions
from .sites import Recorder, never_reached

#: Name under which the (interpolated) input itself is recorded as a layer. Its
#: conductance is the integrated gradients of the input, and it is always a cut.
INPUT = "<input>"

#: The adaptive rule keeps every point's layer values and gradients; it stops adding points when
#: they would take more than this many bytes (and says so in the result). The default of the calls'
#: ``memory_budget=`` keyword; not to be changed (pass ``memory_budget=`` instead).
ADAPTIVE_STORE_BYTES = 3 * 2 ** 30

IntervalMeasure = Callable[..., torch.Tensor]


@dataclass
class PathProblem:
    """Everything fixed for one attribution call.

    Attributes
    ----------
    inputs, baselines : Tensor, shape (batch, *input_shape)
    target : LongTensor (batch,), a callable ``output -> (m,)``, or None for a model
        whose output is already one scalar per example.
    refs : layers to observe; ``track_input`` also records the input as layer ``INPUT``.
    chunk_size : number of path points sent through the model at once.
    """

    model: nn.Module
    inputs: torch.Tensor
    baselines: torch.Tensor
    target: Any
    additional_forward_args: tuple
    forward_kwargs: dict
    refs: list[LayerRef]
    chunk_size: int
    track_input: bool = False
    #: (layer name, value at the baseline, value at the input), each (batch, *layer_shape): when set,
    #: the path runs straight in that layer's own space instead of the input's
    layer_path: Optional[tuple] = None
    #: send path points in channels-last layout (4-D inputs of convolutional models): oneDNN's
    #: convolutions run faster on it; switched off for good if the model cannot take it
    channels_last: bool = False
    #: hand each recorded layer's value downstream as a copy: needed when the model changes a layer's
    #: output in place (an in-place ReLU after it); switched on for good when that is seen
    copy_layer_outputs: bool = False
    #: with several input tensors (a tuple), how they are packed into ``inputs`` (an
    #: ``inputs.InputSpec``); the model gets them unpacked
    input_spec: Any = None
    n_evaluations: int = 0
    n_forwards: int = 0
    #: whether the model computes in bf16 / fp16 (seen at the first evaluation); recorded values are
    #: then kept in float32 and the adaptive rule watches for the precision floor
    low_precision: bool = False
    #: bytes one stored path point takes (values and gradients of every requested layer), measured by
    #: :func:`check_cuts`; 0 while unknown
    point_bytes: int = 0
    #: a :class:`conductance.progress.Progress` counting evaluated points, or None
    progress: Any = None
    #: the cut map and the path's ends (:class:`Ends`) when the first forward (:func:`first_forward`)
    #: found them; None: :func:`check_cuts` and :func:`endpoint` run their own forwards
    cuts: Optional[dict[str, bool]] = None
    ends: Any = None

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def layer_names(self) -> list[str]:
        return [r.name for r in self.refs] + ([INPUT] if self.track_input else [])


@dataclass
class PointBatch:
    """Recorded values at ``m`` path points. ``ys[name]`` and ``gs[name]``: (m, *layer_shape); ``order``:
    the layers in the order the forward pass reached them (for :func:`check_finite`), when known."""

    ex: torch.Tensor
    alphas: torch.Tensor
    F: torch.Tensor
    ys: dict[str, torch.Tensor]
    gs: dict[str, torch.Tensor]
    order: Optional[list[str]] = None

    def check_finite(self) -> None:
        """:func:`check_finite` on this batch (layers in forward order when known)."""
        check_finite(self, self.order if self.order is not None else list(self.ys))


def model_output(problem: PathProblem, x: torch.Tensor, ex: torch.Tensor) -> Any:
    """Run the user's model on points ``x`` (m, *input_shape) belonging to examples ``ex``.

    Parameters
    ----------
    problem : PathProblem
    x : Tensor, shape (m, *input_shape)
        Path points (packed, for a tuple of inputs).
    ex : LongTensor, shape (m,)
        Example index of each point; per-example forward arguments are indexed with it.

    Returns
    -------
    Any
        Whatever the model returns for the batch of ``m`` points.
    """
    extra = take_rows(problem.additional_forward_args, ex, problem.batch_size)
    kwargs = take_rows(problem.forward_kwargs, ex, problem.batch_size)
    problem.n_forwards += 1
    if problem.input_spec is not None:
        return problem.model(*problem.input_spec.unpack(x), *extra, **kwargs)
    return problem.model(x, *extra, **kwargs)


def logits_of(output: Any) -> torch.Tensor:
    """The tensor of scores inside a model output (a tensor, a tuple's first item, ``.logits``).

    Parameters
    ----------
    output : Any
        A model's output.

    Returns
    -------
    Tensor, shape (m, ...)
        The scores, with the points in the first dimension.
    """
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConductanceError(f"the model returned a {type(output).__name__}; pass target=callable that maps "
                           "the model output to one scalar per example")


def target_arity(target: Callable) -> int:
    """1 for ``target(output)``, 2 for ``target(output, examples)``: two when the callable takes two
    positional arguments without defaults (or ``*args``).

    Parameters
    ----------
    target : callable

    Returns
    -------
    int
        1 or 2; a callable with no positional parameter raises a ConductanceError.
    """
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return 1   # a builtin without a signature: the one-argument form
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 2
    required = [p for p in positional if p.default is p.empty]
    if not positional:
        raise ConductanceError("the target callable takes no positional argument; it must be target(output) or "
                               "target(output, examples) returning one score per row of the output")
    return 2 if len(required) >= 2 else 1


def call_target(target: Callable, output: Any, ex: torch.Tensor) -> Any:
    """Call a target callable, giving it each row's example index (LongTensor (m,)) when it takes two arguments.

    Parameters
    ----------
    target : callable
    output : Any
        The model output for ``m`` points.
    ex : LongTensor, shape (m,)

    Returns
    -------
    Any
        What ``target`` returns (checked by the caller, one score per point).
    """
    return target(output, ex) if target_arity(target) == 2 else target(output)


def scalar_output(problem: PathProblem, output: Any, ex: torch.Tensor) -> torch.Tensor:
    """F at each point: the target's score, shape (m,).

    Parameters
    ----------
    problem : PathProblem
        Its ``target`` is None, a LongTensor (batch,) or (batch, k), or a callable.
    output : Any
        The model output at ``m`` points.
    ex : LongTensor, shape (m,)
        Example index of each point.

    Returns
    -------
    Tensor, shape (m,)
    """
    target = problem.target
    if callable(target):
        value = call_target(target, output, ex)
        if not isinstance(value, torch.Tensor) or value.shape != (ex.shape[0],):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConductanceError(f"the target callable must return a tensor of shape (points,) = "
                                   f"({ex.shape[0]},) for a model output batch; it returned {got}")
        if not value.is_floating_point():
            raise ConductanceError(f"the target callable returned a {value.dtype} tensor: it must return the "
                                   "explained scores (floats, one per point, e.g. lambda out: out[:, 3]), not "
                                   "class indices; to explain a class pass target=<class index> instead")
        return value
    scores = logits_of(output)
    if target is None:
        return scores.reshape(scores.shape[0])
    if target.dim() == 2:
        # one index tuple per example into the output without its batch dimension, e.g. (position, token)
        idx = target[ex]
        rows = torch.arange(scores.shape[0], device=scores.device)
        return scores[(rows,) + tuple(idx.to(scores.device).unbind(1))]
    return scores.gather(1, target[ex].to(scores.device).unsqueeze(1)).squeeze(1)


def interpolate(problem: PathProblem, ex: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Points ``x' + a (x - x')`` for examples ``ex`` (m,) at ``alphas`` (m,); (m, *input_shape).

    Parameters
    ----------
    problem : PathProblem
    ex : LongTensor, shape (m,)
    alphas : Tensor, shape (m,)

    Returns
    -------
    Tensor, shape (m, *input_shape)
        In channels-last layout when ``problem.channels_last`` and the points are 4-D.
    """
    base = problem.baselines[ex]
    shape = (-1,) + (1,) * (base.dim() - 1)
    return _layout(problem, base + alphas.to(base.dtype).view(shape) * (problem.inputs[ex] - base))


def _layout(problem: PathProblem, x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if problem.channels_last and x.dim() == 4 else x


def wants_channels_last(model: nn.Module, inputs: torch.Tensor) -> bool:
    """Channels-last points pay off for 4-D floating inputs of a model with 2-D convolutions on the CPU
    (the automatic choice, ``channels_last=None``; ``CHANNELS_LAST`` is its documented default).

    Parameters
    ----------
    model : nn.Module
    inputs : Tensor, shape (batch, *input_shape)

    Returns
    -------
    bool
    """
    return (CHANNELS_LAST and inputs.dim() == 4 and inputs.device.type == "cpu" and inputs.is_floating_point()
            and any(isinstance(m, nn.Conv2d) for m in model.modules()))


#: Default of the automatic layout choice; not to be changed: pass ``channels_last=False`` to a call to
#: keep path points in the inputs' own layout (results then match Captum's arithmetic more closely;
#: channels-last changes float32 results only by rounding).
CHANNELS_LAST = True

class ModifiedInPlace(RuntimeError):
    """The model changed a recorded layer's output in place during a forward pass."""


def evaluate(problem: PathProblem, ex: torch.Tensor, alphas: torch.Tensor, check_values: bool = True
             ) -> PointBatch:
    """Forward and backward at ``m`` path points; every recorded tensor is detached.

    Parameters
    ----------
    ex : LongTensor (m,)
        Example index of each point.
    alphas : Tensor (m,)
        Position of each point on its example's path.
    check_values : bool
        Check every recorded value and gradient for NaN / Inf (:func:`check_finite`). False: only F
        is checked here, and the caller must check the rest (``batch.check_finite()``), as
        :func:`integrate_fixed` does from its interval sums, which any NaN or Inf reaches.

    Returns
    -------
    PointBatch
        ``F`` (m,), and per recorded layer its value and gradient ``dF/dy``, each (m, *layer_shape).
    """
    m = int(ex.shape[0])
    if m > problem.chunk_size:
        # the chunk was halved after an out-of-memory error: later chunks are split the same way
        c = problem.chunk_size
        return _joined([evaluate(problem, ex[i:i + c], alphas[i:i + c], check_values) for i in range(0, m, c)])
    while True:
        try:
            batch = _evaluate(problem, ex, alphas, check_values)
            if problem.progress is not None:
                problem.progress.update(m)
            return batch
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                if m > 1:
                    break   # retried below, outside the handler, so the failed attempt's tensors are freed
                raise
            # Two fast paths fall back for good when a model cannot take them. An in-place change of a
            # recorded value handed on without a copy: seen by its version counter (ModifiedInPlace), or,
            # for the lowest one (a leaf), refused by autograd before anything changes; copies from now
            # on. Channels-last points: a probe (the model .view()s its activations, or anything else
            # that the inputs' own layout cures and that happens again in channels-last layout).
            # check_cuts and build_problem settle both before the path starts; this is for models whose
            # behaviour depends on the batch.
            if not problem.copy_layer_outputs and (isinstance(exc, ModifiedInPlace)
                                                   or is_leaf_in_place_refusal(exc)):
                problem.copy_layer_outputs = True
            elif problem.channels_last:
                return _without_channels_last(problem, ex, alphas, exc, check_values)
            else:
                raise
    problem.chunk_size = (m + 1) // 2
    if ex.device.type == "cuda":
        torch.cuda.empty_cache()
    warn(f"out of memory evaluating {m} path points at once; halved the chunk to {problem.chunk_size} points "
         f"and retried (pass internal_batch_size={problem.chunk_size} or less to start there)")
    return evaluate(problem, ex, alphas, check_values)


def _without_channels_last(problem: PathProblem, ex: torch.Tensor, alphas: torch.Tensor,
                           failure: RuntimeError, check_values: bool = True) -> PointBatch:
    """The chunk evaluated in the inputs' own layout after ``failure`` in channels-last layout.

    Channels-last points are dropped for the rest of the call only when the failure is the layout's:
    the points run in the inputs' layout (a failure there is the model's own and is raised) and fail
    again in channels-last layout. When the second channels-last attempt runs, the first failure was
    not the layout's and ``failure`` is raised, as the model raised it.
    """
    problem.channels_last = False
    batch = evaluate(problem, ex, alphas, check_values)
    problem.channels_last = True
    try:
        _evaluate(problem, ex, alphas, check_values)
    except RuntimeError:
        problem.channels_last = False
        return batch
    raise failure


@dataclass
class LayerPoints:
    """One chunk of ``m`` path points with the autograd graph from the points to one layer kept.

    ``x`` (m, *input_shape) are the points, ``y`` (m, *layer_shape) the layer's value there, ``F``
    (m,) the explained score (detached) and ``g`` = dF/dy (m, *layer_shape); :meth:`vjp` takes
    products ``v^T dy/dx`` through the kept graph."""

    ex: torch.Tensor
    alphas: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    g: torch.Tensor
    F: torch.Tensor

    def vjp(self, v: torch.Tensor) -> torch.Tensor:
        """``v[u]^T dy/dx`` for every row ``u`` of ``v`` (rows, m, *layer_shape): (rows, m, *input_shape).

        One product per row, reusing the graph. ``is_grads_batched`` (vmap) was measured slower on
        GoogLeNet: its convolution backward ran per unit on slower kernels, then stacked the results.

        Parameters
        ----------
        v : Tensor, shape (rows, m, *layer_shape)

        Returns
        -------
        Tensor, shape (rows, m, *input_shape)
        """
        rows = [torch.autograd.grad(self.y, self.x, grad_outputs=v[u], retain_graph=True)[0]
                for u in range(v.shape[0])]
        return torch.stack(rows)


@contextlib.contextmanager
def layer_points(problem: PathProblem, ex: torch.Tensor, alphas: torch.Tensor, ref: LayerRef
                 ) -> Iterator[LayerPoints]:
    """Forward and the upper backward pass at ``m`` path points, hooking one layer ``ref``.

    Inside the context the layer's hook is attached and the graph below the layer is kept, so the
    caller can take vector-Jacobian products from the layer to the points (neuron conductance
    masks ``g`` to each unit); the hook is removed when the context ends, also on an error.

    Parameters
    ----------
    ex : LongTensor (m,)
        Example index of each point.
    alphas : Tensor (m,)
        Position of each point on its example's path.

    Yields
    ------
    LayerPoints
        The points, the layer's value, ``F`` and ``dF/dy`` for the ``m`` points.
    """
    x = interpolate(problem, ex, alphas).detach().requires_grad_(True)
    recorder = Recorder([ref], cut_below=False)
    with recorder.attached(), torch.enable_grad():
        output = model_output(problem, x, ex)
        F = scalar_output(problem, output, ex)
        if ref.name not in recorder.values:
            raise never_reached([ref.name])
        y = recorder.values[ref.name]
        (g,) = torch.autograd.grad(F.sum(), y, retain_graph=True, allow_unused=True)
        if g is None:
            raise not_dependent([ref.name])
        yield LayerPoints(ex, alphas, x, y, g, F.detach())
    problem.n_evaluations += int(ex.shape[0])


#: The only exception texts the library reads, because PyTorch raises a plain RuntimeError with nothing
#: else to tell these failures apart:
#:
#: - memory running out on allocators that raise no torch.OutOfMemoryError (CUDA and XPU raise it,
#:   torch.cuda.OutOfMemoryError is the same class, and it is checked by type): the CPU allocator
#:   ("DefaultCPUAllocator: can't allocate memory: you tried to allocate ... bytes"), the MPS one ("MPS
#:   backend out of memory (MPS allocated: ...)") and torch's memory-limited allocators ("Failed to
#:   allocate N bytes. Memory limit: ...");
#: - autograd refusing an in-place change of a leaf that requires grad, or of a view of one ("a [view
#:   of a] leaf Variable that requires grad is being used in an in-place operation."): it refuses before
#:   the tensor changes, so the version counter that shows every other in-place change does not move.
#:   The lowest recorded layer's value is such a leaf when it is handed on without a copy.
#:
#: Each form is tested in tests/test_oom.py and tests/test_engine_fallbacks.py, raised by PyTorch itself
#: where this machine can (CPU allocator, autograd).
_OOM_MESSAGES = ("can't allocate memory", "out of memory", "Failed to allocate")
_LEAF_IN_PLACE_MESSAGE = "leaf Variable that requires grad is being used in an in-place operation"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator running out of memory (CUDA, MPS or the CPU).

    Parameters
    ----------
    exc : BaseException

    Returns
    -------
    bool
        True for ``torch.OutOfMemoryError`` (by type) and for a plain RuntimeError carrying one of the
        allocators' messages in :data:`_OOM_MESSAGES`.
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return type(exc) is RuntimeError and any(k in str(exc) for k in _OOM_MESSAGES)


def is_leaf_in_place_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is autograd refusing an in-place change of a leaf that requires grad (or a view of one).

    Parameters
    ----------
    exc : BaseException

    Returns
    -------
    bool
        True for the plain RuntimeError carrying :data:`_LEAF_IN_PLACE_MESSAGE`.
    """
    return type(exc) is RuntimeError and _LEAF_IN_PLACE_MESSAGE in str(exc)


def _joined(parts: list[PointBatch]) -> PointBatch:
    if len(parts) == 1:
        return parts[0]
    return PointBatch(torch.cat([p.ex for p in parts]), torch.cat([p.alphas for p in parts]),
                      torch.cat([p.F for p in parts]),
                      {n: torch.cat([p.ys[n] for p in parts]) for n in parts[0].ys},
                      {n: torch.cat([p.gs[n] for p in parts]) for n in parts[0].gs}, parts[0].order)


def _evaluate(problem: PathProblem, ex: torch.Tensor, alphas: torch.Tensor, check_values: bool = True
              ) -> PointBatch:
    replace = None
    if problem.layer_path is not None:
        name, start, end = problem.layer_path
        shape = (-1,) + (1,) * (start.dim() - 1)
        # the layer's ends live on the layer's device (a split model); ex and alphas on the inputs'
        at, a = ex.to(start.device), alphas.to(device=start.device, dtype=start.dtype).view(shape)
        replace = {name: start[at] + a * (end[at] - start[at])}
        x = _layout(problem, problem.inputs[ex])
    else:
        x = interpolate(problem, ex, alphas)
    recorder = Recorder(problem.refs, cut_below=not problem.track_input, replace=replace,
                        copy=problem.copy_layer_outputs)
    # the input is a recorded layer: autograd must run from it even inside a user's no_grad block
    grad_context = torch.enable_grad() if problem.track_input else contextlib.nullcontext()
    with recorder.attached(), grad_context:
        if problem.track_input:
            x = x.detach().requires_grad_(True)
        output = model_output(problem, x, ex)
        F = scalar_output(problem, output, ex)
        missing = [r.name for r in problem.refs if r.name not in recorder.values]
        if missing:
            raise never_reached(missing)
        names = [r.name for r in problem.refs]
        tensors = [recorder.values[n] for n in names]
        if problem.track_input:
            names.append(INPUT)
            tensors.append(x)
        if not F.requires_grad:
            raise not_dependent(names)
        changed = recorder.modified_in_place()
        if changed:
            raise ModifiedInPlace(f"layers {changed} were modified by an in-place operation")
        grads = torch.autograd.grad(F.sum(), tensors, allow_unused=True)
    problem.n_evaluations += int(ex.shape[0])
    unused = [n for n, g in zip(names, grads) if g is None]
    if unused:
        raise not_dependent(unused)
    if any(t.dtype in _LOW_PRECISION for t in tensors):
        problem.low_precision = True
    batch = PointBatch(ex, alphas, _upcast(F.detach()), {n: _upcast(t.detach()) for n, t in zip(names, tensors)},
                       {n: _upcast(g.detach()) for n, g in zip(names, grads)},
                       ([INPUT] if problem.track_input else []) + [n for n in recorder.values if n in names])
    if check_values or not _finite(batch.F):
        batch.check_finite()
    return batch


def _finite(t: torch.Tensor) -> bool:
    # one reduction and no tensor-sized temporary in the common case; a sum can overflow to Inf from
    # finite values, so only an exact element check decides
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite(batch: PointBatch, order: Sequence[str]) -> None:
    """Raise a ConductanceError when the model produced NaN or Inf at any of the batch's points.

    ``order``: the recorded layers in the order the forward pass reached them. The message names the
    first layer whose value is not finite, else the output, else the last layer (nearest the output,
    where a bad derivative enters the backward pass) whose gradient is not finite, and the path
    positions (example, alpha) of the first points affected.

    Parameters
    ----------
    batch : PointBatch
        ``F`` (m,) and the recorded values and gradients, (m, *layer_shape) each.
    order : sequence of str
        Layer names, as described above.

    Raises
    ------
    ConductanceError
        When any value, gradient or output is NaN or infinite.
    """
    def where(bad: torch.Tensor) -> str:
        idx = bad.nonzero().flatten()[:5].tolist()
        return ", ".join(f"example {int(batch.ex[i])} at alpha={float(batch.alphas[i]):.6g}" for i in idx)

    def bad_points(t: torch.Tensor) -> torch.Tensor:
        return ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)

    for name in order:
        if not _finite(batch.ys[name]):
            raise ConductanceError(
                f"the model produced NaN or Inf: layer {name!r} is the first recorded layer with non-finite "
                f"values (at {where(bad_points(batch.ys[name]))}). "
                "Something at or below this layer overflows or leaves its domain (log or sqrt of a "
                "non-positive value, a division by zero) somewhere on the path between baseline and input; "
                "fix the model, or choose a baseline and inputs for which it stays finite")
    if not _finite(batch.F):
        raise ConductanceError(
            f"the model produced NaN or Inf in the explained output F (at {where(~torch.isfinite(batch.F))}) "
            f"although the recorded layers {list(order)} are finite: the problem lies above them; fix the model, or "
            "choose a baseline and inputs for which it stays finite")
    for name in reversed(order):
        if not _finite(batch.gs[name]):
            raise ConductanceError(
                f"the gradient of the output with respect to layer {name!r} is NaN or Inf "
                f"(at {where(bad_points(batch.gs[name]))}) while the values are finite: an operation above the "
                "layer has an infinite derivative there (sqrt or log at 0, abs-like kinks in a custom "
                "function); conductance is not defined on such a path: fix the model or the baseline")


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 values in float32, so that sums over the path keep their small contributions."""
    return t.float() if t.dtype in _LOW_PRECISION else t


def reduce_units(t: torch.Tensor, units: str) -> torch.Tensor:
    """(m, C, ...) -> (m, C) for ``units="channel"``; unchanged for ``"neuron"``.

    Parameters
    ----------
    t : Tensor, shape (m, C, ...)
    units : str
        ``"neuron"`` (one value per element) or ``"channel"`` (summed over the dimensions after ``C``).

    Returns
    -------
    Tensor
        (m, C) for channels, ``t`` itself for neurons.
    """
    if units == "channel" and t.dim() > 2:
        return t.sum(dim=tuple(range(2, t.dim())))   # any memory layout, no copy
    return t


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


class Scratch:
    """Reusable flat buffers, one per kind (the rule's gradient, each measure's output), shared by all
    layers.

    Interval sums run layer after layer, so one buffer of each kind, as large as the largest
    request, serves them all: the bookkeeping allocates no large temporaries and its memory
    does not grow with the number of layers.
    """

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, torch.Tensor] = {}

    def like(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        """A buffer of ``t``'s shape and, when dense, its strides (channels-last stays channels-last,
        so elementwise work runs in one memory order).

        Parameters
        ----------
        kind : str
            Which buffer (one per kind is kept and reused).
        t : Tensor
            Any shape; the buffer gets its shape, dtype, device and, when dense, its strides.

        Returns
        -------
        Tensor
            Uninitialised memory of ``t``'s shape, overwritten by the next request of the same kind.
        """
        key = (kind, t.shape, t.stride(), t.dtype, t.device)
        view = self._views.get(key)
        if view is not None:
            return view
        flat = self._flat.get(kind)
        if flat is None or flat.numel() < t.numel() or flat.dtype != t.dtype or flat.device != t.device:
            flat = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
            self._flat[kind] = flat
            self._views = {k: v for k, v in self._views.items() if k[0] != kind}
        if t.is_contiguous() or not _dense(t):
            view = flat[:t.numel()].view(t.shape)
        else:
            view = flat[:t.numel()].as_strided(t.shape, t.stride())
        self._views[key] = view
        return view


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s strides are a permutation of a contiguous layout (no gaps, no overlap)."""
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return False
        expected *= n
    return True


def interval_contributions(measures: dict[str, IntervalMeasure], y0: torch.Tensor, g0: torch.Tensor,
                           y1: torch.Tensor, g1: torch.Tensor, width: Union[torch.Tensor, float], rule: str,
                           units: Any,
                           scratch: Scratch) -> dict[str, torch.Tensor]:
    """Contributions of ``m`` path intervals of one layer, reduced to units.

    Parameters
    ----------
    y0, g0, y1, g1 : Tensor (m, *layer_shape)
        Layer values and gradients at the intervals' ends.
    width : Tensor (m,) or float
        ``a1 - a0`` per interval (a float when all intervals share it).
    rule : "left" or "trapezoid"

    Returns
    -------
    dict measure -> Tensor (m, *unit_shape). Where the units are the layer's own (no reduction)
    the tensors are views of ``scratch``'s buffers: read them before the next call.
    """
    if rule == "trapezoid" and _reduces(y0, units):
        if "conductance" in measures:
            # one pass over the four tensors instead of four (kernels.py; None where it does not apply)
            fused = kernels.channel_trapezoid(y0, g0, y1, g1)
            if fused is not None:
                rest = {m: fn for m, fn in measures.items() if m != "conductance"}
                out = interval_contributions(rest, y0, g0, y1, g1, width, rule, units, scratch) if rest else {}
                return {m: fused if m == "conductance" else out[m] for m in measures}
        # Both measures are linear in the rule's gradient, so they take the plain sum g0 + g1 and the
        # units' sums are halved afterwards (exact: a power of two); the last measure multiplies into
        # that sum's own buffer. A pass and a buffer fewer than forming the mean first: the interval
        # sums are memory-bound, and this is most of the adaptive rule's bookkeeping (docs/accuracy.md).
        gsum = torch.add(g0, g1, out=scratch.like("g", g0))
        parts = _contributions(measures, gsum, y0, y1, width, units, scratch, "", into_gbar=True)
        return {m: p.mul_(0.5) for m, p in parts.items()}
    # the rule's gradient for each interval: its left end, or the mean of both ends
    gbar = g0 if rule == "left" else torch.lerp(g0, g1, 0.5, out=scratch.like("g", g0))
    return _contributions(measures, gbar, y0, y1, width, units, scratch, "")


def _reduces(t: torch.Tensor, units: Any) -> bool:
    """Whether :func:`reduce_units` sums ``t`` (m, C, ...) into fresh (m, C) tensors."""
    return units == "channel" and t.dim() > 2


def left_and_right_contributions(measures: dict[str, IntervalMeasure], y0: torch.Tensor, g0: torch.Tensor,
                                 y1: torch.Tensor, g1: torch.Tensor, width: Union[torch.Tensor, float],
                                 units: Any, scratch: Scratch
                                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The left sums (gradient at each interval's start) and right sums (at its end) of ``m``
    intervals, as :func:`interval_contributions` gives them; their mean is the trapezoid rule.
    The layer's change is formed once for both.

    Parameters
    ----------
    measures : dict str -> IntervalMeasure
    y0, g0, y1, g1 : Tensor, shape (m, *layer_shape)
        The layer's value and gradient at the start and the end of each interval.
    width : Tensor broadcastable to (m, *layer_shape), or float
        Interval widths ``a1 - a0``.
    units : str
        ``"neuron"`` or ``"channel"``.
    scratch : Scratch

    Returns
    -------
    left, right : dict str -> Tensor, shape (m, *unit_shape)
        Per measure, each interval's contribution under the left and under the right rule.
    """
    if "conductance" in measures and _reduces(y0, units):
        fused = kernels.channel_left_right(y0, g0, y1, g1)   # kernels.py; None where it does not apply
        if fused is not None:
            rest = {m: fn for m, fn in measures.items() if m != "conductance"}
            lefts, rights = (left_and_right_contributions(rest, y0, g0, y1, g1, width, units, scratch)
                             if rest else ({}, {}))
            return ({m: fused[0] if m == "conductance" else lefts[m] for m in measures},
                    {m: fused[1] if m == "conductance" else rights[m] for m in measures})
    dy = torch.sub(y1, y0, out=scratch.like("dy", y0))
    return (_contributions(measures, g0, y0, y1, width, units, scratch, "", dy),
            _contributions(measures, g1, y0, y1, width, units, scratch, ":right", dy))


def add_by_position(measures: dict[str, IntervalMeasure], y0s: Sequence[torch.Tensor], g0s: Sequence[torch.Tensor],
                    y1s: Sequence[torch.Tensor], g1s: Sequence[torch.Tensor], widths: torch.Tensor,
                    totals: dict[str, Any], rule: str, scratch: Scratch) -> None:
    """Add ``k`` intervals' contributions into running sums in place, one interval at a time.

    Each interval is one path position of a block of ``b`` examples (a row per example), so its
    contribution has the running sum's shape and is added (``addcmul_``) without being written out:
    each layer's values and gradients are read once, and the small sums and the interval's change
    stay in the cache. The same sums as :func:`interval_contributions` (or
    :func:`left_and_right_contributions`) followed by a sum over positions, added in another order
    (float rounding); the units must be the layer's own (no reduction).

    Parameters
    ----------
    measures : dict str -> IntervalMeasure
        Each one a key of :data:`conductance.measures.ACCUMULATORS`.
    y0s, g0s, y1s, g1s : sequences of k Tensors, shape (b, *layer_shape)
        The layer's value and gradient at the start and at the end of each interval.
    widths : Tensor, shape (k,)
        Each interval's width ``a1 - a0``.
    totals : dict str -> Tensor (b, *layer_shape), or dict str -> (Tensor, Tensor)
        Per measure the running sum (rule ``"trapezoid"``), or the left and right sums (rule
        ``"left_and_right"``: the gradient at each interval's start, and at its end).
    rule : {"trapezoid", "left_and_right"}
    scratch : Scratch
    """
    adders = {m: ACCUMULATORS[fn] for m, fn in measures.items()}
    like = y0s[0]
    dy = scratch.like("dy:position", like)
    gbar = scratch.like("g:position", like) if rule == "trapezoid" else None
    w = widths.to(device=like.device, dtype=like.dtype).unbind(0)
    for k in range(len(y0s)):
        torch.sub(y1s[k], y0s[k], out=dy)
        if gbar is not None:
            torch.lerp(g0s[k], g1s[k], 0.5, out=gbar)
            for m, add in adders.items():
                add(totals[m], gbar, dy, w[k])
        else:
            for m, add in adders.items():
                add(totals[m][0], g0s[k], dy, w[k])
                add(totals[m][1], g1s[k], dy, w[k])


def _contributions(measures: dict[str, IntervalMeasure], gbar: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor,
                   width: Union[torch.Tensor, float], units: Any, scratch: Scratch, suffix: str,
                   dy: Optional[torch.Tensor] = None, into_gbar: bool = False) -> dict[str, torch.Tensor]:
    """Each measure's contributions; with ``into_gbar`` the last measure writes into ``gbar``'s buffer
    (only when its result is reduced to fresh unit tensors, so nothing returned aliases it)."""
    if dy is None:
        dy = torch.sub(y1, y0, out=scratch.like("dy", y0))
    if isinstance(width, torch.Tensor):
        width = width.to(device=y0.device, dtype=y0.dtype).view((-1,) + (1,) * (y0.dim() - 1))
    last = len(measures) - 1
    return {mname: reduce_units(fn(gbar, dy, width, gbar if into_gbar and i == last
                                   else scratch.like(mname + suffix, y0)), units)
            for i, (mname, fn) in enumerate(measures.items())}


def trapezoid_total(y0: torch.Tensor, g0: torch.Tensor, y1: torch.Tensor, g1: torch.Tensor,
                    scratch: Scratch) -> Optional[torch.Tensor]:
    """``sum((g0 + g1) / 2 * (y1 - y0))`` over all elements as two dot products, a 0-dim float64 tensor;
    None when the four tensors do not share one dense memory layout.

    Parameters
    ----------
    y0, g0, y1, g1 : Tensor, shape (m, *layer_shape)
    scratch : Scratch

    Returns
    -------
    Tensor, shape (), float64, or None
    """
    d = torch.sub(y1, y0, out=scratch.like("dy", y0))
    if not (_dense(d) and g0.stride() == d.stride() == g1.stride()):
        return None
    flat = [t.as_strided((t.numel(),), (1,)) for t in (g0, g1, d)]   # same element order in all three
    return (0.5 * (torch.dot(flat[0], flat[2]) + torch.dot(flat[1], flat[2]))).double()


@dataclass
class Integral:
    """What a driver returns.

    ``values[measure][layer]``: (batch, *unit_shape), the rule on the final grid. ``coarse`` holds
    the comparison values of the same shapes: ``values - coarse`` is the per-unit error estimate
    (see :func:`unit_error` and :func:`comparison_values`). A fixed rule keeps the sums it builds
    them from in ``levels`` (``"trapezoid"``: the trapezoid rule on the same points, for left sums;
    ``"coarse"`` and ``"quarter"``: the trapezoid rule on every other and every fourth point), so
    that pieces added later (Captum's missing ends) reach every level before :meth:`settle`.
    """

    values: dict[str, dict[str, torch.Tensor]]
    F_start: torch.Tensor
    F_end: torch.Tensor
    n_points: torch.Tensor
    coarse: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    interval_residuals: Optional[list] = None
    alphas: Optional[list] = None
    #: per example, a bool tensor over ``alphas``: whether the point belongs to the coarse grid
    coarse_masks: Optional[list] = None
    memory_limited: bool = False
    #: examples whose refinement stopped at the precision floor of a low-precision model
    precision_limited: list = field(default_factory=list)
    #: grids without end points: per block of examples, its (first, last) positions' points
    ends: list = field(default_factory=list)
    #: a fixed rule's comparison sums, level -> measure -> layer -> (batch, *unit_shape)
    levels: dict[str, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)

    def settle(self) -> None:
        """Set :attr:`coarse` from :attr:`levels` (see :func:`comparison_values`)."""
        if not self.levels:
            return
        trapezoid = self.levels.get("trapezoid", self.values)
        quarter = self.levels.get("quarter")
        self.coarse = {m: {n: comparison_values(v, self.levels["coarse"][m][n], trapezoid[m][n],
                                                None if quarter is None else quarter[m][n])
                           for n, v in per.items()} for m, per in self.values.items()}


#: Largest factor by which :func:`comparison_values` stretches the change from halving the points when the
#: changes do not shrink as they would for a converging rule (chosen on the per-unit benchmark,
#: docs/accuracy.md: 2 and 4 gave the same calibration, 2 is less cautious).
STRETCH_MAX = 2.0


def comparison_values(values: torch.Tensor, coarse: torch.Tensor, trapezoid: Optional[torch.Tensor] = None,
                      quarter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The values a rule's per-unit error is measured against; shape of ``values``.

    :func:`unit_error` reads ``||values - comparison||``, built here to be the sum of two bounds
    (a triangle inequality), per example:

    - ``||values - T||``, the rule's distance to the trapezoid rule ``T`` on its own points (0 for
      trapezoid rules, where ``T`` is ``values``; a left sum misses what the gradient does inside
      each interval), and
    - ``f ||T - T_2||``, the trapezoid rule's remaining error: ``T_2`` is the trapezoid rule on
      every other point, and the change from halving the points estimates the error left in ``T``
      for a rule that converges at least at first order (the slowest the per-unit integrands of
      ReLU networks show). With ``T_4`` on every fourth point and ``r = ||T - T_2|| / ||T_2 - T_4||``
      (how much the change shrank when the points doubled), a geometric sequence of changes leaves
      ``r / (1 - r)`` times the last one, so ``f = r / (1 - r)``, at least 1 and at most
      :data:`STRETCH_MAX`: more than 1 only where the changes shrink more slowly than at first
      order, as on grids of 16-32 points that do not converge yet (there the plain halving estimate
      was measured too low, docs/accuracy.md). Without ``quarter``, ``f = 1``.

    The difference ``values - comparison`` lies in the plane of the two changes, so reducing units
    further (heads from elements) reduces it consistently. For a trapezoid rule (no ``trapezoid``)
    the comparison is ``T - f (T - T_2)``: the coarse values themselves when ``f = 1``.

    Parameters
    ----------
    values, coarse, trapezoid, quarter : Tensor (batch, *unit_shape)

    Returns
    -------
    Tensor, shape (batch, *unit_shape)
    """
    T = values if trapezoid is None else trapezoid
    flat = (-1,) + (1,) * (values.dim() - 1)
    b = (T - coarse).detach().flatten(1).double()
    nb = b.norm(dim=1)
    stretch = torch.ones_like(nb)
    if quarter is not None:
        n2 = (coarse - quarter).detach().flatten(1).double().norm(dim=1)
        ratio = nb / n2.clamp(min=torch.finfo(torch.float64).tiny)
        stretch = (ratio / (1 - ratio).clamp(min=1.0 / (1.0 + STRETCH_MAX))).clamp(1.0, STRETCH_MAX)
        stretch = torch.where(nb == 0, torch.ones_like(stretch), stretch)
    if trapezoid is None:
        # in float64: the stretch can be large where the last change is tiny, and is then finite
        # only there (each element times it stays below half the previous change)
        moved = (T.detach().double() - coarse.detach().double()) * stretch.view(flat)
        return (T.detach().double() - moved).to(values.dtype)
    a = (values - trapezoid).detach().flatten(1).double()
    na, bound = a.norm(dim=1), stretch * nb
    direction = b / nb.clamp(min=torch.finfo(torch.float64).tiny)[:, None]
    inner = (a * direction).sum(1)
    direction = direction * torch.where(inner < 0, -1.0, 1.0)[:, None]
    beta = inner.abs()
    # the length t along the change that makes ||a + t direction|| = ||a|| + bound
    t = -beta + torch.sqrt(beta ** 2 + 2 * na * bound + bound ** 2)
    difference = a + t[:, None] * direction
    return (values.detach().double() - difference.view(values.shape)).to(values.dtype)


def integrate_fixed(problem: PathProblem, grid: Grid, measures: dict[str, IntervalMeasure],
                    units: str) -> Integral:
    """Integrate every measure over a grid shared by all examples, streaming the points.

    Points go through the model a block of examples at a time, whole path positions per chunk
    (position-major, examples inner, as Captum batches its steps). Intervals are read as slices
    (views) of the chunk and of the last position carried from the previous chunk.

    The comparison sums for the per-unit error estimate run alongside (``Integral.levels``, see
    :func:`comparison_values`): for a trapezoid rule, the trapezoid rule on every other and on
    every fourth point; for a left sum, the trapezoid rule on its own points and on every other
    point (halving a left sum's points does not see a gradient that jumps in the second interval
    of a pair, which is common in ReLU networks).
    A grid without end points also returns its first and last positions (``Integral.ends``) for
    the missing end pieces; the caller adds them to the levels and calls ``settle()`` again.

    Parameters
    ----------
    problem : PathProblem
        Model, inputs and baselines (batch, *input_shape), layers, chunk size.
    grid : Grid
        The positions (n_points,) in [0, 1] and how intervals combine (trapezoid or left sum).
    measures : dict str -> IntervalMeasure
        Each measure's contribution of one interval, by name.
    units : str
        The unit kind the layer values are reduced to (``"neuron"``, ``"channel"``, ...).

    Returns
    -------
    Integral
        ``values[measure][layer]`` (batch, *unit_shape), their comparison sums, ``F_start`` and
        ``F_end`` (batch,), and ``n_points`` (batch,).
    """
    B = problem.batch_size
    n = grid.n_points
    device = problem.inputs.device
    alphas_all = torch.as_tensor(grid.alphas, dtype=torch.float64)
    left = grid.interval_rule == "left"
    # A left sum's estimate adds its distance to the trapezoid rule (the triangle inequality), which
    # was enough on every grid measured (docs/accuracy.md); only trapezoid rules need the quarter
    # grid's stretch, so left sums skip its cost.
    kinds = ("coarse",) if left else ("coarse", "quarter")
    on_grid = {kind: np.zeros(n, dtype=bool) for kind in kinds}
    on_grid["coarse"][coarse_positions(n)] = True
    if not left:
        on_grid["quarter"][quarter_positions(n)] = True
    names = problem.layer_names
    acc: dict[str, dict[str, torch.Tensor]] = {m: {} for m in measures}
    levels: dict[str, dict[str, dict[str, torch.Tensor]]] = {level: {m: {} for m in measures} for level in kinds}
    right_sums: dict[str, dict[str, torch.Tensor]] = {m: {} for m in measures}   # left sums only
    scratch = Scratch()
    F_start = torch.zeros(B, device=device, dtype=accumulation_dtype(problem.inputs.dtype))
    F_end = torch.zeros_like(F_start)
    ends: list[tuple[PointBatch, PointBatch]] = []

    def add(target: dict, mname: str, name: str, ex_int: torch.Tensor, contrib: torch.Tensor,
            weight: float = 1.0) -> None:
        # a layer may live on another device (models split with device_map): its sums are
        # gathered on the inputs' device once reduced to units
        contrib = contrib.to(device)
        if name not in target[mname]:
            target[mname][name] = _zeros_in_layout((B,) + contrib.shape[1:], contrib)
        # Every interval batch here is whole path positions of the current block of examples
        # e0..e1-1 (the loop below), position-major: the rows of example e0 + j are j, j + b, ...
        # So the sum is a reduction over positions, several times faster on the CPU than index_add_
        # (a scatter there) on language-model layers.
        b = e1 - e0
        if contrib.shape[0] % b == 0:
            per = contrib.reshape((contrib.shape[0] // b, b) + tuple(contrib.shape[1:]))
            target[mname][name][e0:e1].add_(per.sum(0) if per.shape[0] > 1 else per[0], alpha=weight)
        else:
            target[mname][name].index_add_(0, ex_int, contrib, alpha=weight)

    # Element-level layers on the inputs' device (language models' layers) are summed position by
    # position straight into the running sums (add_by_position): less memory traffic than writing each
    # interval's contributions out and summing them (GPT-2 benchmark, docs/transformers.md). CPU only:
    # it launches three small kernels per position and layer, which a GPU may pay more for than it
    # saves (not measured: no GPU here), so CUDA keeps the written-out sums.
    by_position = device.type == "cpu" and all(fn in ACCUMULATORS for fn in measures.values())

    def direct(pts: PointBatch, name: str, rows: int) -> bool:
        y = pts.ys[name]
        return by_position and not _reduces(y, units) and y.device == device and rows % (e1 - e0) == 0

    def totals(target: dict, mname: str, name: str, like: torch.Tensor) -> torch.Tensor:
        """The running sum's rows of the current block of examples, (b, *unit_shape)."""
        if name not in target[mname]:
            target[mname][name] = _zeros_in_layout((B,) + tuple(like.shape[1:]), like)
        return target[mname][name][e0:e1]

    def positions(t: torch.Tensor) -> Sequence[torch.Tensor]:
        """Rows of whole path positions (position-major) -> one (b, *layer_shape) view per position."""
        return t.unflatten(0, (-1, e1 - e0)).unbind(0)

    def accumulate(target: dict, lo_pts: PointBatch, lo: slice, hi_pts: PointBatch, hi: slice) -> None:
        """The trapezoid rule over intervals lo -> hi into ``target``."""
        ex_int = hi_pts.ex[hi]
        width = (hi_pts.alphas[hi] - lo_pts.alphas[lo]).to(torch.float64)
        for name in names:
            if direct(hi_pts, name, int(ex_int.shape[0])):
                add_by_position(measures, positions(lo_pts.ys[name][lo]), positions(lo_pts.gs[name][lo]),
                                positions(hi_pts.ys[name][hi]), positions(hi_pts.gs[name][hi]), width[::e1 - e0],
                                {m: totals(target, m, name, hi_pts.ys[name]) for m in measures}, "trapezoid",
                                scratch)
                continue
            parts = interval_contributions(measures, lo_pts.ys[name][lo], lo_pts.gs[name][lo],
                                           hi_pts.ys[name][hi], hi_pts.gs[name][hi], width, "trapezoid", units,
                                           scratch)
            for mname, contrib in parts.items():
                add(target, mname, name, ex_int, contrib)

    def strided_accumulate(target: dict, pts: PointBatch, ks: list, k0: int, b: int) -> bool:
        """The trapezoid rule over consecutive positions ``ks`` of the chunk (evenly spaced) into
        ``target``, read through strided views of the chunk (no copy): each layer's points seen as
        (positions, b * layer size). Only for element units and plain layouts; False otherwise."""
        steps = {q - p for p, q in zip(ks, ks[1:])}
        tensors = [t for per in (pts.ys, pts.gs) for t in per.values()]
        if len(steps) != 1 or units != "neuron" or not all(t.is_contiguous() for t in tensors):
            return False
        step, first, count = steps.pop(), ks[0] - k0, len(ks)
        npos = pts.ex.shape[0] // b
        on = slice(first, first + step * (count - 1) + 1, step)
        at = alphas_all[ks[0]:ks[-1] + 1:step]
        width = (at[1:] - at[:-1]).to(device)
        for name in names:
            if direct(pts, name, int(pts.ex.shape[0])):
                ys, gs = positions(pts.ys[name])[on], positions(pts.gs[name])[on]
                add_by_position(measures, ys[:-1], gs[:-1], ys[1:], gs[1:], width,
                                {m: totals(target, m, name, pts.ys[name]) for m in measures}, "trapezoid", scratch)
                continue
            y, g = pts.ys[name].view(npos, -1)[on], pts.gs[name].view(npos, -1)[on]
            shape = (count - 1, b) + tuple(pts.ys[name].shape[1:])
            parts = interval_contributions(measures, y[:-1], g[:-1], y[1:], g[1:], width, "trapezoid", units,
                                           scratch)
            for mname, contrib in parts.items():
                contrib = contrib.to(device).reshape(shape)
                if name not in target[mname]:
                    target[mname][name] = _zeros_in_layout((B,) + shape[2:], contrib[0])
                target[mname][name][e0:e1].add_(contrib.sum(0))
        return True

    def intervals(lo_pts: PointBatch, lo: slice, hi_pts: PointBatch, hi: slice) -> None:
        """The rule's own sum over intervals lo -> hi (and, for a left sum, the trapezoid rule)."""
        if not left:
            accumulate(acc, lo_pts, lo, hi_pts, hi)
            return
        ex_int = hi_pts.ex[hi]
        width = (hi_pts.alphas[hi] - lo_pts.alphas[lo]).to(torch.float64)
        for name in names:
            if direct(hi_pts, name, int(ex_int.shape[0])):
                y = hi_pts.ys[name]
                add_by_position(measures, positions(lo_pts.ys[name][lo]), positions(lo_pts.gs[name][lo]),
                                positions(y[hi]), positions(hi_pts.gs[name][hi]), width[::e1 - e0],
                                {m: (totals(acc, m, name, y), totals(right_sums, m, name, y)) for m in measures},
                                "left_and_right", scratch)
                continue
            # both measures are linear in the gradient: the trapezoid rule is the mean of the left
            # and right sums, so one more product per interval gives it
            lefts, rights = left_and_right_contributions(measures, lo_pts.ys[name][lo], lo_pts.gs[name][lo],
                                                         hi_pts.ys[name][hi], hi_pts.gs[name][hi], width, units,
                                                         scratch)
            for mname in lefts:
                add(acc, mname, name, ex_int, lefts[mname])
                add(right_sums, mname, name, ex_int, rights[mname])

    # NaN / Inf in a chunk's values or gradients reaches its conductance sums (a product with a non-finite
    # factor is never finite, a sum with a non-finite term neither): the chunk is checked from those
    # (b, *unit_shape) sums instead of from every (m, *layer_shape) tensor, and in full only when they are
    # not finite, which then names the layer and the points (or finds a sum that overflowed)
    fold = "conductance" in measures

    def check_folded(pts: PointBatch, summed: bool) -> None:
        if not summed:   # no interval read the chunk's points yet (a single position)
            pts.check_finite()
            return
        sums = [t[e0:e1].sum().to(device) for per in ([acc, right_sums] if left else [acc])
                for t in per["conductance"].values()]
        if not bool(torch.isfinite(torch.stack(sums)).all()):
            pts.check_finite()

    block = max(1, min(B, problem.chunk_size))
    per_chunk = max(1, problem.chunk_size // block)
    everything = slice(None)
    for e0 in range(0, B, block):
        e1 = min(B, e0 + block)
        b = e1 - e0
        block_ex = torch.arange(e0, e1, device=device)
        last: Optional[PointBatch] = None          # the previous position (b points)
        previous: dict[str, Optional[PointBatch]] = dict.fromkeys(kinds)
        first: Optional[PointBatch] = None
        for k0 in range(0, n, per_chunk):
            k1 = min(n, k0 + per_chunk)
            ex = block_ex.repeat(k1 - k0)
            pts = evaluate(problem, ex, alphas_all[k0:k1].repeat_interleave(b).to(device), check_values=not fold)
            m = (k1 - k0) * b
            if k0 == 0:
                F_start[e0:e1] = pts.F[:b].to(device=device, dtype=F_start.dtype)
                first = _slice(pts, slice(0, b))
            if k1 == n:
                F_end[e0:e1] = pts.F[m - b:].to(device=device, dtype=F_end.dtype)
            if m > b:   # intervals inside the chunk: point i - b -> i
                intervals(pts, slice(0, m - b), pts, slice(b, m))
            if last is not None:
                intervals(last, everything, pts, slice(0, b))
            if fold:
                check_folded(pts, m > b or last is not None)
            for level in kinds:
                # the chunk's positions on this level's grid: their intervals are summed in one pass
                # per layer rather than one per pair of positions
                ks = [k for k in range(k0, k1) if on_grid[level][k]]
                if not ks:
                    continue
                before = previous[level]
                if before is not None:
                    accumulate(levels[level], before, everything, pts, slice((ks[0] - k0) * b, (ks[0] - k0 + 1) * b))
                if len(ks) > 1 and not strided_accumulate(levels[level], pts, ks, k0, b):
                    # pair by pair through views: a gathered copy of the level's rows (every layer's values
                    # and gradients) cost more than it saved on convolution layers (GoogLeNet's nine
                    # blocks: bookkeeping 9.0% -> 11.7% of evaluation)
                    here = _slice(pts, slice((ks[0] - k0) * b, (ks[0] - k0 + 1) * b))
                    for k in ks[1:]:
                        after = _slice(pts, slice((k - k0) * b, (k - k0 + 1) * b))
                        accumulate(levels[level], here, everything, after, everything)
                        here = after
                previous[level] = _slice(pts, slice((ks[-1] - k0) * b, (ks[-1] - k0 + 1) * b))
            last = _slice(pts, slice(m - b, m))
        if not grid.has_endpoints and first is not None and last is not None:
            ends.append((first, last))
    n_points = torch.full((B,), n, dtype=torch.long)
    values = {m: {name: v.contiguous() for name, v in per.items()} for m, per in acc.items()}
    if left:
        levels["trapezoid"] = {m: {name: 0.5 * (v + right_sums[m][name]) for name, v in per.items()}
                               for m, per in acc.items()}
    levels = {level: {m: {name: v.contiguous() for name, v in per.items()} for m, per in sums.items()}
              for level, sums in levels.items()}
    if len(coarse_positions(n)) == n:
        # two points: no coarser grid to learn from, so the estimate says the values may be
        # entirely wrong (the distance to zero) rather than claim they are exact
        levels["coarse"] = {m: {name: torch.zeros_like(v) for name, v in per.items()} for m, per in values.items()}
        levels.pop("quarter", None)
    integral = Integral(values, F_start, F_end, n_points, ends=ends, levels=levels)
    if grid.has_endpoints:   # else the caller settles once it has added the end pieces
        integral.settle()
    return integral


def _zeros_in_layout(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """Zeros of ``shape`` on ``like``'s device, in its memory layout (adding channels-last tensors
    into a contiguous one is several times slower)."""
    channels_last = like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(
        memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=layout).zero_()


def _slice(a: PointBatch, s: slice) -> PointBatch:
    return PointBatch(a.ex[s], a.alphas[s], a.F[s], {k: v[s] for k, v in a.ys.items()},
                      {k: v[s] for k, v in a.gs.items()}, a.order)


def relative_error(delta: torch.Tensor, output_diff: torch.Tensor, F_end: torch.Tensor,
                   F_start: torch.Tensor) -> torch.Tensor:
    """|delta| / |F(x) - F(x')|, guarded when F barely changes along the path; shape (batch,).

    Parameters
    ----------
    delta : Tensor, shape (batch,)
        Completeness gap: sum of the units' conductances minus ``F(x) - F(x')``.
    output_diff : Tensor, shape (batch,)
        ``F(x) - F(x')``.
    F_end, F_start : Tensor, shape (batch,)
        ``F(x)`` and ``F(x')``, which set the guard's scale.

    Returns
    -------
    Tensor, shape (batch,)
    """
    scale = torch.maximum(F_end.abs(), F_start.abs()).clamp(min=1.0)
    denom = torch.maximum(output_diff.abs(), 1e-6 * scale)
    return delta.abs() / denom


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are kept in: the model's, but at least float32 (bf16 and fp16 sums lose the
    small interval contributions).

    Parameters
    ----------
    dtype : torch.dtype

    Returns
    -------
    torch.dtype
    """
    return torch.promote_types(dtype, torch.float32)


#: A layer whose values are this small against |F(x) - F(x')| (in L2 norm) is measured against that
#: floor instead of its own norm: a relative error of values that carry almost nothing is not a
#: useful target, and it would ask for points without end.
UNIT_ERROR_FLOOR = 1e-3


def unit_error(values: torch.Tensor, coarse: torch.Tensor, output_diff: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """Estimated relative L2 error of each example's vector of unit values; shape (batch,).

    ``||values - coarse|| / ||values||``, where ``coarse`` is the same rule on the coarser grid: the
    change from halving the points bounds the error that remains, for rules that converge at least
    linearly (documented in docs/accuracy.md with measurements).

    Parameters
    ----------
    values, coarse : Tensor (batch, *unit_shape)
    output_diff : Tensor (batch,), optional
        ``F(x) - F(x')``; when given (conductance-like measures, in units of F) the norm is floored
        at ``UNIT_ERROR_FLOOR * |F(x) - F(x')|``.

    Returns
    -------
    Tensor, shape (batch,), float64
        0 where ``values`` and ``coarse`` agree exactly.
    """
    v = values.detach().flatten(1).to(torch.float64)
    diff = (v - coarse.detach().flatten(1).to(device=v.device, dtype=torch.float64)).norm(dim=1)
    norm = v.norm(dim=1)
    if output_diff is not None:
        norm = torch.maximum(norm, UNIT_ERROR_FLOOR * output_diff.detach().to(v.device, torch.float64).abs())
    err = diff / norm.clamp(min=torch.finfo(torch.float64).tiny)
    return torch.where(diff == 0, torch.zeros_like(err), err)


def record_values(problem: PathProblem, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each requested layer's value at ``x`` (batch, *input_shape), from one forward without autograd.

    Parameters
    ----------
    problem : PathProblem
    x : Tensor, shape (batch, *input_shape)

    Returns
    -------
    dict str -> Tensor, shape (batch, *layer_shape)
    """
    ex = torch.arange(x.shape[0], device=x.device)
    recorder = Recorder(problem.refs, cut_below=False)
    with recorder.attached(), torch.no_grad():
        model_output(problem, x, ex)
    missing = [r.name for r in problem.refs if r.name not in recorder.values]
    if missing:
        raise never_reached(missing)
    return {n: v.detach() for n, v in recorder.values.items()}


def endpoint(problem: PathProblem, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """F (batch,) and every recorded layer's value (batch, *layer_shape) at ``x``, an end of the path,
    from forwards without autograd (in chunks); the input itself is layer ``INPUT``.

    Parameters
    ----------
    problem : PathProblem
    x : Tensor, shape (batch, *input_shape)
        The inputs or the baselines.

    Returns
    -------
    F : Tensor, shape (batch,)
    values : dict str -> Tensor, shape (batch, *layer_shape)
    """
    Fs: list[torch.Tensor] = []
    values: dict[str, list[torch.Tensor]] = {n: [] for n in problem.layer_names}
    for start, stop in _chunks(x.shape[0], problem.chunk_size):
        ex = torch.arange(start, stop, device=x.device)
        recorder = Recorder(problem.refs, cut_below=False)
        with recorder.attached(), torch.no_grad():
            output = model_output(problem, _layout(problem, x[start:stop]), ex)
            Fs.append(_upcast(scalar_output(problem, output, ex).detach()).to(x.device))
        missing = [r.name for r in problem.refs if r.name not in recorder.values]
        if missing:
            raise never_reached(missing)
        for r in problem.refs:
            values[r.name].append(_upcast(recorder.values[r.name].detach()))
        if problem.track_input:
            values[INPUT].append(x[start:stop])
    return torch.cat(Fs), {n: torch.cat(v) for n, v in values.items()}


def graph_reaches(root: torch.Tensor, leaf: torch.Tensor, blocked: Sequence[Any] = ()) -> bool:
    """Whether the autograd graph of ``root`` reaches the leaf tensor ``leaf`` without passing
    through any of the ``blocked`` graph nodes (no backward is run).

    Parameters
    ----------
    root : Tensor
        Any tensor with an autograd graph.
    leaf : Tensor
        A tensor that requires grad.
    blocked : sequence of autograd nodes

    Returns
    -------
    bool
    """
    if root.grad_fn is None:
        return False
    seen, stack = set(blocked), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "variable", None) is leaf:
            return True
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return False


def dominating(root: torch.Tensor, leaf: torch.Tensor, nodes: Sequence[Any]) -> list[bool]:
    """For each of ``nodes`` (autograd graph nodes), whether every path of ``root``'s graph to the leaf
    tensor ``leaf`` passes through it; True for all when the graph does not reach ``leaf``.

    ``not graph_reaches(root, leaf, blocked=[node])`` for every node at once: one walk of the graph,
    each node marked with the set (a bit mask) of ``nodes`` that every one of its paths to ``leaf``
    crosses, the intersection over its inputs that reach ``leaf``.

    Parameters
    ----------
    root : Tensor
    leaf : Tensor
        A tensor that requires grad.
    nodes : sequence of autograd nodes

    Returns
    -------
    list of bool
    """
    if root.grad_fn is None:
        return [True] * len(nodes)
    bit: dict[Any, int] = {}
    for i, node in enumerate(nodes):
        bit[node] = bit.get(node, 0) | (1 << i)
    # mask of every path to the leaf from each finished node; None: the node does not reach the leaf
    done: dict[Any, Optional[int]] = {}
    stack: list[tuple[Any, bool]] = [(root.grad_fn, False)]
    while stack:
        node, expanded = stack.pop()
        if node in done and not expanded:
            continue
        children = [fn for fn, _ in node.next_functions if fn is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((fn, False) for fn in children if fn not in done)
            continue
        if getattr(node, "variable", None) is leaf:
            mask: Optional[int] = 0
        else:
            reaching = [done[fn] for fn in children if done.get(fn) is not None]
            mask = None
            for m in reaching:
                mask = m if mask is None else mask & m   # type: ignore[operator]
        if mask is not None:
            mask |= bit.get(node, 0)
        done[node] = mask
    top = done[root.grad_fn]
    return [True if top is None else bool(top >> i & 1) for i in range(len(nodes))]


def check_cuts(problem: PathProblem) -> dict[str, bool]:
    """For each requested layer, whether every path from the input to F passes through it.

    One forward of one example at the input, with every layer's value handed downstream
    through its own clone; a layer is a cut when F's graph no longer reaches the input once
    that clone's node is blocked. The same forward reports layers it never reaches, and sets
    ``problem.copy_layer_outputs`` when the model changes a layer's output in place.

    Parameters
    ----------
    problem : PathProblem

    Returns
    -------
    dict str -> bool
        Layer name -> whether it cuts every path from the input to F.
    """
    ex = torch.zeros(1, dtype=torch.long, device=problem.inputs.device)
    alpha = torch.ones(1, dtype=torch.float64, device=problem.inputs.device)
    recorder = Recorder(problem.refs, cut_below=False, keep_downstream=True)
    x = interpolate(problem, ex, alpha).detach().requires_grad_(True)
    with recorder.attached(), torch.enable_grad():
        output = model_output(problem, x, ex)
        F = scalar_output(problem, output, ex)
    missing = [r.name for r in problem.refs if r.name not in recorder.values]
    if missing:
        raise never_reached(missing)
    if recorder.modified_in_place():
        problem.copy_layer_outputs = True
    problem.point_bytes = sum(2 * v.numel() * max(v.element_size(), 4) for v in recorder.values.values())
    if problem.track_input:
        problem.point_bytes += 2 * x.numel() * max(x.element_size(), 4)
    cut = dominating(F, x, [recorder.downstream_node[ref.name] for ref in problem.refs])
    return {ref.name: c for ref, c in zip(problem.refs, cut)}


@dataclass
class Ends:
    """F (batch,) and every recorded layer's value (batch, *layer_shape) at the inputs and, when the
    first forward carried them, at the baselines (else None); the input itself is layer ``INPUT``
    when ``problem.track_input``."""

    F_end: torch.Tensor
    y_end: dict[str, torch.Tensor]
    F_start: Optional[torch.Tensor] = None
    y_start: Optional[dict[str, torch.Tensor]] = None


@dataclass
class FirstForward:
    """The graph of the call's first forward (:func:`first_forward`), until :func:`settle_first_forward` reads it."""

    x: torch.Tensor
    ex: torch.Tensor
    recorder: Recorder
    output: Any


def first_forward(problem: PathProblem, x: torch.Tensor, ex: torch.Tensor) -> tuple[Any, FirstForward]:
    """The model at the inputs (and, stacked after them, the baselines) before any path point runs,
    recorded.

    The forward that checks the target also hooks every requested layer, handing each value
    downstream through its own clone, with the graph from ``x`` kept: :func:`settle_first_forward`
    then takes the cut map, the layers never reached and the values at the path's ends from it, so
    that neither :func:`check_cuts` nor :func:`endpoint` needs a forward of its own.

    Parameters
    ----------
    problem : PathProblem
    x : Tensor, shape (rows, *input_shape)
        The inputs, optionally followed by the baselines.
    ex : LongTensor, shape (rows,)
        Example index of each row.

    Returns
    -------
    output : Any
        The model's output for the ``rows``.
    state : FirstForward
        What :func:`settle_first_forward` needs.
    """
    x = x.detach().requires_grad_(True)
    recorder = Recorder(problem.refs, cut_below=False, keep_downstream=True)
    with recorder.attached(), torch.enable_grad():
        output = model_output(problem, x, ex)
    return output, FirstForward(x, ex, recorder, output)


def settle_first_forward(problem: PathProblem, state: FirstForward) -> None:
    """Set ``problem.cuts``, ``problem.ends``, ``problem.point_bytes`` and, when the model changed a
    layer's output in place, ``problem.copy_layer_outputs`` from a recorded first forward, once
    ``problem.target`` is known (what :func:`check_cuts` and :func:`endpoint` would compute).

    Parameters
    ----------
    problem : PathProblem
    state : FirstForward
        From :func:`first_forward`; rows ``0..batch-1`` are the inputs, the
        next ``batch`` rows (if any) the baselines.
    """
    recorder, x, B = state.recorder, state.x, problem.batch_size
    with torch.enable_grad():
        F = scalar_output(problem, state.output, state.ex)
    recorder.require()
    if recorder.modified_in_place():
        problem.copy_layer_outputs = True
    problem.point_bytes = sum(2 * v[0].numel() * max(v.element_size(), 4) for v in recorder.values.values())
    if problem.track_input:
        problem.point_bytes += 2 * x[0].numel() * max(x.element_size(), 4)
    cut = dominating(F, x, [recorder.downstream_node[ref.name] for ref in problem.refs])
    problem.cuts = {ref.name: c for ref, c in zip(problem.refs, cut)}
    # F is gathered on the inputs' device (the output may be on the last device of a split model);
    # each layer's values stay on the layer's own device, as the path's do
    F = _upcast(F.detach()).to(x.device)
    values = {r.name: _upcast(recorder.values[r.name].detach()) for r in problem.refs}
    if problem.track_input:
        values[INPUT] = x.detach()
    ends = Ends(F[:B], {n: v[:B] for n, v in values.items()})
    if x.shape[0] == 2 * B:
        ends.F_start, ends.y_start = F[B:], {n: v[B:] for n, v in values.items()}
    problem.ends = ends
