"""Neuron conductance: each listed unit's conductance through each input feature.

Cond^y_i = (x_i - x'_i) * integral dF/dy * dy/dx_i da, for many units from the same
forward and upper backward passes: at each chunk of path points the engine's
gradient ``g = dF/dy`` is masked to each unit and all units' vector-Jacobian products
to the input are taken in one batched call.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any, Optional, Union, cast

import numpy as np
import torch
from torch import nn

from . import engine
from .attribute import DEFAULT_MAX_STEPS, WARN_RELATIVE_ERROR, _package, _warn_accuracy, run_path
from .errors import ConductanceError, warn
from .inputs import Target, build_problem
from .layers import LayerSpec
from .paths import CAPTUM_RULES, captum_point_rule, comparison_point_weights, fixed_grid, point_weights
from .progress import Progress, check_progress
from .request import Request

Neuron = Union[int, Sequence[int]]


def _is_index(n: Any) -> bool:
    def one(i: Any) -> bool:
        return isinstance(i, numbers.Integral) and not isinstance(i, bool)
    return one(n) or (isinstance(n, tuple) and all(one(i) for i in n))


def _unit_index(neuron: Neuron, layer_shape: tuple, units: str, layer: str) -> tuple:
    if units == "channel":
        if not isinstance(neuron, numbers.Integral):
            raise ConductanceError(f"with units='channel' a unit is one channel index (an int); got {neuron!r}")
        channel = int(neuron)
        if not 0 <= channel < layer_shape[0]:
            raise ConductanceError(f"channel {channel} is out of range: layer {layer!r} has {layer_shape[0]} "
                                   "channels")
        return (channel,)
    index = (int(neuron),) if isinstance(neuron, numbers.Integral) else tuple(int(i) for i in cast(Sequence, neuron))
    if len(index) != len(layer_shape):
        raise ConductanceError(f"neuron {neuron!r} does not index layer {layer!r} of shape {layer_shape} "
                               f"(per example); give a tuple of {len(layer_shape)} indices, or use "
                               "units='channel' with an int")
    for i, n in zip(index, layer_shape):
        if not 0 <= i < n:
            raise ConductanceError(f"neuron {neuron!r} is out of range for layer {layer!r} of shape "
                                   f"{layer_shape}")
    return index


def _coarse_weights(alphas: np.ndarray, coarse: np.ndarray, rule: str) -> np.ndarray:
    """Point weights of the same rule on the coarse grid (zero at the points it leaves out)."""
    weights = np.zeros_like(alphas)
    weights[coarse] = point_weights(alphas[coarse], rule)
    return weights


def _path_points(problem: engine.PathProblem, output: Any, request: Request, tolerance: Optional[float]
                 ) -> tuple[list[np.ndarray], list[np.ndarray], list[dict[str, np.ndarray]]]:
    """Per example, the path positions, their quadrature weights and the comparison sums' weights
    (level -> weights, see :func:`conductance.engine.comparison_values`).

    ``output``: the model's output at the inputs; ``tolerance``: the adaptive grid's own target."""
    B = problem.batch_size
    method = request.method
    if method in CAPTUM_RULES:
        # the comparison is the plain trapezoid rule on every other point: it also shows what Captum's
        # weights leave out (the default's sum to (n - 1) / n)
        alphas, weights = captum_point_rule(method, request.fixed_steps, "neuron_conductance")
        return [alphas] * B, [weights] * B, [comparison_point_weights(alphas)] * B
    if method != "adaptive":
        # a left sum is compared with the trapezoid rule on its points and coarser (see integrate_fixed)
        grid = fixed_grid(method, request.fixed_steps)
        return ([grid.alphas] * B, [point_weights(grid.alphas, grid.interval_rule)] * B,
                [comparison_point_weights(grid.alphas)] * B)
    # The grid is refined on the layer's units and on the input's integrated gradients feature by
    # feature, then reused: the units' attributions are integrals on the input side, and a layer
    # followed by a linear map meets its own accuracy on a grid far too coarse for them. It runs on
    # this call's own problem (the input is tracked already), so nothing is checked or built twice.
    grid_request = dataclasses.replace(request, tolerance=tolerance)
    integral, is_cut, output_diff = run_path(problem, ["conductance"], grid_request, output, refine_on_input=True)
    result = _package("conductance", integral.values["conductance"], integral.coarse["conductance"],
                      integral=integral, is_cut=is_cut, output_diff=output_diff, problem=problem,
                      request=grid_request)
    _warn_accuracy(result, request.max_steps)
    grids = [a.numpy() for a in result.extra["alphas"]]
    masks = [m.numpy() for m in result.extra["coarse_masks"]]
    return (grids, [point_weights(a, "trapezoid") for a in grids],
            [{"coarse": _coarse_weights(a, m, "trapezoid")} for a, m in zip(grids, masks)])


def neuron_conductance(model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, neurons: Sequence[Neuron],
                       *, units: str = "neuron", baselines: Any = None, target: Target = None,
                       additional_forward_args: Any = None, n_steps: Optional[int] = None,
                       method: Optional[str] = None, internal_batch_size: Optional[int] = None,
                       tolerance: Optional[float] = None, max_steps: int = DEFAULT_MAX_STEPS,
                       attribute_to_layer_input: bool = False,
                       forward_kwargs: Optional[dict] = None, return_unit_error: bool = False,
                       progress: Optional[bool] = None, memory_budget: Optional[int] = None,
                       channels_last: Optional[bool] = None
                       ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Conductance of each listed unit of ``layer`` through each input feature.

    Parameters
    ----------
    neurons : list
        With ``units="neuron"``, index tuples into the layer's shape (without the batch
        dimension; an int for a one-dimensional layer). With ``units="channel"``, channel
        indices: the unit is the whole channel (a convolution filter).
    method : {"gausslegendre", "uniform", "uniform_left", "captum", "riemann_left", "riemann_right", \
"riemann_middle", "riemann_trapezoid", "adaptive"}, optional
        As in :func:`conductance.layer_conductance`; ``"captum"`` reproduces Captum 0.9's
        NeuronConductance default (``riemann_trapezoid``, weights summing to (n-1)/n) and each
        ``"riemann_*"`` name Captum's NeuronConductance with that method (``n_steps`` points).
        The adaptive rule first refines the path on the layer's completeness (or the
        input's when the layer is not a cut), then integrates on that grid.
    Other parameters are those of :func:`conductance.layer_conductance`.

    tolerance : float, optional
        With the adaptive rule, the relative L2 error to reach for each unit's attribution over the
        input features, per example (and for the layer's own values and completeness).
    return_unit_error : bool
        Also return the per-unit error estimate.
    progress : bool, optional
        A bar (tqdm) counting the path points through the per-unit backward passes, on stderr;
        default: when stderr is a terminal and tqdm is installed.
    memory_budget : int, optional
        Bytes the adaptive rule may keep in stored points while it refines the grid (None: 3 GiB,
        ``conductance.engine.ADAPTIVE_STORE_BYTES``), as in :func:`conductance.layer_conductance`.
    channels_last : bool, optional
        Layout of 4-D path points (None: automatic), as in :func:`conductance.layer_conductance`.

    Returns
    -------
    Tensor, shape (len(neurons), batch, *input_shape); for a tuple of inputs, a tuple of such tensors
    (one per input)
        Summed over the input features, each unit's row approaches its layer conductance
        as the path is refined (a tangent-form quadrature against a difference form).
    Tensor, shape (len(neurons), batch), with ``return_unit_error``
        Estimated relative L2 error of each unit's attribution over the input features: its change
        when the same rule runs on a grid with half the points.
    """
    request = Request.make(method=method, n_steps=n_steps, tolerance=tolerance, max_steps=max_steps, units=units,
                           internal_batch_size=internal_batch_size, additional_forward_args=additional_forward_args,
                           forward_kwargs=forward_kwargs, attribute_to_layer_input=attribute_to_layer_input,
                           memory_budget=memory_budget, channels_last=channels_last)
    method, tolerance = request.method, request.tolerance
    if isinstance(neurons, (numbers.Integral, tuple)) and not isinstance(neurons, (list, bool)):
        neurons = [neurons]
    if not isinstance(neurons, list) or not all(_is_index(n) for n in neurons):
        shown = type(neurons).__name__ if not isinstance(neurons, list) else \
            next(f"{type(n).__name__} {n!r}" for n in neurons if not _is_index(n))
        raise ConductanceError(f"neurons must be an int, a tuple of ints (one index per dimension of the layer) or "
                               f"a list of them; got {shown}" + (". For a tensor of indices pass t.tolist()"
                                                                 if isinstance(neurons, torch.Tensor) else ""))
    if len(neurons) == 0:
        raise ConductanceError("no neurons given: pass a list of unit indices")
    check_progress(progress)
    problem, output = build_problem(model, inputs, layer, baselines=baselines, target=target, request=request,
                                    track_input=True)
    if len(problem.refs) != 1:
        raise ConductanceError("neuron_conductance takes one layer")
    ref = problem.refs[0]
    grid_tolerance = tolerance
    # a fixed rule's warning limit, or the adaptive rule's tolerance (set by resolve_method)
    limit = WARN_RELATIVE_ERROR if tolerance is None else float(tolerance)
    for attempt in range(3):
        grids = _path_points(problem, output, request, grid_tolerance)
        out, err = _integrate_neurons(problem, ref, neurons, units, *grids, progress=progress)
        worst = float(err.max())
        if method != "adaptive" or worst <= limit * (1 + 1e-9):
            break
        if all(len(a) + 2 > max_steps for a in grids[0]) or attempt == 2:
            break
        # the grid met its own targets but these units' input-side values need a finer one
        grid_tolerance = (grid_tolerance or limit) * max(0.2, min(0.7, limit / worst))
    bad = (err > limit * (1 + 1e-9)).nonzero().tolist()
    if bad:
        warn(f"neuron conductance ({method}): per-unit error estimate above {100 * limit:g}% for "
             f"{len(bad)} of {err.numel()} (unit, example) pairs, up to {100 * worst:.3g}% "
             f"(first: unit {bad[0][0]}, example {bad[0][1]}); "
             + (f"raise max_steps (now {max_steps}) or loosen tolerance" if method == "adaptive"
                else "use the adaptive rule (tolerance=0.02) or more n_steps"))
    if problem.input_spec is not None:
        # several inputs: one attribution per input tensor, (len(neurons), batch, *input_i_shape) each
        out = problem.input_spec.unpack(out)
    return (out, err) if return_unit_error else out


