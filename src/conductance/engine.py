"""The path-integral engine.

One engine serves every path-based measure: it evaluates points ``(example, a)`` of
the straight path in chunks, with hooks on all requested layers, and hands each
point's layer values ``y`` and gradients ``g = dF/dy`` to small measure functions
(see :mod:`conductance.measures`). Two drivers sit on top of the point evaluator:

- :func:`integrate_fixed` streams a fixed grid through the model, keeping only the
  last point of each example between chunks, so memory does not grow with the
  number of steps.
- :func:`integrate_adaptive` keeps every evaluated point, measures the completeness
  residual of every path interval on a cut layer, and bisects the worst intervals of
  every unfinished example until the requested completeness error is reached.
"""

from __future__ import annotations

import bisect
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

import contextlib

from .errors import ConductanceError, never_reached, not_dependent, warn
from .layers import LayerRef, Recorder
from .paths import Grid, gauss_legendre_nodes

#: Name under which the (interpolated) input itself is recorded as a layer. Its
#: conductance is the integrated gradients of the input, and it is always a cut.
INPUT = "<input>"

#: Each refinement round bisects an example's worst intervals until they hold this share of
#: its total absolute residual (measured on EfficientNet-Lite0: 0.3 beat 0.5 and 0.8).
REFINE_SHARE = 0.3
#: The adaptive rule keeps every point's layer values and gradients; it stops adding points when
#: they would take more than this many bytes (and says so in the result).
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

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def layer_names(self) -> list[str]:
        return [r.name for r in self.refs] + ([INPUT] if self.track_input else [])


@dataclass
class PointBatch:
    """Recorded values at ``m`` path points. ``ys[name]`` and ``gs[name]``: (m, *layer_shape)."""

    ex: torch.Tensor
    alphas: torch.Tensor
    F: torch.Tensor
    ys: dict[str, torch.Tensor]
    gs: dict[str, torch.Tensor]


def _index_args(args: Any, ex: torch.Tensor, batch: int) -> Any:
    """Expand per-example tensors (first dimension == batch) to the points; leave the rest."""
    if isinstance(args, torch.Tensor):
        return args[ex] if args.dim() > 0 and args.shape[0] == batch else args
    if isinstance(args, tuple):
        return tuple(_index_args(a, ex, batch) for a in args)
    if isinstance(args, list):
        return [_index_args(a, ex, batch) for a in args]
    if isinstance(args, dict):
        return {k: _index_args(v, ex, batch) for k, v in args.items()}
    return args


def model_output(problem: PathProblem, x: torch.Tensor, ex: torch.Tensor) -> Any:
    """Run the user's model on points ``x`` (m, *input_shape) belonging to examples ``ex``."""
    extra = _index_args(problem.additional_forward_args, ex, problem.batch_size)
    kwargs = _index_args(problem.forward_kwargs, ex, problem.batch_size)
    problem.n_forwards += 1
    if problem.input_spec is not None:
        return problem.model(*problem.input_spec.unpack(x), *extra, **kwargs)
    return problem.model(x, *extra, **kwargs)


def logits_of(output: Any) -> torch.Tensor:
    """The tensor of scores inside a model output (a tensor, a tuple's first item, ``.logits``)."""
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
    positional arguments without defaults (or ``*args``)."""
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
    """Call a target callable, giving it each row's example index (LongTensor (m,)) when it takes two arguments."""
    return target(output, ex) if target_arity(target) == 2 else target(output)


def scalar_output(problem: PathProblem, output: Any, ex: torch.Tensor) -> torch.Tensor:
    """F at each point: the target's score, shape (m,)."""
    target = problem.target
    if callable(target):
        value = call_target(target, output, ex)
        if not isinstance(value, torch.Tensor) or value.shape != (ex.shape[0],):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConductanceError(f"the target callable must return a tensor of shape (points,) = "
                                   f"({ex.shape[0]},) for a model output batch; it returned {got}")
        return value
    scores = logits_of(output)
    if target is None:
        return scores.reshape(scores.shape[0])
    if target.dim() == 2:
        # one index tuple per example into the output without its batch dimension, e.g. (position, token)
        idx = target[ex]
        rows = torch.arange(scores.shape[0], device=scores.device)
        return scores[(rows,) + tuple(idx.to(scores.device).unbind(1))]
    return scores.gather(1, target[ex].unsqueeze(1)).squeeze(1)


