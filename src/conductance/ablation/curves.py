"""Deletion and insertion curves with their areas (:class:`AblationCurve`, :func:`deletion_curve`,
:func:`insertion_curve`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Optional, Union

import numpy as np
import torch
from torch import nn

from ..engine import call_target, logits_of
from ..errors import ConductanceError
from ..inputs import Target, resolve_target
from ..layers import LayerSpec
from ..progress import check_progress
from ..result import ResultProtocol, pandas
from .rankings import Ranking, _positions, _random_orders, _seeds
from .runner import _counting, _session

#: Points of the default k grid of the curves (0 .. number of units).
DEFAULT_CURVE_POINTS = 33


# --------------------------------------------------------------------------------------------
# deletion and insertion curves


def _trapezoid(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Area under y over x (last axis), x rescaled to [0, 1]; a single point gives its height."""
    if x.shape[0] == 1:
        return y[..., 0]
    t = (x - x[0]) / (x[-1] - x[0])
    return (0.5 * (y[..., 1:] + y[..., :-1]) * np.diff(t)).sum(-1)


class ExampleArea(NamedTuple):
    """One row of :meth:`AblationCurve.top`."""

    example: int
    auc_logit: float          #: the example's area under its target-score curve
    unablated_logit: float    #: its target score without ablation


