"""The paper's side-by-side table of rankings (:class:`AblationSummary`, :func:`ablation_summary`,
:func:`compare_rankings`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import numpy as np
import torch
from torch import nn

from ..errors import ConductanceError
from ..layers import LayerSpec
from ..progress import check_progress
from ..result import ResultProtocol, pandas
from .flips import _flipped_at
from .rankings import Ranking, _positions, _random_orders, _seeds
from .runner import _counting, _Session, _session

# --------------------------------------------------------------------------------------------
# the paper's summary


@dataclass(eq=False)
class AblationSummary(ResultProtocol):
    """Flip statistics per measure, reported the way the paper does.

    ``rows[name]`` holds: ``examples``; ``flipped`` (finite counts); ``mean_flips`` and
    ``median_flips`` over the examples that flipped (``inf`` counts are left out of both and
    reported as ``never``); ``more_than_k`` (counts above k, *including* the never-flipped,
    which needed more units than were tried); ``never``; ``max_flips`` (the largest finite
    count, None if none flipped); ``top_k_flipped`` (examples whose label changed when their
    top k units were ablated at once) and ``top_k_share``; ``top_k_exact`` (False when that
    column was estimated as ``count <= k`` from the flip counts, which can only overstate it).
    """

    rows: dict[str, dict]
    k: int
    flip_counts: dict[str, torch.Tensor]
    top_k: dict[str, torch.Tensor]
    layer: Optional[str] = None
    mode: Optional[str] = None

    FORMAT: ClassVar[str] = "conductance.ablation_summary/1"

    def _layer_names(self) -> list[str]:
        return [self.layer] if self.layer else []

    def summary(self) -> str:
        """The paper's table (:meth:`format_table`).

        Returns
        -------
        str
        """
        return self.format_table()

    def top(self, k: int = 5, layer: Union[str, nn.Module, None] = None) -> list[tuple[str, dict]]:
        """The ``k`` best measures, as ``(name, rows[name])``: the largest share of examples whose
        label the removal of their top ``self.k`` units changes, ties broken by the smaller median
        flip count (measures that never flipped last).

        Parameters
        ----------
        k : int
            How many measures.
        layer : str, nn.Module or None
            A summary has (at most) one layer: ``layer`` may only name it (or be None).

        Returns
        -------
        list of (str, dict)
            At most ``k`` pairs (measure name, its row of :attr:`rows`), best first.
        """
        if layer is not None and self._name_of(layer) != self.layer:
            raise ConductanceError(f"this summary is of layer {self.layer!r} only, not {layer!r}")

        def key(item: tuple[str, dict]) -> tuple:
            r = item[1]
            median = r["median_flips"] if r["median_flips"] is not None else math.inf
            return (-r["top_k_share"], median)

        return sorted(self.rows.items(), key=key)[:int(k)]

    def to_dataframe(self) -> Any:
        """A tidy pandas table, one row per (measure, example): ``measure``, ``example``,
        ``flip_count`` (units removed until the label changed; inf: never within the units tried)
        and ``top_k_flipped`` (whether removing its top ``k`` units changed it). Needs pandas.

        Returns
        -------
        pandas.DataFrame
            One row per (measure, example).
        """
        pd = pandas()
        frames = [pd.DataFrame({"measure": name, "example": np.arange(counts.numel()),
                                "flip_count": counts.double().numpy(),
                                "top_k_flipped": self.top_k[name].bool().numpy()})
                  for name, counts in self.flip_counts.items()]
        return pd.concat(frames, ignore_index=True)

    def format_table(self) -> str:
        """The paper's table: one line per measure (flipped, mean and median flips, more than k,
        never, max, top-k removal flips), with a title and footnotes.

        Returns
        -------
        str
        """
        head = ["measure", "flipped", "mean flips", "median", f"> {self.k}", "never", "max",
                f"top-{self.k} removal flips"]
        body = []
        for name, r in self.rows.items():
            star = "" if r["top_k_exact"] else "*"
            body.append([name, f"{r['flipped']}/{r['examples']}",
                         "-" if r["mean_flips"] is None else f"{r['mean_flips']:.2f}",
                         "-" if r["median_flips"] is None else f"{r['median_flips']:g}",
                         str(r["more_than_k"]), str(r["never"]),
                         "-" if r["max_flips"] is None else f"{r['max_flips']:g}",
                         f"{r['top_k_flipped']}/{r['examples']} ({100 * r['top_k_share']:.0f}%){star}"])
        widths = [max(len(str(row[i])) for row in [head] + body) for i in range(len(head))]
        fmt = lambda row: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(row, widths)))
        title = "ablation" + (f" of layer {self.layer!r}" if self.layer else "") + (
            f", mode {self.mode!r}" if self.mode else "")
        lines = [title, fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
        lines.append("mean and median over the examples that flipped; 'never' = no flip within the units tried "
                     f"(counted in '> {self.k}')")
        if any(not r["top_k_exact"] for r in self.rows.values()):
            lines.append(f"* estimated as flip count <= {self.k} (an upper bound: a label can flip back)")
        return "\n".join(lines)

    def plot(self, ax: Any = None, title: Optional[str] = None, **kwargs: Any) -> Any:
        """Share of examples whose label has changed after removing up to n units, one step curve per
        measure, with a line at ``k``.

        Parameters
        ----------
        ax : matplotlib Axes, optional
            Draw into it; default a new figure.
        title : str, optional
            Default: "label changes under ablation" with the layer and mode.
        **kwargs
            Go to every ``ax.plot`` (e.g. ``color="red"``).

        Returns
        -------
        matplotlib.figure.Figure
            No pyplot figure is left open.
        """
        from ..plots import flip_share

        if title is None:
            title = "label changes under ablation" + (f" of {self.layer!r}" if self.layer else "") + (
                f" ({self.mode})" if self.mode else "")
        return flip_share(self.flip_counts, k=self.k, ax=ax, title=title, **kwargs)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "mode": self.mode, "k": self.k, "rows": self.rows,
                "flip_counts": {n: [None if math.isinf(v) else v for v in c.tolist()]
                                for n, c in self.flip_counts.items()}}

    def __str__(self) -> str:
        return self.format_table()


def ablation_summary(flip_counts: Mapping[str, torch.Tensor],
                     top10_flipped: Optional[Mapping[str, torch.Tensor]] = None, *, k: int = 10,
                     layer: Optional[str] = None, mode: Optional[str] = None) -> AblationSummary:
    """Put flip counts of several measures side by side, as the paper reports them.

    Parameters
    ----------
    flip_counts : dict name -> Tensor (examples,)
        From :func:`flip_count`; ``inf`` marks examples that never flipped.
    top10_flipped : dict name -> BoolTensor (examples,), optional
        From :func:`flipped_by_top_k` with the same ``k``. For a name missing here the column
        is estimated as ``count <= k`` and marked with ``*``.
    k : int
        The threshold of the "more than k" and "top-k removal" columns (the paper: 10).
    layer, mode : str, optional
        Shown in the table's title.

    Returns
    -------
    AblationSummary
        ``rows[name]`` per measure; ``flip_counts[name]`` (examples,) float32 and
        ``top_k[name]`` (examples,) bool.
    """
    if not flip_counts:
        raise ConductanceError("flip_counts is empty; pass {measure name: flip_count(...)}")
    top10_flipped = dict(top10_flipped or {})
    unknown = set(top10_flipped) - set(flip_counts)
    if unknown:
        raise ConductanceError(f"top10_flipped has measures {sorted(unknown)} with no flip counts")
    rows, counts_out, top_out = {}, {}, {}
    for name, counts in flip_counts.items():
        c = torch.as_tensor(counts, dtype=torch.float64).flatten().cpu()
        if torch.isnan(c).any() or (c < 1).any():
            raise ConductanceError(f"flip counts of {name!r} must be >= 1 or inf (from flip_count)")
        finite = c[torch.isfinite(c)]
        if name in top10_flipped:
            top = torch.as_tensor(top10_flipped[name]).flatten().bool().cpu()
            if top.shape != c.shape:
                raise ConductanceError(f"top10_flipped[{name!r}] has {top.numel()} examples, flip_counts "
                                       f"{c.numel()}; give one value per example")
            exact = True
        else:
            top, exact = c <= k, False
        rows[name] = {
            "examples": int(c.numel()), "flipped": int(finite.numel()),
            "mean_flips": float(finite.mean()) if finite.numel() else None,
            "median_flips": float(finite.median()) if finite.numel() else None,
            "more_than_k": int((c > k).sum()), "never": int(torch.isinf(c).sum()),
            "max_flips": float(finite.max()) if finite.numel() else None,
            "top_k_flipped": int(top.sum()), "top_k_share": float(top.double().mean()), "top_k_exact": exact,
        }
        counts_out[name], top_out[name] = c.float(), top
    return AblationSummary(rows=rows, k=k, flip_counts=counts_out, top_k=top_out, layer=layer, mode=mode)


def compare_rankings(model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, rankings: Mapping[str, Ranking], *,
                     mode: str = "zero", values: Any = None, units: str = "neuron", max_units: Optional[int] = None,
                     k: int = 10, random_seeds: Union[int, Sequence[int]] = 1, baselines: Any = None,
                     additional_forward_args: Any = None, forward_kwargs: Optional[dict] = None,
                     batch_size: Optional[int] = None, expand_at_layer: Optional[bool] = None,
                     progress: Optional[bool] = None) -> AblationSummary:
    """Flip counts and top-k removal for several rankings of one layer, plus random rankings.

    Parameters
    ----------
    model, inputs, layer
        As in :func:`flip_count`: scores (batch, classes), inputs (batch, *input_shape).
    rankings : dict name -> ranking
        Each as in :func:`flip_count`.
    k : int
        The top-k removal column; lowered to the number of units for a layer with fewer than
        ``k`` units (the table says which k was used).
    random_seeds : int or sequence of int
        A row "random" pools the examples of this many random rankings (or of these seeds; a
        fresh order per example and seed).
    progress : bool, optional
        Counts the ablated rows of all rankings (see :func:`flip_count`).
    mode, values, units, max_units, baselines, additional_forward_args, forward_kwargs
        As in :func:`flip_count`.
    batch_size, expand_at_layer
        As in :func:`flip_count`.

    Returns
    -------
    AblationSummary
        One row per ranking (and "random"); print ``.format_table()``.
    """
    if not isinstance(rankings, Mapping) or not rankings:
        raise ConductanceError("rankings must be a non-empty dict {name: ranking}")
    check_progress(progress)
    s = _session(model, inputs, layer, mode, values, units, baselines, additional_forward_args, forward_kwargs,
                 batch_size, expand_at_layer)
    if "random" in rankings and random_seeds:
        raise ConductanceError("a ranking is named 'random', which is the name of the random row; rename it")
    k = min(s.check_k(k, max(k, 0), "k"), s.n_units)
    with _counting(s, progress, "rankings compared"):
        counts, tops = _compare(s, rankings, max_units, k, _seeds(random_seeds))
    return ablation_summary(counts, tops, k=k, layer=s.ref.name, mode=mode)


def _compare(s: _Session, rankings: Mapping[str, Ranking], max_units: Optional[int], k: int, seeds: list
             ) -> tuple[dict, dict]:
    counts, tops = {}, {}
    for name, ranking in rankings.items():
        order = s.orders(ranking)
        limit = order.shape[1]
        k_max = limit if max_units is None else s.check_k(max_units, limit, "max_units")
        pos = _positions(order, s.n_units)
        counts[name] = s.flip_counts(pos, k_max)
        tops[name] = _flipped_at(s, pos, s.check_k(k, limit, "k"))
    if seeds:
        k_max = s.n_units if max_units is None else s.check_k(max_units, s.n_units, "max_units")
        rc, rt = [], []
        for seed in seeds:
            pos = _positions(_random_orders(s.batch, s.n_units, seed, s.device), s.n_units)
            rc.append(s.flip_counts(pos, k_max))
            rt.append(_flipped_at(s, pos, k))
        counts["random"], tops["random"] = torch.cat(rc), torch.cat(rt)
    return counts, tops
