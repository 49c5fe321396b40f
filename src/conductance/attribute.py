"""Layer conductance (and the other path measures) of many layers from one run of the path."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from . import engine
from .engine import INPUT, PathProblem, integrate_adaptive, integrate_fixed, relative_error
from .errors import ConductanceError, warn
from .inputs import Target, build_problem, check_steps
from .layers import LayerSpec
from .measures import PATH_MEASURES
from .paths import FIXED_METHODS, METHODS, fixed_grid
from .result import LayerResult

#: Completeness error the adaptive default aims for.
DEFAULT_TOLERANCE = 0.01
#: Default budget of path points per example for the adaptive rule.
DEFAULT_MAX_STEPS = 256
#: Initial intervals of the adaptive rule.
ADAPTIVE_INITIAL_STEPS = 4
#: Fixed rules warn when a cut layer misses completeness by more than this.
WARN_RELATIVE_ERROR = 0.05
UNITS = ("neuron", "channel")


def resolve_method(method: Optional[str], n_steps: Optional[int], tolerance: Optional[float]
                   ) -> tuple[str, Optional[int], Optional[float]]:
    """Settle (method, n_steps, tolerance) from what the user gave.

    Neither ``n_steps`` nor ``tolerance``: adaptive to ``DEFAULT_TOLERANCE``. ``tolerance``:
    adaptive. ``n_steps`` alone: the trapezoid rule on Gauss-Legendre nodes plus both ends.
    """
    if method is not None and method not in METHODS:
        raise ConductanceError(f"unknown method {method!r}; choose one of {METHODS}")
    if tolerance is not None:
        if method not in (None, "adaptive"):
            raise ConductanceError(f"tolerance is met by refining the path, which method={method!r} does "
                                   "not do; drop method or use method='adaptive'")
        return "adaptive", n_steps, float(tolerance)
    if method == "adaptive" or (method is None and n_steps is None):
        return "adaptive", n_steps, DEFAULT_TOLERANCE
    if method is None:
        method = "gausslegendre"
    return method, 50 if n_steps is None else n_steps, None


def run_path(problem: PathProblem, measures: Sequence[str], units: str, method: str,
             n_steps: Optional[int], tolerance: Optional[float], max_steps: int,
             output_at_inputs: Any) -> tuple[engine.Integral, dict[str, bool], torch.Tensor]:
    """Run the path once for all measures; returns the integral, the cut map and F(x) - F(x')."""
    is_cut = engine.check_cuts(problem)
    fns = {m: PATH_MEASURES[m] for m in measures}
    if "conductance" not in fns and method == "adaptive":
        fns = {"conductance": PATH_MEASURES["conductance"], **fns}
    if method == "adaptive":
        cuts = [n for n, c in is_cut.items() if c]
        if not cuts:
            problem.track_input = True
            cuts = [INPUT]
        integral = integrate_adaptive(problem, fns, units, cuts, tolerance, max_steps,
                                      initial_steps=n_steps or ADAPTIVE_INITIAL_STEPS)
    else:
        grid = fixed_grid(method, n_steps)
        integral = integrate_fixed(problem, grid, fns, units)
        if not grid.has_endpoints:
            ex = torch.arange(problem.batch_size, device=problem.inputs.device)
            with torch.no_grad():
                F_end = engine.scalar_output(problem, output_at_inputs, ex)
                F_start = engine.scalar_output(problem, engine.model_output(problem, problem.baselines, ex), ex)
            integral.F_start, integral.F_end = F_start.detach(), F_end.detach()
    return integral, is_cut, integral.F_end - integral.F_start


def path_attribution(model: nn.Module, inputs: torch.Tensor, layers: Union[LayerSpec, Sequence[LayerSpec]],
                     measures: Sequence[str], *, baselines: Any, target: Target, additional_forward_args: Any,
                     forward_kwargs: Optional[dict], n_steps: Optional[int], method: Optional[str],
                     tolerance: Optional[float], max_steps: int, units: str,
                     internal_batch_size: Optional[int], attribute_to_layer_input: bool) -> LayerResult:
    """Shared body of the path measures: validate, run the path once, package and check the result."""
    if units not in UNITS:
        raise ConductanceError(f"unknown units {units!r}; choose 'neuron' (the layer's own shape) or "
                               "'channel' (summed over every dimension after the channel dimension)")
    check_steps(n_steps, tolerance, max_steps)
    method, n_steps, tolerance = resolve_method(method, n_steps, tolerance)
    problem, output = build_problem(model, inputs, layers, baselines=baselines, target=target,
                                    additional_forward_args=additional_forward_args,
                                    forward_kwargs=forward_kwargs, internal_batch_size=internal_batch_size,
                                    attribute_to_layer_input=attribute_to_layer_input)
    integral, is_cut, output_diff = run_path(problem, measures, units, method, n_steps, tolerance, max_steps,
                                             output)
    names = [r.name for r in problem.refs]
    primary = measures[0]
    attributions = {n: integral.values[primary][n] for n in names}
    cond = integral.values["conductance"] if "conductance" in integral.values else None
    delta, rel = {}, {}
    for n in names:
        total = (cond[n] if cond is not None else attributions[n]).flatten(1).sum(1)
        delta[n] = total - output_diff
        rel[n] = relative_error(delta[n], output_diff, integral.F_end, integral.F_start)
    extra: dict[str, Any] = {m: {n: integral.values[m][n] for n in names} for m in integral.values
                             if m != primary}
    if INPUT in integral.values.get("conductance", {}):
        ig = integral.values["conductance"][INPUT]
        extra["input_integrated_gradients"] = ig
        extra["input_relative_error"] = relative_error(ig.flatten(1).sum(1) - output_diff, output_diff,
                                                       integral.F_end, integral.F_start)
    if integral.alphas is not None:
        extra["alphas"] = integral.alphas
        extra["interval_residuals"] = integral.interval_residuals
    extra["model_evaluations"] = problem.n_evaluations
    extra["memory_limited"] = integral.memory_limited
    result = LayerResult(attributions=attributions, delta=delta, relative_error=rel, output_diff=output_diff,
                         is_cut=is_cut, n_points=integral.n_points,
                         target=problem.target if isinstance(problem.target, torch.Tensor) else None,
                         method=method, n_steps=n_steps, tolerance=tolerance, units=units, measure=primary,
                         extra=extra)
    _warn_accuracy(result, max_steps)
    return result


def _warn_accuracy(result: LayerResult, max_steps: int) -> None:
    if result.method == "adaptive":
        limit = result.tolerance
        errors = {n: e for n, e in result.relative_error.items() if result.is_cut[n]}
        if not errors and "input_relative_error" in result.extra:
            errors = {"input (integrated gradients)": result.extra["input_relative_error"]}
        advice = f"raise max_steps (now {max_steps}) or loosen tolerance"
        if result.extra.get("memory_limited"):
            advice = ("refinement stopped at the memory budget for stored points "
                      f"(conductance.engine.ADAPTIVE_STORE_BYTES = {engine.ADAPTIVE_STORE_BYTES}); request "
                      "fewer layers or examples per call, raise the budget, or use a fixed rule")
    else:
        limit = WARN_RELATIVE_ERROR
        errors = {n: e for n, e in result.relative_error.items() if result.is_cut[n]}
        advice = "use tolerance=0.01 (adaptive refinement) or more n_steps"
    bad = {n: e for n, e in errors.items() if (e > limit * (1 + 1e-9)).any()}
    if bad:
        parts = []
        for n, e in bad.items():
            idx = (e > limit).nonzero().flatten().tolist()
            parts.append(f"{n}: examples {idx[:10]}{'...' if len(idx) > 10 else ''} reach "
                         f"{', '.join(f'{100 * e[i]:.1f}%' for i in idx[:5])}")
        warn(f"completeness error above {100 * limit:g}% ({result.method}, points per example "
                      f"{result.n_points.tolist()}): " + "; ".join(parts) + f". {advice}")


def layer_conductance(model: nn.Module, inputs: torch.Tensor, layers: Union[LayerSpec, Sequence[LayerSpec]],
                      *, baselines: Any = None, target: Target = None, additional_forward_args: Any = None,
                      n_steps: Optional[int] = None, method: Optional[str] = None, units: str = "neuron",
                      internal_batch_size: Optional[int] = None, attribute_to_layer_input: bool = False,
                      tolerance: Optional[float] = None, max_steps: int = DEFAULT_MAX_STEPS,
                      forward_kwargs: Optional[dict] = None) -> LayerResult:
    """Conductance of every unit of every requested layer, from one run of the path.

    Parameters
    ----------
    model : nn.Module
        Called as ``model(x, *additional_forward_args, **forward_kwargs)``.
    inputs : Tensor, shape (batch, *input_shape)
        Floating-point inputs (for token ids, attribute from the embeddings).
    layers : str, nn.Module, or a list of them
        Dotted names from ``model.named_modules()`` or module objects; ``"name[i]"`` picks
        element ``i`` of a tuple output.
    baselines : None, number or Tensor broadcastable to ``inputs``
        Start of the path; None means zeros.
    target : None, int, LongTensor (batch,) or callable
        The scalar explained: None takes each example's top predicted logit; a callable
        maps a model output (points, ...) to a tensor (points,).
    n_steps : int, optional
        Intervals of a fixed rule (``n_steps + 1`` points per example). With ``tolerance``,
        the intervals of the starting grid.
    method : {"gausslegendre", "uniform", "uniform_left", "captum", "adaptive"}, optional
        See :mod:`conductance.paths`. Default: adaptive to ``tolerance=0.01`` when neither
        ``n_steps`` nor ``tolerance`` is given, else "gausslegendre" for a fixed ``n_steps``.
    units : {"neuron", "channel"}
        "channel" sums each channel over all dimensions after dimension 1.
    internal_batch_size : int, optional
        Path points per forward/backward pass; bounds memory.
    attribute_to_layer_input : bool
        Observe each layer's input instead of its output.
    tolerance : float, optional
        Relative completeness error to reach on the cut layers (adaptive refinement).
    max_steps : int
        Budget of path points per example for the adaptive rule.
    forward_kwargs : dict, optional
        Keyword arguments for the model; tensors with a first dimension equal to the
        batch size are expanded along the path with their example.

    Returns
    -------
    LayerResult
        ``result[name]``: Tensor (batch, *layer_shape) or (batch, channels), detached.
    """
    return path_attribution(model, inputs, layers, ["conductance"], baselines=baselines, target=target,
                            additional_forward_args=additional_forward_args, forward_kwargs=forward_kwargs,
                            n_steps=n_steps, method=method, tolerance=tolerance, max_steps=max_steps,
                            units=units, internal_batch_size=internal_batch_size,
                            attribute_to_layer_input=attribute_to_layer_input)
