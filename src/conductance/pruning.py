"""Conductance as a channel-pruning criterion for Torch-Pruning (``pip install 'conductance[pruning]'``).

:class:`ConductanceImportance` implements Torch-Pruning 1.6's ``Importance`` protocol: a pruner
calls it with a dependency group (the layers whose channels must be removed together) and gets
one score per channel; the lowest-scored channels are removed. The scores are statistics of
:func:`conductance.aggregate` over a calibration data set, computed once for every convolution and
linear layer of the model in one pass over the data (the layers share one path run), and summed
over the coupled output layers of a group.

Conductance is in the units of the explained output (a logit), the same for every layer, so
scores from different layers can be ranked against each other directly (global pruning) without
the per-group normalisation that weight-based criteria need.

:class:`CalibratedTaylorImportance` is Torch-Pruning's Taylor criterion (Molchanov et al. 2019)
with the gradients of the loss accumulated over the same calibration data, so that it can be
compared with conductance on equal terms.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Optional, cast

import numpy as np
import torch
from torch import nn

from .errors import ConductanceError
from .sites import intervene

if TYPE_CHECKING:   # a runtime import would load aggregate (and its extras) with this module
    from .aggregate import AggregateResult

try:
    import torch_pruning as tp
    from torch_pruning.pruner import function as _fn
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("conductance.pruning needs Torch-Pruning: pip install 'conductance[pruning]' "
                      "(torch-pruning==1.6.1)") from exc

__all__ = ["ConductanceImportance", "CalibratedTaylorImportance", "STATISTICS", "COMPENSATIONS", "prunable_layers",
           "input_fill", "prune"]

#: How the per-example channel values of a measure become one score per channel.
#: ``"mean"``: the signed mean over all calibration examples; ``"class_abs"``: the mean over
#: classes of the absolute class mean, weighted by the examples per class; ``"rms"``: the root mean
#: square over all examples.
#: ``"class_max"``: the largest absolute class mean (a unit that one class relies on scores high).
STATISTICS = ("mean", "class_abs", "rms", "class_max")
_GROUP_REDUCTIONS = ("sum", "mean", "max", "first")
_NORMALIZERS = ("mean", "max", "sum", "standarization", "gaussian", "lamp")
_OUT_FNS = (_fn.prune_conv_out_channels, _fn.prune_linear_out_channels)
_AGGREGATE_OPTIONS = ("by", "target", "near_zero", "limit_batches", "progress", "checkpoint", "checkpoint_every",
                      "class_names", "baselines", "additional_forward_args", "forward_kwargs", "n_steps", "method",
                      "tolerance", "max_steps", "internal_batch_size", "memory_budget", "channels_last")


def prunable_layers(model: nn.Module) -> list[str]:
    """Names of the convolution and linear layers of ``model`` (the layers a pruner removes channels of).

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    list of str
        Dotted names, in ``named_modules`` order.
    """
    return [name for name, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.modules.conv._ConvNd) and getattr(module, "transposed", False):
        return int(cast(torch.Tensor, module.weight).shape[1] * module.groups)
    return int(cast(torch.Tensor, module.weight).shape[0])


def _sum_of_squares(stats: dict, counts: np.ndarray) -> np.ndarray:
    """Per group, the sum of the squared values (n_groups, units), from the aggregate's sums and squared
    deviations from the group means: m2 + sum^2 / n."""
    n = np.maximum(counts, 1)[:, None]
    return stats["m2"] + stats["sum"] ** 2 / n


class ConductanceImportance(tp.importance.Importance):
    """Torch-Pruning importance from dataset-level conductance (or another measure) of each channel.

    Parameters
    ----------
    calibration_data : iterable of batches
        Batches as :func:`conductance.aggregate` takes them (``(inputs, labels)``, ``inputs``, or a
        dict), iterated once per computation; a DataLoader without shuffling in practice. With
        labels, the default explains each example's label logit.
    measure : str
        ``"conductance"`` (default), or another measure of :func:`conductance.layer_importance`:
        ``"grad_x_activation"``, ``"activation"``, ``"gradient"``, ``"internal_influence"``.
    statistic : {"class_max", "class_abs", "mean", "rms"}
        How a channel's per-example values become its score (see :data:`STATISTICS`). The default
        ``"class_max"`` (the largest absolute class mean) was chosen by measurement: averaging over
        classes removes the channels that only a few classes use, together (docs/pruning.md).
    group_reduction : {"sum", "mean", "max", "first"}
        How the scores of the coupled output layers of a group are combined (Torch-Pruning's own
        criteria use the same names). Default ``"sum"``: conductances through coupled channels add.
    normalizer : None or str
        Torch-Pruning's per-group normalisation (``"mean"``, ``"max"``, ``"sum"``, ...); default
        None, because conductance is already in the output's units for every layer.
    layers : list of str, optional
        Layers to score (default: every convolution and linear layer, :func:`prunable_layers`).
        A group with none of its output layers here gets no score (the pruner then skips it).
    **aggregate_options
        Passed to :func:`conductance.aggregate` (``n_steps``, ``tolerance``, ``method``, ``target``,
        ``by``, ``limit_batches``, ``baselines``, ...). ``units`` is always ``"channel"``.

    Attributes
    ----------
    result : AggregateResult or None
        The statistics of the last computation (its ``completeness()`` reports the error).
    seconds : float
        Wall time of the last computation.

    Notes
    -----
    The model is taken from the group (``group._DG.model``) at the first call, so the importance is
    created before the pruner, like Torch-Pruning's own. Scores are recomputed when a scored layer's
    channel count has changed since (iterative pruning) or after :meth:`reset`.
    """

    def __init__(self, calibration_data: Iterable, measure: str = "conductance", *, statistic: str = "class_max",
                 group_reduction: str = "sum", normalizer: Optional[str] = None,
                 layers: Optional[Sequence[str]] = None, **aggregate_options: Any):
        from .measures import LIG, MEASURES

        if not isinstance(measure, str) or measure not in MEASURES or measure == LIG:
            allowed = tuple(m for m in MEASURES if m != LIG)
            raise ConductanceError(f"measure must be one of {allowed}; got {measure!r} (layer integrated gradients "
                                   "runs one path per layer: too slow to score every layer)")
        if statistic not in STATISTICS:
            raise ConductanceError(f"statistic must be one of {STATISTICS}; got {statistic!r}")
        if group_reduction not in _GROUP_REDUCTIONS:
            raise ConductanceError(f"group_reduction must be one of {_GROUP_REDUCTIONS}; got {group_reduction!r}")
        if not (normalizer is None or callable(normalizer) or normalizer in _NORMALIZERS
                or (isinstance(normalizer, str) and normalizer.startswith("sentinel_"))):
            raise ConductanceError(f"normalizer must be None, a callable or one of Torch-Pruning's {_NORMALIZERS} "
                                   f"(or 'sentinel_q'); got {normalizer!r}")
        if "units" in aggregate_options or "measure" in aggregate_options:
            raise ConductanceError("units and measure are fixed by ConductanceImportance (channels of one measure); "
                                   "remove them from the keyword arguments")
        bad = [k for k in aggregate_options if k not in _AGGREGATE_OPTIONS]
        if bad:
            raise TypeError(f"ConductanceImportance got unexpected keyword argument(s) {bad}; it passes on only "
                            f"{_AGGREGATE_OPTIONS} to conductance.aggregate")
        if calibration_data is None or isinstance(calibration_data, torch.Tensor):
            raise ConductanceError("calibration_data must be an iterable of batches (a DataLoader, or a list of "
                                   "(inputs, labels) tuples); for one tensor x pass [x] or [(x, y)]")
        self.calibration_data = calibration_data
        self.measure = measure
        self.statistic = statistic
        self.group_reduction = group_reduction
        self.normalizer = normalizer
        self.layers = list(layers) if layers is not None else None
        self.aggregate_options = dict(aggregate_options)
        self.result: Optional[AggregateResult] = None
        self.seconds = 0.0
        self._model: Optional[nn.Module] = None
        self._scores: dict[nn.Module, torch.Tensor] = {}
        self._names: dict[nn.Module, str] = {}

    # ---- computation --------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the scores: the next call recomputes them."""
        self._scores, self._names, self.result = {}, {}, None

    def fit(self, model: nn.Module) -> ConductanceImportance:
        """Compute the scores of every scored layer of ``model`` now (the pruner would at its first call).

        Returns self; :meth:`scores` then gives them by layer name.

        Parameters
        ----------
        model : nn.Module

        Returns
        -------
        ConductanceImportance
        """
        from .aggregate import AggregateResult, aggregate  # noqa: F811 (the runtime name of the type above)

        if model.training:
            raise ConductanceError("put the model in eval() mode before pruning by conductance: the scores "
                                   "of a model in training mode depend on the batch (BatchNorm, dropout)")
        names = self.layers if self.layers is not None else prunable_layers(model)
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConductanceError(f"layers {missing} are not modules of the model; give dotted names from "
                                   "model.named_modules()")
        if not names:
            raise ConductanceError("the model has no convolution or linear layer to score")
        start = time.perf_counter()
        result = cast(AggregateResult, aggregate(model, self.calibration_data, list(names), measure=self.measure,
                                                 units="channel", **self.aggregate_options))
        self.seconds = time.perf_counter() - start
        if result.n_examples == 0:
            raise ConductanceError("calibration_data yielded no examples")
        self.result = result
        self._model = model
        self._scores, self._names = {}, {}
        for name in names:
            score = torch.from_numpy(self._statistic(result, name).astype(np.float32))
            if not torch.isfinite(score).all():
                raise ConductanceError(f"the {self.measure} scores of layer {name!r} are not finite (NaN or Inf in "
                                       "the model's outputs or gradients on the calibration data); check the model "
                                       "and data before pruning")
            self._scores[modules[name]] = score
            self._names[modules[name]] = name
        return self

    def _statistic(self, result: Any, layer: str) -> np.ndarray:
        if self.statistic == "mean":
            return result.mean(layer)
        stats = result.stats[layer]
        counts = result.counts.astype(np.float64)
        if self.statistic == "rms":
            return np.sqrt(_sum_of_squares(stats, counts).sum(0) / counts.sum())
        have = counts > 0                               # class_abs: |class mean| weighted by class size
        class_means = stats["sum"][have] / counts[have, None]
        if self.statistic == "class_max":
            return np.abs(class_means).max(0)
        return (np.abs(class_means) * counts[have, None]).sum(0) / counts.sum()

    def scores(self) -> dict[str, torch.Tensor]:
        """Layer name -> (channels,) score of each output channel, as last computed.

        Returns
        -------
        dict str -> Tensor, shape (channels,)
        """
        return {self._names[m]: s.clone() for m, s in self._scores.items()}

    def bind(self, model: nn.Module) -> ConductanceImportance:
        """Use the scores computed for another copy of the same network (``copy.deepcopy``) on ``model``.

        Layers are matched by name and must have the same channel counts; saves recomputing the
        scores when one network is pruned at several ratios.

        Parameters
        ----------
        model : nn.Module
            A copy of the network the scores were computed on, not yet pruned.

        Returns
        -------
        ConductanceImportance
            Itself.
        """
        if not self._scores:
            raise ConductanceError("no scores yet: call fit(model) (or let a pruner call the importance) first")
        modules = dict(model.named_modules())
        scores, names = {}, {}
        for old, name in self._names.items():
            new = modules.get(name)
            if new is None or _out_channels(new) != self._scores[old].numel():
                raise ConductanceError(f"layer {name!r} is missing or has another channel count in this model; "
                                       "bind only to an unpruned copy of the network the scores were computed on")
            scores[new], names[new] = self._scores[old], name
        self._scores, self._names, self._model = scores, names, model
        return self

    def _stale(self, model: nn.Module) -> bool:
        if model is not self._model or not self._scores:
            return True
        return any(_out_channels(m) != s.numel() for m, s in self._scores.items())

    # ---- the Importance protocol --------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, group: Any) -> Optional[torch.Tensor]:
        """Scores (n,) for the n channels of ``group``'s root (the pruner's ordering), or None."""
        model = getattr(getattr(group, "_DG", None), "model", None)
        if model is None:
            if self._model is None:
                raise ConductanceError("this group does not carry its model (group._DG.model); call "
                                       "importance.fit(model) before pruning")
            model = self._model
        if self._stale(model):
            with torch.enable_grad():
                self.fit(model)
        parts, roots = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if dep.handler not in _OUT_FNS or layer not in self._scores:
                continue
            root_idxs = group[i].root_idxs
            if any(r is None for r in root_idxs):
                continue
            parts.append(self._scores[layer][list(idxs)])
            roots.append(list(root_idxs))
        if not parts:
            return None
        n = len(group[0].idxs)
        reduced = torch.full((n,), -math.inf) if self.group_reduction == "max" else torch.zeros(n)
        for k, (part, root) in enumerate(zip(parts, roots)):
            index = torch.tensor(root, dtype=torch.long)
            if self.group_reduction in ("sum", "mean"):
                reduced.index_add_(0, index, part)
            elif self.group_reduction == "max":
                reduced[index] = torch.maximum(reduced[index], part)
            elif k == 0:                                         # "first"
                reduced[index] = part
        if self.group_reduction == "mean":
            reduced /= len(parts)
        return _normalize(reduced, self.normalizer)


