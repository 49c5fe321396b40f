"""The image experiments' measurements: GoogLeNet weights, the per-photo analysis and the Fashion-MNIST
ablation and feature-selection protocols (everything that runs a network and returns numbers).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, cast

import torch
from torch import nn

import conductance as cd

from ...errors import ConductanceError, ConductanceWarning
from ...progress import Progress
from ...result import LayerResult
from .config import BLACK, MEASURES


def load_googlenet(path: str) -> nn.Module:
    """torchvision GoogLeNet with the pretrained weights in the state-dict file ``path``:
    :func:`conductance.assets.googlenet` with ``weights_path`` (see there for the file format and
    the errors).

    Parameters
    ----------
    path : str

    Returns
    -------
    nn.Module
    """
    from ... import assets

    return assets.googlenet(weights_path=path)


@dataclass
class PhotoAnalysis:
    """Everything measured on a few photos with one ImageNet network.

    ``labels`` (photos,), ``logits`` of the top label, ``output_diff`` F(x) - F(x'); ``importance``
    {measure: LayerResult over ``blocks``, units="channel"}; ``pixel`` (photos, top, 3, H, W): the
    per-pixel conductance of each photo's top filters at ``pixel_block`` (``pixel_filters`` (photos,
    top)); ``pixel_sum_error`` (photos, top): |sum over pixels - filter conductance| / |filter
    conductance|; ``pixel_unit_error`` (photos, top): each map's estimated relative L2 error
    (``unit_error`` of :func:`conductance.neuron_conductance`); ``ablation`` {block: AblationSummary}
    with filters set to zero, ``ablation_baseline``
    the same with filters set to their value at the baseline photo.
    """

    names: list[str]
    images: torch.Tensor
    labels: torch.Tensor
    label_names: list[str]
    logits: torch.Tensor
    output_diff: torch.Tensor
    blocks: list[str]
    importance: dict
    pixel_block: str
    pixel_filters: torch.Tensor
    pixel: torch.Tensor
    pixel_sum_error: torch.Tensor
    pixel_unit_error: torch.Tensor
    ablation: dict
    ablation_baseline: dict
    seconds: dict
    warnings: list[str]


def warning_messages(records: list) -> list[str]:
    """The distinct messages of caught warnings, as "Category: message", long lists of numbers shortened.

    Parameters
    ----------
    records : list of warnings.WarningMessage

    Returns
    -------
    list of str
        In first-seen order.
    """
    import re

    seen = []
    for w in records:
        # the per-example point counts of a warning can list hundreds of numbers: keep the message readable
        text = re.sub(r"\[[0-9, ]{60,}\]", "[...]", f"{w.category.__name__}: {w.message}")
        if text not in seen:
            seen.append(text)
    return seen


def _importance(model: nn.Module, x: torch.Tensor, layers: list[str], measures: list[str],
                **kwargs: Any) -> dict[str, LayerResult]:
    """``cd.layer_importance`` with a list of measures: {measure: LayerResult over ``layers``}."""
    return cast(dict[str, LayerResult], cd.layer_importance(model, x, layers, measures, **kwargs))


def analyse_photos(model: nn.Module, x: torch.Tensor, names: Sequence[str], blocks: Sequence[str], pixel_block: str,
                   *, top_filters: int = 3, measures: Sequence[str] = MEASURES, rule: Optional[dict] = None,
                   pixel_rule: Optional[dict] = None, baselines: Any = BLACK, random_seeds: int = 1,
                   max_units: Optional[int] = None, classes: Optional[Sequence[str]] = None,
                   seed: int = 0, progress: Optional[bool] = None) -> PhotoAnalysis:
    """Filter conductance and the other measures at ``blocks``, per-pixel maps, flip counts.

    Parameters
    ----------
    model : an ImageNet classifier in eval mode, (photos, 3, H, W) -> (photos, 1000)
    x : Tensor (photos, 3, H, W), normalised photos
    blocks : cut layers (block outputs) to study; ``pixel_block`` must be one of them
    rule, pixel_rule : integration rule of the layer measures and of the per-pixel maps
    max_units : longest prefix of filters tried in the flip counts (default: all)
    random_seeds, seed : number of random rankings per photo, and the seed they derive from
    baselines : the baseline image (default a black photo in the normalised space)
    progress : bars on stderr (None: when stderr is a terminal): the path points of the measures, the
        photos of the per-pixel maps, the ablated rows of each block's flip counts

    Returns
    -------
    PhotoAnalysis
    """
    if pixel_block not in blocks:
        raise ConductanceError(f"pixel_block {pixel_block!r} must be one of the blocks {list(blocks)}")
    rule = dict(rule or {"n_steps": 32, "method": "gausslegendre"})
    pixel_rule = dict(pixel_rule or {"n_steps": 32, "method": "gausslegendre"})
    seconds = {}
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", ConductanceWarning)
        with torch.no_grad():
            out = model(x)
        labels = out.argmax(1)
        start = time.perf_counter()
        importance = _importance(model, x, list(blocks), list(measures), units="channel", baselines=baselines,
                                 progress=progress, **rule)
        seconds["measures"] = time.perf_counter() - start
        cond = importance["conductance"]
        start = time.perf_counter()
        # one neuron_conductance call per photo: each photo has its own top filters
        filt, maps, errs, map_errs = [], [], [], []
        bar = Progress(progress, x.shape[0], f"per-pixel maps of {pixel_block}", "photos")
        for i in range(x.shape[0]):
            top = torch.argsort(cond[pixel_block][i], descending=True)[:top_filters]
            # the report shows each map's own estimate, so its warning is not needed here
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConductanceWarning)
                per_pixel, map_err = cast(tuple[torch.Tensor, torch.Tensor], cd.neuron_conductance(
                    model, x[i:i + 1], pixel_block, [int(c) for c in top], units="channel", baselines=baselines,
                    progress=False, return_unit_error=True, **pixel_rule))
            per_pixel = per_pixel[:, 0]
            sums = per_pixel.flatten(1).sum(1)
            want = cond[pixel_block][i, top]
            filt.append(top)
            maps.append(per_pixel)
            map_errs.append(map_err[:, 0])
            errs.append((sums - want).abs() / want.abs().clamp_min(1e-12))
            bar.update(1)
        bar.close()
        seconds["pixel maps"] = time.perf_counter() - start
        start = time.perf_counter()
        ablation, ablation_baseline = {}, {}
        seeds = _random_seeds(random_seeds, seed)
        for block in blocks:
            rankings = {m: importance[m] for m in measures}
            ablation[block] = cd.compare_rankings(model, x, block, rankings, units="channel",
                                                  random_seeds=seeds, max_units=max_units, progress=progress)
            # the filter set to its value at the baseline photo: the change conductance attributes
            ablation_baseline[block] = cd.compare_rankings(model, x, block, rankings, units="channel", mode="baseline",
                                                           baselines=baselines, random_seeds=seeds,
                                                           max_units=max_units, progress=progress)
        seconds["ablation"] = time.perf_counter() - start
    classes = list(classes) if classes is not None else [str(i) for i in range(out.shape[1])]
    return PhotoAnalysis(names=list(names), images=x, labels=labels, label_names=[classes[int(c)] for c in labels],
                         logits=out[torch.arange(x.shape[0]), labels], output_diff=cond.output_diff,
                         blocks=list(blocks), importance=importance, pixel_block=pixel_block,
                         pixel_filters=torch.stack(filt), pixel=torch.stack(maps), pixel_sum_error=torch.stack(errs),
                         pixel_unit_error=torch.stack(map_errs),
                         ablation=ablation, ablation_baseline=ablation_baseline, seconds=seconds,
                         warnings=warning_messages(records))


def _random_seeds(n: int, seed: int) -> list[int]:
    """Seeds of the random rankings: 0..n-1 for seed 0, a disjoint block for every other seed."""
    return [seed * 1000 + i for i in range(n)]


def _consistent_filter(a: PhotoAnalysis, k: int = 5) -> tuple[int, int]:
    """The filter of ``pixel_block`` found most often among the photos' top-k by conductance (and how often)."""
    values = a.importance["conductance"][a.pixel_block]
    counts = torch.zeros(values.shape[1], dtype=torch.long)
    for row in values:
        counts[torch.argsort(row, descending=True)[:k]] += 1
    best = int(torch.argmax(counts))  # ties: lowest index
    return best, int(counts[best])