def interpolate(problem: PathProblem, ex: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Points ``x' + a (x - x')`` for examples ``ex`` (m,) at ``alphas`` (m,); (m, *input_shape)."""
    base = problem.baselines[ex]
    shape = (-1,) + (1,) * (base.dim() - 1)
    return _layout(problem, base + alphas.to(base.dtype).view(shape) * (problem.inputs[ex] - base))


def _layout(problem: PathProblem, x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if problem.channels_last and x.dim() == 4 else x


def wants_channels_last(model: nn.Module, inputs: torch.Tensor) -> bool:
    """Channels-last points pay off for 4-D floating inputs of a model with 2-D convolutions on the CPU."""
    return (CHANNELS_LAST and inputs.dim() == 4 and inputs.device.type == "cpu" and inputs.is_floating_point()
            and any(isinstance(m, nn.Conv2d) for m in model.modules()))


#: Set to False to keep path points in the inputs' own layout (results then match Captum's
#: arithmetic more closely; channels-last changes float32 results only by rounding).
CHANNELS_LAST = True

_LAYOUT_ERRORS = ("view size is not compatible", "stride", "contiguous")


def is_layout_error(exc: RuntimeError) -> bool:
    """Whether a model failed because it cannot take channels-last activations (it ``.view()``s them)."""
    return any(k in str(exc) for k in _LAYOUT_ERRORS)


class ModifiedInPlace(RuntimeError):
    """The model changed a recorded layer's output in place during a forward pass."""


#: what autograd says when a model changes a leaf or a saved tensor in place
_IN_PLACE_ERRORS = ("in-place operation", "inplace operation")


def evaluate(problem: PathProblem, ex: torch.Tensor, alphas: torch.Tensor) -> PointBatch:
    """Forward and backward at ``m`` path points; every recorded tensor is detached.

    Parameters
    ----------
    ex : LongTensor (m,)
        Example index of each point.
    alphas : Tensor (m,)
        Position of each point on its example's path.
    """
    m = int(ex.shape[0])
    if m > problem.chunk_size:
        # the chunk was halved after an out-of-memory error: later chunks are split the same way
        c = problem.chunk_size
        return _joined([evaluate(problem, ex[i:i + c], alphas[i:i + c]) for i in range(0, m, c)])
    while True:
        try:
            return _evaluate(problem, ex, alphas)
        except RuntimeError as exc:
            # Two fast paths fall back for good when a model cannot take them: a model that .view()s
            # its activations gets points in its own layout; a model that changes a recorded layer's
            # output in place gets a copy of each recorded value.
            if problem.channels_last and is_layout_error(exc):
                problem.channels_last = False
            elif not problem.copy_layer_outputs and (isinstance(exc, ModifiedInPlace)
                                                     or any(k in str(exc) for k in _IN_PLACE_ERRORS)):
                problem.copy_layer_outputs = True
            elif is_out_of_memory(exc) and m > 1:
                break   # retried below, outside the handler, so the failed attempt's tensors are freed
            else:
                raise
    problem.chunk_size = (m + 1) // 2
    if ex.device.type == "cuda":
        torch.cuda.empty_cache()
    warn(f"out of memory evaluating {m} path points at once; halved the chunk to {problem.chunk_size} points "
         f"and retried (pass internal_batch_size={problem.chunk_size} or less to start there)")
    return evaluate(problem, ex, alphas)


