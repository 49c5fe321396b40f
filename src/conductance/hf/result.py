""":class:`TransformerResult`, :class:`UnitScore` and the reduction of element values to heads, neurons and tokens."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Optional, Union

import torch
from torch import nn

from ..errors import ConductanceError
from ..result import LayerResult, ResultProtocol, pandas, plain
from .families import layer_index

#: Unit views of a layer value (batch, tokens, hidden); see the module docstring.
UNITS = ("neuron", "head", "head_token", "token", "layer", "element")


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------

class UnitScore(NamedTuple):
    """One row of :meth:`TransformerResult.table` / :meth:`TransformerResult.top`."""

    layer: str                 #: layer name as requested
    block: Optional[int]       #: transformer block index parsed from the name (None if there is none)
    unit: str                  #: unit kind ("head", "neuron", ...)
    index: Any                 #: int, or (token, head) for "head_token", (token, hidden) for "element"
    name: str                  #: readable name, e.g. "L3.H5" (head 5 of block 3), "L3.N1024" (MLP neuron)
    value: float


def reduce_layer(values: torch.Tensor, unit: str, num_heads: Optional[int], name: str = "layer") -> torch.Tensor:
    """Reduce element-level values (batch, tokens, hidden) to a unit view (see the module docstring).

    Reductions run on the tensor's own device.

    Parameters
    ----------
    values : Tensor, shape (batch, tokens, hidden)
        (or any shape for units "layer" and "element").
    unit : str
        One of :data:`UNITS`.
    num_heads : int or None
        Needed by "head" and "head_token"; it must divide ``hidden``.
    name : str
        The layer, for the messages.

    Returns
    -------
    Tensor
        "layer" (batch, 1); "element" ``values`` itself; "neuron" (batch, hidden); "token"
        (batch, tokens); "head" (batch, heads); "head_token" (batch, tokens, heads).
    """
    if unit not in UNITS:
        raise ConductanceError(f"unknown unit {unit!r}; choose from {UNITS}")
    if unit == "layer":
        return values.flatten(1).sum(1, keepdim=True)
    if unit == "element":
        return values
    if values.dim() != 3:
        raise ConductanceError(f"layer {name!r} has values of shape {tuple(values.shape)}; unit {unit!r} needs "
                               "(batch, tokens, hidden). Use unit 'layer' or 'element', or observe another layer")
    if unit == "neuron":
        return values.sum(1)
    if unit == "token":
        return values.sum(2)
    B, T, H = values.shape
    if num_heads is None:
        raise ConductanceError(f"unit {unit!r} of layer {name!r} needs the number of heads: the model has no "
                               "config.num_attention_heads; pass num_heads=")
    if H % num_heads:
        raise ConductanceError(f"layer {name!r} has hidden size {H}, which {num_heads} heads do not divide; pass "
                               "the right num_heads or observe the heads' concatenated output "
                               "(e.g. 'attention.output.dense:input')")
    per = values.reshape(B, T, num_heads, H // num_heads).sum(3)
    return per if unit == "head_token" else per.sum(1)


@dataclass(eq=False)
class TransformerResult(ResultProtocol):
    """Per-unit values of one measure for the layers of a transformer.

    ``result[layer]`` is the layer's values in its requested unit (see :data:`UNITS`);
    ``result.elements[layer]`` keeps the element-level values (batch, tokens, hidden) so any other
    view can be read with :meth:`reduce` without another run.

    Attributes
    ----------
    measure : str
    layers : list of str, as requested
    units : dict layer -> unit
    elements : dict layer -> Tensor (batch, tokens, hidden) (or the layer's own shape)
    delta, relative_error : dict layer -> Tensor (batch,), completeness (see ``is_cut``)
    is_cut : dict layer -> bool; only cut layers (e.g. block outputs) must sum to F(x) - F(x')
    output_diff : Tensor (batch,), F(x) - F(x')
    num_heads : int or None
    tokens : optional list (batch) of lists of token strings, used in unit names
    raw : the engine's LayerResult (names inside the wrapper)
    coarse : dict layer -> Tensor, the element-level values on the coarse grid (see ``unit_error``)
    baseline : str, which baseline was used (see ``baseline=`` of :func:`layer_importance`)
    target : str, what was explained (empty for a target given as a tensor or a plain callable)
    """

    measure: str
    layers: list[str]
    units: dict[str, str]
    elements: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    relative_error: dict[str, torch.Tensor]
    is_cut: dict[str, bool]
    output_diff: torch.Tensor
    num_heads: Optional[int]
    raw: LayerResult
    tokens: Optional[list] = None
    attention_mask: Optional[torch.Tensor] = None
    input_ids: Optional[torch.Tensor] = field(default=None, repr=False)
    #: the path's start as used, e.g. "pad token 0 (config.pad_token_id)" or "zeros (no pad token known)"
    baseline: str = ""
    #: the explained scalar as used, e.g. "log-probability of the next token at positions [4, 6]"
    target: str = ""
    coarse: dict = field(default_factory=dict, repr=False)

    FORMAT: ClassVar[str] = "conductance.transformer_result/1"

    def _layer_names(self) -> list[str]:
        return list(self.layers)

    @property
    def unit_error(self) -> dict[str, torch.Tensor]:
        """Per layer, each example's estimated per-unit error in the layer's requested unit, (batch,)."""
        return {n: self.unit_error_of(n, self.units[n]) for n in self.layers}

    def unit_error_of(self, layer: str, unit: str) -> torch.Tensor:
        """The estimated per-unit error (batch,) of ``layer`` read in any unit view: the relative L2
        distance of the example's vector of unit values to the same rule on a grid with half the points
        (see :func:`conductance.engine.unit_error`).

        Parameters
        ----------
        layer : str
        unit : str
            One of :data:`UNITS`, e.g. "head" for a layer requested by neuron.

        Returns
        -------
        Tensor, shape (batch,), float64
        """
        from ..engine import unit_error
        coarse = reduce_layer(self.coarse[self._check(layer)], unit, self.num_heads, layer)
        scale = self.output_diff if self.measure in ("conductance", "layer_integrated_gradients") else None
        return unit_error(self.reduce(layer, unit), coarse, scale)

    def __getitem__(self, layer: Union[str, nn.Module]) -> torch.Tensor:
        """One layer's values in its requested unit, by name or by module: Tensor (batch, *unit_shape)."""
        layer = self._check(layer)
        return self.reduce(layer, self.units[layer])

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def _check(self, layer: Union[str, nn.Module]) -> str:
        name = self._name_of(layer)
        if not isinstance(name, str) or name not in self.elements:
            raise KeyError(f"no layer {layer!r} in this result; it has {self.layers}")
        return name

    def reduce(self, layer: str, unit: str) -> torch.Tensor:
        """The layer's values in any unit view, e.g. ``reduce(name, "head_token")`` (batch, tokens, heads).

        Parameters
        ----------
        layer : str
        unit : str
            One of :data:`UNITS`.

        Returns
        -------
        Tensor
            As :func:`reduce_layer` gives it, e.g. (batch, heads) for "head".
        """
        return reduce_layer(self.elements[self._check(layer)], unit, self.num_heads, layer)

    def per_token(self, layer: str, index: int) -> torch.Tensor:
        """Values of one neuron (unit "neuron") or head (unit "head") of ``layer`` at each token.

        Parameters
        ----------
        layer : str
            A layer requested with unit "neuron" or "head".
        index : int
            The neuron or head.

        Returns
        -------
        Tensor, shape (batch, tokens)
        """
        unit = self.units[self._check(layer)]
        if unit == "neuron":
            return self.elements[layer][:, :, index]
        if unit == "head":
            return self.reduce(layer, "head_token")[:, :, index]
        raise ConductanceError(f"per_token reads a neuron or a head; layer {layer!r} has unit {unit!r} "
                               "(use reduce(layer, 'token') for positions)")

    def unit_names(self, layer: str, example: int = 0) -> list[str]:
        """Readable names of the units of ``layer`` (flattened in row-major order).

        Parameters
        ----------
        layer : str
        example : int
            Whose tokens name the token units (when the result has ``tokens``).

        Returns
        -------
        list of str
            One per unit of ``result[layer]`` (batch, *unit_shape), e.g. "L3.H5", "L3.N1024".
        """
        unit = self.units[self._check(layer)]
        block = layer_index(layer)
        prefix = f"L{block}" if block is not None else layer
        shape = self[layer].shape[1:]
        tok = self.tokens[example] if self.tokens is not None else None

        def token(t: int) -> str:
            return f"token {t}" + (f" {tok[t]!r}" if tok is not None and t < len(tok) else "")

        if unit == "layer":
            return [prefix + " total"]
        if unit in ("neuron", "head"):
            letter = "N" if unit == "neuron" else "H"
            return [f"{prefix}.{letter}{i}" for i in range(shape[0])]
        if unit == "token":
            return [f"{prefix} {token(t)}" for t in range(shape[0])]
        if unit == "head_token":
            return [f"{prefix}.H{h} {token(t)}" for t in range(shape[0]) for h in range(shape[1])]
        return [f"{prefix} {token(t)} dim {d}" for t in range(shape[0]) for d in range(shape[1])]

    def mean(self, layer: str, examples: Any = None) -> torch.Tensor:
        """Mean over examples of ``result[layer]``.

        Parameters
        ----------
        layer : str
        examples : sequence of int, LongTensor or BoolTensor (batch,), optional
            Indices or a boolean mask of the examples; default all.

        Returns
        -------
        Tensor, shape (*unit_shape)
        """
        values = self[layer]
        if examples is not None:
            values = values[torch.as_tensor(examples, device=values.device)
                            if not isinstance(examples, torch.Tensor) else examples.to(values.device)]
        if values.shape[0] == 0:
            raise ConductanceError("no examples selected")
        return values.mean(0)

    def table(self, example: Optional[int] = None, examples: Any = None,
              layers: Optional[Sequence[str]] = None) -> list[UnitScore]:
        """Every unit of every layer as a tidy list of :class:`UnitScore` rows.

        Parameters
        ----------
        example : int, optional
            One example's values; otherwise the mean over ``examples``.
        examples : indices or boolean mask, optional
            As in :meth:`mean` (default all).
        layers : sequence of str, optional
            Default every layer.

        Returns
        -------
        list of :class:`UnitScore`
            Layer by layer, units in row-major order.
        """
        rows: list[UnitScore] = []
        for layer in layers or self.layers:
            unit = self.units[self._check(layer)]
            values = self[layer][example] if example is not None else self.mean(layer, examples)
            shape = tuple(values.shape)
            flat = values.flatten().tolist()
            names = self.unit_names(layer, example or 0)
            for i, v in enumerate(flat):
                index: Any = i if len(shape) == 1 else \
                    tuple(int(j) for j in torch.unravel_index(torch.tensor(i), shape))
                rows.append(UnitScore(layer, layer_index(layer), unit, index, names[i], float(v)))
        return rows

    def top(self, k: int = 10, layer: Union[str, nn.Module, None] = None, *, unit: Optional[str] = None,
            layers: Optional[Sequence[Union[str, nn.Module]]] = None, example: Optional[int] = None,
            examples: Any = None, absolute: bool = False) -> list[UnitScore]:
        """The ``k`` largest units across the chosen layers (optionally only one unit kind).

        Parameters
        ----------
        k : int
            Rows returned in all (ranked across layers, not per layer).
        layer : str or nn.Module, optional
            One layer; None: every layer (or those in ``layers``).
        unit : str, optional
            Only layers whose unit is this kind ("head", "neuron", ...).
        example, examples : one example's values, or the mean over ``examples`` (default all).
        absolute : rank by magnitude instead of value.

        Returns
        -------
        list of :class:`UnitScore`, largest first.
        """
        if isinstance(layer, str) and layer in UNITS and layer not in self.elements and unit is None:
            unit, layer = layer, None          # the older top(k, unit)
        if layer is not None:
            layers = [layer]
        chosen = [n for n in (self._check(x) for x in (layers or self.layers)) if unit is None or self.units[n] == unit]
        if not chosen:
            raise ConductanceError(f"no layer with unit {unit!r}; units are {self.units}")
        rows = self.table(example=example, examples=examples, layers=chosen)
        rows.sort(key=lambda r: -abs(r.value) if absolute else -r.value)
        return rows[:k]

    def to_dataframe(self, example: Optional[int] = None) -> Any:
        """A tidy pandas table, one row per (layer, example, unit) in each layer's requested unit:
        ``layer``, ``block``, ``kind`` (the unit kind), ``example``, ``unit`` (flat index), ``name``
        (e.g. "L3.H5"), ``value`` and the example's per-unit error estimate ``unit_error`` (NaN
        without the coarse values). Needs pandas.

        Parameters
        ----------
        example : int, optional
            Only that example; default all.

        Returns
        -------
        pandas.DataFrame
        """
        pd = pandas()
        errors = self.unit_error if self.coarse else {}
        frames = []
        for name in self.layers:
            values = self[name].detach().cpu().flatten(1)
            batch, n = values.shape
            picked = range(batch) if example is None else [range(batch)[example]]
            for ex in picked:
                err = float(errors[name][ex]) if name in errors else float("nan")
                frames.append(pd.DataFrame({"layer": name, "block": layer_index(name), "kind": self.units[name],
                                            "example": ex, "unit": range(n), "name": self.unit_names(name, ex),
                                            "value": values[ex].double().numpy(), "unit_error": err}))
        return pd.concat(frames, ignore_index=True)

    def to_dict(self) -> dict:
        """Plain content (JSON-serialisable): settings, each layer's values in its unit, errors, tokens.

        Returns
        -------
        dict
            ``values[layer]`` as nested lists of shape (batch, *unit_shape); ``unit_error``,
            ``delta``, ``relative_error`` per layer and ``output_diff``, each (batch,).
        """
        errors = self.unit_error if self.coarse else {}
        return plain({"measure": self.measure, "layers": self.layers, "units": self.units,
                      "values": {n: self[n] for n in self.layers}, "unit_error": errors, "delta": self.delta,
                      "relative_error": self.relative_error, "is_cut": self.is_cut, "output_diff": self.output_diff,
                      "num_heads": self.num_heads, "tokens": self.tokens, "baseline": self.baseline,
                      "target": self.target, "method": self.raw.method, "n_steps": self.raw.n_steps,
                      "n_points": self.raw.n_points})

    def plot(self, layer: Union[str, nn.Module, None] = None, example: Optional[int] = None, k: int = 10,
             ax: Any = None, **kwargs: Any) -> Any:
        """Bar chart of the ``k`` units of ``layer`` with the largest |value|, labelled with unit names.

        Parameters
        ----------
        layer : str or nn.Module, optional
            May be omitted when the result has one layer.
        example : int, optional
            One example's values, else the mean over all.
        k : int
            Bars.
        ax : matplotlib Axes, optional
            Draw into it; default a new figure.
        **kwargs
            Go to :func:`conductance.plots.top_units` and on to ``ax.bar`` (e.g. ``color="red"``);
            ``title=`` replaces the default title.

        Returns
        -------
        matplotlib.figure.Figure
            No pyplot figure is left open.
        """
        from ..plots import top_units

        if layer is None:
            if len(self.layers) != 1:
                raise ConductanceError(f"this result has several layers {self.layers}; name one, "
                                       "e.g. result.plot('layer name')")
            layer = self.layers[0]
        name = self._check(layer)
        values = self[name][example] if example is not None else self.mean(name)
        which = f"example {example}" if example is not None else f"mean of {self[name].shape[0]} examples"
        title = kwargs.pop("title", None) or f"{self.measure} of {name!r} ({which}): top {k} {self.units[name]}s"
        return top_units(values, k=k, labels=self.unit_names(name, example or 0), ax=ax, title=title,
                         ylabel=self.measure, xlabel=self.units[name], **kwargs)

    def completeness(self) -> list[tuple[str, bool, float, float]]:
        """Per layer: (name, is_cut, mean and max relative completeness error over examples).

        Returns
        -------
        list of (str, bool, float, float)
            In the result's layer order.
        """
        return [(n, bool(self.is_cut[n]), float(self.relative_error[n].mean()), float(self.relative_error[n].max()))
                for n in self.layers]

    def summary(self) -> str:
        """A short text: the rule and points, then per layer its unit, shape and errors.

        Returns
        -------
        str
            One line for the settings, one per layer.
        """
        lines = [f"{self.measure} of {len(self.layers)} layers, {self.raw.method}"
                 + (f" n_steps={self.raw.n_steps}" if self.raw.n_steps else "")
                 + f", points per example {self.raw.n_points.tolist()}"]
        unit_errors = self.unit_error if self.coarse else {}
        for n, cut, _mean, worst in self.completeness():
            lines.append(f"  {n} [{self.units[n]}] shape {tuple(self[n].shape)}"
                         + (f", max per-unit error {100 * float(unit_errors[n].max()):.2f}%"
                            if n in unit_errors else "")
                         + (f", cut, relative completeness error max {100 * worst:.2f}%" if cut else ", not a cut"))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"TransformerResult({self.summary()})"