def _importance_many(model: nn.Module, x: torch.Tensor, layers: Sequence[str], measures: Sequence[str],
                     rule: dict, batch: int = 50, progress: Optional[bool] = None) -> dict:
    """{measure: {layer: (n, channels)}} plus completeness errors {layer: (n,)} and points (n,), in batches."""
    out: dict[str, dict[str, list[torch.Tensor]]] = {m: {ln: [] for ln in layers} for m in measures}
    errors: dict[str, list[torch.Tensor]] = {ln: [] for ln in layers}
    unit_errors: dict[str, list[torch.Tensor]] = {ln: [] for ln in layers}
    points = []
    bar = Progress(progress, x.shape[0], f"{', '.join(measures)} of {', '.join(layers)}", "images")
    for start in range(0, x.shape[0], batch):
        r = _importance(model, x[start:start + batch], list(layers), list(measures), units="channel",
                        baselines=0.0, progress=False, **rule)
        bar.update(r["conductance"].n_points.shape[0])
        for m in measures:
            for ln in layers:
                out[m][ln].append(r[m][ln])
        for ln in layers:
            errors[ln].append(r["conductance"].relative_error[ln])
            unit_errors[ln].append(r["conductance"].unit_error[ln])
        points.append(r["conductance"].n_points)
    bar.close()
    return {"values": {m: {ln: torch.cat(v) for ln, v in d.items()} for m, d in out.items()},
            "relative_error": {ln: torch.cat(v) for ln, v in errors.items()},
            "unit_error": {ln: torch.cat(v) for ln, v in unit_errors.items()}, "n_points": torch.cat(points)}


