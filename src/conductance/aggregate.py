"""Importance of hidden units over a whole data set: streaming, resumable, on one process or many.

:func:`aggregate` runs :func:`conductance.layer_importance` batch after batch and keeps, per group
(class) and per unit, only mergeable statistics in float64 / int64: count, sum, sum of squared
deviations from the mean, and the counts of positive, negative and near-zero values, plus a
summary of each layer's completeness error. Sums and counts add up across batches, files
(:meth:`AggregateResult.merge`) and processes (``torch.distributed.all_reduce``); squared
deviations are merged with Chan et al.'s pairwise update (so a standard deviation far below the
mean stays exact), and the result does not depend on how the data was split, up to the order of
float64 operations.

Batches may be ``(inputs, labels)`` (a tuple or list; items after the second are ignored),
``inputs`` alone (a tensor, or a one-item tuple / list), or a dict with the key ``"inputs"`` and
optionally ``"labels"``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import numbers
import os
import sys
import tempfile
import time
import types
import functools
import warnings
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from . import io as _io
from .errors import ConductanceError, warn
from .layers import LayerSpec, resolve_layers
from .measures import LIG, MEASURES, POINT_MEASURES
from .result import ResultProtocol, pandas, plain

#: Version of the file layout written by :meth:`AggregateResult.save` and checkpoints.
FORMAT = "conductance.aggregate/2"
#: Key of the content checksum in a file's JSON metadata (sha256 of the metadata and every array).
CHECKSUM = _io.CHECKSUM
BY = ("class", "label", "predicted", None)
#: Keyword arguments passed on to :func:`conductance.layer_importance`.
IMPORTANCE_KWARGS = ("baselines", "additional_forward_args", "forward_kwargs", "n_steps", "method", "tolerance",
                     "max_steps", "internal_batch_size", "attribute_to_layer_input", "memory_budget", "channels_last")
#: Settings that do not change the values, so a checkpoint may be resumed with another value.
_NOT_FINGERPRINTED = ("internal_batch_size",)
_UNIT_STATS = ("sum", "m2", "positive", "negative", "near_zero")
_GROUP_STATS = ("error_sum", "error_max", "error_above", "unit_error_sum", "unit_error_max", "unit_error_above")
_INT_STATS = ("positive", "negative", "near_zero", "error_above", "unit_error_above")
ALL = "all"


class TopUnit(NamedTuple):
    """One row of :meth:`AggregateResult.top`."""

    layer: str
    unit: int              #: flat index into the layer's unit shape (``np.unravel_index`` for a tuple)
    mean: float
    std: float
    positive: float        #: share of examples with a value above ``near_zero``
    negative: float        #: share below ``-near_zero``
    count: int


# ----------------------------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------------------------

class AggregateResult(ResultProtocol):
    """Per-group, per-unit statistics of one measure over a data set.

    Groups are classes (``grouping == "label"`` or ``"predicted"``: group ``g`` holds the examples
    whose label, or predicted class, is ``g``) or a single pooled group (``grouping == "all"``).
    Every accessor takes ``group=None`` for all examples pooled, and a layer as its name or as
    the module; ``result[layer]`` is the mean over all examples, like ``result.mean(layer)``.

    Attributes
    ----------
    measure, units, grouping, target, near_zero, settings, model : what produced it.
    layers : list of str; ``unit_shapes[layer]``: the shape of one example's units.
    is_cut : dict layer -> bool (completeness only applies to cut layers).
    counts : int64 array (n_groups,), examples per group (index = class).
    stats : dict layer -> dict of arrays (n_groups, n_units): ``"sum"``, ``"m2"`` (the sum of squared
        deviations from the group's mean; float64),
        ``"positive"``, ``"negative"``, ``"near_zero"`` (int64; ``|v| <= near_zero`` is near zero).
    errors : dict layer -> dict of arrays (n_groups,): ``"error_sum"``, ``"error_max"`` (relative
        completeness error, float64), ``"error_above"`` (examples above ``error_threshold``), and the
        same three for the per-unit error estimate (``"unit_error_sum"``, ``"unit_error_max"``,
        ``"unit_error_above"``).
    output_diff_sum : float64 (n_groups,), sum of F(x) - F(x'); ``points_sum``: int64, path points.
    n_batches : batches aggregated.
    """

    def __init__(self, *, measure: str, layers: Sequence[str], unit_shapes: dict[str, tuple], units: str,
                 grouping: str, target: str, near_zero: float, error_threshold: float, settings: dict,
                 model: str, is_cut: dict[str, bool], counts: np.ndarray, stats: dict[str, dict[str, np.ndarray]],
                 errors: dict[str, dict[str, np.ndarray]], output_diff_sum: np.ndarray, points_sum: np.ndarray,
                 n_batches: int = 0, class_names: Optional[Sequence[str]] = None):
        self.measure = measure
        self.layers = list(layers)
        self.unit_shapes = {k: tuple(int(d) for d in v) for k, v in unit_shapes.items()}
        self.units = units
        self.grouping = grouping
        self.target = target
        self.near_zero = float(near_zero)
        self.error_threshold = float(error_threshold)
        self.settings = dict(settings)
        self.model = model
        self.is_cut = dict(is_cut)
        self.counts = counts
        self.stats = stats
        self.errors = errors
        self.output_diff_sum = output_diff_sum
        self.points_sum = points_sum
        self.n_batches = int(n_batches)
        self.class_names = list(class_names) if class_names is not None else None

    FORMAT = FORMAT

    def _layer_names(self) -> list[str]:
        return list(self.layers)

    def __getitem__(self, layer: Union[str, nn.Module]) -> np.ndarray:
        """The mean of every unit of ``layer`` (name or module) over all examples, shape ``unit_shapes[layer]``."""
        return self.mean(layer)

    def __eq__(self, other: object) -> bool:
        """Identical settings, metadata and statistics (every array equal, same dtype)."""
        if not isinstance(other, AggregateResult):
            return NotImplemented
        mine, theirs = self._arrays(), other._arrays()
        return (json.dumps(self._meta(), sort_keys=True) == json.dumps(other._meta(), sort_keys=True)
                and list(mine) == list(theirs)
                and all(mine[k].dtype == theirs[k].dtype and np.array_equal(mine[k], theirs[k], equal_nan=True)
                        for k in mine))

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict:
        """Plain content (JSON-serialisable): the metadata and every statistic as nested lists."""
        return plain({**self._meta(), "counts": self.counts, "output_diff_sum": self.output_diff_sum,
                      "points_sum": self.points_sum, "stats": self.stats, "errors": self.errors})

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls, n_groups: int, unit_shapes: dict[str, tuple], **meta: Any) -> "AggregateResult":
        stats = {layer: {s: np.zeros((n_groups, int(np.prod(shape, dtype=np.int64))),
                                     dtype=np.int64 if s in _INT_STATS else np.float64) for s in _UNIT_STATS}
                 for layer, shape in unit_shapes.items()}
        errors = {layer: {s: np.zeros(n_groups, dtype=np.int64 if s in _INT_STATS else np.float64)
                          for s in _GROUP_STATS} for layer in unit_shapes}
        return cls(unit_shapes=unit_shapes, counts=np.zeros(n_groups, np.int64), stats=stats, errors=errors,
                   output_diff_sum=np.zeros(n_groups), points_sum=np.zeros(n_groups, np.int64), **meta)

    def _meta(self) -> dict:
        return dict(measure=self.measure, layers=self.layers, unit_shapes={k: list(v) for k, v in
                                                                             self.unit_shapes.items()},
                    units=self.units, grouping=self.grouping, target=self.target, near_zero=self.near_zero,
                    error_threshold=self.error_threshold, settings=self.settings, model=self.model,
                    is_cut=self.is_cut, n_batches=self.n_batches, class_names=self.class_names)

    def _pad(self, n_groups: int) -> None:
        """Grow the group dimension to ``n_groups`` (new groups empty)."""
        extra = n_groups - self.n_groups
        if extra <= 0:
            return
        pad = lambda a: np.concatenate([a, np.zeros((extra,) + a.shape[1:], dtype=a.dtype)])  # noqa: E731
        self.counts = pad(self.counts)
        self.output_diff_sum = pad(self.output_diff_sum)
        self.points_sum = pad(self.points_sum)
        for layer in self.layers:
            self.stats[layer] = {k: pad(v) for k, v in self.stats[layer].items()}
            self.errors[layer] = {k: pad(v) for k, v in self.errors[layer].items()}

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {"counts": self.counts, "output_diff_sum": self.output_diff_sum, "points_sum": self.points_sum}
        for j, layer in enumerate(self.layers):
            for k, v in {**self.stats[layer], **self.errors[layer]}.items():
                out[f"{j}.{k}"] = v
        return out

    # ---- groups -------------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        return int(self.counts.shape[0])

    @property
    def groups(self) -> list:
        """Groups that hold at least one example: class indices, or ``["all"]`` when pooled."""
        if self.grouping == ALL:
            return [ALL]
        return [int(g) for g in np.flatnonzero(self.counts)]

    @property
    def n_examples(self) -> int:
        return int(self.counts.sum())

    def group_name(self, group: Any) -> str:
        if group is None or group == ALL:
            return "all examples"
        name = f"class {group}"
        if self.class_names and 0 <= int(group) < len(self.class_names):
            name += f" ({self.class_names[int(group)]})"
        return name

    def _rows(self, group: Any) -> Union[slice, int]:
        if group is None or (isinstance(group, str) and group == ALL):
            return slice(None)
        if not isinstance(group, numbers.Integral) or isinstance(group, bool):
            raise ConductanceError(f"group must be a class index, 'all' or None (all examples), got {group!r}")
        if not 0 <= group < self.n_groups or self.counts[group] == 0:
            raise ConductanceError(f"no examples in group {group!r}; groups with examples: {self.groups}")
        return int(group)

    def _layer(self, layer: Union[str, nn.Module, None]) -> str:
        if layer is None:
            if len(self.layers) != 1:
                raise ConductanceError(f"this result has several layers {self.layers}; name one")
            return self.layers[0]
        layer = self._name_of(layer)
        if not isinstance(layer, str) or layer not in self.stats:
            raise ConductanceError(f"no layer {layer!r} in this result; it has {self.layers}")
        return layer

    def _total(self, array: np.ndarray, group: Any) -> np.ndarray:
        rows = self._rows(group)
        return array[rows].sum(0) if isinstance(rows, slice) else array[rows]

    def count(self, group: Any = None) -> int:
        """Examples in ``group`` (None: all)."""
        return int(self._total(self.counts, group))

    # ---- statistics ---------------------------------------------------------------------------
    def mean(self, layer: Union[str, nn.Module, None] = None, group: Any = None) -> np.ndarray:
        """Mean value of every unit, shape ``unit_shapes[layer]``."""
        layer = self._layer(layer)
        n = self.count(group)
        return (self._total(self.stats[layer]["sum"], group) / max(n, 1)).reshape(self.unit_shapes[layer])

    def std(self, layer: Union[str, nn.Module, None] = None, group: Any = None, ddof: int = 0) -> np.ndarray:
        """Standard deviation of every unit over the group's examples (``ddof=1`` for the sample std)."""
        layer = self._layer(layer)
        n = self.count(group)
        if n - ddof <= 0:
            return np.full(self.unit_shapes[layer], np.nan)
        return np.sqrt(self._m2(layer, group) / (n - ddof)).reshape(self.unit_shapes[layer])

    def _m2(self, layer: str, group: Any) -> np.ndarray:
        """Sum of squared deviations from the group's mean, (n_units,); groups pooled exactly."""
        rows = self._rows(group)
        s, m2 = self.stats[layer]["sum"], self.stats[layer]["m2"]
        if not isinstance(rows, slice):
            return m2[rows]
        n = self.counts[:, None].astype(np.float64)
        total = max(float(n.sum()), 1.0)
        mean = s.sum(0) / total
        with np.errstate(invalid="ignore", divide="ignore"):
            shift = np.where(n > 0, s / np.maximum(n, 1) - mean, 0.0)
        return m2.sum(0) + (n * shift * shift).sum(0)

    def sign_shares(self, layer: Union[str, nn.Module, None] = None, group: Any = None) -> dict[str, np.ndarray]:
        """Share of examples where each unit is ``positive`` (> near_zero), ``negative`` (< -near_zero)
        or ``near_zero``; the three add up to 1."""
        layer = self._layer(layer)
        n = max(self.count(group), 1)
        return {k: (self._total(self.stats[layer][k], group) / n).reshape(self.unit_shapes[layer])
                for k in ("positive", "negative", "near_zero")}

    def top(self, k: int = 5, layer: Union[str, nn.Module, None] = None, *, group: Any = None,
            absolute: bool = False) -> list[TopUnit]:
        """The ``k`` units with the largest mean in each layer (or in ``layer``), for ``group``.

        Parameters
        ----------
        k : int
            Units per layer.
        layer : str or nn.Module, optional
            One layer; None: every layer.
        group : class index, "all" or None (all examples pooled)
        absolute : bool
            Rank by the size of the mean, so strongly negative units count too.

        Returns
        -------
        list of :class:`TopUnit`, grouped by layer in the result's layer order, best first within a layer.
        """
        if layer is not None and not isinstance(layer, (str, nn.Module)):
            raise ConductanceError(f"layer must be a layer name or module, got {layer!r}: top(k, layer, group=...) "
                                   "takes the layer second; pass a class as group= (the older top(k, group, "
                                   "layer) order is gone)")
        out = []
        for name in ([self._layer(layer)] if layer is not None else self.layers):
            mean = self.mean(name, group).ravel()
            std = self.std(name, group).ravel()
            shares = {s: v.ravel() for s, v in self.sign_shares(name, group).items()}
            order = np.argsort(-(np.abs(mean) if absolute else mean), kind="stable")[:k]
            n = self.count(group)
            out.extend(TopUnit(name, int(u), float(mean[u]), float(std[u]), float(shares["positive"][u]),
                               float(shares["negative"][u]), n) for u in order)
        return out

    def completeness(self, group: Any = None) -> dict[str, dict[str, Any]]:
        """Per layer: ``count``, ``mean`` and ``max`` relative completeness error, examples ``above``
        ``threshold``, and ``is_cut`` (the error only means something on a cut); the same for the
        per-unit error estimate (``unit_error_mean``, ``unit_error_max``, ``unit_error_above``), which
        holds for every layer."""
        out = {}
        n = self.count(group)
        for layer in self.layers:
            e = self.errors[layer]
            rows = self._rows(group)
            mx = e["error_max"][rows]
            umx = e["unit_error_max"][rows]
            out[layer] = dict(count=n, mean=float(self._total(e["error_sum"], group)) / max(n, 1),
                              max=float(np.max(mx)) if np.size(mx) else 0.0,
                              above=int(self._total(e["error_above"], group)), threshold=self.error_threshold,
                              is_cut=bool(self.is_cut.get(layer, False)),
                              unit_error_mean=float(self._total(e["unit_error_sum"], group)) / max(n, 1),
                              unit_error_max=float(np.max(umx)) if np.size(umx) else 0.0,
                              unit_error_above=int(self._total(e["unit_error_above"], group)))
        return out

    def plot(self, layer: Union[str, nn.Module, None] = None, group: Any = None, k: int = 10, ax: Any = None,
             absolute: bool = True, title: Optional[str] = None, **kwargs: Any) -> Any:
        """Bar chart of the ``k`` units of ``layer`` with the largest |mean| (or mean, ``absolute=False``)
        over ``group`` (a class index; None: all examples), with the standard deviation as error bars.
        ``kwargs`` go to ``ax.bar`` (e.g. ``color="red"``). Returns the matplotlib Figure (no pyplot
        figure left open)."""
        from .plots import top_units

        layer = self._layer(layer)
        n = self.count(group)
        if title is None:
            title = f"{self.measure} of {layer!r}, {self.group_name(group)} ({n} examples): top {k} {self.units}s"
        return top_units(self.mean(layer, group), k=k, ax=ax, title=title, absolute=absolute,
                         errors=self.std(layer, group), ylabel=f"mean {self.measure} ± std", xlabel=self.units,
                         **kwargs)

    def mean_output_diff(self, group: Any = None) -> float:
        """Mean of F(x) - F(x'), the total that a cut layer's conductances add up to."""
        return float(self._total(self.output_diff_sum, group)) / max(self.count(group), 1)

    # ---- tables and text ----------------------------------------------------------------------
    def to_dataframe(self):
        """A tidy pandas table: one row per (group, layer, unit) with count, mean, std and sign shares.

        ``group`` is the class index, or ``"all"`` for a pooled result. Needs pandas.
        """
        pd = pandas()
        frames = []
        for g in self.groups:
            for layer in self.layers:
                mean = self.mean(layer, g).ravel()
                shares = self.sign_shares(layer, g)
                frames.append(pd.DataFrame({
                    "group": g, "layer": layer, "unit": np.arange(mean.size), "count": self.count(g),
                    "mean": mean, "std": self.std(layer, g).ravel(),
                    "positive": shares["positive"].ravel(), "negative": shares["negative"].ravel(),
                    "near_zero": shares["near_zero"].ravel()}))
        columns = ["group", "layer", "unit", "count", "mean", "std", "positive", "negative", "near_zero"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

    def summary(self, k: int = 0) -> str:
        """Settings, examples per group, each layer's completeness error; with ``k``, top units."""
        s = self.settings
        rule = str(s.get("method")) + (f" n_steps={s['n_steps']}" if s.get("n_steps") else "") + \
            (f" tolerance={s['tolerance']}" if s.get("tolerance") else "")
        promise = self.measure in ("conductance", LIG)
        lines = [f"{self.measure} of {self.model} over {self.n_examples} examples ({self.n_batches} batches); "
                 f"units={self.units}, grouped by {self.grouping}, target={self.target}, rule {rule}, "
                 f"near zero |v| <= {self.near_zero:g}"]
        for layer, c in self.completeness().items():
            kind = ("cut" if c["is_cut"] else "not a cut: completeness does not apply") if promise else \
                f"{self.measure} does not promise completeness"
            unit = (f"per-unit error mean {100 * c['unit_error_mean']:.3g}%, max {100 * c['unit_error_max']:.3g}%, "
                    f"{c['unit_error_above']} examples above {100 * c['threshold']:g}%; ")
            if promise and c["is_cut"]:
                unit += (f"relative completeness error mean {100 * c['mean']:.3g}%, max {100 * c['max']:.3g}%, "
                         f"{c['above']} examples above {100 * c['threshold']:g}%")
            lines.append(f"  {layer}: units {self.unit_shapes[layer]}, {kind}; {unit}".rstrip("; "))
        if k:
            for g in self.groups:
                lines.append(f"{self.group_name(g)}: {self.count(g)} examples, mean F(x) - F(x') "
                             f"{self.mean_output_diff(g):+.4g}")
                for layer in self.layers:
                    rows = self.top(k, layer, group=g)
                    lines.append(f"  {layer:<20} " + ", ".join(
                        f"{r.unit} ({r.mean:+.4g} ± {r.std:.2g}, {100 * r.positive:.0f}% +)" for r in rows))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"AggregateResult({self.summary()})"

    # ---- combining ----------------------------------------------------------------------------
    def _compatible(self, other: "AggregateResult") -> None:
        if not isinstance(other, AggregateResult):
            raise TypeError(f"can only merge an AggregateResult, got {type(other).__name__}")
        mine, theirs = self._meta(), other._meta()
        keys = ("measure", "layers", "unit_shapes", "units", "grouping", "target", "near_zero", "error_threshold",
                "settings", "model")
        diff = [f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in keys if mine[k] != theirs[k]]
        if diff:
            raise ConductanceError("cannot merge results computed differently: " + "; ".join(diff))

    def merge(self, other: "AggregateResult") -> "AggregateResult":
        """The statistics of both results' examples together (a new result; counts exact)."""
        self._compatible(other)
        out = AggregateResult.empty(max(self.n_groups, other.n_groups), self.unit_shapes,
                                    **{k: v for k, v in self._meta().items() if k not in ("unit_shapes",)})
        out.n_batches = self.n_batches + other.n_batches
        for part in (self, other):
            n = part.n_groups
            out.counts[:n] += part.counts
            out.output_diff_sum[:n] += part.output_diff_sum
            out.points_sum[:n] += part.points_sum
            for layer in self.layers:
                before = out.counts[:n] - part.counts      # out.counts already holds this part
                _chan_merge(out.stats[layer], before, part.stats[layer]["sum"], part.stats[layer]["m2"],
                            part.counts, n)
                for k, v in part.stats[layer].items():
                    if k != "m2":
                        out.stats[layer][k][:n] += v
                for k, v in part.errors[layer].items():
                    if k in ("error_max", "unit_error_max"):
                        np.maximum(out.errors[layer][k][:n], v, out=out.errors[layer][k][:n])
                    else:
                        out.errors[layer][k][:n] += v
        return out

    def equals(self, other: "AggregateResult", rtol: float = 0.0, atol: float = 0.0) -> bool:
        """Same settings, identical counts, and float statistics equal within ``rtol`` / ``atol``."""
        try:
            self._compatible(other)
        except ConductanceError:
            return False
        if self.n_groups != other.n_groups:
            return False
        a, b = self._arrays(), other._arrays()
        for k in a:
            if a[k].dtype.kind in "iu":
                if not np.array_equal(a[k], b[k]):
                    return False
            elif not np.allclose(a[k], b[k], rtol=rtol, atol=atol, equal_nan=True):
                return False
        return True

    # ---- files --------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the result atomically: ``.safetensors`` (needs the safetensors package) or else npz,
        with the metadata (model class, layers, measure, settings, counts) as JSON inside."""
        _write_results(path, [self], {})

    @classmethod
    def load(cls, path: str, measure: Optional[str] = None) -> "AggregateResult":
        """Read a file written by :meth:`save`, by the CLI, or a checkpoint of :func:`aggregate`."""
        results, _ = _read_results(path)
        if measure is None:
            if len(results) != 1:
                raise ConductanceError(f"{path} holds several measures {list(results)}; pass measure=")
            return next(iter(results.values()))
        if measure not in results:
            raise ConductanceError(f"{path} has no measure {measure!r}; it has {list(results)}")
        return results[measure]


# ----------------------------------------------------------------------------------------------
# Files: npz (or safetensors) + JSON metadata, written atomically
# ----------------------------------------------------------------------------------------------

def _write_results(path: str, results: Sequence[AggregateResult], extra: dict) -> None:
    arrays: dict[str, np.ndarray] = {}
    for i, r in enumerate(results):
        arrays.update({f"{i}.{k}": np.ascontiguousarray(v) for k, v in r._arrays().items()})
    _io.write(path, {"format": FORMAT, "results": [r._meta() for r in results], **extra}, arrays)


def _unreadable(path: str, why: Any) -> ConductanceError:
    return _io._unreadable(path, "aggregate", why)


def _read_results(path: str) -> tuple[dict[str, AggregateResult], dict]:
    meta, arrays = _io.read(path, "aggregate")
    if isinstance(meta, dict) and meta.get("format") == "conductance.aggregate/1":
        raise ConductanceError(f"{path} was written by an older version of conductance (format "
                               f"'conductance.aggregate/1', a sum of squares and no checksum); this version reads "
                               f"{FORMAT!r}. Recompute it (move the file away first); it was left as it is")
    meta = _io.verify(path, meta, arrays, (FORMAT,), "aggregate")
    results = {}
    try:
        for i, m in enumerate(meta["results"]):
            get = lambda k: arrays[f"{i}.{k}"]  # noqa: E731
            stats = {layer: {s: get(f"{j}.{s}") for s in _UNIT_STATS} for j, layer in enumerate(m["layers"])}
            errors = {layer: {s: get(f"{j}.{s}") for s in _GROUP_STATS} for j, layer in enumerate(m["layers"])}
            r = AggregateResult(counts=get("counts"), output_diff_sum=get("output_diff_sum"),
                                points_sum=get("points_sum"), stats=stats, errors=errors,
                                **{k: m[k] for k in ("measure", "layers", "unit_shapes", "units", "grouping",
                                                     "target", "near_zero", "error_threshold", "settings",
                                                     "model", "is_cut", "n_batches", "class_names")})
            G = r.n_groups
            for layer in r.layers:
                U = int(np.prod(r.unit_shapes[layer], dtype=np.int64))
                for s, v in r.stats[layer].items():
                    if v.shape != (G, U):
                        raise ValueError(f"array {layer}/{s} has shape {v.shape}, expected {(G, U)}")
                for s, v in r.errors[layer].items():
                    if v.shape != (G,):
                        raise ValueError(f"array {layer}/{s} has shape {v.shape}, expected {(G,)}")
            results[r.measure] = r
    except (KeyError, TypeError, ValueError) as exc:
        raise _unreadable(path, f"inconsistent content: {type(exc).__name__}: {exc}") from None
    return results, meta


def checkpoint_info(path: str) -> dict:
    """What a checkpoint of :func:`aggregate` holds: ``position`` (batches of the data consumed),
    ``exhausted`` (the data ran out), ``examples``, ``fingerprint``, ``rank`` and ``world_size``."""
    results, meta = _read_results(path)
    if "checkpoint" not in meta:
        raise ConductanceError(f"{path} is a saved result, not a checkpoint")
    info = dict(meta["checkpoint"])
    info["examples"] = next(iter(results.values())).n_examples if results else 0
    return info


# ----------------------------------------------------------------------------------------------
# Fingerprints: what must match for a checkpoint to be resumed
# ----------------------------------------------------------------------------------------------

def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _describe(value: Any) -> Any:
    """A JSON-able, stable description of a setting (tensors by shape and content hash)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        h = hashlib.blake2b(digest_size=12)
        _hash_tensor(h, value)
        return f"tensor{tuple(value.shape)}:{h.hexdigest()}"
    if isinstance(value, numbers.Number):
        return float(value)
    from .engine import Shared
    if isinstance(value, Shared):
        return {"shared": _describe(value.value)}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if callable(value):
        name = getattr(value, "__qualname__", type(value).__qualname__)
        h = hashlib.blake2b(digest_size=12)
        _hash_callable(h, value, 0)
        return f"callable:{getattr(value, '__module__', '')}.{name}:{h.hexdigest()}"
    return f"{type(value).__name__}"


def _hash_value(h: Any, value: Any, depth: int) -> None:
    """Feed what a value a callable uses would change in its result into ``h``."""
    if depth > 6:
        h.update(b"<deep>")
    elif isinstance(value, nn.Module):
        h.update(f"module:{type(value).__qualname__}:{_model_hash(value)}".encode())
    elif isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
        _hash_callable(h, value, depth + 1)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}[{len(value)}]".encode())
        for v in value:
            _hash_value(h, v, depth + 1)
    elif isinstance(value, dict):
        h.update(f"dict[{len(value)}]".encode())
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            _hash_value(h, value[k], depth + 1)
    elif isinstance(value, (set, frozenset)):
        h.update(repr(sorted(repr(v) for v in value)).encode())
    elif isinstance(value, np.ndarray):
        h.update(f"ndarray{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, types.ModuleType):
        h.update(f"module {value.__name__}".encode())
    else:
        h.update(json.dumps(_describe(value), sort_keys=True, default=str).encode() if not callable(value)
                 else f"callable {getattr(value, '__module__', '')}."
                      f"{getattr(value, '__qualname__', type(value).__qualname__)}".encode())


def _hash_code(h: Any, code: types.CodeType) -> None:
    # the bytecode, constants and names, not the line numbers: moving a function does not change it
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _hash_code(h, c)
        elif isinstance(c, frozenset):
            h.update(repr(sorted(repr(v) for v in c)).encode())
        else:
            h.update(repr(c).encode())


def _hash_callable(h: Any, fn: Any, depth: int) -> None:
    """What a callable computes: its code, defaults, the values it closes over and the plain
    global values it names (numbers, strings, tensors); for other callables their type and state."""
    if isinstance(fn, functools.partial):
        h.update(b"partial")
        _hash_callable(h, fn.func, depth + 1)
        _hash_value(h, fn.args, depth + 1)
        _hash_value(h, fn.keywords, depth + 1)
    elif isinstance(fn, types.MethodType):
        h.update(b"method")
        _hash_callable(h, fn.__func__, depth + 1)
        _hash_value(h, fn.__self__, depth + 1) if isinstance(fn.__self__, nn.Module) else \
            h.update(type(fn.__self__).__qualname__.encode())
    elif isinstance(fn, types.FunctionType):
        _hash_code(h, fn.__code__)
        _hash_value(h, fn.__defaults__ or (), depth + 1)
        _hash_value(h, fn.__kwdefaults__ or {}, depth + 1)
        for cell in fn.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:          # a cell not filled yet
                contents = None
            if contents is fn:
                continue
            _hash_value(h, contents, depth + 1)
        g = fn.__globals__
        for name in fn.__code__.co_names:
            v = g.get(name)
            if isinstance(v, (bool, int, float, str, complex, torch.Tensor)) or \
                    (isinstance(v, (list, tuple, dict)) and depth < 3):
                h.update(name.encode())
                _hash_value(h, v, depth + 1)
    elif isinstance(fn, nn.Module):
        h.update(f"module:{type(fn).__qualname__}:{_model_hash(fn)}".encode())
    else:
        h.update(f"object:{type(fn).__module__}.{type(fn).__qualname__}".encode())
        call = getattr(type(fn), "__call__", None)
        if isinstance(call, types.FunctionType):
            _hash_code(h, call.__code__)
        state = getattr(fn, "__dict__", None)
        if isinstance(state, dict):
            _hash_value(h, {k: v for k, v in state.items() if not k.startswith("__")}, depth + 1)


def _model_hash(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=12)
    for name, t in model.state_dict().items():
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            _hash_tensor(h, t)
    return h.hexdigest()


def _batch_hash(inputs: torch.Tensor, labels: Optional[torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=12)
    _hash_tensor(h, inputs)
    if labels is not None:
        _hash_tensor(h, labels)
    return h.hexdigest()


def _length(obj: Any) -> Optional[int]:
    try:
        return int(len(obj))
    except Exception:
        return None


_FINGERPRINT_NAMES = {"model": "model (class and weights)", "layers": "layers", "measures": "measure",
                      "units": "units", "by": "by", "target": "target", "near_zero": "near_zero",
                      "settings": "layer_importance settings", "world_size": "world size (processes)",
                      "rank": "rank", "data_batches": "number of batches in the data",
                      "data_examples": "number of examples in the data (len(data.dataset))",
                      "first_batch": "content of the first batch (data order or data changed)",
                      "sharding": "sharding of the data between processes"}


def _mismatch(saved: dict, now: dict) -> list[str]:
    out = []
    for key in _FINGERPRINT_NAMES:
        if key in ("data_batches", "data_examples") and (saved.get(key) is None or now.get(key) is None):
            continue                   # a length that one of the two runs could not know
        if key in saved and key in now and saved[key] != now[key]:
            out.append(f"{_FINGERPRINT_NAMES[key]}: {saved[key]!r} in the checkpoint, {now[key]!r} now")
    return out


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------

def split_batch(batch: Any, index: int = 0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(inputs, labels or None)`` from one batch: ``(inputs, labels, ...)``, ``inputs`` or a dict
    with ``"inputs"`` (and optionally ``"labels"``)."""
    if isinstance(batch, dict):
        if "inputs" not in batch:
            raise ConductanceError(f"batch {index} is a dict without an 'inputs' key (keys {list(batch)}); "
                                   "use {'inputs': x, 'labels': y} or yield (inputs, labels) tuples")
        inputs, labels = batch["inputs"], batch.get("labels")
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise ConductanceError(f"batch {index} is empty")
        inputs, labels = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        inputs, labels = batch, None
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"batch {index}: inputs must be a tensor (batch, ...), got {type(inputs).__name__}; "
                        "batches are (inputs, labels), inputs alone, or {'inputs': ..., 'labels': ...}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise TypeError(f"batch {index}: labels must be integer class indices, got dtype {labels.dtype}")
        if labels.numel() != inputs.shape[0]:
            raise ConductanceError(f"batch {index}: {labels.numel()} labels for {inputs.shape[0]} inputs "
                                   f"(labels shape {tuple(labels.shape)}); give one class index per example")
        labels = labels.reshape(-1).long()
        if labels.numel() and labels.min() < 0:
            raise ConductanceError(f"batch {index}: negative labels {labels[labels < 0].tolist()[:5]}; "
                                   "labels must be class indices 0, 1, ...")
    return inputs, labels


def _distributed_sampler_check(data: Any, world: int, active: bool) -> bool:
    """True when ``data`` is a DataLoader whose DistributedSampler already gives each rank its shard."""
    sampler = getattr(data, "sampler", None)
    try:
        from torch.utils.data.distributed import DistributedSampler
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(sampler, DistributedSampler):
        return False
    n, replicas = _length(sampler.dataset), sampler.num_replicas
    if n is not None and n % replicas:
        what, k = (("drops the last", n % replicas) if sampler.drop_last
                   else ("pads with repeats of the first", replicas - n % replicas))
        raise ConductanceError(
            f"the DataLoader's DistributedSampler {what} {k} example(s) ({n} examples over {replicas} "
            "replicas), so some examples would count "
            f"{'zero times' if sampler.drop_last else 'twice'}. Pass a plain DataLoader (no sampler): aggregate() "
            "gives each rank every world_size-th batch itself, with every example counted once")
    if not active or replicas != world:
        raise ConductanceError(
            f"the DataLoader's DistributedSampler splits the data over {replicas} replicas, but aggregate() "
            f"runs {'without torch.distributed' if not active else f'on {world} processes'}; pass a plain "
            "DataLoader and let aggregate() shard it")
    return True


def _plan_batches(data: Iterable, wanted: Callable[[int], bool]
                  ) -> tuple[Iterator[tuple[int, Any]], Optional[list[int]]]:
    """(index, batch) pairs to read, and the sizes of all batches when known.

    A plain ``DataLoader`` over a map-style dataset loads only batch 0 and the batches
    ``wanted(index)`` asks for (its batch sampler is listed once; other batches are never read).
    Any other iterable is read in full and the caller drops the batches it does not want.
    """
    from torch.utils.data import DataLoader, IterableDataset

    if type(data) is DataLoader and data.batch_sampler is not None and \
            not isinstance(data.dataset, IterableDataset):
        try:
            sizes, chosen, selected = [], [], []
            for i, b in enumerate(data.batch_sampler):
                sizes.append(len(b))
                if i == 0 or wanted(i):
                    chosen.append(i)
                    selected.append(list(b))
            kwargs = dict(batch_sampler=selected, num_workers=data.num_workers,
                          collate_fn=data.collate_fn, pin_memory=data.pin_memory, timeout=data.timeout,
                          worker_init_fn=data.worker_init_fn, multiprocessing_context=data.multiprocessing_context,
                          generator=data.generator, persistent_workers=data.persistent_workers)
            if data.num_workers > 0:
                kwargs["prefetch_factor"] = data.prefetch_factor
            if getattr(data, "pin_memory_device", ""):
                kwargs["pin_memory_device"] = data.pin_memory_device
            loader = DataLoader(data.dataset, **kwargs)
        except Exception:  # an unusual loader: read it in full instead
            pass
        else:
            return zip(chosen, loader), sizes
    return enumerate(data), None


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------

class _Progress:
    """A tqdm bar in examples (examples/second shown) or, without tqdm, a line every 10 s."""

    def __init__(self, enabled: Optional[bool], total: Optional[int], initial: int, desc: str):
        self.bar, self.plain = None, False
        if enabled is None:
            enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.plain = True
            self.n, self.start, self.last, self.initial, self.total, self.desc = initial, time.perf_counter(), 0.0, \
                initial, total, desc
            return
        # whole examples: unit_scale would print "8.00/64.0"
        self.bar = tqdm(total=total, initial=initial, unit="ex", desc=desc, dynamic_ncols=True,
                        smoothing=0.1)

    def update(self, n: int, **postfix: Any) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.plain:
            self.n += n
            now = time.perf_counter()
            if now - self.last > 10:
                self.last = now
                rate = (self.n - self.initial) / max(now - self.start, 1e-9)
                print(f"{self.desc}: {self.n}{'/' + str(self.total) if self.total else ''} examples, "
                      f"{rate:.1f} examples/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------

#: Minutes a rank waits in a collective (or for its peers at start-up) before it fails.
DEFAULT_TIMEOUT_MINUTES = 30.0


def init_distributed(backend: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT_MINUTES) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) if not done yet: nccl when CUDA is available, else gloo. Returns (rank, world).

    ``timeout`` (minutes) bounds every collective: a rank whose peer stopped or hangs fails after
    it instead of waiting for ever. It does not change a process group that is already initialised."""
    import datetime

    import torch.distributed as dist

    _check_timeout(timeout)

    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise ConductanceError("distributed=True but torch.distributed is not initialised and no torchrun "
                                   "environment (WORLD_SIZE, RANK, MASTER_ADDR) is set; launch with torchrun or "
                                   "call torch.distributed.init_process_group first")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=float(timeout)))
    return dist.get_rank(), dist.get_world_size()


def _check_timeout(timeout: Any) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 < timeout < math.inf:
        raise ConductanceError(f"timeout must be a positive number of minutes (default {DEFAULT_TIMEOUT_MINUTES:g}), "
                               f"got {timeout!r}")


def _dist_state(distributed: Optional[bool], timeout: float = DEFAULT_TIMEOUT_MINUTES) -> tuple[bool, int, int]:
    import torch.distributed as dist

    available = dist.is_available()
    if distributed is False:
        return False, 0, 1
    if distributed is None:
        if available and dist.is_initialized():
            return True, dist.get_rank(), dist.get_world_size()
        return False, 0, 1
    if not available:
        raise ConductanceError("distributed=True but this torch build has no torch.distributed")
    rank, world = init_distributed(timeout=timeout)
    return True, rank, world


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(obj: Any) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    _collective(dist.all_gather_object, out, obj)
    return out


def _collective(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run a torch.distributed collective; a timeout or a dead peer becomes an error naming this rank."""
    import torch.distributed as dist

    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        raise ConductanceError(
            f"rank {dist.get_rank()} of {dist.get_world_size()}: the collective {fn.__name__} failed or timed out "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Another rank has probably "
            "stopped or hangs (an error, a crash, a frozen data loader); see its log. The wait is bounded by the "
            "process group's timeout (aggregate(..., timeout=minutes) when aggregate initialises it)") from exc


def _raise_collectively(problem: Optional[str], active: bool) -> None:
    """Raise on every rank when any rank has a problem (so no rank waits forever for the others)."""
    if active:
        problems = [(r, p) for r, p in enumerate(_gather(problem)) if p]
        if problems:
            raise ConductanceError("; ".join(f"rank {r}: {p}" if len(problems) > 1 or r else p
                                             for r, p in problems))
    elif problem:
        raise ConductanceError(problem)


def _all_reduce(results: list[AggregateResult]) -> None:
    """Sum the statistics of every rank into every rank's results (max for the error maximum)."""
    import torch.distributed as dist

    device = _collective_device()
    size = torch.tensor([max(r.n_groups for r in results)], dtype=torch.int64, device=device)
    _collective(dist.all_reduce, size, op=dist.ReduceOp.MAX)
    for r in results:
        r._pad(int(size.item()))
    floats, ints, maxes = [], [], []
    local = [(r.counts.copy(), {layer: r.stats[layer]["sum"].copy() for layer in r.layers}) for r in results]
    for r in results:
        for k, v in r._arrays().items():
            if k.endswith(".m2"):
                continue                 # merged below, once the global means are known
            (maxes if k.endswith("error_max") else ints if v.dtype.kind in "iu" else floats).append(v)
    _reduce_arrays(floats, ints, maxes, device)
    # each rank's squared deviations about the global mean: m2_r + n_r (mean_r - mean)^2, summed
    spread = []
    for r, (n_local, sums) in zip(results, local):
        n_r = n_local.astype(np.float64)[:, None]
        n = np.maximum(r.counts.astype(np.float64)[:, None], 1)
        for layer in r.layers:
            m2 = r.stats[layer]["m2"]
            shift = np.where(n_r > 0, sums[layer] / np.maximum(n_r, 1) - r.stats[layer]["sum"] / n, 0.0)
            m2 += n_r * shift * shift
            spread.append(m2)
    _reduce_arrays(spread, [], [], device)
    batches = torch.tensor([r.n_batches for r in results], dtype=torch.int64, device=device)
    _collective(dist.all_reduce, batches)
    for r, n in zip(results, batches.cpu().tolist()):
        r.n_batches = int(n)


def _reduce_arrays(floats: list, ints: list, maxes: list, device: torch.device) -> None:
    """All-reduce numpy arrays in place: ``floats`` and ``ints`` summed, ``maxes`` by maximum."""
    import torch.distributed as dist

    for arrays, dtype, op in ((floats, torch.float64, dist.ReduceOp.SUM), (ints, torch.int64, dist.ReduceOp.SUM),
                              (maxes, torch.float64, dist.ReduceOp.MAX)):
        if not arrays:
            continue
        flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]).astype(
            np.float64 if dtype == torch.float64 else np.int64)).to(device)
        _collective(dist.all_reduce, flat, op=op)
        flat = flat.cpu().numpy()
        offset = 0
        for a in arrays:
            a[...] = flat[offset: offset + a.size].reshape(a.shape)
            offset += a.size


# ----------------------------------------------------------------------------------------------
# The verb
# ----------------------------------------------------------------------------------------------

def _target_spec(target: Any) -> str:
    if isinstance(target, str):
        if target not in ("label", "predicted"):
            raise ConductanceError(f"target must be 'label', 'predicted', a class index, None or a callable; "
                                   f"got {target!r}")
        return target
    if target is None:
        return "default"
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        return f"class {int(target)}"
    if callable(target):
        return _describe(target)
    raise ConductanceError(f"target must be 'label', 'predicted', a class index, None or a callable; got "
                           f"{type(target).__name__}. (Per-example targets come from the labels: target='label')")


def _model_device(model: nn.Module) -> torch.device:
    for p in itertools.chain(model.parameters(), model.buffers()):
        return p.device
    return torch.device("cpu")


def _to(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    return None if t is None else t.to(device, non_blocking=True)


def aggregate(model: nn.Module, data: Iterable, layers: Union[LayerSpec, Sequence[LayerSpec]], *,
              measure: Union[str, Sequence[str]] = "conductance", by: Optional[str] = "class",
              units: str = "channel", target: Any = "label", near_zero: float = 0.01,
              checkpoint: Optional[str] = None, checkpoint_every: int = 10, progress: Optional[bool] = None,
              distributed: Optional[bool] = None, limit_batches: Optional[int] = None,
              class_names: Optional[Sequence[str]] = None, timeout: float = DEFAULT_TIMEOUT_MINUTES,
              **importance_kwargs: Any
              ) -> Union[AggregateResult, dict[str, AggregateResult]]:
    """Statistics of the importance of every unit of ``layers`` over all examples of ``data``.

    Parameters
    ----------
    model : nn.Module
        In ``eval()`` mode. Inputs and labels are moved to the device of its first parameter.
    data : iterable of batches
        A ``DataLoader`` in practice, iterated once (plus batch 0 again on resume). Batches are
        ``(inputs, labels, ...)``, ``inputs`` alone, or ``{"inputs": ..., "labels": ...}``. The
        order must be deterministic for checkpoints and for torch.distributed.
    layers : names or modules, as for :func:`conductance.layer_importance`.
    measure : str or list of str
        Any measure of :func:`~conductance.layer_importance`; a list gives a dict
        measure -> result, all from one pass over the data (path measures share the path run).
    by : {"class", "label", "predicted", None}
        Groups. ``"class"``: the label when batches have labels, else the predicted class (the
        result's ``grouping`` says which); ``"label"`` requires labels; ``"predicted"``: the model's
        top class; None: all examples in one group.
    units : {"channel", "neuron"}
        As in :func:`~conductance.layer_importance` (default here: channels).
    target : "label", "predicted", int, None or callable
        The output explained. ``"label"``: each example's label logit, or the predicted class when
        batches have no labels; ``"predicted"``: the top logit (the paper's choice); an int: that
        class for every example; None / callable: as in ``layer_importance``.
    near_zero : float
        A value ``v`` with ``|v| <= near_zero`` counts as near zero, above as positive, below
        ``-near_zero`` as negative (in the measure's units: for conductance, the output's).
    checkpoint : str, optional
        File to write the statistics, the position in the data and a fingerprint of settings
        and data to, atomically, every ``checkpoint_every`` computed batches and at the end.
        When it exists, the run resumes from it (see docs/aggregate.md); under torch.distributed
        each rank uses ``checkpoint + ".rank{r}"``.
    progress : bool, optional
        A progress bar (tqdm, examples/second) on stderr; default only when stderr is a terminal
        (and only on rank 0).
    distributed : bool, optional
        None: shard when torch.distributed is initialised; True: initialise it from torchrun's
        environment if needed; False: never. Rank ``r`` of ``W`` computes batches ``r, r + W, ...``
        and every rank returns the all-reduced (summed) result.
    limit_batches : int, optional
        Use only the first ``limit_batches`` batches of the data.
    class_names : list of str, optional
        Names shown for the classes by :meth:`AggregateResult.summary` and ``conductance show``.
    timeout : float
        Minutes a rank waits for the others in a collective before it fails with an error naming
        itself (default 30), when aggregate initialises torch.distributed (``distributed=True``);
        a process group you initialise yourself keeps the timeout you gave it.
    **importance_kwargs
        ``n_steps``, ``tolerance``, ``method``, ``max_steps``, ``baselines``,
        ``internal_batch_size``, ``attribute_to_layer_input``, ``additional_forward_args``,
        ``forward_kwargs``, ``memory_budget``, ``channels_last``: passed to ``layer_importance`` for
        every batch (so they must not depend on the batch); checked once, before any batch runs.

    Returns
    -------
    AggregateResult, or dict measure -> AggregateResult for a list of measures.
    """
    from .attribute import UNITS, WARN_RELATIVE_ERROR, layer_importance
    from .request import Request

    # ---- check the request --------------------------------------------------------------------
    measures = [measure] if isinstance(measure, str) else list(measure)
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures or len(set(measures)) != len(measures):
        raise ConductanceError(f"measure must be one of {MEASURES} or a list of distinct ones; got {measure!r}")
    if by not in BY:
        raise ConductanceError(f"by must be 'class', 'label', 'predicted' or None; got {by!r}")
    if units not in UNITS:
        raise ConductanceError(f"unknown units {units!r}; choose 'channel' or 'neuron'")
    target_spec = _target_spec(target)
    if not isinstance(near_zero, numbers.Real) or not near_zero >= 0:
        raise ConductanceError(f"near_zero must be a number >= 0, got {near_zero!r}")
    if not isinstance(checkpoint_every, numbers.Integral) or checkpoint_every < 1:
        raise ConductanceError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    if limit_batches is not None and (not isinstance(limit_batches, numbers.Integral) or limit_batches < 1):
        raise ConductanceError(f"limit_batches must be an integer >= 1, got {limit_batches!r}")
    bad = [k for k in importance_kwargs if k not in IMPORTANCE_KWARGS]
    if bad:
        raise TypeError(f"aggregate() got unexpected keyword argument(s) {bad}; it passes on only "
                        f"{list(IMPORTANCE_KWARGS)} to layer_importance (target, units and measure are its own)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(data, (torch.Tensor, dict)) or not isinstance(data, Iterable):
        raise TypeError(f"data must be an iterable of batches (a DataLoader, or a list of (inputs, labels)); "
                        f"got a {type(data).__name__}. For one batch of tensors pass [(inputs, labels)]")
    refs = resolve_layers(model, layers, use_input=bool(importance_kwargs.get("attribute_to_layer_input")))
    names = [r.name for r in refs]
    # the per-batch settings, checked once here (the baselines are checked against each batch's inputs)
    request = Request.make(units=units, **{k: v for k, v in importance_kwargs.items() if k != "baselines"})
    method, n_steps, tolerance = request.method, request.n_steps, request.tolerance
    error_threshold = tolerance if method == "adaptive" else WARN_RELATIVE_ERROR
    _check_timeout(timeout)
    active, rank, world = _dist_state(distributed, timeout)
    presharded = _distributed_sampler_check(data, world, active)
    mine = (lambda i: True) if presharded or not active else (lambda i: i % world == rank)
    device = _model_device(model)
    # what the values depend on (internal_batch_size only bounds memory: a resume may change it)
    settings = dict(method=method, n_steps=n_steps, tolerance=tolerance,
                    **{k: _describe(v) for k, v in sorted(importance_kwargs.items())
                       if k not in ("method", "n_steps", "tolerance") + _NOT_FINGERPRINTED})
    # hashing the weights costs a pass over them: only when a checkpoint or other ranks need it
    model_id = type(model).__name__ + (f":{_model_hash(model)}" if checkpoint is not None or active else "")
    fingerprint = dict(
        model=model_id, layers=names, measures=measures, units=units,
        by=by, target=target_spec, near_zero=float(near_zero),
        settings=settings,
        world_size=world, rank=rank, sharding="sampler" if presharded else "strided",
        data_batches=_length(data), data_examples=_length(getattr(data, "dataset", None)))

    # ---- the checkpoint -----------------------------------------------------------------------
    path = None
    if checkpoint is not None:
        path = os.fspath(checkpoint) + (f".rank{rank}" if active and world > 1 else "")
    loaded: Optional[dict[str, AggregateResult]] = None
    saved: dict = {}
    problem: Optional[str] = None
    if path is not None:
        problem = _check_writable(path) or _other_world(os.fspath(checkpoint), path, world)
    if path is not None and problem is None and os.path.exists(path):
        try:
            loaded, meta = _read_results(path)
            saved = meta.get("checkpoint")
            if not isinstance(saved, dict):
                raise ConductanceError(f"{path} is a saved result, not a checkpoint of aggregate(); give "
                                       "another checkpoint path")
            diff = _mismatch(saved["fingerprint"], fingerprint)
            if diff:
                raise ConductanceError(f"checkpoint {path} was written by a different run: " + "; ".join(diff)
                                       + ". Resume with the same arguments and data, or give another checkpoint "
                                       "path (the file was left unchanged)")
            if limit_batches is not None and saved["position"] > limit_batches:
                raise ConductanceError(f"checkpoint {path} already covers {saved['position']} batches, more than "
                                       f"limit_batches={limit_batches}; raise the limit or use another path")
            if set(loaded) != set(measures):
                raise ConductanceError(f"checkpoint {path} holds measures {sorted(loaded)}, not {measures}")
        except ConductanceError as exc:
            problem, loaded, saved = str(exc), None, {}
        except (KeyError, TypeError, AttributeError) as exc:
            problem, loaded, saved = str(_unreadable(path, f"incomplete checkpoint record: {exc!r}")), None, {}
    position = int(saved.get("position", 0))
    exhausted = bool(saved.get("exhausted", False))
    stop = limit_batches if limit_batches is not None else math.inf

    def wanted(i: int) -> bool:
        return mine(i) and position <= i < stop and not exhausted

    meta_common = dict(units=units, near_zero=float(near_zero), error_threshold=error_threshold,
                       model=type(model).__name__, class_names=class_names)

    def settings_of(m: str) -> dict:     # the point measures use no path (layer_importance reports "none")
        return dict(settings, method="none", n_steps=None, tolerance=None) if m in POINT_MEASURES else settings

    results: Optional[dict[str, AggregateResult]] = loaded
    grouping: Optional[str] = next(iter(loaded.values())).grouping if loaded else None

    rescued: list[str] = []

    def write_checkpoint(next_position: int, done: bool) -> None:
        if path is None or results is None:
            return
        info = dict(position=next_position, exhausted=done, fingerprint=fingerprint, rank=rank, world_size=world)
        try:
            _write_results(path, [results[m] for m in measures], {"checkpoint": info})
        except OSError as exc:
            # finished work is never lost to an output error: write it where it can be written
            rescue = os.path.join(tempfile.gettempdir(), f"conductance-rescue-{os.getpid()}-{os.path.basename(path)}")
            try:
                _write_results(rescue, [results[m] for m in measures], {"checkpoint": info})
                where = f"wrote it to {rescue} instead (move it to {path} to resume from it)"
            except OSError as exc2:
                where = f"nor to {rescue} ({exc2}); the statistics exist only in the returned result"
            if where not in rescued:
                rescued.append(where)
                warn(f"could not write the checkpoint {path} ({type(exc).__name__}: {exc}); {where}")

    # ---- the pass over the data ---------------------------------------------------------------
    pairs, sizes = _plan_batches(data, wanted)
    total = None
    if sizes is not None:
        total = sum(s for i, s in enumerate(sizes) if mine(i) and i < stop)
    elif fingerprint["data_examples"] is not None and limit_batches is None:
        total = -(-fingerprint["data_examples"] // (1 if presharded else world))
    done_examples = next(iter(loaded.values())).n_examples if loaded else 0
    bar = _Progress(progress if rank == 0 else False, total, done_examples,
                    f"{'+'.join(measures)}" + (f" rank {rank}/{world}" if active else ""))
    caught_warnings: dict[str, list] = {}
    since_write, computed, last_seen, ran_out, resumed_done = 0, 0, -1, False, False
    try:
        for i, batch in pairs:
            last_seen = i
            if i >= stop:
                break
            inputs, labels = split_batch(batch, i)
            if i == 0:
                fingerprint["first_batch"] = _batch_hash(inputs, labels)
                if problem is None and saved and saved["fingerprint"].get("first_batch") != \
                        fingerprint["first_batch"]:
                    problem = (f"checkpoint {path} was written by a different run: "
                               + "; ".join(_mismatch(saved["fingerprint"], fingerprint))
                               + ". The data must come in the same, deterministic order (no unseeded shuffling) "
                               "to resume; or give another checkpoint path (the file was left unchanged)")
                if active and not presharded and problem is None:
                    prints = _gather((fingerprint["first_batch"], fingerprint["model"]))
                    if len(set(p[0] for p in prints)) > 1:
                        problem = ("the first batch differs between ranks: every rank must iterate the same data "
                                   "in the same order (seed any shuffling identically, e.g. a torch.Generator "
                                   "with a fixed seed)")
                    elif len(set(p[1] for p in prints)) > 1:
                        problem = "the model's weights differ between ranks: load the same weights on every rank"
                _raise_collectively(problem, active)
                if exhausted or position >= stop:
                    resumed_done = True
                    break
            if not wanted(i):
                continue
            x = inputs.to(device)
            y = _to(labels, device)
            has_labels = y is not None
            kind = ("label" if has_labels else "predicted") if by == "class" else ALL if by is None else by
            if by == "label" and not has_labels:
                raise ConductanceError(f"by='label' but batch {i} has no labels; use by='predicted' or 'class'")
            if grouping is None:
                grouping = kind
            elif kind != grouping:
                raise ConductanceError(f"batch {i} {'has' if has_labels else 'has no'} labels but earlier batches "
                                       f"{'did not' if has_labels else 'did'}: every batch must have labels, or none")
            if target_spec == "label":
                t = y if has_labels else None
            elif target_spec == "predicted":
                t = None
            else:
                t = target
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    out = layer_importance(model, x, names, measures, target=t, units=units, **importance_kwargs)
                except ConductanceError as exc:
                    raise ConductanceError(f"batch {i}: {exc}") from exc
            for w in caught:
                caught_warnings.setdefault(str(w.message)[:60], [str(w.message), 0])[1] += 1
            _check_finite_batch(out, measures, names, i)
            first = out[measures[0]]
            if grouping == "label":
                groups = y
            elif grouping == "predicted":
                groups = first.target if t is None and first.target is not None else \
                    _predicted(model, x, importance_kwargs, i)
            else:
                groups = torch.zeros(x.shape[0], dtype=torch.long)
            groups = groups.detach().to("cpu", torch.long)
            if results is None:
                target_name = "predicted" if target_spec == "label" and not has_labels else target_spec
                results = {m: AggregateResult.empty(0, {n: tuple(out[m][n].shape[1:]) for n in names},
                                                    measure=m, layers=names, grouping=grouping,
                                                    is_cut=dict(out[m].is_cut), target=target_name,
                                                    settings=settings_of(m), **meta_common)
                           for m in measures}
            for m in measures:
                _accumulate(results[m], out[m], groups, names, float(near_zero), error_threshold)
            computed += 1
            since_write += 1
            bar.update(int(x.shape[0]))
            if since_write >= checkpoint_every:
                write_checkpoint(i + 1, False)
                since_write = 0
        else:
            ran_out = True
    finally:
        bar.close()
    if last_seen < 0:
        _raise_collectively(problem or "the data yielded no batches", active)
    if not resumed_done:
        # where the data ends, if known: the DataLoader's batch count, or the last batch read
        n_total = len(sizes) if sizes is not None else (last_seen + 1 if ran_out else None)
        if n_total is not None and n_total <= stop:
            next_position, exhausted = n_total, True
        else:
            next_position, exhausted = int(stop), False
        if computed or next_position != position or exhausted != bool(saved.get("exhausted", False)):
            write_checkpoint(next_position, exhausted)
    for key, (message, count) in caught_warnings.items():
        warn(message if count == 1 else f"{message} [and similar warnings in {count - 1} more batches]")

    # ---- combine ranks ------------------------------------------------------------------------
    if active:
        local = None if results is None else {m: (r._meta(), r.n_groups) for m, r in results.items()}
        gathered = [g for g in _gather(local) if g is not None]
        if not gathered:
            raise ConductanceError("no rank computed any batch: the data is empty (or limit_batches is 0)")
        if results is None:
            results = {}
            for m in measures:
                meta = dict(gathered[0][m][0])
                shapes = meta.pop("unit_shapes")
                meta.pop("n_batches")
                results[m] = AggregateResult.empty(0, {k: tuple(v) for k, v in shapes.items()}, **meta)
        _all_reduce([results[m] for m in measures])
    if results is None:
        raise ConductanceError("no batch was aggregated: the data is empty")
    for r in results.values():
        r.bind(model)          # result.mean(model.layer) as well as result.mean("layer")
    return results[measures[0]] if isinstance(measure, str) else {m: results[m] for m in measures}


def _check_finite_batch(out: dict, measures: Sequence[str], names: Sequence[str], index: int) -> None:
    """Refuse a batch whose values are NaN or Inf: it would turn every mean it enters into NaN."""
    for m in measures:
        parts = {"F(x) - F(x')": out[m].output_diff, **{f"layer {n!r}": out[m][n] for n in names}}
        for what, t in parts.items():
            finite = torch.isfinite(t.detach().reshape(t.shape[0], -1)).all(1) if t.dim() else torch.isfinite(t)
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten()[:10].tolist()
                raise ConductanceError(f"batch {index}: {m} of {what} is NaN or Inf for examples {bad} of the batch; "
                                       "the model produces non-finite values for them. Fix the model or leave those "
                                       "examples out; nothing of this batch was added")


def _check_writable(path: str) -> Optional[str]:
    """Why ``path`` cannot be written (its folder is missing and cannot be made, is a file, or is
    read-only), or None; found before any batch is computed."""
    if os.path.isdir(path):
        return f"checkpoint {path!r} is a folder; give a file path ending in .npz or .safetensors"
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return (f"checkpoint {path!r} cannot be written: {existing!r} is a file, not a folder; give a path in a "
                "writable folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".conductance-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return (f"checkpoint {path!r} cannot be written: the folder {existing!r} is not writable "
                f"({type(exc).__name__}: {exc}); give a path in a writable folder")
    return None


def _other_world(base: str, path: str, world: int) -> Optional[str]:
    """A checkpoint written by a different number of processes than this run has, described, or None."""
    import glob

    if os.path.exists(path):
        return None
    if world == 1:
        found = sorted(p for p in glob.glob(glob.escape(base) + ".rank*") if p[len(base) + 5:].isdigit())
    else:
        found = [base] if os.path.exists(base) else []
    if not found:
        return None
    try:
        written = checkpoint_info(found[0]).get("world_size")
    except (ConductanceError, OSError) as exc:
        written = f"an unknown number of ({exc})"
    return (f"checkpoint {base!r} was written by {written} process(es) (found {found[:4]}), and this run has "
            f"{world}: resume with {written} processes (torchrun --nproc-per-node {written}), or give another "
            "checkpoint path (the files were left unchanged)")


def _predicted(model: nn.Module, x: torch.Tensor, kwargs: dict, index: int) -> torch.Tensor:
    from .engine import logits_of

    from .engine import unwrap_shared

    extra = kwargs.get("additional_forward_args")
    extra = () if extra is None else extra if isinstance(extra, tuple) else (extra,)
    with torch.no_grad():
        scores = logits_of(model(x, *unwrap_shared(extra), **unwrap_shared(dict(kwargs.get("forward_kwargs") or {}))))
    if scores.dim() != 2:
        raise ConductanceError(f"batch {index}: grouping by predicted class needs outputs (batch, classes), got "
                               f"{tuple(scores.shape)}; give labels or use by=None")
    return scores.argmax(1)


def _accumulate(result: AggregateResult, out: Any, groups: torch.Tensor, names: Sequence[str], near_zero: float,
                error_threshold: float) -> None:
    """Add one batch to ``result`` in place (float64 sums, int64 counts, rows in example order)."""
    if groups.numel():
        result._pad(int(groups.max()) + 1)
    as_t = torch.from_numpy
    G = result.n_groups
    before = result.counts.copy()
    n_batch = torch.bincount(groups, minlength=G)
    as_t(result.counts).add_(n_batch)
    as_t(result.output_diff_sum).index_add_(0, groups, out.output_diff.detach().to("cpu", torch.float64))
    as_t(result.points_sum).index_add_(0, groups, out.n_points.detach().to("cpu", torch.long))
    for name in names:
        v = out[name].detach().reshape(groups.shape[0], -1).to("cpu", torch.float64)
        s = result.stats[name]
        # the batch's own mean and squared deviations (two passes), then Chan et al.'s merge with the
        # running ones: a sum of squares would lose a small spread around a large mean to rounding
        sum_b = torch.zeros((G, v.shape[1]), dtype=torch.float64).index_add_(0, groups, v)
        mean_b = sum_b / n_batch.clamp(min=1).to(torch.float64)[:, None]
        dev = v - mean_b[groups]
        m2_b = torch.zeros_like(sum_b).index_add_(0, groups, dev * dev)
        _chan_merge(s, before, sum_b.numpy(), m2_b.numpy(), n_batch.numpy(), G)
        as_t(s["sum"]).add_(sum_b)
        as_t(s["positive"]).index_add_(0, groups, (v > near_zero).long())
        as_t(s["negative"]).index_add_(0, groups, (v < -near_zero).long())
        as_t(s["near_zero"]).index_add_(0, groups, (v.abs() <= near_zero).long())
        err = out.relative_error[name].detach().to("cpu", torch.float64)
        e = result.errors[name]
        as_t(e["error_sum"]).index_add_(0, groups, err)
        as_t(e["error_max"]).scatter_reduce_(0, groups, err, reduce="amax")
        as_t(e["error_above"]).index_add_(0, groups, (err > error_threshold).long())
        # measures read at one point have no integration error: their estimate is 0
        unit_err = out.unit_error[name].detach().to("cpu", torch.float64) if name in out.unit_error \
            else torch.zeros_like(err)
        as_t(e["unit_error_sum"]).index_add_(0, groups, unit_err)
        as_t(e["unit_error_max"]).scatter_reduce_(0, groups, unit_err, reduce="amax")
        as_t(e["unit_error_above"]).index_add_(0, groups, (unit_err > error_threshold).long())
    result.n_batches += 1


def _chan_merge(stats: dict[str, np.ndarray], n_a: np.ndarray, sum_b: np.ndarray, m2_b: np.ndarray,
                n_b: np.ndarray, n: int) -> None:
    """Fold part b's squared deviations into ``stats["m2"][:n]`` in place (Chan, Golub, LeVeque 1979).

    ``stats["sum"][:n]`` and ``n_a`` (n,) still describe part a alone; ``sum_b``, ``m2_b`` (n, units)
    and ``n_b`` (n,) describe part b. The caller adds the sums and counts afterwards."""
    na = n_a[:n].astype(np.float64)[:, None]
    nb = n_b[:n].astype(np.float64)[:, None]
    both = (na > 0) & (nb > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.where(both, sum_b[:n] / np.maximum(nb, 1) - stats["sum"][:n] / np.maximum(na, 1), 0.0)
        weight = np.where(both, na * nb / np.maximum(na + nb, 1), 0.0)
    stats["m2"][:n] += m2_b[:n] + delta * delta * weight