@dataclass(eq=False)
class AblationCurve(ResultProtocol):
    """A deletion or insertion curve of one ranking, with random rankings as the floor.

    Attributes
    ----------
    kind : "deletion" (the top-k units ablated) or "insertion" (all units ablated but the top k)
    layer, mode, units, n_units : what was ablated
    ks : int array (n_k,), the k grid
    logit : (batch, n_k) the target score per example at each k
    agreement : (batch, n_k) 1.0 where the top-1 label equals the unablated label
    unablated_logit : (batch,) the target score without ablation
    target : (batch,) the class whose score is tracked (None for a callable target)
    random_logit, random_agreement : (seeds, batch, n_k), the same for each random ranking
        (a fresh random order per example and seed), or None without seeds
    seeds : the random seeds used

    The areas (``auc_*``) use the trapezoid rule over k rescaled so the grid spans [0, 1]:
    each area is the curve's average height over the grid (with the default grid, from no
    unit to every unit).
    """

    kind: str
    layer: str
    mode: str
    units: str
    n_units: int
    ks: np.ndarray
    logit: np.ndarray
    agreement: np.ndarray
    unablated_logit: np.ndarray
    target: Optional[np.ndarray]
    random_logit: Optional[np.ndarray]
    random_agreement: Optional[np.ndarray]
    seeds: list[int] = field(default_factory=list)

    FORMAT: ClassVar[str] = "conductance.ablation_curve/1"

    def _layer_names(self) -> list[str]:
        return [self.layer]

    def _check_layer(self, layer: Any) -> None:
        if layer is not None and self._name_of(layer) != self.layer:
            raise ConductanceError(f"this curve is of layer {self.layer!r} only, not {layer!r}")

    def top(self, k: int = 5, layer: Union[str, nn.Module, None] = None) -> list[ExampleArea]:
        """The ``k`` examples the ranking moves most: for a deletion curve the smallest area under
        the target score (it falls fastest as top units go), for an insertion curve the largest
        (it recovers fastest as top units come back).

        Parameters
        ----------
        k : int
            How many examples.
        layer : str, nn.Module or None
            A curve has one layer: ``layer`` may only name it (or be None).

        Returns
        -------
        list of :class:`ExampleArea`
            At most ``k`` rows (example, area, unablated score), most moved first.
        """
        self._check_layer(layer)
        area = self.auc_logit_per_example
        order = np.argsort(area if self.kind == "deletion" else -area, kind="stable")[:int(k)]
        return [ExampleArea(int(i), float(area[i]), float(self.unablated_logit[i])) for i in order]

    def to_dataframe(self) -> Any:
        """A tidy pandas table, one row per (ranking, seed, example, k): ``ranking`` ("ranking", or
        "random" for the random rankings), ``seed`` (None for the ranking), ``example``, ``k``,
        ``logit`` (target score) and ``agreement`` (1.0 where the top-1 label is unchanged). Needs pandas.

        Returns
        -------
        pandas.DataFrame
            ``(1 + seeds) * batch * n_k`` rows.
        """
        pd = pandas()
        batch, n_k = self.logit.shape

        def frame(ranking: str, seed: Any, logit: np.ndarray, agreement: np.ndarray) -> Any:
            return pd.DataFrame({"ranking": ranking, "seed": seed, "example": np.repeat(np.arange(batch), n_k),
                                 "k": np.tile(np.asarray(self.ks), batch), "logit": np.asarray(logit).reshape(-1),
                                 "agreement": np.asarray(agreement).reshape(-1)})

        frames = [frame("ranking", None, self.logit, self.agreement)]
        if self.random_logit is not None and self.random_agreement is not None:
            frames += [frame("random", seed, self.random_logit[i], self.random_agreement[i])
                       for i, seed in enumerate(self.seeds)]
        return pd.concat(frames, ignore_index=True)

    @property
    def mean_logit(self) -> np.ndarray:
        return self.logit.mean(0)

    @property
    def mean_agreement(self) -> np.ndarray:
        return self.agreement.mean(0)

    @property
    def random_mean_logit(self) -> Optional[np.ndarray]:
        return None if self.random_logit is None else self.random_logit.mean((0, 1))

    @property
    def random_mean_agreement(self) -> Optional[np.ndarray]:
        return None if self.random_agreement is None else self.random_agreement.mean((0, 1))

    @property
    def auc_logit(self) -> float:
        return float(_trapezoid(self.ks, self.mean_logit))

    @property
    def auc_agreement(self) -> float:
        return float(_trapezoid(self.ks, self.mean_agreement))

    @property
    def auc_logit_per_example(self) -> np.ndarray:
        return _trapezoid(self.ks, self.logit)

    @property
    def random_auc_logit(self) -> Optional[float]:
        mean = self.random_mean_logit
        return None if mean is None else float(_trapezoid(self.ks, mean))

    @property
    def random_auc_agreement(self) -> Optional[float]:
        mean = self.random_mean_agreement
        return None if mean is None else float(_trapezoid(self.ks, mean))

    @property
    def random_auc_logit_per_seed(self) -> Optional[np.ndarray]:
        return None if self.random_logit is None else _trapezoid(self.ks, self.random_logit.mean(1))

    def to_dict(self) -> dict:
        """Plain lists and numbers (JSON-ready): the settings, mean curves, per-example curves and areas.

        Returns
        -------
        dict
            The settings; ``mean_logit`` / ``mean_agreement`` (n_k,); ``logit`` / ``agreement``
            (batch, n_k); the random rankings' means (n_k,) and per-seed areas (seeds,), or None
            without seeds; the areas as floats.
        """
        def arr(a: Optional[np.ndarray]) -> Any:
            return None if a is None else np.asarray(a).tolist()

        return {
            "kind": self.kind, "layer": self.layer, "mode": self.mode, "units": self.units,
            "n_units": self.n_units, "ks": arr(self.ks), "seeds": list(self.seeds),
            "mean_logit": arr(self.mean_logit), "mean_agreement": arr(self.mean_agreement),
            "random_mean_logit": arr(self.random_mean_logit), "random_mean_agreement": arr(self.random_mean_agreement),
            "auc_logit": self.auc_logit, "auc_agreement": self.auc_agreement,
            "random_auc_logit": self.random_auc_logit, "random_auc_agreement": self.random_auc_agreement,
            "random_auc_logit_per_seed": arr(self.random_auc_logit_per_seed),
            "logit": arr(self.logit), "agreement": arr(self.agreement),
            "unablated_logit": arr(self.unablated_logit), "target": arr(self.target),
        }

    def plot(self, what: str = "logit", *, label: str = "ranking", random: bool = True, ax: Any = None,
             title: Optional[str] = None, **kwargs: Any) -> Any:
        """The mean curve against k, with the random rankings' mean and min-max band over seeds.

        To compare rankings on one axes, call it for each curve with the same ``ax``, a
        ``label`` per ranking and ``random=False`` after the first.

        Parameters
        ----------
        what : {"logit", "agreement"}
            The target score, or the share keeping the unablated top-1 label.
        label : str
            The legend entry of this ranking.
        random : bool
            Also draw the random rankings (when the curve has seeds).
        ax : matplotlib Axes, optional
            Draw into it; default a new figure.
        title : str, optional
            Default: kind, layer, mode and number of examples.
        **kwargs
            Go to the ranking's ``ax.plot`` (e.g. ``color="red"``), not to the random rankings'.

        Returns
        -------
        matplotlib.figure.Figure
            No pyplot figure is left open.
        """
        from ..plots import curves

        if what not in ("logit", "agreement"):
            raise ConductanceError(f"what must be 'logit' or 'agreement', got {what!r}")
        mine, rand = (self.logit, self.random_logit) if what == "logit" else (self.agreement, self.random_agreement)
        area = self.auc_logit if what == "logit" else self.auc_agreement
        series = {f"{label}, area {area:.3g}": (self.ks, mine.mean(0))}
        if random and rand is not None:
            rand_area = self.random_auc_logit if what == "logit" else self.random_auc_agreement
            # one mean curve per seed: the band shows how much random rankings vary
            series[f"random rankings, area {rand_area:.3g}"] = (self.ks, rand.mean(1))
        verb = "removed" if self.kind == "deletion" else "kept"
        if title is None:
            title = f"{self.kind} curve of {self.layer!r} ({self.mode} ablation, {self.logit.shape[0]} examples)"
        styles = {next(iter(series)): kwargs}
        return curves(series, f"top-k {self.units}s {verb}",
                      "mean target score" if what == "logit" else "share with unchanged top-1 label",
                      ax=ax, title=title, styles=styles)

    def summary(self) -> str:
        """A short text: the areas of the ranking and of the random rankings.

        Returns
        -------
        str
            Three lines: the settings, the target-score areas, the top-1 agreement areas.
        """
        ks = self.ks.tolist()
        grid = str(ks) if len(ks) <= 12 else str(ks[:6])[:-1] + f", ..., {ks[-1]}]"
        lines = [f"{self.kind} curve, layer {self.layer!r}, mode {self.mode!r}, {self.n_units} {self.units}s, "
                 f"{self.logit.shape[0]} examples, k = {grid}"]
        lines.append(f"  area, target logit:    ranking {self.auc_logit:.4g}"
                     + (f"   random {self.random_auc_logit:.4g} ({len(self.seeds)} seeds)" if self.seeds else ""))
        lines.append(f"  area, top-1 agreement: ranking {self.auc_agreement:.4g}"
                     + (f"   random {self.random_auc_agreement:.4g}" if self.seeds else ""))
        return "\n".join(lines)