def _normalize(scores: torch.Tensor, normalizer: Optional[str]) -> torch.Tensor:
    if normalizer is None:
        return scores
    # Torch-Pruning's own normalisations, reused so that the names mean the same thing
    return tp.importance.GroupMagnitudeImportance()._normalize(scores, normalizer)


class CalibratedTaylorImportance(tp.importance.GroupTaylorImportance):
    """Torch-Pruning's Taylor criterion with loss gradients summed over a calibration set.

    At the first call (and whenever the model's channel counts changed) it computes the gradient
    of the mean cross-entropy over all examples of ``calibration_data`` (batches ``(inputs,
    labels)``) with the model in its current (eval) mode, then scores channels as
    ``GroupTaylorImportance`` does: ``sum |w * dL/dw|`` over each filter, averaged over the group.

    Parameters
    ----------
    calibration_data : iterable of (inputs (batch, ...), labels (batch,)) batches.
    loss : callable (logits, labels) -> scalar mean loss; default cross-entropy.
    **taylor_options : passed to ``GroupTaylorImportance`` (``group_reduction``, ``normalizer``, ...).
    """

    def __init__(self, calibration_data: Iterable, loss: Optional[Any] = None, **taylor_options: Any):
        super().__init__(**taylor_options)
        self.calibration_data = calibration_data
        self.loss = loss or nn.functional.cross_entropy
        self.seconds = 0.0
        self._model: Optional[nn.Module] = None
        self._shapes: Optional[list] = None
        self._grads: dict[str, torch.Tensor] = {}

    def fit(self, model: nn.Module) -> CalibratedTaylorImportance:
        """Accumulate the calibration-set gradient into ``model``'s ``.grad`` (previous gradients are cleared).

        Parameters
        ----------
        model : nn.Module

        Returns
        -------
        CalibratedTaylorImportance
            Itself.
        """
        from .aggregate import split_batch

        start = time.perf_counter()
        device = next(model.parameters()).device
        model.zero_grad(set_to_none=True)
        batches = []
        for batch in self.calibration_data:
            x, y = split_batch(batch)
            if y is None:
                raise ConductanceError("CalibratedTaylorImportance needs labelled batches (inputs, labels): the "
                                       "Taylor criterion differentiates the loss")
            batches.append((x, y))
        total = sum(int(x.shape[0]) for x, _ in batches)
        if total == 0:
            raise ConductanceError("calibration_data yielded no examples")
        with torch.enable_grad():
            for x, y in batches:
                out = model(x.to(device))
                (self.loss(out, y.to(device)) * (x.shape[0] / total)).backward()
        self.seconds = time.perf_counter() - start
        self._model = model
        self._shapes = [tuple(p.shape) for p in model.parameters()]
        self._grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return self

    def bind(self, model: nn.Module) -> CalibratedTaylorImportance:
        """Copy the calibration gradient of the fitted model onto an unpruned copy of it (by parameter name).

        Parameters
        ----------
        model : nn.Module
            An unpruned copy of the fitted model.

        Returns
        -------
        CalibratedTaylorImportance
            Itself.
        """
        if self._model is None:
            raise ConductanceError("no gradient yet: call fit(model) first")
        grads = self._grads
        for name, p in model.named_parameters():
            g = grads.get(name)
            if g is None or g.shape != p.shape:
                raise ConductanceError(f"parameter {name!r} has no matching gradient; bind only to an unpruned copy "
                                       "of the fitted network")
            p.grad = g.clone()
        self._model = model
        self._shapes = [tuple(p.shape) for p in model.parameters()]
        return self

    def __call__(self, group: Any) -> Optional[torch.Tensor]:
        model: Optional[nn.Module] = getattr(getattr(group, "_DG", None), "model", None) or self._model
        if model is None:
            raise ConductanceError("call importance.fit(model) before pruning")
        if model is not self._model or self._shapes != [tuple(p.shape) for p in model.parameters()]:
            self.fit(model)
        return super().__call__(group)


