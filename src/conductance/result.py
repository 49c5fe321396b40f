"""The result type shared by every layer measure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

#: measures integrated along the path (the others are read at the input)
PATH_MEASURES = ("conductance", "internal_influence")


def _spread(points: torch.Tensor) -> str:
    lo, hi = int(points.min()), int(points.max())
    return f"{lo}" if lo == hi else f"{lo}-{hi} (median {int(points.median())})"


@dataclass
class LayerResult(Mapping):
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

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.attributions[name]
        except KeyError:
            raise KeyError(f"no layer {name!r} in this result; it has {list(self.attributions)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.attributions)

    def __len__(self) -> int:
        return len(self.attributions)

    def top(self, layer: str, k: int = 5, example: int = 0) -> list[tuple[int, float]]:
        """The ``k`` units of ``layer`` with the largest attribution for one example: (flat index, value)."""
        values = self.attributions[layer][example].flatten()
        order = torch.argsort(values, descending=True)[:k]
        return [(int(i), float(values[i])) for i in order]

    def plot(self, layer: Optional[str] = None, example: int = 0, k: int = 10, ax: Any = None, **options: Any
             ) -> Any:
        """Bar chart of the ``k`` units of ``layer`` with the largest |attribution| for one example.

        The title names the measure, the example and the layer's completeness error (or that the
        layer is not a cut). ``layer`` may be omitted when the result has one layer; ``options`` go
        to :func:`conductance.plots.top_units`. Returns the matplotlib Figure (needs matplotlib).
        """
        from .errors import ConductanceError
        from .plots import top_units

        if layer is None:
            if len(self.attributions) != 1:
                raise ConductanceError(f"this result has several layers {list(self.attributions)}; name one, "
                                       "e.g. result.plot('layer name')")
            layer = next(iter(self.attributions))
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
        """A short text table: per layer, shape, cut or not, worst per-unit and completeness errors."""
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