def _curve(kind: str, model, inputs, layer, ranking, *, ks, mode, values, units, target, random_seeds, baselines,
           additional_forward_args, forward_kwargs, batch_size, expand_at_layer, progress) -> AblationCurve:
    check_progress(progress)
    s = _session(model, inputs, layer, mode, values, units, baselines, additional_forward_args, forward_kwargs,
                 batch_size, expand_at_layer)
    order = s.orders(ranking)
    limit = order.shape[1]
    if ks is None:
        ks = np.unique(np.round(np.linspace(0, limit, min(limit + 1, DEFAULT_CURVE_POINTS))).astype(int))
    ks_list = [s.check_k(k.item() if isinstance(k, (np.integer, torch.Tensor)) else k, limit, "k")
               for k in (ks.tolist() if isinstance(ks, (np.ndarray, torch.Tensor)) else list(ks))]
    if not ks_list:
        raise ConductanceError("ks is empty; give the numbers of units to ablate, e.g. ks=range(0, 11)")
    ks_list = sorted(set(ks_list))
    seeds = _seeds(random_seeds)
    tgt = resolve_target(target, s.output, s.batch, s.device)
    pos_list = [_positions(order, s.n_units)]
    pos_list += [_positions(_random_orders(s.batch, s.n_units, seed, s.device), s.n_units) for seed in seeds]
    with _counting(s, progress, f"{kind} curve", len(pos_list) * s.batch * len(ks_list)):
        scores = s.at_k(pos_list, ks_list, keep=(kind == "insertion"))  # (R, B, K, classes)
    R, B, K, C = scores.shape
    labels = scores.argmax(-1)
    agree = (labels == s.labels.view(1, B, 1)).double()
    base_scores = logits_of(s.output)
    if callable(tgt):
        rows_ex = torch.arange(B, device=scores.device).view(1, B, 1).expand(R, B, K).reshape(-1)
        flat = call_target(tgt, scores.reshape(R * B * K, C), rows_ex)
        if not isinstance(flat, torch.Tensor) or flat.shape != (R * B * K,):
            raise ConductanceError("the target callable must return one score per row of a (rows, classes) output")
        logit = flat.view(R, B, K)
        unabl = call_target(tgt, base_scores, torch.arange(B, device=scores.device))
        target_arr = None
    else:
        logit = scores.gather(-1, tgt.view(1, B, 1, 1).expand(R, B, K, 1)).squeeze(-1)
        unabl = base_scores.gather(1, tgt.view(B, 1)).squeeze(1)
        target_arr = tgt.cpu().numpy()
    logit_arr = logit.double().cpu().numpy()
    agree_arr = agree.cpu().numpy()
    return AblationCurve(kind=kind, layer=s.ref.name, mode=mode, units=units, n_units=s.n_units,
                         ks=np.asarray(ks_list), logit=logit_arr[0], agreement=agree_arr[0],
                         unablated_logit=unabl.detach().double().cpu().numpy(), target=target_arr,
                         random_logit=logit_arr[1:] if seeds else None,
                         random_agreement=agree_arr[1:] if seeds else None,
                         seeds=seeds).bind(model)