#: what PyTorch's allocators say when memory runs out (CUDA raises torch.OutOfMemoryError)
_OOM_ERRORS = ("out of memory", "can't allocate memory", "Failed to allocate")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator running out of memory (CUDA, MPS or the CPU)."""
    return isinstance(exc, torch.OutOfMemoryError) or any(k in str(exc) for k in _OOM_ERRORS)


def _joined(parts: list[PointBatch]) -> PointBatch:
    if len(parts) == 1:
        return parts[0]
    return PointBatch(torch.cat([p.ex for p in parts]), torch.cat([p.alphas for p in parts]),
                      torch.cat([p.F for p in parts]),
                      {n: torch.cat([p.ys[n] for p in parts]) for n in parts[0].ys},
                      {n: torch.cat([p.gs[n] for p in parts]) for n in parts[0].gs})


def _evaluate(problem: PathProblem, ex: torch.Tensor, alphas: torch.Tensor) -> PointBatch:
    replace = None
    if problem.layer_path is not None:
        name, start, end = problem.layer_path
        shape = (-1,) + (1,) * (start.dim() - 1)
        replace = {name: start[ex] + alphas.to(start.dtype).view(shape) * (end[ex] - start[ex])}
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
    return PointBatch(ex, alphas, F.detach(), {n: t.detach() for n, t in zip(names, tensors)},
                      {n: g.detach() for n, g in zip(names, grads)})


def reduce_units(t: torch.Tensor, units: str) -> torch.Tensor:
    """(m, C, ...) -> (m, C) for ``units="channel"``; unchanged for ``"neuron"``."""
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
        so elementwise work runs in one memory order)."""
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
    # the rule's gradient for each interval: its left end, or the mean of both ends
    gbar = g0 if rule == "left" else torch.lerp(g0, g1, 0.5, out=scratch.like("g", g0))
    if isinstance(width, torch.Tensor):
        width = width.to(device=y0.device, dtype=y0.dtype).view((-1,) + (1,) * (y0.dim() - 1))
    return {mname: reduce_units(fn(gbar, y0, y1, width, scratch.like(mname, y0)), units)
            for mname, fn in measures.items()}


def trapezoid_total(y0: torch.Tensor, g0: torch.Tensor, y1: torch.Tensor, g1: torch.Tensor,
                    scratch: Scratch) -> Optional[torch.Tensor]:
    """``sum((g0 + g1) / 2 * (y1 - y0))`` over all elements as two dot products, a 0-dim float64 tensor;
    None when the four tensors do not share one dense memory layout."""
    d = torch.sub(y1, y0, out=scratch.like("dy", y0))
    if not (_dense(d) and g0.stride() == d.stride() == g1.stride()):
        return None
    flat = [t.as_strided((t.numel(),), (1,)) for t in (g0, g1, d)]   # same element order in all three
    return (0.5 * (torch.dot(flat[0], flat[2]) + torch.dot(flat[1], flat[2]))).double()


@dataclass
class Integral:
    """What a driver returns. ``values[measure][layer]``: (batch, *unit_shape)."""

    values: dict[str, dict[str, torch.Tensor]]
    F_start: torch.Tensor
    F_end: torch.Tensor
    n_points: torch.Tensor
    interval_residuals: Optional[list] = None
    alphas: Optional[list] = None
    memory_limited: bool = False