def fashion_ablation(model: nn.Module, x: torch.Tensor, layers: Sequence[str], *, measures: Sequence[str] = MEASURES,
                     rule: Optional[dict] = None, random_seeds: int = 2,
                     modes: Sequence[str] = ("zero", "baseline"), seed: int = 0,
                     progress: Optional[bool] = None) -> dict:
    """The paper's ablation protocol on images x (n, 1, 28, 28), for each layer.

    Returns {"summaries": {mode: {layer: AblationSummary}}, "relative_error": {layer: (n,)}, "n_points":
    (n,), "seconds": float}. Rankings per image from ``cd.layer_importance`` (units="channel", black
    baseline, top label); filters removed cumulatively, set to zero ("zero", the paper's removal) or to
    their value at the black image ("baseline").

    Parameters
    ----------
    model : nn.Module
    x : Tensor, shape (n, 1, 28, 28)
    layers : sequence of str
    measures : sequence of str
    rule : dict, optional
        Keywords of the rule (``method``, ``n_steps``, ``tolerance``, ...), passed on to the attribution calls.
    random_seeds : int
    modes : sequence of str
    seed : int
    progress : bool, optional
        Bars on stderr (None: when stderr is a terminal): the images ranked, then the ablated rows of
        each (layer, mode).

    Returns
    -------
    dict
    """
    rule = dict(rule or {"n_steps": 32, "method": "gausslegendre"})
    start = time.perf_counter()
    imp = _importance_many(model, x, layers, measures, rule, progress=progress)
    summaries: dict[str, dict[str, Any]] = {mode: {} for mode in modes}
    for layer in layers:
        for mode in modes:
            summaries[mode][layer] = cd.compare_rankings(model, x, layer,
                                                         {m: imp["values"][m][layer] for m in measures},
                                                         units="channel", mode=mode, baselines=0.0,
                                                         random_seeds=_random_seeds(random_seeds, seed),
                                                         progress=progress)
    return {"summaries": summaries, "relative_error": imp["relative_error"], "unit_error": imp["unit_error"],
            "n_points": imp["n_points"],
            "seconds": time.perf_counter() - start}


