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

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

import contextlib

from .errors import ConductanceError, never_reached, not_dependent
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


def scalar_output(problem: PathProblem, output: Any, ex: torch.Tensor) -> torch.Tensor:
    """F at each point: the target's score, shape (m,)."""
    target = problem.target
    if callable(target):
        value = target(output)
        if not isinstance(value, torch.Tensor) or value.shape != (ex.shape[0],):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ConductanceError(f"the target callable must return a tensor of shape (points,) = "
                                   f"({ex.shape[0]},) for a model output batch; it returned {got}")
        return value
    scores = logits_of(output)
    if target is None:
        return scores.reshape(scores.shape[0])
    return scores.gather(1, target[ex].unsqueeze(1)).squeeze(1)


def interpolate(problem: PathProblem, ex: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Points ``x' + a (x - x')`` for examples ``ex`` (m,) at ``alphas`` (m,); (m, *input_shape)."""
    base = problem.baselines[ex]
    shape = (-1,) + (1,) * (base.dim() - 1)
    return base + alphas.to(base.dtype).view(shape) * (problem.inputs[ex] - base)


def evaluate(problem: PathProblem, ex: torch.Tensor, alphas: torch.Tensor) -> PointBatch:
    """Forward and backward at ``m`` path points; every recorded tensor is detached.

    Parameters
    ----------
    ex : LongTensor (m,)
        Example index of each point.
    alphas : Tensor (m,)
        Position of each point on its example's path.
    """
    replace = None
    if problem.layer_path is not None:
        name, start, end = problem.layer_path
        shape = (-1,) + (1,) * (start.dim() - 1)
        replace = {name: start[ex] + alphas.to(start.dtype).view(shape) * (end[ex] - start[ex])}
        x = problem.inputs[ex]
    else:
        x = interpolate(problem, ex, alphas)
    recorder = Recorder(problem.refs, cut_below=not problem.track_input, replace=replace)
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
        return t.flatten(2).sum(2)
    return t


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


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
    """
    B = problem.batch_size
    n = grid.n_points
    device = problem.inputs.device
    alphas_all = torch.as_tensor(grid.alphas, dtype=torch.float64)
    flat_alpha = alphas_all.repeat_interleave(B)
    flat_ex = torch.arange(B, device=device).repeat(n)
    names = problem.layer_names
    acc: dict[str, dict[str, torch.Tensor]] = {m: {} for m in measures}
    carry: Optional[PointBatch] = None
    F_start = torch.zeros(B, device=device, dtype=problem.inputs.dtype)
    F_end = torch.zeros(B, device=device, dtype=problem.inputs.dtype)
    for start, stop in _chunks(n * B, problem.chunk_size):
        ex = flat_ex[start:stop]
        alpha = flat_alpha[start:stop]
        pts = evaluate(problem, ex, alpha.to(device))
        first = torch.arange(start, stop, device=device) < B
        last = torch.arange(start, stop, device=device) >= (n - 1) * B
        F_start[ex[first]] = pts.F[first]
        F_end[ex[last]] = pts.F[last]
        window = pts if carry is None else _concat(carry, pts)
        offset = 0 if carry is None else carry.ex.shape[0]
        begin = max(B, offset)
        if begin < window.ex.shape[0]:
            lo = torch.arange(begin - B, window.ex.shape[0] - B, device=device)
            hi = lo + B
            a0 = window.alphas[lo].to(torch.float64)
            a1 = window.alphas[hi].to(torch.float64)
            ex_int = window.ex[hi]
            for mname, fn in measures.items():
                for name in names:
                    contrib = fn(window.ys[name][lo], window.gs[name][lo], window.ys[name][hi],
                                 window.gs[name][hi], a0, a1, grid.interval_rule)
                    contrib = reduce_units(contrib, units)
                    if name not in acc[mname]:
                        acc[mname][name] = torch.zeros((B,) + contrib.shape[1:], dtype=contrib.dtype,
                                                       device=device)
                    acc[mname][name].index_add_(0, ex_int, contrib)
        keep = min(B, window.ex.shape[0])
        carry = _slice(window, slice(window.ex.shape[0] - keep, None))
    n_points = torch.full((B,), n, dtype=torch.long)
    return Integral(acc, F_start, F_end, n_points)


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
class _ExampleState:
    alphas: list = field(default_factory=list)          # sorted positions
    point_ids: list = field(default_factory=list)       # store index of each position
    intervals: dict = field(default_factory=dict)       # (id0, id1) -> (contribs, score, residual)


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
    """
    B = problem.batch_size
    device = problem.inputs.device
    names = problem.layer_names
    init = np.concatenate([[0.0], gauss_legendre_nodes(initial_steps - 1), [1.0]]) if initial_steps > 1 \
        else np.array([0.0, 1.0])
    states = [_ExampleState() for _ in range(B)]
    memory_limited = False
    store_F: list[float] = []
    store_y: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    store_g: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def run(points: list[tuple[int, float]]) -> list[int]:
        ids = []
        for start, stop in _chunks(len(points), problem.chunk_size):
            part = points[start:stop]
            ex = torch.tensor([p[0] for p in part], device=device)
            al = torch.tensor([p[1] for p in part], dtype=torch.float64, device=device)
            pts = evaluate(problem, ex, al)
            for j in range(len(part)):
                ids.append(len(store_F))
                store_F.append(float(pts.F[j]))
                for n in names:
                    store_y[n].append(pts.ys[n][j])
                    store_g[n].append(pts.gs[n][j])
        return ids

    def add_intervals(pairs: list[tuple[int, int, int, float, float]]) -> None:
        """pairs: (example, id0, id1, a0, a1); computes contributions and residuals in one go per layer."""
        if not pairs:
            return
        i0 = [p[1] for p in pairs]
        i1 = [p[2] for p in pairs]
        a0 = torch.tensor([p[3] for p in pairs], dtype=torch.float64, device=device)
        a1 = torch.tensor([p[4] for p in pairs], dtype=torch.float64, device=device)
        dF = torch.tensor([store_F[b] - store_F[a] for a, b in zip(i0, i1)], dtype=torch.float64)
        contribs: dict[str, dict[str, torch.Tensor]] = {m: {} for m in measures}
        residual = torch.zeros(len(pairs), len(cut_layers), dtype=torch.float64)
        for n in names:
            y0 = torch.stack([store_y[n][i] for i in i0])
            y1 = torch.stack([store_y[n][i] for i in i1])
            g0 = torch.stack([store_g[n][i] for i in i0])
            g1 = torch.stack([store_g[n][i] for i in i1])
            for mname, fn in measures.items():
                c = fn(y0, g0, y1, g1, a0, a1, "trapezoid")
                if mname == "conductance" and n in cut_layers:
                    total = c.flatten(1).sum(1).to(torch.float64).cpu()
                    residual[:, list(cut_layers).index(n)] = total - dF
                contribs[mname][n] = reduce_units(c, units)
        for j, (e, id0, id1, _, _) in enumerate(pairs):
            # cloned so that dropping a bisected interval frees its memory
            per = {m: {n: contribs[m][n][j].clone() for n in names} for m in measures}
            states[e].intervals[(id0, id1)] = (per, residual[j])

    # initial grid for every example, batched together
    initial = [(e, float(a)) for e in range(B) for a in init]
    ids = run(initial)
    k = 0
    for e in range(B):
        states[e].alphas = [float(a) for a in init]
        states[e].point_ids = ids[k:k + len(init)]
        k += len(init)
    add_intervals([(e, s.point_ids[j], s.point_ids[j + 1], s.alphas[j], s.alphas[j + 1])
                   for e, s in enumerate(states) for j in range(len(s.alphas) - 1)])

    def error_of(e: int) -> float:
        s = states[e]
        res = torch.stack([v[1] for v in s.intervals.values()])  # (intervals, cuts)
        dF = store_F[s.point_ids[-1]] - store_F[s.point_ids[0]]
        scale = max(abs(store_F[s.point_ids[-1]]), abs(store_F[s.point_ids[0]]), 1.0)
        denom = max(abs(dF), 1e-6 * scale)
        signed = res.sum(0).abs().max().item() / denom
        if strict:
            return max(signed, res.abs().sum(0).max().item() / denom)
        return signed

    while True:
        active = [e for e in range(B) if error_of(e) > tolerance and len(states[e].alphas) < max_points]
        if not active:
            break
        proposals: dict[int, list] = {}
        for e in active:
            s = states[e]
            items = sorted(s.intervals.items(), key=lambda kv: -kv[1][1].abs().max().item())
            items = [kv for kv in items if _width(s, kv[0]) > 1e-7]
            total = sum(kv[1][1].abs().max().item() for kv in items)
            budget = max_points - len(s.alphas)
            chosen, covered = [], 0.0
            for kv in items:
                if len(chosen) >= budget or (chosen and covered >= REFINE_SHARE * total):
                    break
                chosen.append(kv[0])
                covered += kv[1][1].abs().max().item()
            proposals[e] = chosen
        point_bytes = sum(store_y[n][0].numel() * store_y[n][0].element_size() for n in names) \
            * (2 + len(measures))
        room = (ADAPTIVE_STORE_BYTES - point_bytes * len(store_F)) // max(point_bytes, 1)
        n_new = sum(len(v) for v in proposals.values())
        if n_new > room:
            memory_limited = True
            scored = sorted(((states[e].intervals[k][1].abs().max().item(), e, k)
                             for e, ks in proposals.items() for k in ks), key=lambda t: -t[0])
            keep = {(e, k) for _, e, k in scored[:max(0, int(room))]}
            proposals = {e: [k for k in ks if (e, k) in keep] for e, ks in proposals.items()}
            n_new = sum(len(v) for v in proposals.values())
        if n_new == 0:
            break
        new_points, owners = [], []
        for e, chosen in proposals.items():
            s = states[e]
            pos = {pid: j for j, pid in enumerate(s.point_ids)}
            for (id0, id1) in chosen:
                mid = 0.5 * (s.alphas[pos[id0]] + s.alphas[pos[id1]])
                new_points.append((e, mid))
                owners.append((e, id0, id1, mid))
        new_ids = run(new_points)
        pairs = []
        for (e, id0, id1, mid), nid in zip(owners, new_ids):
            s = states[e]
            del s.intervals[(id0, id1)]
            j = s.point_ids.index(id1)
            s.point_ids.insert(j, nid)
            s.alphas.insert(j, mid)
            pairs.append((e, id0, nid, s.alphas[j - 1], mid))
            pairs.append((e, nid, id1, mid, s.alphas[j + 1]))
        add_intervals(pairs)

    values: dict[str, dict[str, torch.Tensor]] = {m: {} for m in measures}
    residuals, alphas = [], []
    for m in measures:
        for n in names:
            values[m][n] = torch.stack([
                torch.stack([v[0][m][n] for v in states[e].intervals.values()]).sum(0) for e in range(B)])
    for e in range(B):
        s = states[e]
        order = sorted(s.intervals, key=lambda k: s.alphas[s.point_ids.index(k[0])])
        residuals.append(torch.stack([s.intervals[k][1] for k in order]))
        alphas.append(torch.tensor(s.alphas, dtype=torch.float64))
    F_start = torch.tensor([store_F[s.point_ids[0]] for s in states], device=device)
    F_end = torch.tensor([store_F[s.point_ids[-1]] for s in states], device=device)
    n_points = torch.tensor([len(s.alphas) for s in states], dtype=torch.long)
    return Integral(values, F_start, F_end, n_points, residuals, alphas, memory_limited)


def _width(state: _ExampleState, key: tuple) -> float:
    pos = state.point_ids.index(key[0]), state.point_ids.index(key[1])
    return state.alphas[pos[1]] - state.alphas[pos[0]]


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


def graph_reaches(root: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether the autograd graph of ``root`` reaches the leaf tensor ``leaf`` (no backward is run)."""
    if root.grad_fn is None:
        return False
    seen, stack = set(), [root.grad_fn]
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

    One forward of one example per layer at the input, with that layer's value cut
    from the graph; the layer is a cut when F's graph then no longer reaches the input.
    The same forwards report layers the forward never reaches.
    """
    ex = torch.zeros(1, dtype=torch.long, device=problem.inputs.device)
    alpha = torch.ones(1, dtype=torch.float64, device=problem.inputs.device)
    result: dict[str, bool] = {}
    for ref in problem.refs:
        recorder = Recorder([ref], cut_below=False, detach=[ref.name])
        x = interpolate(problem, ex, alpha).detach().requires_grad_(True)
        with recorder.attached(), torch.enable_grad():
            output = model_output(problem, x, ex)
            F = scalar_output(problem, output, ex)
        if ref.name not in recorder.values:
            raise never_reached([ref.name])
        result[ref.name] = not graph_reaches(F, x)
    return result
