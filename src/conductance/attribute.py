"""Layer conductance (and the other path measures) of many layers from one run of the path."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from . import engine
from .adaptive import integrate_adaptive
from .engine import INPUT, PathProblem, integrate_fixed, relative_error, unit_error
from .errors import ConductanceError, warn
from .inputs import Target, build_problem
from .layers import LayerSpec
from .measures import LIG, MEASURES, PATH_MEASURES, POINT_MEASURES
from .paths import CAPTUM_RULES, captum_point_rule, comparison_point_weights, fixed_grid
from .progress import Progress
from .request import ADAPTIVE_INITIAL_STEPS, DEFAULT_MAX_STEPS, DEFAULT_TOLERANCE, UNITS, Request, resolve_method  # noqa: F401
from .result import LayerResult

#: Fixed rules warn when a cut layer misses completeness, or a layer's per-unit error estimate is, above this.
WARN_RELATIVE_ERROR = 0.05
#: Measures whose values are in units of F (their error is floored against F(x) - F(x')).
F_UNITS = ("conductance", "layer_integrated_gradients")


def run_path(problem: PathProblem, measures: Sequence[str], request: Request, output_at_inputs: Any,
             refine_on_input: bool = False) -> tuple[engine.Integral, dict[str, bool], torch.Tensor]:
    """Run the path once for all measures; returns the integral, the cut map and F(x) - F(x').

    Parameters
    ----------
    problem : PathProblem
        The model, inputs and baselines (batch, *input_shape) and the layers to observe.
    measures : sequence of str
        Names in :data:`conductance.measures.PATH_MEASURES`, integrated from the same points.
    request : Request
        The checked settings (rule, steps, tolerance, units, memory budget, progress).
    output_at_inputs : Any
        The model's output at the inputs, from the caller's target check (not read by the path
        itself at present).
    refine_on_input : bool
        The adaptive rule also refines until the input's integrated gradients meet the tolerance
        (neuron conductance integrates on the input side).

    Returns
    -------
    integral : engine.Integral
        ``values[measure][layer]``, each (batch, *unit_shape), and the per-unit error estimates.
    is_cut : dict str -> bool
        Whether each layer is a cut (every path from input to output crosses it).
    output_diff : Tensor, shape (batch,)
        F(x) - F(x') of each example.
    """
    method = request.method
    is_cut = problem.cuts if problem.cuts is not None else engine.check_cuts(problem)
    B = problem.batch_size
    # the adaptive rule's points are not known ahead: its bar counts up to the budget
    total = B * (request.max_steps if method == "adaptive" else request.fixed_steps + 1)   # a fixed grid's points
    names = ", ".join(r.name for r in problem.refs)
    with Progress(request.progress, total, f"{'+'.join(measures)} of {names}", "points") as bar:
        problem.progress = bar
        try:
            return _run_path(problem, measures, request, is_cut, refine_on_input)
        finally:
            problem.progress = None


def _run_path(problem: PathProblem, measures: Sequence[str], request: Request, is_cut: dict[str, bool],
              refine_on_input: bool) -> tuple[engine.Integral, dict[str, bool], torch.Tensor]:
    units, method = request.units, request.method
    fns = {m: PATH_MEASURES[m] for m in measures}
    if "conductance" not in fns and method == "adaptive":
        fns = {"conductance": PATH_MEASURES["conductance"], **fns}
    if method == "adaptive":
        cuts = [n for n, c in is_cut.items() if c]
        unit_layers = [r.name for r in problem.refs]
        if refine_on_input or not cuts:
            # the input's integrated gradients are a cut when no requested layer is; for neuron
            # conductance, whose values live on the input side, each feature's value must be right too
            if not problem.track_input:
                problem.point_bytes += 2 * problem.inputs[0].numel() * max(problem.inputs.element_size(), 4)
            problem.track_input = True
            cuts = cuts + [INPUT]
            if refine_on_input:
                unit_layers.append(INPUT)
        integral = integrate_adaptive(problem, fns, units, cuts, unit_layers, request.target_tolerance,
                                      request.max_steps, initial_steps=request.initial_steps,
                                      store_bytes=request.memory_budget, unit_floor=request.unit_floor,
                                      refine_share=request.refine_share)
    else:
        grid = fixed_grid(method, request.fixed_steps)
        integral = integrate_fixed(problem, grid, fns, units)
        if not grid.has_endpoints:
            _add_end_pieces(problem, integral, fns, units)
    return integral, is_cut, integral.F_end - integral.F_start


def _add_end_pieces(problem: PathProblem, integral: engine.Integral, fns: dict, units: str) -> None:
    """For a grid that misses both ends of the path (Captum's), take F at the ends and add the two
    missing end pieces, with the nearest point's gradient, to the comparison sums (every level of
    ``integral.levels``), then settle the comparison values: the estimate then sees the part of the
    path the rule leaves out."""
    F_start, y_start, F_end, y_end = _path_ends(problem)
    integral.F_start, integral.F_end = F_start, F_end
    scratch = engine.Scratch()
    for first, last in integral.ends:
        ex = first.ex
        for name in problem.layer_names:
            at = ex.to(y_start[name].device)   # the layer's device, for a model split over devices
            pieces = [(y_start[name][at], first.ys[name], first.gs[name], first.alphas),
                      (last.ys[name], y_end[name][at], last.gs[name], 1.0 - last.alphas)]
            for y0, y1, g, width in pieces:
                parts = engine.interval_contributions(fns, y0, g, y1.to(y0.dtype), g, width.to(torch.float64),
                                                      "left", units, scratch)
                for m, c in parts.items():
                    for level in integral.levels.values():
                        level[m][name].index_add_(0, ex, c.to(level[m][name].device))
    integral.settle()


def _path_ends(problem: PathProblem) -> tuple[torch.Tensor, dict, torch.Tensor, dict]:
    """F (batch,) and every recorded layer's value (batch, *layer_shape) at the baselines and at the
    inputs: from the call's first forward where it recorded them, else from forwards of their own."""
    ends = problem.ends
    names = problem.layer_names
    if ends is not None and all(n in ends.y_end for n in names):
        F_end, y_end = ends.F_end, ends.y_end
    else:
        F_end, y_end = engine.endpoint(problem, problem.inputs)
    if ends is not None and ends.y_start is not None and all(n in ends.y_start for n in names):
        F_start, y_start = ends.F_start, ends.y_start
    else:
        F_start, y_start = engine.endpoint(problem, problem.baselines)
    return F_start, y_start, F_end, y_end


def path_attribution(model: nn.Module, inputs: torch.Tensor, layers: Union[LayerSpec, Sequence[LayerSpec]],
                     measures: Sequence[str], *, baselines: Any, target: Target, request: Optional[Request] = None,
                     refine_on_input: bool = False, **settings: Any) -> LayerResult:
    """Shared body of the path measures: validate, run the path once, package and check the result.

    The first of ``measures`` is the result's own; the others are in ``result.extra[measure]``.
    ``request``: the checked settings; without it, ``settings`` (the keywords of
    :func:`layer_conductance`) are checked into one.

    Parameters
    ----------
    model : nn.Module
    inputs : Tensor, shape (batch, *input_shape), or a tuple of them
    layers : a layer spec or a list of them
    measures : sequence of str
        Path measures (:data:`conductance.measures.PATH_MEASURES`).
    baselines, target
        As in :func:`layer_conductance`.
    refine_on_input : bool
        See :func:`run_path`.

    Returns
    -------
    LayerResult
        Values (batch, *unit_shape) per layer.
    """
    if request is None:
        request = Request.make(**settings)
    results = importance_results(model, inputs, layers, measures, baselines=baselines, target=target,
                                 request=request, refine_on_input=refine_on_input)
    primary = results[measures[0]]
    for m in measures[1:]:
        primary.extra[m] = dict(results[m].attributions)
    return primary


def _package(measure: str, values: dict[str, torch.Tensor], coarse: dict[str, torch.Tensor], *,
             integral: engine.Integral, is_cut: dict[str, bool], output_diff: torch.Tensor, problem: PathProblem,
             request: Request, exact: bool = False) -> LayerResult:
    """``exact``: values read at one point (no rule, nothing to estimate)."""
    method, n_steps, tolerance = ("none", None, None) if exact else (request.method, request.n_steps,
                                                                      request.tolerance)
    units = request.units
    names = [r.name for r in problem.refs]
    delta, rel, unit_err = {}, {}, {}
    scale = output_diff if measure in F_UNITS else None
    for n in names:
        delta[n] = values[n].flatten(1).sum(1) - output_diff
        rel[n] = relative_error(delta[n], output_diff, integral.F_end, integral.F_start)
        unit_err[n] = unit_error(values[n], coarse[n], scale)
    extra: dict[str, Any] = {}
    if INPUT in integral.values.get("conductance", {}):
        ig = integral.values["conductance"][INPUT]
        extra["input_integrated_gradients"] = ig
        extra["input_relative_error"] = relative_error(ig.flatten(1).sum(1) - output_diff, output_diff,
                                                       integral.F_end, integral.F_start)
        extra["input_unit_error"] = unit_error(ig, integral.coarse["conductance"][INPUT], output_diff)
    if integral.alphas is not None:
        extra["alphas"] = integral.alphas
        extra["coarse_masks"] = integral.coarse_masks
        extra["interval_residuals"] = integral.interval_residuals
    extra["coarse"] = {n: coarse[n] for n in names}
    extra["model_evaluations"] = problem.n_evaluations
    extra["memory_limited"] = integral.memory_limited
    extra["precision_limited"] = list(integral.precision_limited)
    if integral.memory_limited:
        extra["memory_budget"] = request.memory_budget
    return LayerResult(attributions={n: values[n] for n in names}, delta=delta, relative_error=rel,
                       output_diff=output_diff, is_cut=is_cut, n_points=integral.n_points,
                       target=problem.target if isinstance(problem.target, torch.Tensor) else None,
                       method=method, n_steps=n_steps, tolerance=tolerance, units=units, measure=measure,
                       unit_error=unit_err, extra=extra)


def check_measures(measures: Sequence[str]) -> None:
    """Refuse unknown or repeated measure names.

    Parameters
    ----------
    measures : sequence of str
        Names from :data:`conductance.measures.MEASURES`.
    """
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise ConductanceError(f"unknown measure(s) {unknown}; choose from {MEASURES}")
    if len(set(measures)) != len(measures):
        raise ConductanceError(f"measure listed twice in {list(measures)}")


def importance_results(model: nn.Module, inputs: torch.Tensor, layers: Union[LayerSpec, Sequence[LayerSpec]],
                       measures: Sequence[str], *, baselines: Any, target: Target, request: Request,
                       refine_on_input: bool = False) -> dict[str, LayerResult]:
    """Every requested measure, each as a LayerResult; the path measures share one run of the path.

    Parameters
    ----------
    model, inputs, layers, baselines, target
        As in :func:`layer_importance`.
    measures : sequence of str
    request : Request
    refine_on_input : bool

    Returns
    -------
    dict str -> LayerResult
        Measure name -> its result, values (batch, *unit_shape) per layer.
    """
    check_measures(measures)
    units, method = request.units, request.method
    path = [m for m in measures if m in PATH_MEASURES]
    # Captum integrates internal influence with a weight per point, not as a Stieltjes sum
    weighted = [m for m in path if m == "internal_influence" and method in CAPTUM_RULES]
    path = [m for m in path if m not in weighted]
    point = [m for m in measures if m in POINT_MEASURES]
    # F at both ends from the first forward when something reads it there: Captum's grids, which
    # miss both ends, and the measures that are not integrated over the path
    ends_needed = bool(point or weighted or LIG in measures) or (
        bool(path) and method != "adaptive" and not fixed_grid(method, request.fixed_steps).has_endpoints)
    problem, output = build_problem(model, inputs, layers, baselines=baselines, target=target, request=request,
                                    probe="ends" if ends_needed else "cuts")
    settings: dict[str, Any] = dict(problem=problem, request=request)
    results: dict[str, LayerResult] = {}
    if path:
        integral, is_cut, output_diff = run_path(problem, path, request, output, refine_on_input=refine_on_input)
        for m in path:
            results[m] = _package(m, integral.values[m], integral.coarse[m], integral=integral, is_cut=is_cut,
                                  output_diff=output_diff, **settings)
    else:
        is_cut = problem.cuts if problem.cuts is not None else engine.check_cuts(problem)
    if point or LIG in measures or weighted:
        ends = problem.ends
        ex = torch.arange(problem.batch_size, device=problem.inputs.device)
        with torch.no_grad():
            F_end = ends.F_end if ends is not None else engine.scalar_output(problem, output, ex).detach()
            F_start = ends.F_start if ends is not None and ends.F_start is not None else engine.scalar_output(
                problem, engine.model_output(problem, problem.baselines, ex), ex).detach()
            F_end, F_start = F_end.to(ex.device), F_start.to(ex.device)   # the output's device may be another
    del output
    if point:
        values = _point_measures(problem, point, units)
        integral = engine.Integral({}, F_start, F_end, torch.ones(problem.batch_size, dtype=torch.long))
        for m in point:
            # read at one point, with no integral: nothing to estimate, the values are exact
            results[m] = _package(m, values[m], values[m], integral=integral, is_cut=is_cut,
                                  output_diff=F_end - F_start, exact=True, **settings)
    if weighted:
        alphas, weights = captum_point_rule(method, request.fixed_steps, "internal_influence")
        sums, levels = _weighted_gradient_sums(problem, alphas, weights)
        influence = {n: engine.reduce_units(v, units) for n, v in sums.items()}
        coarse = {n: engine.comparison_values(influence[n], **{k: engine.reduce_units(per[n], units)
                                                               for k, per in levels.items()}) for n in influence}
        integral = engine.Integral({}, F_start, F_end, torch.full((problem.batch_size,), len(alphas)))
        results["internal_influence"] = _package("internal_influence", influence, coarse, integral=integral,
                                                 is_cut=is_cut, output_diff=F_end - F_start, **settings)
    if LIG in measures:
        results[LIG] = _layer_integrated_gradients(problem, is_cut, request, F_start, F_end)
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
                # on the inputs' device with F, as the path measures' sums (layers of a split model live elsewhere)
                out[m][r.name].append(engine.reduce_units(parts[m], units).to(problem.inputs.device))
    return {m: {n: torch.cat(v) for n, v in per.items()} for m, per in out.items()}


def _weighted_gradient_sums(problem: PathProblem, alphas, weights
                            ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """``sum_k w_k dF/dy(a_k)`` for every layer, each (batch, *layer_shape), streamed in chunks, and
    the same sums with each set of comparison weights of :func:`conductance.paths.comparison_point_weights`
    (level -> layer -> sum).

    Captum's InternalInfluence and LayerIntegratedGradients integrate this way: a weight per
    point (its step size), where our rules take a Stieltjes sum over intervals."""
    B = problem.batch_size
    device = problem.inputs.device
    n = len(alphas)
    flat_alpha = torch.as_tensor(alphas, dtype=torch.float64).repeat_interleave(B)
    weight_sets = {"values": weights, **comparison_point_weights(alphas)}
    flat = {k: torch.as_tensor(w, dtype=torch.float64).repeat_interleave(B) for k, w in weight_sets.items()}
    flat_ex = torch.arange(B, device=device).repeat(n)
    sums: dict[str, dict[str, torch.Tensor]] = {k: {} for k in flat}
    for start, stop in engine._chunks(n * B, problem.chunk_size):
        ex = flat_ex[start:stop]
        pts = engine.evaluate(problem, ex, flat_alpha[start:stop].to(device))
        for ref in problem.refs:
            g = pts.gs[ref.name]
            shape = (-1,) + (1,) * (g.dim() - 1)
            for key, wts in flat.items():
                target = sums[key]
                contrib = (g * wts[start:stop].to(device=g.device, dtype=g.dtype).view(shape)).to(device)
                if ref.name not in target:
                    target[ref.name] = torch.zeros((B,) + tuple(g.shape[1:]), dtype=g.dtype, device=device)
                target[ref.name].index_add_(0, ex, contrib)
    values = sums.pop("values")
    return values, sums


def _layer_integrated_gradients(problem: PathProblem, is_cut: dict[str, bool], request: Request,
                                F_start: torch.Tensor, F_end: torch.Tensor) -> LayerResult:
    """Integrated gradients along a straight line in each layer's own space (one path run per layer).

    It is the conductance measure on a different path: from the layer's value at the baseline to
    its value at the input, with everything above the layer recomputed.
    """
    y_start = engine.record_values(problem, problem.baselines)
    y_end = engine.record_values(problem, problem.inputs)
    units, method = request.units, request.method
    measure = {"conductance": PATH_MEASURES["conductance"]}
    values, coarse, n_points, evaluations = {}, {}, torch.zeros(problem.batch_size, dtype=torch.long), 0
    extra_alphas = {}
    for ref in problem.refs:
        single = dataclasses.replace(problem, refs=[ref], layer_path=(ref.name, y_start[ref.name], y_end[ref.name]),
                                     track_input=False, n_evaluations=0)
        if method == "adaptive":
            # a layer that is not a cut has no completeness check, but its per-unit estimate steers
            cuts = [ref.name] if is_cut[ref.name] else []
            integral = integrate_adaptive(single, measure, units, cuts, [ref.name], request.target_tolerance,
                                          request.max_steps, initial_steps=request.initial_steps,
                                          store_bytes=request.memory_budget, unit_floor=request.unit_floor,
                                          refine_share=request.refine_share)
            extra_alphas[ref.name] = integral.alphas
        elif method in CAPTUM_RULES:
            # Captum's LayerIntegratedGradients: integrated gradients in the layer's space, a weight
            # per point; (y - y') times the weighted sum of dF/dy
            alphas, weights = captum_point_rule(method, request.fixed_steps, LIG)
            sums, levels = _weighted_gradient_sums(single, alphas, weights)
            diff = y_end[ref.name] - y_start[ref.name]
            value = engine.reduce_units(sums[ref.name] * diff.to(sums[ref.name].device), units)
            value_coarse = engine.comparison_values(value, **{
                k: engine.reduce_units(v[ref.name] * diff.to(v[ref.name].device), units) for k, v in levels.items()})
            integral = engine.Integral({"conductance": {ref.name: value}}, F_start, F_end,
                                       torch.full((problem.batch_size,), len(alphas)),
                                       coarse={"conductance": {ref.name: value_coarse}})
        else:
            grid = fixed_grid(method, request.fixed_steps)
            integral = integrate_fixed(single, grid, measure, units)
        values[ref.name] = integral.values["conductance"][ref.name]
        coarse[ref.name] = integral.coarse["conductance"][ref.name]
        n_points = torch.maximum(n_points, integral.n_points)
        evaluations += single.n_evaluations
    problem.n_evaluations += evaluations
    integral = engine.Integral({}, F_start, F_end, n_points)
    result = _package(LIG, values, coarse, integral=integral, is_cut=is_cut, output_diff=F_end - F_start,
                      problem=problem, request=request)
    if extra_alphas:
        # one path per layer, so one adaptive grid per layer: "alphas" keeps its one meaning (the grid of
        # the single path, a per-example list) and these go under their own key
        result.extra["layer_alphas"] = extra_alphas
    return result


def layer_importance(model: nn.Module, inputs: torch.Tensor, layers: Union[LayerSpec, Sequence[LayerSpec]],
                     measure: Union[str, Sequence[str]] = "conductance", *, baselines: Any = None,
                     target: Target = None, additional_forward_args: Any = None, n_steps: Optional[int] = None,
                     method: Optional[str] = None, units: str = "neuron", internal_batch_size: Optional[int] = None,
                     attribute_to_layer_input: bool = False, tolerance: Optional[float] = None,
                     max_steps: int = DEFAULT_MAX_STEPS, forward_kwargs: Optional[dict] = None,
                     memory_budget: Optional[int] = None, channels_last: Optional[bool] = None,
                     progress: Optional[bool] = False) -> Union[LayerResult, dict[str, LayerResult]]:
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
    request = Request.make(method=method, n_steps=n_steps, tolerance=tolerance, max_steps=max_steps, units=units,
                           internal_batch_size=internal_batch_size, additional_forward_args=additional_forward_args,
                           forward_kwargs=forward_kwargs, attribute_to_layer_input=attribute_to_layer_input,
                           memory_budget=memory_budget, channels_last=channels_last, progress=progress)
    results = importance_results(model, inputs, layers, names, baselines=baselines, target=target, request=request)
    for m in ("conductance", LIG):
        if m in results:
            _warn_accuracy(results[m], max_steps)
    for r in results.values():
        r.bind(model)          # result[model.layer] as well as result["layer"]
    return results[names[0]] if isinstance(measure, str) else results


def _examples(idx: list[int]) -> str:
    return f"examples {idx[:8]}{' ...' if len(idx) > 8 else ''}"


def _warn_accuracy(result: LayerResult, max_steps: int) -> None:
    """One short warning when the result misses its accuracy: which layers, how many examples, how far."""
    adaptive = result.method == "adaptive"
    limit = float(result.tolerance) if adaptive and result.tolerance is not None else WARN_RELATIVE_ERROR
    over = limit * (1 + 1e-9)
    completeness = {n: e for n, e in result.relative_error.items() if result.is_cut[n]}
    units = dict(result.unit_error)
    if "input_relative_error" in result.extra:
        completeness["input (integrated gradients)"] = result.extra["input_relative_error"]
    parts, idx_all = [], set()
    for kind, errors in (("completeness error", completeness), ("per-unit error estimate", units)):
        for n, e in errors.items():
            idx = (e > over).nonzero().flatten().tolist()
            if idx:
                idx_all.update(idx)
                parts.append(f"{n}: {kind} above {100 * limit:g}% for {len(idx)} of {e.shape[0]} "
                             f"({_examples(idx)}, up to {100 * float(e.max()):.3g}%)")
    if not parts:
        return
    points = result.n_points
    spread = (f"{int(points.min())}" if int(points.min()) == int(points.max())
              else f"{int(points.min())}-{int(points.max())}")
    if adaptive:
        advice = f"raise max_steps (now {max_steps}) or loosen tolerance"
        limited = result.extra.get("precision_limited") or []
        if limited:
            advice = (f"{_examples(limited)} stopped at the precision floor of the model's dtype: their error "
                      "stopped falling as points were added. Run the model in float32 for smaller errors; "
                      "otherwise " + advice)
        if result.extra.get("memory_limited"):
            budget = result.extra.get("memory_budget", engine.ADAPTIVE_STORE_BYTES)
            advice = (f"refinement stopped at the memory budget for stored points ({budget} bytes); request "
                      "fewer layers or examples per call, pass a larger memory_budget= (bytes), or use a fixed rule")
    else:
        advice = "use the adaptive rule (tolerance=0.02) or more n_steps"
    warn(f"{result.measure} ({result.method}, {spread} points per example): " + "; ".join(parts)
         + f". {advice}")


def layer_conductance(model: nn.Module, inputs: torch.Tensor, layers: Union[LayerSpec, Sequence[LayerSpec]],
                      *, baselines: Any = None, target: Target = None, additional_forward_args: Any = None,
                      n_steps: Optional[int] = None, method: Optional[str] = None, units: str = "neuron",
                      internal_batch_size: Optional[int] = None, attribute_to_layer_input: bool = False,
                      tolerance: Optional[float] = None, max_steps: int = DEFAULT_MAX_STEPS,
                      forward_kwargs: Optional[dict] = None, memory_budget: Optional[int] = None,
                      channels_last: Optional[bool] = None, progress: Optional[bool] = False) -> LayerResult:
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
    method : {"gausslegendre", "uniform", "uniform_left", "captum", "riemann_left", "riemann_right", \
"riemann_middle", "riemann_trapezoid", "adaptive"}, optional
        See :mod:`conductance.paths`. Default: adaptive to ``tolerance=0.02`` when neither
        ``n_steps`` nor ``tolerance`` is given, else "gausslegendre" for a fixed ``n_steps``.
        ``"captum"`` and Captum's ``"riemann_*"`` names give Captum 0.9's numbers for the same
        ``method`` and ``n_steps`` (``"captum"`` is Captum's default, Gauss-Legendre); our
        ``"gausslegendre"`` is not Captum's (it adds both ends of the path and takes trapezoids).
    units : {"neuron", "channel"}
        "channel" sums each channel over all dimensions after dimension 1.
    internal_batch_size : int, optional
        Path points per forward/backward pass; bounds memory.
    attribute_to_layer_input : bool
        Observe each layer's input instead of its output.
    tolerance : float, optional
        Relative error to reach (adaptive refinement): every requested layer's per-unit error
        estimate (``result.unit_error``) and, on cut layers, the completeness error.
    max_steps : int
        Budget of path points per example for the adaptive rule.
    forward_kwargs : dict, optional
        Keyword arguments for the model; tensors with a first dimension equal to the
        batch size are expanded along the path with their example.
    memory_budget : int, optional
        Bytes the adaptive rule may keep in stored path points (values and gradients of every
        requested layer); when refinement would need more it stops, says so in a warning and sets
        ``result.extra["memory_limited"]``. None: ``conductance.engine.ADAPTIVE_STORE_BYTES`` (3 GiB).
    channels_last : bool, optional
        Memory layout of 4-D path points. None (default): channels-last for a model with 2-D
        convolutions and floating inputs on the CPU, except for Captum's rules (which keep
        Captum's arithmetic); True / False force it on or off. A model that cannot take
        channels-last activations (it ``.view()``\\ s them) falls back to the inputs' layout.
        The layout changes float32 results only by rounding.
    progress : bool, optional
        A bar on stderr counting path points (tqdm); False (default) for none, None for a bar when
        stderr is a terminal. The adaptive rule's bar counts up to its budget and stops where the
        rule does. (Off by default: ``cd.aggregate`` and the experiments call this once per batch
        and show their own bars.)

    Returns
    -------
    LayerResult
        ``result[name]``: Tensor (batch, *layer_shape) or (batch, channels), detached.
    """
    request = Request.make(method=method, n_steps=n_steps, tolerance=tolerance, max_steps=max_steps, units=units,
                           internal_batch_size=internal_batch_size, additional_forward_args=additional_forward_args,
                           forward_kwargs=forward_kwargs, attribute_to_layer_input=attribute_to_layer_input,
                           memory_budget=memory_budget, channels_last=channels_last, progress=progress)
    result = path_attribution(model, inputs, layers, ["conductance"], baselines=baselines, target=target,
                              request=request)
    _warn_accuracy(result, max_steps)
    return result.bind(model)
