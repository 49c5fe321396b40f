"""Checking what the user passed and turning it into a :class:`~conductance.engine.PathProblem`."""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union, cast

import torch
from torch import nn

from . import engine
from .engine import PathProblem, logits_of, model_output
from .errors import ConductanceError
from .forward_args import ForwardArgs, check_forward_args  # noqa: F401 (check_forward_args: re-exported)
from .layers import LayerSpec, resolve_layers
from .paths import CAPTUM_RULES
from .sites import warn_training

Target = Union[None, int, Sequence[int], Sequence[tuple], torch.Tensor, Callable[..., torch.Tensor]]

#: Input elements per chunk of path points when the user gives no internal_batch_size.
DEFAULT_CHUNK_ELEMENTS = 2 ** 21
MAX_DEFAULT_CHUNK = 256
#: Most path points per example any rule evaluates (n_steps + 1 of a fixed rule, max_steps of the adaptive one).
MAX_POINTS = 20_000


def check_inputs(inputs: Any) -> torch.Tensor:
    """Check one input tensor: floating point, on a real device, with examples, finite.

    Parameters
    ----------
    inputs : Tensor, shape (batch, *input_shape)

    Returns
    -------
    Tensor, shape (batch, *input_shape)
        ``inputs`` detached. Other values raise TypeError or ConductanceError saying what to pass.
    """
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor of shape (batch, ...) (or, for layer and neuron conductance "
                        f"of a multi-input model, a tuple of them), got {type(inputs).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(
            f"inputs have dtype {inputs.dtype}: integer inputs (such as token ids) cannot be interpolated "
            "along a path. Attribute from the embedding layer instead: for a model that takes token ids, "
            "cd.hf.layer_conductance(model, input_ids, layers, ...) runs the path in word-embedding space "
            "for you; otherwise compute the embeddings and pass them as inputs to a model that starts "
            "after the embedding layer, with a zero or pad-token embedding as the baseline")
    if inputs.device.type == "meta":
        raise ConductanceError("inputs are on the meta device (a shape without data); pass real tensors, on the "
                               "model's device")
    if inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ConductanceError(f"inputs must have a batch dimension with at least one example; got shape "
                               f"{tuple(inputs.shape)}")
    if not torch.isfinite(inputs).all():
        bad = (~torch.isfinite(inputs)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ConductanceError(f"inputs contain NaN or Inf (examples {bad}); clean or drop them first")
    return inputs.detach()


def check_baselines(baselines: Any, inputs: torch.Tensor) -> torch.Tensor:
    """The baselines as one tensor of the inputs' shape, dtype and device.

    Parameters
    ----------
    baselines : None, a number, or Tensor broadcastable to ``inputs``
        None is zeros; a tensor (*input_shape) is shared by every example.
    inputs : Tensor, shape (batch, *input_shape)

    Returns
    -------
    Tensor, shape (batch, *input_shape)
        Contiguous; NaN or Inf raise a ConductanceError.
    """
    if baselines is None:
        return torch.zeros_like(inputs)
    if isinstance(baselines, numbers.Number):
        value = torch.full_like(inputs, float(cast(float, baselines)))  # numbers.Number is not typed as SupportsFloat
    elif isinstance(baselines, torch.Tensor):
        try:
            shape = torch.broadcast_shapes(baselines.shape, inputs.shape)
        except RuntimeError:
            shape = None
        if shape != inputs.shape:
            raise ConductanceError(
                f"baselines of shape {tuple(baselines.shape)} do not broadcast to the inputs' shape "
                f"{tuple(inputs.shape)}; pass one baseline per example, one shared baseline of shape "
                f"{tuple(inputs.shape[1:])}, or a number")
        value = baselines.detach().to(device=inputs.device, dtype=inputs.dtype).expand_as(inputs).contiguous()
    else:
        raise TypeError(f"baselines must be None, a number or a tensor, got {type(baselines).__name__}")
    if not torch.isfinite(value).all():
        raise ConductanceError("baselines contain NaN or Inf")
    return value


@dataclass(frozen=True)
class InputSpec:
    """How a tuple of input tensors is packed into one flat tensor (batch, sum of per-example sizes).

    The engine interpolates, indexes and chunks one tensor; :meth:`unpack` gives the model its
    inputs back. Interpolating the packed vector is interpolating each input between its own
    baseline and its value, with one ``alpha`` per point, as Captum does."""

    shapes: tuple    # per-example shape of each input
    dtypes: tuple

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    def unpack(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(*lead, N) -> tuple of (*lead, *shape_i) in each input's dtype.

        Parameters
        ----------
        flat : Tensor, shape (*lead, N)
            N is the sum of :attr:`sizes`.

        Returns
        -------
        tuple of Tensor
        """
        lead = tuple(flat.shape[:-1])
        return tuple(part.reshape(lead + tuple(shape)).to(dtype)
                     for part, shape, dtype in zip(flat.split(self.sizes, -1), self.shapes, self.dtypes))


def pack_inputs(inputs: Sequence[Any], baselines: Any) -> tuple[torch.Tensor, torch.Tensor, InputSpec]:
    """Check a tuple of inputs and their baselines (None, a number, or a tuple of one per input) and pack them.

    Parameters
    ----------
    inputs : sequence of Tensor, each (batch, *shape_i)
    baselines : None, a number, or a sequence of one baseline per input

    Returns
    -------
    flat : Tensor, shape (batch, N)
        The inputs flattened and concatenated in the promoted dtype, ``N = sum_i prod(shape_i)``.
    flat_baselines : Tensor, shape (batch, N)
    spec : InputSpec
        Unpacks ``flat`` (or points built from it) into the model's inputs.
    """
    if len(inputs) == 0:
        raise ConductanceError("inputs is an empty tuple; pass one tensor or a tuple of tensors")
    parts = []
    for i, t in enumerate(inputs):
        try:
            parts.append(check_inputs(t))
        except (TypeError, ConductanceError) as exc:
            raise type(exc)(f"inputs[{i}]: {exc}") from None
    batch = {int(t.shape[0]) for t in parts}
    devices = {t.device for t in parts}
    if len(batch) != 1 or len(devices) != 1:
        raise ConductanceError(f"the inputs of a tuple must share the batch size and the device; got batch sizes "
                               f"{[int(t.shape[0]) for t in parts]} on {[str(t.device) for t in parts]}")
    if isinstance(baselines, (tuple, list)):
        if len(baselines) != len(parts):
            raise ConductanceError(f"{len(baselines)} baselines for {len(parts)} inputs; give one baseline per "
                                   "input (None, a number or a tensor each), as Captum does")
        bases = baselines
    elif baselines is None or isinstance(baselines, numbers.Number):
        bases = [baselines] * len(parts)
    else:
        raise ConductanceError("the inputs are a tuple, so the baselines must be a tuple too (one per input: None, "
                               "a number or a tensor), or None / one number for all of them")
    base_parts = []
    for i, (b, t) in enumerate(zip(bases, parts)):
        try:
            base_parts.append(check_baselines(b, t))
        except (TypeError, ConductanceError) as exc:
            raise type(exc)(f"baselines[{i}]: {exc}") from None
    dtype = parts[0].dtype
    for t in parts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    spec = InputSpec(tuple(tuple(t.shape[1:]) for t in parts), tuple(t.dtype for t in parts))
    flat = torch.cat([t.reshape(t.shape[0], -1).to(dtype) for t in parts], 1)
    flat_base = torch.cat([b.reshape(b.shape[0], -1).to(dtype) for b in base_parts], 1)
    return flat, flat_base, spec


def _float_params(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]


def check_model_fits(model: nn.Module, inputs: torch.Tensor) -> None:
    """Refuse a model that cannot run at all (weights on the meta device), before anything runs.

    Parameters
    ----------
    model : nn.Module
    inputs : Tensor, shape (batch, *input_shape)
    """
    if any(t.device.type == "meta" for t in itertools.chain(model.parameters(), model.buffers())):
        raise ConductanceError("the model's weights are on the meta device (created without data, e.g. with "
                               "device='meta' or low_cpu_mem_usage): load its weights first (model.to_empty(...) "
                               "then load_state_dict, or from_pretrained without a meta device)")


def explain_failure(model: nn.Module, inputs: torch.Tensor) -> Optional[str]:
    """Why the model may have failed on ``inputs``: a dtype or device that differs from its weights.

    Parameters
    ----------
    model : nn.Module
    inputs : Tensor

    Returns
    -------
    str or None
        A sentence with the fix, or None when dtypes and devices agree.
    """
    params = _float_params(model)
    dtypes = sorted({str(t.dtype) for t in params})
    devices = sorted({str(t.device) for t in params})
    if len(dtypes) == 1 and dtypes[0] != str(inputs.dtype):
        want = dtypes[0].replace("torch.", "")
        return (f"the inputs are {inputs.dtype} but the model's weights are {dtypes[0]}: convert one side, "
                f"inputs.to(torch.{want}) (and the baselines) or model.to({inputs.dtype})")
    if len(devices) == 1 and devices[0] != str(inputs.device):
        return (f"the inputs are on {inputs.device} but the model's weights are on {devices[0]}: move one side, "
                f"inputs.to('{devices[0]}') (and the baselines) or model.to('{inputs.device}')")
    return None


def default_chunk(inputs: torch.Tensor) -> int:
    """Path points per forward pass when the user gives no ``internal_batch_size``.

    Parameters
    ----------
    inputs : Tensor, shape (batch, *input_shape)

    Returns
    -------
    int
        About :data:`DEFAULT_CHUNK_ELEMENTS` input elements, between 1 and :data:`MAX_DEFAULT_CHUNK`.
    """
    per_example = max(1, inputs[0].numel())
    return int(max(1, min(MAX_DEFAULT_CHUNK, DEFAULT_CHUNK_ELEMENTS // per_example)))


def resolve_target(target: Target, output: Any, batch: int, device: torch.device) -> Any:
    """Turn ``target`` into a LongTensor, a callable, or None (scalar outputs).

    For an output (batch, classes) the tensor is (batch,), one class per example; for an output
    with more dimensions, such as a language model's (batch, positions, vocab), it is
    (batch, output.dim() - 1): one index tuple per example into the output without its batch
    dimension (Captum's convention), e.g. ``(position, token)``.

    Parameters
    ----------
    target : None, int, sequence, LongTensor or callable
    output : Any
        The model's output at the inputs, (batch, ...) scores.
    batch : int
    device : torch.device
        Where the index tensor goes.

    Returns
    -------
    None, LongTensor of shape (batch,) or (batch, k), or the callable
    """
    if callable(target) and not isinstance(target, torch.Tensor):
        engine.target_arity(target)  # a callable that takes no output is refused before the path runs
        choose = getattr(target, "choose_at_inputs", None)
        if choose is not None:
            # a target that picks what it explains from the output at the inputs (cd.hf.next_token with
            # token=None: each example's top token), from this forward rather than one of its own
            choose(output)
        return target
    scores = logits_of(output)
    if target is None:
        if scores.dim() == 1 or (scores.dim() == 2 and scores.shape[1] == 1):
            return None
        if scores.dim() != 2:
            raise ConductanceError(
                f"the model output has shape {tuple(scores.shape)}; target=None needs (batch, classes). Pass one "
                "index tuple per example into the output without the batch dimension (for a language model "
                "(batch, positions, vocab): target=[(position, token), ...]), cd.hf.next_token(...), or a "
                "callable target(output, examples) returning one score per row")
        return scores.argmax(1).to(device)
    if scores.dim() < 2:
        raise ConductanceError(f"the model output has shape {tuple(scores.shape)}, one score per example: "
                               "there is nothing to pick, pass target=None")
    if scores.dim() > 2:
        return _index_target(target, scores, batch, device)
    n_classes = scores.shape[1]
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        t = torch.full((batch,), int(target), dtype=torch.long, device=device)
    elif isinstance(target, (list, tuple)):
        t = torch.as_tensor(target, dtype=torch.long, device=device)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"target tensor must hold class indices (an integer dtype), got {target.dtype}")
        t = target.to(device=device, dtype=torch.long)
        if t.dim() == 0:
            t = t.expand(batch).clone()
    else:
        raise TypeError(f"target must be None, an int, a LongTensor of shape (batch,) or a callable; got "
                        f"{type(target).__name__}")
    if t.shape != (batch,):
        raise ConductanceError(f"target has shape {tuple(t.shape)}; it must be one class per example, "
                               f"shape ({batch},)")
    if (t < 0).any() or (t >= n_classes).any():
        raise ConductanceError(f"target {t.tolist()} is out of range: the model has {n_classes} outputs "
                               f"(valid classes 0..{n_classes - 1})")
    return t


def _index_target(target: Any, scores: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """Index tuples (batch, k) into an output (batch, *dims) with k = len(dims) >= 2; negatives count from the end."""
    dims = tuple(scores.shape[1:])
    k = len(dims)
    example = ", ".join(["i"] * k)
    hint = (f"pass one index tuple of {k} integers per example into the output without its batch dimension "
            f"{dims}, e.g. target=[({example}), ...] with {batch} tuples" + (" ((position, token) for a language "
            "model)" if k == 2 else "") + f", one tuple ({example}) for every example, a LongTensor ({batch}, {k}), "
            "or a callable target(output, examples)")
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        raise ConductanceError(f"an int target picks a class of a (batch, classes) output, but the model output "
                               f"has shape {tuple(scores.shape)}; {hint}")
    if isinstance(target, tuple) and all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                                         for i in target):
        t = torch.tensor([int(i) for i in target], dtype=torch.long, device=device).expand(batch, -1).clone()
    elif isinstance(target, (list, tuple)):
        rows = []
        for row in target:
            if isinstance(row, torch.Tensor):
                row = row.tolist()
            if not isinstance(row, (list, tuple)) or not all(isinstance(i, numbers.Integral)
                                                              and not isinstance(i, bool) for i in row):
                raise ConductanceError(f"target entry {row!r} is not a tuple of integers; {hint}")
            rows.append([int(i) for i in row])
        if any(len(r) != k for r in rows):
            raise ConductanceError(f"target entries have {sorted({len(r) for r in rows})} indices; {hint}")
        t = torch.tensor(rows, dtype=torch.long, device=device).view(-1, k)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"target tensor must hold indices (an integer dtype), got {target.dtype}")
        # a 1-D tensor is ambiguous here (one class per example, or one tuple for all): only (batch, k) is taken
        t = target.to(device=device, dtype=torch.long)
    else:
        raise TypeError(f"target must be index tuples or a callable for an output of shape {tuple(scores.shape)}; "
                        f"got {type(target).__name__}. {hint}")
    if t.shape != (batch, k):
        raise ConductanceError(f"target has shape {tuple(t.shape)}, expected ({batch}, {k}); {hint}")
    size = torch.tensor(dims, dtype=torch.long, device=device)
    bad = ((t < -size) | (t >= size)).any(1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ConductanceError(f"target {tuple(t[i].tolist())} of example {i} is out of range for an output of "
                               f"shape {dims} per example")
    return torch.where(t < 0, t + size, t)


def build_problem(model: nn.Module, inputs: torch.Tensor, layers: Union[LayerSpec, Sequence[LayerSpec]],
                  *, baselines: Any, target: Target, request: Any = None, track_input: bool = False,
                  probe: Optional[str] = None, **settings: Any) -> tuple[PathProblem, Any]:
    """Validate the model, inputs and layers and return the problem plus the model's output at the inputs.

    ``request``: the call's checked :class:`~conductance.request.Request`; without it, ``settings``
    (``method``, ``additional_forward_args``, ``forward_kwargs``, ``internal_batch_size``,
    ``attribute_to_layer_input``, ...) are checked into one here.

    ``method="captum"`` (and Captum's other rules) keeps the inputs' memory layout (Captum's arithmetic,
    layout included); otherwise convolutional models get channels-last path points when they can take them
    (``channels_last=True`` / ``False`` in the request forces the choice).

    Parameters
    ----------
    model : nn.Module
    inputs : Tensor, shape (batch, *input_shape), or a tuple of them
    layers : a layer spec or a list of them (see :func:`conductance.layers.resolve_layers`)
    baselines, target
        As in :func:`conductance.layer_conductance`.
    track_input : bool
        Keep the graph to the input (for input-side integrals such as neuron conductance).
    probe : {None, "cuts", "ends"}
        What the one forward at the inputs (which checks the target) also finds, so that no
        separate forward is needed later: "cuts" the cut map and F and the layers' values at the
        inputs (``problem.cuts``, ``problem.ends``), "ends" the same at the baselines too (stacked
        after the inputs in the same forward), for rules whose points miss both ends. Done when
        the rows fit in one chunk of path points (their graph is kept, as a chunk's is); otherwise
        "ends" falls back to "cuts", and "cuts" to a plain forward.

    Returns
    -------
    problem : PathProblem
    output : Any
        The model's output at the inputs (its score tensor's rows for the inputs, detached, when
        ``probe`` recorded the forward).
    """
    if request is None:
        from .request import Request
        request = Request.make(**settings)
    elif settings:
        raise TypeError(f"build_problem got both a request and settings {sorted(settings)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (layers are addressed by its submodules), got "
                        f"{type(model).__name__}")
    check_autograd_available()
    spec = None
    if isinstance(inputs, (tuple, list)):
        # several input tensors: packed into one, unpacked for each call of the model (engine.model_output)
        inputs, base, spec = pack_inputs(inputs, baselines)
        check_model_fits(model, inputs)
    else:
        inputs = check_inputs(inputs)
        check_model_fits(model, inputs)
        base = check_baselines(baselines, inputs)
    extra, kwargs = request.additional_forward_args, request.forward_kwargs
    ForwardArgs(extra, kwargs, int(inputs.shape[0])).warn_ambiguous()
    refs = resolve_layers(model, layers, use_input=request.attribute_to_layer_input)
    internal_batch_size = request.internal_batch_size
    warn_training(model, "conductance")
    problem = PathProblem(model=model, inputs=inputs, baselines=base, target=None,
                          additional_forward_args=extra, forward_kwargs=kwargs,
                          refs=refs, chunk_size=int(internal_batch_size or default_chunk(inputs)),
                          track_input=track_input)
    problem.input_spec = spec
    if request.channels_last is None:
        problem.channels_last = request.method not in CAPTUM_RULES and engine.wants_channels_last(model, inputs)
    else:
        problem.channels_last = request.channels_last and inputs.dim() == 4
    B = int(inputs.shape[0])
    if probe == "ends" and problem.chunk_size < 2 * B:
        probe = "cuts"
    record = probe is not None and problem.chunk_size >= B
    # the baselines ride along in the same forward, after the inputs: rows B..2B-1
    x = torch.cat([inputs, base]) if record and probe == "ends" else inputs
    ex = torch.arange(x.shape[0], device=inputs.device) % B

    def forward(points: torch.Tensor) -> tuple[Any, Optional[engine.FirstForward]]:
        if record:
            return engine.first_forward(problem, points, ex)
        with torch.no_grad():
            return model_output(problem, points, ex), None

    state = None
    try:
        if problem.channels_last:
            try:
                output, state = forward(x.contiguous(memory_format=torch.channels_last))
            except RuntimeError as exc:
                if engine.is_out_of_memory(exc):
                    raise
                output, state = _layout_probe(problem, forward, x, exc)
        else:
            output, state = forward(x)
    except RuntimeError as exc:
        why = explain_failure(model, inputs)
        if why is None:
            raise
        raise ConductanceError(f"the model failed on the inputs ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); {why}") from exc
    at_inputs = output if state is None else _input_rows(output, B)
    problem.target = resolve_target(target, at_inputs, B, inputs.device)
    if state is not None:
        engine.settle_first_forward(problem, state)
    return problem, at_inputs


def _input_rows(output: Any, batch: int) -> Any:
    """The first ``batch`` rows of a recorded first forward's output, detached (its graph is not kept):
    the tensor, each tensor of a tuple or list, or the ``.logits`` of other outputs (other outputs as they are)."""
    if isinstance(output, torch.Tensor):
        return output[:batch].detach()
    if isinstance(output, (tuple, list)):
        return type(output)(_input_rows(o, batch) if isinstance(o, torch.Tensor) else o for o in output)
    logits = getattr(output, "logits", None)
    return logits[:batch].detach() if isinstance(logits, torch.Tensor) else output


def _layout_probe(problem: PathProblem, run: Callable[[torch.Tensor], Any], x: torch.Tensor,
                  failure: RuntimeError) -> Any:
    """After ``run`` (the forward at the inputs) failed with channels-last points: keep the inputs' layout
    when the model runs in it and fails again in channels-last layout (it cannot take such activations:
    it ``.view()``s them), and return ``run(x)``; raise its error when it fails in its own layout too
    (the caller adds the dtype or device hint), and ``failure`` when the second channels-last attempt
    runs (a failure of its own, not the layout's). No exception text is read.

    Parameters
    ----------
    problem : PathProblem
        Its ``channels_last`` is cleared when the layout is the cause.
    run : callable
        Points (rows, *input_shape) -> the model's output there.
    x : Tensor, shape (rows, *input_shape)
        The points in the inputs' own layout.
    failure : RuntimeError
        The channels-last attempt's error.

    Returns
    -------
    Any
        ``run(x)``.
    """
    output = run(x)
    try:
        run(x.contiguous(memory_format=torch.channels_last))
    except RuntimeError:
        problem.channels_last = False
        return output
    raise failure


def check_autograd_available() -> None:
    """Conductance needs gradients: refuse to start inside ``torch.inference_mode()``."""
    if torch.is_inference_mode_enabled():
        raise ConductanceError(
            "torch.inference_mode() is active: conductance integrates gradients along a path, and inference mode "
            "forbids autograd (tensors made in it cannot be differentiated). Call it outside inference_mode; "
            "torch.no_grad() around the call is fine, autograd is switched on where it is needed")


def check_steps(n_steps: Optional[int], tolerance: Optional[float], max_steps: int) -> None:
    """Refuse step settings outside their ranges, before anything runs.

    Parameters
    ----------
    n_steps : int or None
        At least 1, at most ``MAX_POINTS - 1``.
    tolerance : float or None
        In (0, 1).
    max_steps : int
        Points per example, 2 to ``MAX_POINTS``.
    """
    if n_steps is not None and (not isinstance(n_steps, numbers.Integral) or isinstance(n_steps, bool)
                                or n_steps < 1):
        raise ConductanceError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    if n_steps is not None and n_steps > MAX_POINTS - 1:
        raise ConductanceError(f"n_steps={n_steps} asks for {n_steps + 1} path points per example; at most "
                               f"{MAX_POINTS} are evaluated (conductance.inputs.MAX_POINTS). Far fewer are enough: "
                               "use tolerance=0.02 to refine only where the path needs it")
    if tolerance is not None and (not isinstance(tolerance, numbers.Real) or isinstance(tolerance, bool)
                                  or not 0 < tolerance < 1 or math.isnan(tolerance)):
        raise ConductanceError(f"tolerance must be a relative completeness error between 0 and 1 (exclusive), such "
                               f"as 0.01 for 1%; got {tolerance!r}")
    if not isinstance(max_steps, numbers.Integral) or isinstance(max_steps, bool) or max_steps < 2:
        raise ConductanceError(f"max_steps must be an integer >= 2 (points per example), got {max_steps!r}")
    if max_steps > MAX_POINTS:
        raise ConductanceError(f"max_steps={max_steps} is above the bound of {MAX_POINTS} path points per example "
                               "(conductance.inputs.MAX_POINTS); an adaptive run that needs more than that is "
                               "better served by a looser tolerance")


def check_budget(method: str, n_steps: Optional[int], max_steps: int, default_max_steps: int) -> None:
    """Contradictory settings, once the rule is known: a budget for a fixed rule, a budget below the
    adaptive rule's own starting grid.

    Parameters
    ----------
    method : str
        The settled rule.
    n_steps : int or None
    max_steps : int
    default_max_steps : int
        The default of ``max_steps`` (a changed one counts as given).
    """
    if method != "adaptive" and max_steps != default_max_steps:
        points = "" if n_steps is None else f" = {n_steps + 1}"  # a fixed rule's n_steps is resolved by now
        raise ConductanceError(f"max_steps={max_steps} is the adaptive rule's budget, but method={method!r} is a "
                               f"fixed rule of n_steps + 1{points} points; drop max_steps, or use "
                               "tolerance= (adaptive) to bound the points with it")
    if method == "adaptive" and n_steps is not None and 2 * n_steps + 1 > max_steps:
        raise ConductanceError(f"the adaptive rule starts from n_steps = {n_steps} pairs, 2 * n_steps + 1 = "
                               f"{2 * n_steps + 1} points per example, more than max_steps={max_steps}; raise "
                               "max_steps or lower n_steps")
