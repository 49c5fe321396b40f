"""The result type shared by every layer measure, and the protocol every result type follows.

Every result type (:class:`LayerResult`, :class:`conductance.hf.TransformerResult`,
:class:`conductance.aggregate.AggregateResult`, :class:`conductance.ablation.AblationCurve`,
:class:`conductance.ablation.AblationSummary`, :class:`conductance.selection.FeatureSelectionResult`)
has ``summary()``, ``top(k, layer=None)``, ``to_dataframe()``, ``to_dict()``, ``save(path)``
(read back with :func:`conductance.load`), ``plot(..., **kwargs)`` and ``==``; the ones with
layers take a layer as its name or as the module object (see :meth:`ResultProtocol.bind`).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Optional, TypeVar, Union

import numpy as np
import torch
from torch import nn

from .errors import ConductanceError

#: measures integrated along the path (the others are read at the input)
PATH_MEASURES = ("conductance", "internal_influence")


def _spread(points: torch.Tensor) -> str:
    lo, hi = int(points.min()), int(points.max())
    return f"{lo}" if lo == hi else f"{lo}-{hi} (median {int(points.median())})"


def pandas() -> Any:
    """Import pandas, or raise a ConductanceError saying how to install it.

    Returns
    -------
    module
        The ``pandas`` module.
    """
    try:
        import pandas as pd
    except ImportError:
        raise ConductanceError("to_dataframe() needs pandas: pip install pandas "
                               "(or pip install 'conductance[data]')") from None
    return pd


def plain(value: Any) -> Any:
    """``value`` with tensors and arrays as (nested) lists and numpy scalars as Python numbers.

    Parameters
    ----------
    value : Any
        Nested dicts, lists, tuples, tensors, arrays and scalars.

    Returns
    -------
    Any
        The same structure in JSON-serialisable Python types (tuples become lists).
    """
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, ResultProtocol):
        return value.to_dict()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def same(a: Any, b: Any) -> bool:
    """Deep equality for result contents: tensors and arrays equal in dtype, shape and every value
    (NaN equal to NaN), dicts with the same keys, lists / tuples item by item.

    Parameters
    ----------
    a, b : Any

    Returns
    -------
    bool
    """
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.is_floating_point() or a.is_complex():
            return bool(torch.equal(torch.isnan(a), torch.isnan(b))
                        and torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)))
        return bool(torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            return False
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and list(a) == list(b)
                and all(same(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b)))
    if isinstance(a, ResultProtocol) or isinstance(b, ResultProtocol):
        return bool(a == b)
    numbers = (int, float, np.integer, np.floating)
    if isinstance(a, numbers) and isinstance(b, numbers):
        if isinstance(a, bool) != isinstance(b, bool):
            return False
        return bool(a == b) or (math.isnan(a) and math.isnan(b))
    return bool(type(a) is type(b) and a == b)


def module_name(layer: str) -> str:
    """The module part of a layer label: without ``":input"``, an element ``"[i]"``, or ``"<model>"``.

    Parameters
    ----------
    layer : str
        A layer label such as ``"lstm[0]"`` or ``"fc2:input"``.

    Returns
    -------
    str
        The dotted module name (``""`` for the model itself).
    """
    if layer.endswith(":input"):
        layer = layer[:-len(":input")]
    if layer.endswith("]") and "[" in layer:
        layer = layer[:layer.rindex("[")]
    return "" if layer == "<model>" else layer


_R = TypeVar("_R", bound="ResultProtocol")


class ResultProtocol:
    """What every result type offers; see the module docstring.

    Subclasses set :attr:`FORMAT` (``"conductance.<type>/<version>"``), list their layers in
    :meth:`_layer_names` and their saved content in :meth:`_fields` / :meth:`_from_fields`.
    """

    FORMAT: ClassVar[str] = ""

    # ---- layers as names or modules -----------------------------------------------------------
    def _layer_names(self) -> list[str]:
        return []

    def bind(self: _R, model: nn.Module) -> _R:
        """Remember (weakly) which module of ``model`` each layer name is, so that a layer can be
        given as the module object: ``result[model.fc1]`` is ``result["fc1"]``. The functions that
        compute results bind them; a loaded result needs ``bind(model)`` for module lookup. Returns self.

        Parameters
        ----------
        model : nn.Module
            The model the result was computed on.

        Returns
        -------
        The result itself.
        """
        if not isinstance(model, nn.Module):
            raise ConductanceError(f"bind() takes the model (an nn.Module), got {type(model).__name__}")
        modules = dict(model.named_modules())
        table: weakref.WeakKeyDictionary[nn.Module, list[str]] = weakref.WeakKeyDictionary()
        for name in self._layer_names():
            module = modules.get(module_name(name))
            if module is not None:
                table.setdefault(module, []).append(name)
        object.__setattr__(self, "_modules", table)
        return self

    def __getstate__(self) -> dict:
        # the weak module table cannot be pickled (nor should a pickle carry the model): drop it
        state = dict(self.__dict__)
        state.pop("_modules", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def _name_of(self, layer: Any) -> Any:
        """``layer`` as a layer name: a module is looked up among the bound ones; anything else is returned."""
        if not isinstance(layer, nn.Module):
            return layer
        table = getattr(self, "_modules", None)
        if table is None:
            raise ConductanceError(f"this result knows its layers by name only ({self._layer_names()}): it was "
                                   "not computed in this process (loaded from a file?); call result.bind(model) "
                                   "first, or index it by name")
        names = table.get(layer)
        if not names:
            raise KeyError(f"the {type(layer).__name__} given is not one of this result's layers "
                           f"{self._layer_names()}")
        if len(names) > 1:
            raise ConductanceError(f"the {type(layer).__name__} given is several layers of this result {names}; "
                                   "index by name")
        return names[0]

    # ---- files --------------------------------------------------------------------------------
    def _fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> Any:
        return cls(**fields)

    def _fallback(self) -> Optional[Callable[[Any], Any]]:
        """How to store a value the file format cannot hold (None: refuse with an error)."""
        return None

    def save(self, path: str) -> None:
        """Write the result to ``path`` atomically: ``*.safetensors`` (needs the safetensors package) or else
        an npz archive, tensors as arrays and everything else as JSON, with a checksum; no pickle.
        :func:`conductance.load` reads it back as an equal object (tensors on the CPU).

        Parameters
        ----------
        path : str
            ``*.safetensors`` or another name (an npz archive).
        """
        from . import io

        io.save(path, self)

    # ---- comparison ---------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return same(self._fields(), other._fields())  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict:
        """Plain Python content (lists, numbers, strings; JSON-serialisable).

        Returns
        -------
        dict
        """
        return plain(self._fields())


class UnitValue(NamedTuple):
    """One row of :meth:`LayerResult.top`."""

    layer: str
    example: int
    unit: int             #: flat index into the layer's unit shape (``torch.unravel_index`` for a tuple)
    value: float


@dataclass(eq=False)
class LayerResult(ResultProtocol, Mapping):
    """Attributions per layer, with the evidence of their accuracy.

    Behaves as a read-only mapping ``layer name -> Tensor (batch, *unit_shape)``.

    Attributes
    ----------
    delta : dict[str, Tensor (batch,)]
        Sum over the layer minus ``F(x) - F(x')``: the completeness error. Meaningful as an
        error only for layers that are cuts (see ``is_cut``).
    relative_error : dict[str, Tensor (batch,)]
        ``|delta| / |F(x) - F(x')|``.
    unit_error : dict[str, Tensor (batch,)]
        Estimated relative L2 distance of each example's vector of unit values (in ``units``) to the
        exact integral: ``||values - comparison|| / ||values||``, the comparison values
        (``extra["coarse"]``) coming from the same rule on coarser grids (see
        :func:`conductance.engine.comparison_values`). It needs no cut, so it holds for every layer;
        0 for measures read at one point (activation, gradient, grad x activation). See
        docs/accuracy.md for how it is computed and how cautious it is.
    output_diff : Tensor (batch,)
        ``F(x) - F(x')``.
    is_cut : dict[str, bool]
        Whether every path from the input to F passes through the layer (so completeness
        must hold). A branch of an Inception block or one attention head is not a cut.
    n_points : LongTensor (batch,)
        Path points evaluated per example.
    target : LongTensor (batch,) or None
        The class explained per example (None for a callable target or scalar outputs).
    method, n_steps, tolerance, units, measure : the settings that produced the result.
    extra : dict
        Other measures computed in the same run (``extra[measure][layer]``) and, for the
        adaptive rule, the final grid (``"alphas"``) and per-interval residuals.
    """

    attributions: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    relative_error: dict[str, torch.Tensor]
    output_diff: torch.Tensor
    is_cut: dict[str, bool]
    n_points: torch.Tensor
    target: Optional[torch.Tensor]
    method: str
    n_steps: Optional[int]
    tolerance: Optional[float]
    units: str
    measure: str = "conductance"
    unit_error: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    FORMAT: ClassVar[str] = "conductance.layer_result/1"

    def _layer_names(self) -> list[str]:
        return list(self.attributions)

    def __getitem__(self, name: Union[str, nn.Module]) -> torch.Tensor:
        """The values of one layer, by name or by module: Tensor (batch, *unit_shape)."""
        key = self._name_of(name)
        try:
            return self.attributions[key]
        except (KeyError, TypeError):
            raise KeyError(f"no layer {name!r} in this result; it has {list(self.attributions)}") from None

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except (KeyError, ConductanceError):
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.attributions)

    def __len__(self) -> int:
        return len(self.attributions)

    def top(self, k: Union[int, str, nn.Module] = 5, layer: Union[str, nn.Module, int, None] = None, *,
            example: int = 0, absolute: bool = False) -> list:
        """The ``k`` units with the largest value for one example, per layer.

        Parameters
        ----------
        k : int
            Units per layer.
        layer : str or nn.Module, optional
            One layer; None: every layer, rows grouped by layer in the result's order.
        example : int
            Which example (row of the batch).
        absolute : bool
            Rank by ``|value|`` instead of value.

        Returns
        -------
        list of :class:`UnitValue` (layer, example, unit (flat index), value), best first per layer.
        The older form ``top("layer", k)`` (a layer first) still works and returns ``(unit, value)`` pairs.
        """
        if isinstance(k, (str, nn.Module)):       # the older top(layer, k=5, example=0)
            old_k = 5 if layer is None else layer
            return [(r.unit, r.value) for r in self.top(old_k, k, example=example, absolute=absolute)]  # type: ignore[arg-type]
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ConductanceError(f"k must be a positive integer, got {k!r}")
        names = list(self.attributions) if layer is None else [self._check_layer(layer)]
        rows: list[UnitValue] = []
        for name in names:
            values = self.attributions[name]
            if not -values.shape[0] <= example < values.shape[0]:
                raise ConductanceError(f"example {example} is out of range: the result has {values.shape[0]} examples")
            flat = values[example].flatten()
            order = torch.argsort(flat.abs() if absolute else flat, descending=True, stable=True)[:int(k)]
            rows.extend(UnitValue(name, int(example), int(i), float(flat[i])) for i in order)
        return rows

    def _check_layer(self, layer: Any) -> str:
        name = self._name_of(layer)
        if name not in self.attributions:
            raise ConductanceError(f"no layer {layer!r} in this result; it has {list(self.attributions)}")
        return name

    def to_dataframe(self) -> Any:
        """A tidy pandas table, one row per (layer, example, unit): columns ``layer``, ``example``,
        ``unit`` (flat index), ``value`` and the example's per-unit error estimate ``unit_error``.
        Needs pandas.

        Returns
        -------
        pandas.DataFrame
            ``sum over layers of batch * n_units`` rows.
        """
        pd = pandas()
        frames = []
        for name, values in self.attributions.items():
            v = values.detach().cpu().flatten(1)
            batch, n = v.shape
            known = self.unit_error.get(name)
            err: Any = known.detach().cpu().double().repeat_interleave(n).numpy() if known is not None else np.nan
            # float64 holds every float16 / bfloat16 / float32 value exactly (numpy has no bfloat16)
            frames.append(pd.DataFrame({"layer": name, "example": np.repeat(np.arange(batch), n),
                                        "unit": np.tile(np.arange(n), batch), "value": v.reshape(-1).double().numpy(),
                                        "unit_error": err}))
        return pd.concat(frames, ignore_index=True)

    def to_dict(self) -> dict:
        """Plain content (JSON-serialisable): settings, values, errors and ``extra`` as nested lists.

        Returns
        -------
        dict
        """
        return plain(self._fields())

    def _fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def plot(self, layer: Union[str, nn.Module, None] = None, example: int = 0, k: int = 10, ax: Any = None,
             **options: Any) -> Any:
        """Bar chart of the ``k`` units of ``layer`` with the largest |attribution| for one example.

        The title names the measure, the example and the layer's completeness error (or that the
        layer is not a cut). ``layer`` (a name or the module) may be omitted when the result has one
        layer; ``options`` go to :func:`conductance.plots.top_units` and from there to ``ax.bar``
        (e.g. ``color="red"``). Returns the matplotlib Figure (needs matplotlib); no pyplot figure is
        left open.

        Parameters
        ----------
        layer : str, nn.Module or None
        example : int
            Row of the batch.
        k : int
            Number of bars.
        ax : matplotlib Axes, optional
            Draw there instead of on a new figure.
        **options
            Keywords for the bars.

        Returns
        -------
        matplotlib.figure.Figure
        """
        from .plots import top_units

        if layer is None:
            if len(self.attributions) != 1:
                raise ConductanceError(f"this result has several layers {list(self.attributions)}; name one, "
                                       "e.g. result.plot('layer name')")
            layer = next(iter(self.attributions))
        layer = self._check_layer(layer)
        values = self[layer]
        if not -values.shape[0] <= example < values.shape[0]:
            raise ConductanceError(f"example {example} is out of range: the result has {values.shape[0]} examples")
        err = self._accuracy_text(layer, example)
        title = options.pop("title", None)
        if title is None:
            title = f"{self.measure} of {layer!r}, example {example}: top {k} {self.units}s ({err})"
        return top_units(values[example], k=k, ax=ax, title=title, ylabel=self.measure,
                         xlabel=self.units, **options)

    def _accuracy_text(self, layer: str, example: int) -> str:
        parts = []
        if self.measure in PATH_MEASURES or self.measure == "layer_integrated_gradients":
            parts.append(f"per-unit error {100 * float(self.unit_error[layer][example]):.2f}%")
        if self.is_cut.get(layer) and self.measure in ("conductance", "layer_integrated_gradients"):
            parts.append(f"completeness error {100 * float(self.relative_error[layer][example]):.2f}%")
        if not parts:
            return f"{self.measure} is read at the input itself: no integration error"
        return ", ".join(parts)

    def summary(self) -> str:
        """A short text table: per layer, shape, cut or not, worst per-unit and completeness errors.

        Returns
        -------
        str
            One line per layer.
        """
        lines = [f"{self.measure}: method={self.method}"
                 + (f" n_steps={self.n_steps}" if self.n_steps else "")
                 + (f" tolerance={self.tolerance}" if self.tolerance else "")
                 + f" points per example={_spread(self.n_points)} units={self.units}"]
        integrated = self.measure in PATH_MEASURES or self.measure == "layer_integrated_gradients"
        completes = self.measure in ("conductance", "layer_integrated_gradients")
        for name, value in self.attributions.items():
            text = f"  {name}: shape {tuple(value.shape)}"
            if integrated:
                text += f", max per-unit error {100 * self.unit_error[name].max().item():.2f}%"
            if completes and self.is_cut.get(name):
                text += f", cut: max completeness error {100 * self.relative_error[name].max().item():.2f}%"
            elif completes:
                text += ", not a cut (no completeness check)"
            else:
                text += "" if integrated else " (read at the input: no integration error)"
            lines.append(text)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"LayerResult({self.summary()})"
