"""Layer conductance (and the other path measures) of many layers from one run of the path."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import dataclasses

import torch
from torch import nn

from . import engine
from .engine import INPUT, PathProblem, integrate_adaptive, integrate_fixed, relative_error
from .errors import ConductanceError, warn
from .inputs import Target, build_problem, check_steps
from .layers import LayerSpec
from .measures import LIG, MEASURES, PATH_MEASURES, POINT_MEASURES
from .paths import METHODS, fixed_grid
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
             output_at_inputs: Any, refine_on_input: bool = False
             ) -> tuple[engine.Integral, dict[str, bool], torch.Tensor]:
    """Run the path once for all measures; returns the integral, the cut map and F(x) - F(x').

    ``refine_on_input``: the adaptive rule also refines until the input's integrated gradients
    meet the tolerance (neuron conductance integrates on the input side)."""
    is_cut = engine.check_cuts(problem)
    fns = {m: PATH_MEASURES[m] for m in measures}
    if "conductance" not in fns and method == "adaptive":
        fns = {"conductance": PATH_MEASURES["conductance"], **fns}
    if method == "adaptive":
        cuts = [n for n, c in is_cut.items() if c]
        if refine_on_input or not cuts:
            problem.track_input = True
            cuts = cuts + [INPUT]
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
                     internal_batch_size: Optional[int], attribute_to_layer_input: bool,
                     refine_on_input: bool = False) -> LayerResult:
    """Shared body of the path measures: validate, run the path once, package and check the result.

    The first of ``measures`` is the result's own; the others are in ``result.extra[measure]``.
    """
    results = importance_results(model, inputs, layers, measures, baselines=baselines, target=target,
                                 additional_forward_args=additional_forward_args, forward_kwargs=forward_kwargs,
                                 n_steps=n_steps, method=method, tolerance=tolerance, max_steps=max_steps,
                                 units=units, internal_batch_size=internal_batch_size,
                                 attribute_to_layer_input=attribute_to_layer_input,
                                 refine_on_input=refine_on_input)
    primary = results[measures[0]]
    for m in measures[1:]:
        primary.extra[m] = dict(results[m].attributions)
    return primary


def _package(measure: str, values: dict[str, torch.Tensor], *, integral: engine.Integral,
             is_cut: dict[str, bool], output_diff: torch.Tensor, problem: PathProblem, method: str,
             n_steps: Optional[int], tolerance: Optional[float], units: str) -> LayerResult:
    names = [r.name for r in problem.refs]
    delta, rel = {}, {}
    for n in names:
        delta[n] = values[n].flatten(1).sum(1) - output_diff
        rel[n] = relative_error(delta[n], output_diff, integral.F_end, integral.F_start)
    extra: dict[str, Any] = {}
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
    return LayerResult(attributions={n: values[n] for n in names}, delta=delta, relative_error=rel,
                       output_diff=output_diff, is_cut=is_cut, n_points=integral.n_points,
                       target=problem.target if isinstance(problem.target, torch.Tensor) else None,
                       method=method, n_steps=n_steps, tolerance=tolerance, units=units, measure=measure,
                       extra=extra)


def importance_results(model: nn.Module, inputs: torch.Tensor, layers: Union[LayerSpec, Sequence[LayerSpec]],
                       measures: Sequence[str], *, baselines: Any, target: Target, additional_forward_args: Any,
                       forward_kwargs: Optional[dict], n_steps: Optional[int], method: Optional[str],
                       tolerance: Optional[float], max_steps: int, units: str,
                       internal_batch_size: Optional[int], attribute_to_layer_input: bool,
                       refine_on_input: bool = False) -> dict[str, LayerResult]:
    """Every requested measure, each as a LayerResult; the path measures share one run of the path."""
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise ConductanceError(f"unknown measure(s) {unknown}; choose from {MEASURES}")
    if len(set(measures)) != len(measures):
        raise ConductanceError(f"measure listed twice in {list(measures)}")
    if units not in UNITS:
        raise ConductanceError(f"unknown units {units!r}; choose 'neuron' (the layer's own shape) or "
                               "'channel' (summed over every dimension after the channel dimension)")
    check_steps(n_steps, tolerance, max_steps)
    method, n_steps, tolerance = resolve_method(method, n_steps, tolerance)
    problem, output = build_problem(model, inputs, layers, baselines=baselines, target=target,
                                    additional_forward_args=additional_forward_args,
                                    forward_kwargs=forward_kwargs, internal_batch_size=internal_batch_size,
                                    attribute_to_layer_input=attribute_to_layer_input, method=method)
    settings = dict(problem=problem, method=method, n_steps=n_steps, tolerance=tolerance, units=units)
    results: dict[str, LayerResult] = {}
    path = [m for m in measures if m in PATH_MEASURES]
    if path:
        integral, is_cut, output_diff = run_path(problem, path, units, method, n_steps, tolerance, max_steps,
                                                 output, refine_on_input=refine_on_input)
        for m in path:
            results[m] = _package(m, integral.values[m], integral=integral, is_cut=is_cut,
                                  output_diff=output_diff, **settings)
    else:
        is_cut = engine.check_cuts(problem)
    point = [m for m in measures if m in POINT_MEASURES]
    if point or LIG in measures:
        ex = torch.arange(problem.batch_size, device=problem.inputs.device)
        with torch.no_grad():
            F_end = engine.scalar_output(problem, output, ex).detach()
            F_start = engine.scalar_output(problem, engine.model_output(problem, problem.baselines, ex),
                                           ex).detach()
    if point:
        values = _point_measures(problem, point, units)
        integral = engine.Integral({}, F_start, F_end, torch.ones(problem.batch_size, dtype=torch.long))
        for m in point:
            results[m] = _package(m, values[m], integral=integral, is_cut=is_cut, output_diff=F_end - F_start,
                                  **{**settings, "method": "none", "n_steps": None, "tolerance": None})
    if LIG in measures:
        results[LIG] = _layer_integrated_gradients(problem, is_cut, units, method, n_steps, tolerance,
                                                   max_steps, F_start, F_end)
    return {m: results[m] for m in measures}


def _point_measures(problem: PathProblem, measures: Sequence[str], units: str) -> dict[str, dict]:
    """Activation, gradient and gradient x activation at the input itself (a = 1), in chunks."""
    B = problem.batch_size
    out: dict[str, dict[str, list]] = {m: {r.name: [] for r in problem.refs} for m in measures}
    for start, stop in engine._chunks(B, problem.chunk_size):
        ex = torch.arange(start, stop, device=problem.inputs.device)
        pts = engine.evaluate(problem, ex, torch.ones(stop - start, dtype=torch.float64,
                                                      device=problem.inputs.device))
        for r in problem.refs:
            y, g = pts.ys[r.name], pts.gs[r.name]
            parts = {"activation": y, "gradient": g, "grad_x_activation": g * y}
            for m in measures:
                out[m][r.name].append(engine.reduce_units(parts[m], units))
    return {m: {n: torch.cat(v) for n, v in per.items()} for m, per in out.items()}


def _layer_integrated_gradients(problem: PathProblem, is_cut: dict[str, bool], units: str, method: str,
                                n_steps: Optional[int], tolerance: Optional[float], max_steps: int,
                                F_start: torch.Tensor, F_end: torch.Tensor) -> LayerResult:
    """Integrated gradients along a straight line in each layer's own space (one path run per layer).

    It is the conductance measure on a different path: from the layer's value at the baseline to
    its value at the input, with everything above the layer recomputed.
    """
    y_start = engine.record_values(problem, problem.baselines)
    y_end = engine.record_values(problem, problem.inputs)
    measure = {"conductance": PATH_MEASURES["conductance"]}
    values, n_points, evaluations = {}, torch.zeros(problem.batch_size, dtype=torch.long), 0
    extra_alphas = {}
    for ref in problem.refs:
        single = dataclasses.replace(problem, refs=[ref], layer_path=(ref.name, y_start[ref.name], y_end[ref.name]),
                                     track_input=False, n_evaluations=0)
        if method == "adaptive":
            if not is_cut[ref.name]:
                raise ConductanceError(
                    f"layer {ref.name!r} is not a cut, so its layer integrated gradients have no observable "
                    "error to refine on; give n_steps (a fixed rule) for this layer")
            integral = integrate_adaptive(single, measure, units, [ref.name], tolerance, max_steps,
                                          initial_steps=n_steps or ADAPTIVE_INITIAL_STEPS)
            extra_alphas[ref.name] = integral.alphas
        else:
            grid = fixed_grid(method, n_steps)
            integral = integrate_fixed(single, grid, measure, units)
        values[ref.name] = integral.values["conductance"][ref.name]
        n_points = torch.maximum(n_points, integral.n_points)
        evaluations += single.n_evaluations
    problem.n_evaluations += evaluations
    integral = engine.Integral({}, F_start, F_end, n_points)
    result = _package(LIG, values, integral=integral, is_cut=is_cut, output_diff=F_end - F_start,
                      problem=problem, method=method, n_steps=n_steps, tolerance=tolerance, units=units)
    if extra_alphas:
        result.extra["alphas"] = extra_alphas
    return result


def layer_importance(model: nn.Module, inputs: torch.Tensor, layers: Union[LayerSpec, Sequence[LayerSpec]],
                     measure: Union[str, Sequence[str]] = "conductance", *, baselines: Any = None,
                     target: Target = None, additional_forward_args: Any = None, n_steps: Optional[int] = None,
                     method: Optional[str] = None, units: str = "neuron", internal_batch_size: Optional[int] = None,
                     attribute_to_layer_input: bool = False, tolerance: Optional[float] = None,
                     max_steps: int = DEFAULT_MAX_STEPS, forward_kwargs: Optional[dict] = None
                     ) -> Union[LayerResult, dict[str, LayerResult]]:
    """Importance of every unit of every requested layer by one or several measures.

    Parameters
    ----------
    measure : str or list of str
        ``"conductance"``; ``"internal_influence"`` (Leino et al. 2018: integral of dF/dy along
        the same straight input path); ``"activation"`` (y at the input); ``"gradient"``
        (dF/dy at the input); ``"grad_x_activation"``; ``"layer_integrated_gradients"``
        (integrated gradients along a straight line in the layer's own space; equal to
        conductance only when the layer is an affine function of the input). Conductance and
        internal influence asked together come from one run of the path.
    Other parameters are those of :func:`layer_conductance`.

    Returns
    -------
    LayerResult for one measure, or dict measure -> LayerResult for a list. Every result's
    ``delta`` is its sum over the layer minus F(x) - F(x'): only conductance (and layer
    integrated gradients, on a cut) promise it is small.
    """
    names = [measure] if isinstance(measure, str) else list(measure)
    results = importance_results(model, inputs, layers, names, baselines=baselines, target=target,
                                 additional_forward_args=additional_forward_args, forward_kwargs=forward_kwargs,
                                 n_steps=n_steps, method=method, tolerance=tolerance, max_steps=max_steps,
                                 units=units, internal_batch_size=internal_batch_size,
                                 attribute_to_layer_input=attribute_to_layer_input)
    for m in ("conductance", LIG):
        if m in results:
            _warn_accuracy(results[m], max_steps)
    return results[names[0]] if isinstance(measure, str) else results


def _warn_accuracy(result: LayerResult, max_steps: int) -> None:
    if result.method == "adaptive":
        limit = result.tolerance
        errors = {n: e for n, e in result.relative_error.items() if result.is_cut[n]}
        if "input_relative_error" in result.extra:
            errors["input (integrated gradients)"] = result.extra["input_relative_error"]
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
    inputs : Tensor, shape (batch, *input_shape), or a tuple of them (multi-input models)
        Floating-point inputs (for token ids, attribute from the embeddings). A tuple is passed
        to the model as ``model(*inputs, ...)``, each input on its own path from its baseline.
    layers : str, nn.Module, or a list of them
        Dotted names from ``model.named_modules()`` or module objects; ``"name[i]"`` picks
        element ``i`` of a tuple output.
    baselines : None, number or Tensor broadcastable to ``inputs`` (a tuple of them for tuple inputs)
        Start of the path; None means zeros.
    target : None, int, LongTensor (batch,), index tuples, or callable
        The scalar explained: None takes each example's top predicted logit; for an output
        with more than two dimensions (e.g. (batch, tokens, vocab)), one index tuple per
        example into the output without the batch dimension (``[(position, token), ...]``),
        one tuple for all, or a LongTensor (batch, k); a callable ``target(output)`` or
        ``target(output, examples)`` maps a model output (points, ...) to a tensor (points,),
        ``examples`` being each row's example index, LongTensor (points,).
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
    result = path_attribution(model, inputs, layers, ["conductance"], baselines=baselines, target=target,
                              additional_forward_args=additional_forward_args, forward_kwargs=forward_kwargs,
                              n_steps=n_steps, method=method, tolerance=tolerance, max_steps=max_steps,
                              units=units, internal_batch_size=internal_batch_size,
                              attribute_to_layer_input=attribute_to_layer_input)
    _warn_accuracy(result, max_steps)
    return result