# ----------------------------------------------------------------------------------------------
# Pruning with compensation
# ----------------------------------------------------------------------------------------------

#: What a removed channel is replaced by in the layers that read it: nothing (``None``: zero, what a
#: pruner does), its mean over the calibration data (``"mean"``), or its value at the baseline input
#: (``"baseline"``: what conductance measures the removal against).
COMPENSATIONS = (None, "mean", "baseline")
_IN_FNS = (_fn.prune_conv_in_channels, _fn.prune_linear_in_channels)


def _foldable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.modules.conv._ConvNd) and not getattr(module, "transposed", False)
            and module.groups == 1)


@torch.no_grad()
def input_fill(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[nn.Module, torch.Tensor]:
    """Mean of each input channel of every convolution (groups=1) and linear layer over ``batches``.

    Returns module -> (in_channels,) float64 tensor: for a convolution the mean over examples and
    positions of input channel c, for a linear layer the mean of input feature c. A module called
    more than once per forward gets no entry (its inputs are not one channel set).

    Parameters
    ----------
    model : nn.Module
    batches : iterable of Tensor, each (batch, *input_shape)

    Returns
    -------
    dict nn.Module -> Tensor, shape (in_channels,), float64
    """
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}
    calls: dict[nn.Module, int] = {}

    def observer(module: nn.Module) -> Callable[[torch.Tensor], None]:
        def observe(x: torch.Tensor) -> None:
            calls[module] = calls.get(module, 0) + 1
            x = x.detach().double()
            if isinstance(module, nn.Linear):
                flat = x.reshape(-1, x.shape[-1])
            else:
                flat = x.transpose(0, 1).reshape(x.shape[1], -1).T
            sums[module] = sums.get(module, 0) + flat.sum(0)
            counts[module] = counts.get(module, 0) + flat.shape[0]
        return observe

    modules = [m for m in model.modules() if _foldable(m)]
    if not modules:
        return {}
    # each module's first positional input
    with intervene(model, {m: observer(m) for m in modules}, at_input=True):
        for x in batches:
            before = dict(calls)
            model(x)
            for m in modules:
                if calls.get(m, 0) - before.get(m, 0) > 1:
                    calls[m] = -10 ** 9              # called twice in one forward: never folded
    return {m: (sums[m] / counts[m]).cpu() for m in sums if calls.get(m, 0) > 0}


