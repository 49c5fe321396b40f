"""Neuron conductance: each listed unit's conductance through each input feature.

Cond^y_i = (x_i - x'_i) * integral dF/dy * dy/dx_i da, for many units from the same
forward and upper backward passes: at each chunk of path points the engine's
gradient ``g = dF/dy`` is masked to each unit and all units' vector-Jacobian products
to the input are taken in one batched call.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from . import engine
from .attribute import DEFAULT_MAX_STEPS, UNITS, _warn_accuracy, path_attribution, resolve_method
import warnings

from .errors import ConductanceError, never_reached, not_dependent
from .inputs import Target, build_problem, check_steps
from .layers import LayerSpec, Recorder
from .paths import captum_neuron_grid, fixed_grid, point_weights

Neuron = Union[int, Sequence[int]]


def _unit_index(neuron: Neuron, layer_shape: tuple, units: str, layer: str) -> tuple:
    if units == "channel":
        if not isinstance(neuron, numbers.Integral):
            raise ConductanceError(f"with units='channel' a unit is one channel index (an int); got {neuron!r}")
        if not 0 <= neuron < layer_shape[0]:
            raise ConductanceError(f"channel {neuron} is out of range: layer {layer!r} has {layer_shape[0]} "
                                   "channels")
        return (int(neuron),)
    index = (int(neuron),) if isinstance(neuron, numbers.Integral) else tuple(int(i) for i in neuron)
    if len(index) != len(layer_shape):
        raise ConductanceError(f"neuron {neuron!r} does not index layer {layer!r} of shape {layer_shape} "
                               f"(per example); give a tuple of {len(layer_shape)} indices, or use "
                               "units='channel' with an int")
    for i, n in zip(index, layer_shape):
        if not 0 <= i < n:
            raise ConductanceError(f"neuron {neuron!r} is out of range for layer {layer!r} of shape "
                                   f"{layer_shape}")
    return index


def _path_points(problem: engine.PathProblem, layer: LayerSpec, method: str, n_steps: Optional[int],
                 tolerance: Optional[float], max_steps: int, units: str, kwargs: dict
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per example, the path positions and their quadrature weights."""
    B = problem.batch_size
    if method == "captum":
        alphas, weights = captum_neuron_grid(n_steps)
        return [alphas] * B, [weights] * B
    if method != "adaptive":
        grid = fixed_grid(method, n_steps)
        return [grid.alphas] * B, [point_weights(grid.alphas, grid.interval_rule)] * B
    # The grid is refined on the layer's completeness and on the input's integrated gradients, then
    # reused: the units' attributions are integrals on the input side, and a layer followed by a
    # linear map meets its own completeness on a grid far too coarse for them.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the model is in training mode")  # warned once already
        result = path_attribution(
            problem.model, kwargs["inputs"], [layer], ["conductance"], baselines=kwargs["baselines"],
            target=problem.target, additional_forward_args=kwargs["additional_forward_args"],
            forward_kwargs=kwargs["forward_kwargs"], n_steps=n_steps, method="adaptive", tolerance=tolerance,
            max_steps=max_steps, units=units, internal_batch_size=problem.chunk_size,
            attribute_to_layer_input=kwargs["attribute_to_layer_input"], refine_on_input=True)
    _warn_accuracy(result, max_steps)
    alphas = [a.numpy() for a in result.extra["alphas"]]
    return alphas, [point_weights(a, "trapezoid") for a in alphas]