def integrate_fixed(problem: PathProblem, grid: Grid, measures: dict[str, IntervalMeasure],
                    units: str) -> Integral:
    """Integrate every measure over a grid shared by all examples, streaming the points.

    Points are ordered by position then example, so the interval ending at flat point
    ``p`` starts at ``p - batch``; the last ``batch`` points are carried between chunks.
    Intervals are read as slices (views) of the chunk and of the carried points.
    """
    B = problem.batch_size
    n = grid.n_points
    device = problem.inputs.device
    alphas_all = torch.as_tensor(grid.alphas, dtype=torch.float64)
    flat_alpha = alphas_all.repeat_interleave(B)
    flat_ex = torch.arange(B, device=device).repeat(n)
    names = problem.layer_names
    acc: dict[str, dict[str, torch.Tensor]] = {m: {} for m in measures}
    scratch = Scratch()
    carry: Optional[PointBatch] = None
    F_start = torch.zeros(B, device=device, dtype=problem.inputs.dtype)
    F_end = torch.zeros(B, device=device, dtype=problem.inputs.dtype)

    def accumulate(lo_pts: PointBatch, lo: slice, hi_pts: PointBatch, hi: slice) -> None:
        ex_int = hi_pts.ex[hi]
        width = (hi_pts.alphas[hi] - lo_pts.alphas[lo]).to(torch.float64)
        for name in names:
            parts = interval_contributions(measures, lo_pts.ys[name][lo], lo_pts.gs[name][lo],
                                           hi_pts.ys[name][hi], hi_pts.gs[name][hi], width,
                                           grid.interval_rule, units, scratch)
            for mname, contrib in parts.items():
                # a layer may live on another device (models split with device_map): its sums are
                # gathered on the inputs' device once reduced to units
                contrib = contrib.to(device)
                if name not in acc[mname]:
                    acc[mname][name] = _zeros_in_layout((B,) + contrib.shape[1:], contrib)
                acc[mname][name].index_add_(0, ex_int, contrib)

    for start, stop in _chunks(n * B, problem.chunk_size):
        ex = flat_ex[start:stop]
        alpha = flat_alpha[start:stop]
        pts = evaluate(problem, ex, alpha.to(device))
        first = torch.arange(start, stop, device=device) < B
        last = torch.arange(start, stop, device=device) >= (n - 1) * B
        F_start[ex[first]] = pts.F[first]
        F_end[ex[last]] = pts.F[last]
        m = stop - start
        # intervals whose two ends are both in this chunk: local i-B -> i for i >= B
        if m > B:
            accumulate(pts, slice(0, m - B), pts, slice(B, m))
        # intervals that start in the carried points: flat p-B -> p for p in [max(start, B), min(stop, start+B))
        i0, i1 = max(0, B - start), min(m, B)
        if carry is not None and i0 < i1:
            shift = carry.ex.shape[0] - B
            accumulate(carry, slice(i0 + shift, i1 + shift), pts, slice(i0, i1))
        if m >= B:
            carry = _slice(pts, slice(m - B, None))
        else:
            joined = pts if carry is None else _concat(carry, pts)
            carry = _slice(joined, slice(max(0, joined.ex.shape[0] - B), None))
    n_points = torch.full((B,), n, dtype=torch.long)
    values = {m: {name: v.contiguous() for name, v in per.items()} for m, per in acc.items()}
    return Integral(values, F_start, F_end, n_points)