def deletion_curve(model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, ranking: Ranking, *,
                   ks: Optional[Iterable[int]] = None, mode: str = "zero", values: Any = None,
                   units: str = "neuron", target: Target = None, random_seeds: Union[int, Sequence[int]] = 5,
                   baselines: Any = None, additional_forward_args: Any = None,
                   forward_kwargs: Optional[dict] = None, batch_size: Optional[int] = None,
                   expand_at_layer: Optional[bool] = None, progress: Optional[bool] = None) -> AblationCurve:
    """The target score and top-1 agreement as each example's top-k units are ablated.

    A good ranking makes the deletion curve fall fast: its area is below the random area.
    Every (ranking, example, k) is one row of a batched forward pass (``progress`` counts them).

    Parameters
    ----------
    model : nn.Module
        Returns scores (batch, classes).
    inputs : Tensor, shape (batch, *input_shape)
    layer : str or nn.Module
        The layer whose units are ablated.
    ranking : Tensor, LayerResult or list of ints
        As in :func:`flip_count`: scores (batch, n_units) or unit indices, most important first.
    ks : iterable of int, optional
        The grid of k (0 <= k <= ranked units); default up to 33 evenly spaced values from 0 to
        all units.
    target : None, int, LongTensor (batch,) or callable
        None tracks each example's unablated top class; a callable maps scores
        (rows, classes) to (rows,).
    random_seeds : int or sequence of int
        How many random rankings (or a list of seeds) to evaluate alongside.
    mode, values, units, baselines, additional_forward_args, forward_kwargs, batch_size, expand_at_layer, progress
        As in :func:`flip_count`.

    Returns
    -------
    AblationCurve
        ``logit`` and ``agreement`` (batch, n_k), the random rankings' (seeds, batch, n_k), the areas.
    """
    return _curve("deletion", model, inputs, layer, ranking, ks=ks, mode=mode, values=values, units=units,
                  target=target, random_seeds=random_seeds, baselines=baselines,
                  additional_forward_args=additional_forward_args, forward_kwargs=forward_kwargs,
                  batch_size=batch_size, expand_at_layer=expand_at_layer, progress=progress)


def insertion_curve(model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, ranking: Ranking, *,
                    ks: Optional[Iterable[int]] = None, mode: str = "zero", values: Any = None,
                    units: str = "neuron", target: Target = None, random_seeds: Union[int, Sequence[int]] = 5,
                    baselines: Any = None, additional_forward_args: Any = None,
                    forward_kwargs: Optional[dict] = None, batch_size: Optional[int] = None,
                    expand_at_layer: Optional[bool] = None, progress: Optional[bool] = None) -> AblationCurve:
    """Like :func:`deletion_curve`, but every unit is ablated except each example's top k.

    A good ranking makes the insertion curve rise fast: its area is above the random area.

    Parameters
    ----------
    model, inputs, layer, ranking, ks, target, random_seeds
        As in :func:`deletion_curve`; ``k`` counts the units kept.
    mode, values, units, baselines, additional_forward_args, forward_kwargs, batch_size, expand_at_layer, progress
        As in :func:`flip_count`.

    Returns
    -------
    AblationCurve
        ``kind == "insertion"``; ``logit`` and ``agreement`` (batch, n_k).
    """
    return _curve("insertion", model, inputs, layer, ranking, ks=ks, mode=mode, values=values, units=units,
                  target=target, random_seeds=random_seeds, baselines=baselines,
                  additional_forward_args=additional_forward_args, forward_kwargs=forward_kwargs,
                  batch_size=batch_size, expand_at_layer=expand_at_layer, progress=progress)