def _fold(module: nn.Module, idxs: Sequence[int], fill: torch.Tensor) -> None:
    """Add what input channels ``idxs`` held constant at ``fill[idxs]`` contribute to ``module``'s bias."""
    w = cast(torch.Tensor, module.weight).detach()
    idx = torch.as_tensor(list(idxs), dtype=torch.long, device=w.device)
    value = fill.to(w.device, torch.float64)[idx]
    if isinstance(module, nn.Linear):
        shift = w[:, idx].double() @ value
    else:                                    # a constant input channel: the kernel's sum times the value
        shift = w[:, idx].double().flatten(2).sum(2) @ value
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    cast(torch.Tensor, module.bias).data += shift.to(w.dtype)


def prune(model: nn.Module, example_inputs: torch.Tensor, importance: Any, *, pruning_ratio: float = 0.5,
          global_pruning: bool = False, ignored_layers: Optional[Sequence[nn.Module]] = None,
          compensate: Optional[str] = None, fill_data: Optional[Iterable] = None, baselines: Any = None,
          **pruner_options: Any) -> nn.Module:
    """Prune ``model`` in place with Torch-Pruning's ``MetaPruner`` and ``importance``; returns it.

    Parameters
    ----------
    model : nn.Module in eval() mode.
    example_inputs : tensor (1, ...) used to trace the model's dependency graph.
    importance : a Torch-Pruning importance (``ConductanceImportance``, ``MagnitudeImportance``, ...).
    pruning_ratio, global_pruning, ignored_layers, **pruner_options : as for ``MetaPruner``.
    compensate : {None, "mean", "baseline"}
        None: removed channels are gone (every reader sees zero), as Torch-Pruning does. ``"mean"``:
        each reading convolution / linear layer gets the removed channels' calibration mean folded
        into its bias (mean replacement). ``"baseline"``: their value at the baseline input, which
        is the removal conductance measures (a unit moved to its baseline value). Exact for linear
        layers; for a padded convolution exact away from the border (the kernel sum is used).
        Without a fill, conductance-pruned CNNs lose more than L1-pruned ones at small ratios;
        with either fill they tie or win at 10-20% per layer (docs/pruning.md, measured).
    fill_data : iterable of batches, needed for ``compensate="mean"`` (inputs only are used).
    baselines : None (zeros like ``example_inputs``), a number or a tensor (1, ...), for ``"baseline"``.

    Returns
    -------
    nn.Module
        ``model`` itself, pruned.
    """
    from .aggregate import split_batch

    if compensate not in COMPENSATIONS:
        raise ConductanceError(f"compensate must be one of {COMPENSATIONS}; got {compensate!r}")
    if not 0.0 <= pruning_ratio < 1.0:
        raise ConductanceError(f"pruning_ratio must be in [0, 1); got {pruning_ratio!r}")
    if model.training:
        raise ConductanceError("put the model in eval() mode before pruning (BatchNorm statistics and the "
                               "compensation are read in eval mode)")
    fill: dict[nn.Module, torch.Tensor] = {}
    if compensate == "mean":
        if fill_data is None:
            raise ConductanceError("compensate='mean' needs fill_data: an iterable of batches (e.g. the "
                                   "calibration DataLoader) to take the channel means over")
        fill = input_fill(model, (split_batch(b)[0] for b in fill_data))
    elif compensate == "baseline":
        if baselines is None:
            base = torch.zeros_like(example_inputs)
        elif isinstance(baselines, torch.Tensor):
            base = baselines.to(example_inputs.device, example_inputs.dtype).expand_as(example_inputs)
        else:
            base = torch.full_like(example_inputs, float(baselines))
        fill = input_fill(model, [base])
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=importance, pruning_ratio=pruning_ratio,
                                  global_pruning=global_pruning, ignored_layers=list(ignored_layers or []),
                                  **pruner_options)
    for group in pruner.step(interactive=True):
        if compensate is not None:
            for dep, idxs in group:
                module = dep.target.module
                if dep.handler in _IN_FNS and module in fill and len(idxs) > 0:
                    _fold(module, idxs, fill[module])
                    keep = torch.ones(fill[module].numel(), dtype=torch.bool)
                    keep[list(idxs)] = False
                    fill[module] = fill[module][keep]        # stay aligned with the pruned input channels
        group.prune()
    return model