def _zeros_in_layout(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """Zeros of ``shape`` on ``like``'s device, in its memory layout (adding channels-last tensors
    into a contiguous one is several times slower)."""
    channels_last = like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(
        memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=layout).zero_()


def _concat(a: PointBatch, b: PointBatch) -> PointBatch:
    return PointBatch(torch.cat([a.ex, b.ex]), torch.cat([a.alphas, b.alphas]), torch.cat([a.F, b.F]),
                      {k: torch.cat([a.ys[k], b.ys[k]]) for k in a.ys},
                      {k: torch.cat([a.gs[k], b.gs[k]]) for k in a.gs})


def _slice(a: PointBatch, s: slice) -> PointBatch:
    return PointBatch(a.ex[s], a.alphas[s], a.F[s], {k: v[s] for k, v in a.ys.items()},
                      {k: v[s] for k, v in a.gs.items()})


def relative_error(delta: torch.Tensor, output_diff: torch.Tensor, F_end: torch.Tensor,
                   F_start: torch.Tensor) -> torch.Tensor:
    """|delta| / |F(x) - F(x')|, guarded when F barely changes along the path; shape (batch,)."""
    scale = torch.maximum(F_end.abs(), F_start.abs()).clamp(min=1.0)
    denom = torch.maximum(output_diff.abs(), 1e-6 * scale)
    return delta.abs() / denom


@dataclass
class _Path:
    """One example's refined grid in the adaptive rule."""

    ids: list                                            # store index of each point, in path order
    intervals: dict = field(default_factory=dict)        # (id0, id1) -> residual per cut layer, (n_cuts,)
    final: Optional[dict] = None                         # per-unit values once finished
    residuals: Optional[torch.Tensor] = None             # (intervals, cuts) once finished


def integrate_adaptive(problem: PathProblem, measures: dict[str, IntervalMeasure], units: str,
                       cut_layers: Sequence[str], tolerance: float, max_points: int,
                       initial_steps: int = 4, strict: bool = False) -> Integral:
    """Refine each example's path until the completeness error on the cut layers is at most ``tolerance``.

    Parameters
    ----------
    cut_layers : names (among ``problem.layer_names``) whose completeness drives refinement.
    tolerance : relative completeness error to reach, per example and cut layer.
    max_points : budget of path points per example.
    initial_steps : intervals of the starting grid (Gauss-Legendre nodes plus both ends).
    strict : if True, require the sum of the absolute interval residuals (not only their
        signed sum) to meet the tolerance, so errors cannot hide by cancelling.

    Every point is evaluated exactly once; each refinement round sends the midpoints of
    the worst intervals of all unfinished examples through the model together.

    Each new interval's completeness residual is measured on every cut layer, and an interval's
    score is its largest absolute residual: refinement goes where any cut layer is wrong. With
    units that shrink the layer (channels), an interval's per-unit sums are kept, so the final
    pass over the grid only sums the layers that are not cuts and the other measures.
    """
    B = problem.batch_size
    device = problem.inputs.device
    names = problem.layer_names
    cut_layers = list(cut_layers)
    init = np.concatenate([[0.0], gauss_legendre_nodes(initial_steps - 1), [1.0]]) if initial_steps > 1 \
        else np.array([0.0, 1.0])
    memory_limited = False
    # every evaluated point, by store index: its position, F, and each layer's value and gradient
    # (kept as (1, *layer_shape) views of the evaluated chunk)
    store_alpha: list[float] = []
    store_F: list[float] = []
    store_y: dict[str, list[Optional[torch.Tensor]]] = {n: [] for n in names}
    store_g: dict[str, list[Optional[torch.Tensor]]] = {n: [] for n in names}
    stored_bytes = 0
    scratch = Scratch()
    conductance_only = {"conductance": measures["conductance"]}

    def run(points: list[tuple[int, float]]) -> list[int]:
        nonlocal stored_bytes
        ids = []
        for start, stop in _chunks(len(points), problem.chunk_size):
            part = points[start:stop]
            ex = torch.tensor([p[0] for p in part], device=device)
            al = torch.tensor([p[1] for p in part], dtype=torch.float64, device=device)
            pts = evaluate(problem, ex, al)
            store_F.extend(pts.F.tolist())
            for j, (_, a) in enumerate(part):
                ids.append(len(store_alpha))
                store_alpha.append(a)
                for n in names:
                    store_y[n].append(pts.ys[n][j:j + 1])
                    store_g[n].append(pts.gs[n][j:j + 1])
            stored_bytes += sum(2 * pts.ys[n].numel() * pts.ys[n].element_size() for n in names)
        return ids

    # Interval sums already computed, kept when units shrink the layer (channels of 8 or more
    # elements): the final pass then only sums intervals it has not seen.
    # Key (id0, id1, layer) -> {measure: (*unit_shape)}.
    sums: dict[tuple, dict[str, torch.Tensor]] = {}

    def keeps_sums(y: torch.Tensor) -> bool:
        return units == "channel" and y.dim() > 2 and y[0, 0].numel() >= 8

    def interval_sums(layer: str, id0: int, id1: int, wanted: dict[str, IntervalMeasure]) -> dict[str, torch.Tensor]:
        known = sums.get((id0, id1, layer), {})
        missing = {m: fn for m, fn in wanted.items() if m not in known}
        if not missing:
            return known
        parts = interval_contributions(missing, store_y[layer][id0], store_g[layer][id0], store_y[layer][id1],
                                       store_g[layer][id1], store_alpha[id1] - store_alpha[id0], "trapezoid",
                                       units, scratch)
        merged = {**known, **{m: c[0] for m, c in parts.items()}}
        if keeps_sums(store_y[layer][id0]):
            sums[(id0, id1, layer)] = merged
        return merged

    def layer_total(layer: str, id0: int, id1: int) -> torch.Tensor:
        """Sum over a layer's units of one interval's conductance, a 0-dim tensor."""
        y0, g0, y1, g1 = store_y[layer][id0], store_g[layer][id0], store_y[layer][id1], store_g[layer][id1]
        if not keeps_sums(y0):
            # per-unit sums that are not kept: only their total is needed, from two dot products
            total = trapezoid_total(y0, g0, y1, g1, scratch)
            if total is not None:
                return total
        return interval_sums(layer, id0, id1, conductance_only)["conductance"].sum(dtype=torch.float64)

    def residuals(id0: int, id1: int) -> np.ndarray:
        """Completeness residual of one interval on every cut layer: its units' sum minus the change of F."""
        # one value per layer (layers of a model split over devices live on different devices)
        totals = [layer_total(L, id0, id1).item() for L in cut_layers]
        return np.asarray(totals, dtype=np.float64) - (store_F[id1] - store_F[id0])

    def denominator(p: _Path) -> float:
        """|F(x) - F(x')| of one example, guarded as in :func:`relative_error`."""
        F0, F1 = store_F[p.ids[0]], store_F[p.ids[-1]]
        return max(abs(F1 - F0), 1e-6 * max(abs(F1), abs(F0), 1.0))

    def error_of(p: _Path) -> float:
        """The worst relative completeness error over the cut layers."""
        r = np.stack(list(p.intervals.values()))
        err = np.abs(r.sum(0))
        if strict:
            err = np.maximum(err, np.abs(r).sum(0))
        return float(err.max()) / denominator(p)

    def finish(p: _Path) -> None:
        """Sum every layer's units over the final grid, then drop the example's stored points."""
        total: dict[str, dict[str, torch.Tensor]] = {m: {} for m in measures}
        keys = list(zip(p.ids[:-1], p.ids[1:]))
        for id0, id1 in keys:
            for n in names:
                for mname, c in interval_sums(n, id0, id1, measures).items():
                    acc = total[mname].get(n)
                    total[mname][n] = c.clone() if acc is None else acc.add_(c)
                sums.pop((id0, id1, n), None)
        p.final = total
        p.residuals = torch.tensor(np.stack([p.intervals[k] for k in keys]), dtype=torch.float64)
        nonlocal stored_bytes
        for pid in p.ids:
            for n in names:
                stored_bytes -= 2 * store_y[n][pid].numel() * store_y[n][pid].element_size()
                store_y[n][pid] = store_g[n][pid] = None

    # the starting grid of every example, batched together
    ids = run([(e, float(a)) for e in range(B) for a in init])
    paths = [_Path(ids=ids[e * len(init):(e + 1) * len(init)]) for e in range(B)]
    for p in paths:
        p.intervals = {(i0, i1): residuals(i0, i1) for i0, i1 in zip(p.ids[:-1], p.ids[1:])}

    active = list(range(B))
    stuck: set[int] = set()   # examples with no interval left that can be bisected
    while True:
        still = []
        for e in active:
            p = paths[e]
            if len(p.ids) < max_points and not memory_limited and e not in stuck and error_of(p) > tolerance:
                still.append(e)
            else:
                finish(p)
        active = still
        if not active:
            break
        # each example bisects its worst intervals until they hold REFINE_SHARE of its residuals
        proposals: dict[int, list[tuple[int, int]]] = {}
        for e in active:
            p = paths[e]
            scored = sorted(((float(np.abs(r).max()), k) for k, r in p.intervals.items()
                             if store_alpha[k[1]] - store_alpha[k[0]] > 1e-7), key=lambda t: -t[0])
            total = sum(s for s, _ in scored)
            budget = max_points - len(p.ids)
            chosen, covered = [], 0.0
            for s, k in scored:
                if len(chosen) >= budget or (chosen and covered >= REFINE_SHARE * total):
                    break
                chosen.append(k)
                covered += s
            proposals[e] = chosen
            if not chosen:
                stuck.add(e)
        # a new point stores its layer values and gradients (interval residuals are scalars)
        first = paths[active[0]].ids[0]
        point_bytes = sum(2 * store_y[n][first].numel() * store_y[n][first].element_size() for n in names)
        room = (ADAPTIVE_STORE_BYTES - stored_bytes) // max(point_bytes, 1)
        n_new = sum(len(v) for v in proposals.values())
        if n_new > room:
            memory_limited = True
            ranked = sorted(((float(np.abs(paths[e].intervals[k]).max()), e, k)
                             for e, ks in proposals.items() for k in ks), key=lambda t: -t[0])
            keep = {(e, k) for _, e, k in ranked[:max(0, int(room))]}
            proposals = {e: [k for k in ks if (e, k) in keep] for e, ks in proposals.items()}
        new_points = [(e, 0.5 * (store_alpha[i0] + store_alpha[i1])) for e, ks in proposals.items() for i0, i1 in ks]
        if not new_points:
            continue   # the examples that cannot go on are summed up by the next pass
        new_ids = iter(run(new_points))
        for e, ks in proposals.items():
            p = paths[e]
            for i0, i1 in ks:
                mid = next(new_ids)
                del p.intervals[(i0, i1)]
                for n in names:
                    sums.pop((i0, i1, n), None)
                p.ids.insert(bisect.bisect_left(p.ids, store_alpha[mid], key=store_alpha.__getitem__), mid)
                p.intervals[(i0, mid)] = residuals(i0, mid)
                p.intervals[(mid, i1)] = residuals(mid, i1)

    values: dict[str, dict[str, torch.Tensor]] = {
        m: {n: torch.stack([p.final[m][n] for p in paths]).to(device).contiguous() for n in names}
        for m in measures}
    F_start = torch.tensor([store_F[p.ids[0]] for p in paths], device=device)
    F_end = torch.tensor([store_F[p.ids[-1]] for p in paths], device=device)
    n_points = torch.tensor([len(p.ids) for p in paths], dtype=torch.long)
    return Integral(values, F_start, F_end, n_points, [p.residuals for p in paths],
                    [torch.tensor([store_alpha[i] for i in p.ids], dtype=torch.float64) for p in paths],
                    memory_limited)


def record_values(problem: PathProblem, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each requested layer's value at ``x`` (batch, *input_shape), from one forward without autograd."""
    ex = torch.arange(x.shape[0], device=x.device)
    recorder = Recorder(problem.refs, cut_below=False)
    with recorder.attached(), torch.no_grad():
        model_output(problem, x, ex)
    missing = [r.name for r in problem.refs if r.name not in recorder.values]
    if missing:
        raise never_reached(missing)
    return {n: v.detach() for n, v in recorder.values.items()}


def graph_reaches(root: torch.Tensor, leaf: torch.Tensor, blocked: Sequence[Any] = ()) -> bool:
    """Whether the autograd graph of ``root`` reaches the leaf tensor ``leaf`` without passing
    through any of the ``blocked`` graph nodes (no backward is run)."""
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
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def check_cuts(problem: PathProblem) -> dict[str, bool]:
    """For each requested layer, whether every path from the input to F passes through it.

    One forward of one example at the input, with every layer's value handed downstream
    through its own clone; a layer is a cut when F's graph no longer reaches the input once
    that clone's node is blocked. The same forward reports layers it never reaches, and sets
    ``problem.copy_layer_outputs`` when the model changes a layer's output in place.
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
    return {ref.name: not graph_reaches(F, x, blocked=[recorder.downstream_node[ref.name]])
            for ref in problem.refs}