def _split_per_class(labels: torch.Tensor, n_select: int, n_evaluate: int, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sel, ev = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        if idx.numel() < n_select + n_evaluate:
            raise ConductanceError(f"class {c} has {idx.numel()} images, fewer than {n_select} + {n_evaluate}")
        sel.append(idx[:n_select])
        ev.append(idx[n_select:n_select + n_evaluate])
    return torch.cat(sel), torch.cat(ev)


def fashion_selection(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: Sequence[str], *, n_select: int,
                      n_evaluate: int, ks: Sequence[int], measures: Sequence[str] = MEASURES,
                      rule: Optional[dict] = None, random_seeds: int = 5, seed: int = 0,
                      progress: Optional[bool] = None) -> dict:
    """The feature-selection task: per class ``n_select`` images rank units, ``n_evaluate`` images test.

    Returns {"results": {layer: FeatureSelectionResult}, "relative_error": {layer: (n_select * classes,)},
    "seconds": float}. The completeness errors are those of conductance on the selection images, each
    explaining its own label's logit, with the same rule as the selection.

    Parameters
    ----------
    model : nn.Module
    x : Tensor, shape (n, 1, 28, 28)
    y : LongTensor, shape (n,)
    layers : sequence of str
    n_select, n_evaluate : int
        Images per class.
    ks : sequence of int
        Units per class to try.
    measures : sequence of str
    rule : dict, optional
    random_seeds : int
    seed : int
    progress : bool, optional
        Bars on stderr (None: when stderr is a terminal): the ranking images of each layer's feature
        selection, then those of the completeness check.

    Returns
    -------
    dict
    """
    rule = dict(rule or {"n_steps": 32, "method": "gausslegendre"})
    start = time.perf_counter()
    select, evaluate = _split_per_class(y, n_select, n_evaluate, seed)
    used = torch.cat([select, evaluate])
    xs, ys = x[used], y[used]
    split = (torch.arange(select.numel()), torch.arange(select.numel(), used.numel()))
    results = {}
    for layer in layers:
        results[layer] = cd.feature_selection(model, xs, ys, layer, measures=list(measures), ks=list(ks), split=split,
                                              units="channel", random_seeds=random_seeds,
                                              importance_kwargs={"baselines": 0.0, **rule}, seed=seed, batch_size=100,
                                              progress=progress)
    # the completeness error of the conductance runs the ranking came from (same examples, targets, rule)
    errors: dict[str, list[torch.Tensor]] = {ln: [] for ln in layers}
    unit_errors: dict[str, list[torch.Tensor]] = {ln: [] for ln in layers}
    xsel, ysel = xs[split[0]], ys[split[0]]
    bar = Progress(progress, xsel.shape[0], f"completeness of the selection rankings of {', '.join(layers)}",
                   "images")
    for s in range(0, xsel.shape[0], 100):
        r = cd.layer_conductance(model, xsel[s:s + 100], list(layers), target=ysel[s:s + 100], units="channel",
                                 baselines=0.0, progress=False, **rule)
        bar.update(r.n_points.shape[0])
        for ln in layers:
            errors[ln].append(r.relative_error[ln])
            unit_errors[ln].append(r.unit_error[ln])
    bar.close()
    return {"results": results, "relative_error": {ln: torch.cat(v) for ln, v in errors.items()},
            "unit_error": {ln: torch.cat(v) for ln, v in unit_errors.items()},
            "seconds": time.perf_counter() - start}


def consistent_filter_maps(model: nn.Module, a: PhotoAnalysis, pixel_rule: dict, baselines: Any,
                           progress: Optional[bool] = None) -> Optional[tuple[int, int, torch.Tensor]]:
    """Per-pixel conductance of the filter of ``a.pixel_block`` most often among the photos' top 5.

    Parameters
    ----------
    model : nn.Module
    a : PhotoAnalysis
    pixel_rule : dict
        Integration settings of the per-pixel maps.
    baselines : float or torch.Tensor
    progress : bool, optional

    Returns
    -------
    (channel, count, maps) or None
        The filter, for how many photos it is in the top 5, and its maps of shape (photos, 3, H, W);
        None with fewer than three photos (a filter common to two photos says little).
    """
    if len(a.names) < 3:
        return None
    channel, count = _consistent_filter(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConductanceWarning)
        per_pixel = cd.neuron_conductance(model, a.images, a.pixel_block, [channel], units="channel",
                                          baselines=baselines, progress=progress, **pixel_rule)[0]
    return channel, count, per_pixel