def neuron_conductance(model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, neurons: Sequence[Neuron],
                       *, units: str = "neuron", baselines: Any = None, target: Target = None,
                       additional_forward_args: Any = None, n_steps: Optional[int] = None,
                       method: Optional[str] = None, internal_batch_size: Optional[int] = None,
                       tolerance: Optional[float] = None, max_steps: int = DEFAULT_MAX_STEPS,
                       attribute_to_layer_input: bool = False,
                       forward_kwargs: Optional[dict] = None) -> torch.Tensor:
    """Conductance of each listed unit of ``layer`` through each input feature.

    Parameters
    ----------
    neurons : list
        With ``units="neuron"``, index tuples into the layer's shape (without the batch
        dimension; an int for a one-dimensional layer). With ``units="channel"``, channel
        indices: the unit is the whole channel (a convolution filter).
    method : {"gausslegendre", "uniform", "uniform_left", "captum", "adaptive"}, optional
        As in :func:`conductance.layer_conductance`; ``"captum"`` reproduces Captum 0.9's
        NeuronConductance default (``riemann_trapezoid``, weights summing to (n-1)/n).
        The adaptive rule first refines the path on the layer's completeness (or the
        input's when the layer is not a cut), then integrates on that grid.
    Other parameters are those of :func:`conductance.layer_conductance`.

    Returns
    -------
    Tensor, shape (len(neurons), batch, *input_shape); for a tuple of inputs, a tuple of such tensors
    (one per input)
        Summed over the input features, each unit's row approaches its layer conductance
        as the path is refined (a tangent-form quadrature against a difference form).
    """
    if units not in UNITS:
        raise ConductanceError(f"unknown units {units!r}; choose 'neuron' or 'channel'")
    if isinstance(neurons, (numbers.Integral, tuple)) and not isinstance(neurons, list):
        neurons = [neurons]
    if len(neurons) == 0:
        raise ConductanceError("no neurons given: pass a list of unit indices")
    check_steps(n_steps, tolerance, max_steps)
    method, n_steps, tolerance = resolve_method(method, n_steps, tolerance)
    problem, _ = build_problem(model, inputs, layer, baselines=baselines, target=target,
                               additional_forward_args=additional_forward_args, forward_kwargs=forward_kwargs,
                               internal_batch_size=internal_batch_size,
                               attribute_to_layer_input=attribute_to_layer_input, track_input=True,
                               method=method)
    if len(problem.refs) != 1:
        raise ConductanceError("neuron_conductance takes one layer")
    ref = problem.refs[0]
    kwargs = dict(inputs=inputs, baselines=baselines, additional_forward_args=additional_forward_args,
                  forward_kwargs=forward_kwargs, attribute_to_layer_input=attribute_to_layer_input)
    alphas, weights = _path_points(problem, ref.module if ref.element is None and not ref.use_input
                                   else ref.name, method, n_steps, tolerance, max_steps, units, kwargs)
    B = problem.batch_size
    device = problem.inputs.device
    ex = torch.cat([torch.full((len(a),), e, dtype=torch.long) for e, a in enumerate(alphas)]).to(device)
    al = torch.cat([torch.as_tensor(a, dtype=torch.float64) for a in alphas]).to(device)
    w = torch.cat([torch.as_tensor(x, dtype=torch.float64) for x in weights]).to(device)
    diff = problem.inputs - problem.baselines
    out: Optional[torch.Tensor] = None
    index: Optional[list] = None
    for start, stop in engine._chunks(ex.shape[0], problem.chunk_size):
        e, a = ex[start:stop], al[start:stop]
        x = engine.interpolate(problem, e, a).detach().requires_grad_(True)
        recorder = Recorder([ref], cut_below=False)
        with recorder.attached(), torch.enable_grad():
            output = engine.model_output(problem, x, e)
            F = engine.scalar_output(problem, output, e)
            if ref.name not in recorder.values:
                raise never_reached([ref.name])
            y = recorder.values[ref.name]
            (g,) = torch.autograd.grad(F.sum(), y, retain_graph=True, allow_unused=True)
            if g is None:
                raise not_dependent([ref.name])
            if index is None:
                index = [_unit_index(n, tuple(y.shape[1:]), units, ref.name) for n in neurons]
            weighted = g * w[start:stop].to(g.dtype).view((-1,) + (1,) * (g.dim() - 1))
            v = torch.zeros((len(index),) + tuple(g.shape), dtype=g.dtype, device=g.device)
            for u, idx in enumerate(index):
                sel = (u, slice(None)) + idx
                v[sel] = weighted[(slice(None),) + idx]
            grads = _batched_vjp(y, x, v)
        problem.n_evaluations += int(e.shape[0])
        contrib = grads * diff[e].unsqueeze(0)
        if out is None:
            out = torch.zeros((len(index), B) + tuple(diff.shape[1:]), dtype=contrib.dtype, device=device)
        out.index_add_(1, e, contrib)
    if problem.input_spec is not None:
        # several inputs: one attribution per input tensor, (len(neurons), batch, *input_i_shape) each
        return problem.input_spec.unpack(out.detach())
    return out.detach()


def _batched_vjp(y: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``v[u]^T dy/dx`` for every unit ``u``: (units, m, *input_shape).

    One product per unit, reusing the graph. ``is_grads_batched`` (vmap) was measured slower on
    GoogLeNet: its convolution backward ran per unit on slower kernels, then stacked the results.
    """
    rows = [torch.autograd.grad(y, x, grad_outputs=v[u], retain_graph=True)[0] for u in range(v.shape[0])]
    return torch.stack(rows)