def _integrate_neurons(problem: engine.PathProblem, ref: Any, neurons: Sequence[Neuron], units: str,
                       alphas: list[np.ndarray], weights: list[np.ndarray], coarse_weights: list[dict[str, np.ndarray]],
                       progress: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit's attribution over the inputs on the given grids, (units, batch, *input_shape), and
    its per-unit error estimate (units, batch)."""
    B = problem.batch_size
    device = problem.inputs.device
    ex = torch.cat([torch.full((len(a),), e, dtype=torch.long) for e, a in enumerate(alphas)]).to(device)
    al = torch.cat([torch.as_tensor(a, dtype=torch.float64) for a in alphas]).to(device)
    w = torch.cat([torch.as_tensor(x, dtype=torch.float64) for x in weights]).to(device)
    # comparison sums (see engine.comparison_values): level -> weights of every point
    wc = {k: torch.cat([torch.as_tensor(x[k], dtype=torch.float64) for x in coarse_weights]).to(device)
          for k in coarse_weights[0]}
    diff = problem.inputs - problem.baselines
    out: Optional[torch.Tensor] = None
    out_levels: dict[str, torch.Tensor] = {}
    index: Optional[list] = None
    F_start = torch.zeros(B, dtype=torch.float64, device=device)
    F_end = torch.zeros(B, dtype=torch.float64, device=device)
    bar = Progress(progress, ex.shape[0], f"neuron conductance ({len(neurons)} units)", "points")
    with bar:
        for start, stop in engine._chunks(ex.shape[0], problem.chunk_size):
            e, a = ex[start:stop], al[start:stop]
            with engine.layer_points(problem, e, a, ref) as pts:
                g = pts.g
                if index is None:
                    index = [_unit_index(n, tuple(pts.y.shape[1:]), units, ref.name) for n in neurons]
                v = torch.zeros((len(index),) + tuple(g.shape), dtype=g.dtype, device=g.device)
                for u, idx in enumerate(index):
                    sel = (u, slice(None)) + idx
                    v[sel] = g[(slice(None),) + idx]
                grads = pts.vjp(v)
            F_start[e[a == 0]] = pts.F[a == 0].double()
            F_end[e[a == 1]] = pts.F[a == 1].double()
            # each point's product is weighted after the VJP, so the coarse grid's sum costs no extra product
            contrib = grads * diff[e].unsqueeze(0)
            shape = (1, -1) + (1,) * (contrib.dim() - 2)
            if out is None:
                out = torch.zeros((len(index), B) + tuple(diff.shape[1:]), dtype=contrib.dtype, device=device)
                out_levels = {k: torch.zeros_like(out) for k in wc}
            out.index_add_(1, e, contrib * w[start:stop].to(contrib.dtype).view(shape))
            for k, level in out_levels.items():
                level.index_add_(1, e, contrib * wc[k][start:stop].to(contrib.dtype).view(shape))
            bar.update(int(e.shape[0]))
    assert out is not None
    err = torch.stack([
        engine.unit_error(out[u], engine.comparison_values(out[u], **{k: v[u] for k, v in out_levels.items()}),
                          F_end - F_start) for u in range(out.shape[0])])
    return out.detach(), err
