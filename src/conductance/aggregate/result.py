"""AggregateResult and TopUnit: the mergeable per-group, per-unit statistics and what is read from them."""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import nn

from .. import io as _io
from ..errors import ConductanceError
from ..measures import LIG
from ..result import ResultProtocol, pandas, plain

#: Version of the file layout written by :meth:`AggregateResult.save` and checkpoints.
FORMAT = "conductance.aggregate/2"


#: Key of the content checksum in a file's JSON metadata (sha256 of the metadata and every array).
CHECKSUM = _io.CHECKSUM


BY = ("class", "label", "predicted", None)


#: Keyword arguments passed on to :func:`conductance.layer_importance`.
IMPORTANCE_KWARGS = ("baselines", "additional_forward_args", "forward_kwargs", "n_steps", "method", "tolerance",
                     "max_steps", "internal_batch_size", "attribute_to_layer_input", "memory_budget", "channels_last")


_UNIT_STATS = ("sum", "m2", "positive", "negative", "near_zero")


_GROUP_STATS = ("error_sum", "error_max", "error_above", "unit_error_sum", "unit_error_max", "unit_error_above")


_INT_STATS = ("positive", "negative", "near_zero", "error_above", "unit_error_above")


ALL = "all"


class TopUnit(NamedTuple):
    """One row of :meth:`AggregateResult.top`.

    ``n_examples`` was called ``count`` before; ``row.count`` still reads it (a field of that name
    hid the tuple's ``count`` method, which the alias still does).
    """

    layer: str
    unit: int              #: flat index into the layer's unit shape (``np.unravel_index`` for a tuple)
    mean: float
    std: float
    positive: float        #: share of examples with a value above ``near_zero``
    negative: float        #: share below ``-near_zero``
    n_examples: int        #: examples in the group

    @property
    def count(self) -> int:  # type: ignore[override]  # the old field name, kept readable; hides tuple.count
        """The old name of :attr:`n_examples`."""
        return self.n_examples


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

    __hash__ = None

    def to_dict(self) -> dict:
        """Plain content (JSON-serialisable): the metadata and every statistic as nested lists.

        Returns
        -------
        dict
            The settings, ``counts`` (n_groups,), ``stats[layer][stat]`` (n_groups, n_units),
            ``errors[layer][stat]`` (n_groups,), ``output_diff_sum`` and ``points_sum`` (n_groups,).
        """
        return plain({**self._meta(), "counts": self.counts, "output_diff_sum": self.output_diff_sum,
                      "points_sum": self.points_sum, "stats": self.stats, "errors": self.errors})

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls, n_groups: int, unit_shapes: dict[str, tuple], **meta: Any) -> AggregateResult:
        """A result with no examples yet: every statistic zero.

        Parameters
        ----------
        n_groups : int
            Rows of every statistic (classes, or 1 for a pooled result).
        unit_shapes : dict str -> tuple
            The shape of one example's units, per layer.
        **meta
            The other keyword arguments of the constructor (measure, layers, units, ...).

        Returns
        -------
        AggregateResult
            ``counts`` (n_groups,) and ``stats[layer][stat]`` (n_groups, n_units) all zero.
        """
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
        """How the text output names a group.

        Parameters
        ----------
        group : int, "all" or None
            A class index; "all" or None: every example pooled.

        Returns
        -------
        str
            "all examples", or "class g" with the class name when the result has ``class_names``.
        """
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
        if not 0 <= int(group) < self.n_groups or self.counts[int(group)] == 0:
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
        """Examples in ``group`` (None: all).

        Parameters
        ----------
        group : int, "all" or None
            A class index; "all" or None: every example pooled.

        Returns
        -------
        int
        """
        return int(self._total(self.counts, group))

    # ---- statistics ---------------------------------------------------------------------------
    def mean(self, layer: Union[str, nn.Module, None] = None, group: Any = None) -> np.ndarray:
        """Mean value of every unit over the group's examples.

        Parameters
        ----------
        layer : str or nn.Module, optional
            May be left out when the result has one layer.
        group : int, "all" or None
            A class index; "all" or None: every example pooled.

        Returns
        -------
        ndarray, shape ``unit_shapes[layer]``, float64
        """
        layer = self._layer(layer)
        n = self.count(group)
        return (self._total(self.stats[layer]["sum"], group) / max(n, 1)).reshape(self.unit_shapes[layer])

    def std(self, layer: Union[str, nn.Module, None] = None, group: Any = None, ddof: int = 0) -> np.ndarray:
        """Standard deviation of every unit over the group's examples.

        Parameters
        ----------
        layer : str or nn.Module, optional
            May be left out when the result has one layer.
        group : int, "all" or None
            A class index; "all" or None: every example pooled.
        ddof : int
            0: the population std; 1: the sample std.

        Returns
        -------
        ndarray, shape ``unit_shapes[layer]``, float64
            NaN where the group has ``ddof`` examples or fewer.
        """
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
        or ``near_zero``; the three add up to 1.

        Parameters
        ----------
        layer : str or nn.Module, optional
            May be left out when the result has one layer.
        group : int, "all" or None
            A class index; "all" or None: every example pooled.

        Returns
        -------
        dict str -> ndarray
            ``"positive"``, ``"negative"``, ``"near_zero"``, each of shape ``unit_shapes[layer]``.
        """
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
        out: list[TopUnit] = []
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
        holds for every layer.

        Parameters
        ----------
        group : int, "all" or None
            A class index; "all" or None: every example pooled.

        Returns
        -------
        dict str -> dict
            One dict of numbers (and ``is_cut``) per layer.
        """
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
        over ``group``, with the standard deviation as error bars.

        Parameters
        ----------
        layer : str or nn.Module, optional
            May be left out when the result has one layer.
        group : int, "all" or None
            A class index; "all" or None: every example pooled.
        k : int
            Bars.
        ax : matplotlib Axes, optional
            Draw into it; default a new figure.
        absolute : bool
            Rank by |mean| (True) or by mean.
        title : str, optional
            Default: measure, layer, group and number of examples.
        **kwargs
            Go to ``ax.bar`` (e.g. ``color="red"``).

        Returns
        -------
        matplotlib.figure.Figure
            No pyplot figure is left open.
        """
        from ..plots import top_units

        layer = self._layer(layer)
        n = self.count(group)
        if title is None:
            title = f"{self.measure} of {layer!r}, {self.group_name(group)} ({n} examples): top {k} {self.units}s"
        return top_units(self.mean(layer, group), k=k, ax=ax, title=title, absolute=absolute,
                         errors=self.std(layer, group), ylabel=f"mean {self.measure} ± std", xlabel=self.units,
                         **kwargs)

    def mean_output_diff(self, group: Any = None) -> float:
        """Mean of F(x) - F(x'), the total that a cut layer's conductances add up to.

        Parameters
        ----------
        group : int, "all" or None
            A class index; "all" or None: every example pooled.

        Returns
        -------
        float
            0.0 for a result without examples (a class without examples raises).
        """
        return float(self._total(self.output_diff_sum, group)) / max(self.count(group), 1)

    # ---- tables and text ----------------------------------------------------------------------
    def to_dataframe(self):
        """A tidy pandas table: one row per (group, layer, unit) with count, mean, std and sign shares.

        ``group`` is the class index, or ``"all"`` for a pooled result. Needs pandas.

        Returns
        -------
        pandas.DataFrame
            Columns group, layer, unit, count, mean, std, positive, negative, near_zero.
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
        """Settings, examples per group, each layer's completeness error; with ``k``, top units.

        Parameters
        ----------
        k : int
            Top units per layer and group to list (0: none).

        Returns
        -------
        str
        """
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
    def _compatible(self, other: AggregateResult) -> None:
        if not isinstance(other, AggregateResult):
            raise TypeError(f"can only merge an AggregateResult, got {type(other).__name__}")
        mine, theirs = self._meta(), other._meta()
        keys = ("measure", "layers", "unit_shapes", "units", "grouping", "target", "near_zero", "error_threshold",
                "settings", "model")
        diff = [f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in keys if mine[k] != theirs[k]]
        if diff:
            raise ConductanceError("cannot merge results computed differently: " + "; ".join(diff))

    def merge(self, other: AggregateResult) -> AggregateResult:
        """The statistics of both results' examples together (a new result; counts exact).

        Parameters
        ----------
        other : AggregateResult
            Computed with the same settings (else a ConductanceError names what differs).

        Returns
        -------
        AggregateResult
            With ``max(self.n_groups, other.n_groups)`` groups.
        """
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

    def equals(self, other: AggregateResult, rtol: float = 0.0, atol: float = 0.0) -> bool:
        """Same settings, identical counts, and float statistics equal within ``rtol`` / ``atol``.

        Parameters
        ----------
        other : AggregateResult
        rtol, atol : float
            Tolerances of the float statistics (``np.allclose``; NaN equals NaN).

        Returns
        -------
        bool
        """
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
        with the metadata (model class, layers, measure, settings, counts) as JSON inside.

        Parameters
        ----------
        path : str
            The file; read it back with :meth:`load` or ``conductance.load``.
        """
        from .files import _write_results  # files.py builds AggregateResult objects: import it when used

        _write_results(path, [self], {})

    @classmethod
    def load(cls, path: str, measure: Optional[str] = None) -> AggregateResult:
        """Read a file written by :meth:`save`, by the CLI, or a checkpoint of :func:`aggregate`.

        Parameters
        ----------
        path : str
        measure : str, optional
            Which result, when the file holds several measures.

        Returns
        -------
        AggregateResult
        """
        from .files import _read_results

        results, _ = _read_results(path)
        if measure is None:
            if len(results) != 1:
                raise ConductanceError(f"{path} holds several measures {list(results)}; pass measure=")
            return next(iter(results.values()))
        if measure not in results:
            raise ConductanceError(f"{path} has no measure {measure!r}; it has {list(results)}")
        return results[measure]


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
