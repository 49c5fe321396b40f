"""The pruning study's measurements: channel importance of every criterion, pruning with Torch-Pruning,
fine-tuning, and the accuracy (or label agreement) of every pruned network.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ...progress import Progress
from .. import fashion_inception as fi
from .config import CRITERIA, EFFNET_CAL, EFFNET_HELD_OUT, SIGNED_STATISTIC
from .network import _train_epochs


def make_importance(criterion: str, calibration: list, **conductance_options: Any) -> Any:
    """A fresh Torch-Pruning importance for ``criterion`` (one of :data:`CRITERIA`).

    Parameters
    ----------
    criterion : str
    calibration : list of Tensor
        Calibration batches, each (batch, *input_shape).
    **conductance_options
        For :class:`conductance.pruning.ConductanceImportance`.

    Returns
    -------
    A Torch-Pruning importance object.
    """
    import torch_pruning as tp

    from ...pruning import CalibratedTaylorImportance, ConductanceImportance

    if criterion == "conductance":
        return ConductanceImportance(calibration, statistic=SIGNED_STATISTIC, **conductance_options)
    if criterion == "conductance_class_abs":          # the class-averaged statistic, for comparison
        return ConductanceImportance(calibration, statistic="class_abs", **conductance_options)
    if criterion == "grad_x_activation":
        return ConductanceImportance(calibration, "grad_x_activation", statistic=SIGNED_STATISTIC)
    if criterion == "activation":
        return ConductanceImportance(calibration, "activation", statistic="rms")
    if criterion == "taylor":
        return CalibratedTaylorImportance(calibration)
    if criterion == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if criterion == "random":
        return tp.importance.RandomImportance()
    raise ValueError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")


def classifier(model: nn.Module) -> nn.Module:
    """The last linear layer of ``model`` (its classifier, whose outputs are never pruned).

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    nn.Linear
    """
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError("the model has no linear classifier to keep")
    return linear[-1]


def prune_copy(model: nn.Module, importance: Any, ratio: float, example: torch.Tensor, *, compensate=None,
               fill_data=None, global_pruning: bool = False, seed: int = 0) -> nn.Module:
    """An unpruned copy of ``model`` pruned with ``importance`` (fitted on ``model``; bound to the copy).

    Every convolution loses ``ratio`` of its output channels; the classifier keeps its outputs.

    Parameters
    ----------
    model : nn.Module
    importance : a fitted importance (see :func:`make_importance`)
    ratio : float
        Share of channels removed, in [0, 1).
    example : Tensor, shape (1, *input_shape)
        Traces the dependency graph.
    compensate, fill_data, global_pruning
        As for :func:`conductance.pruning.prune`.
    seed : int

    Returns
    -------
    nn.Module
        The pruned copy; ``model`` is left as it was.
    """
    from ...pruning import prune

    m = copy.deepcopy(model).eval()
    if hasattr(importance, "bind") and getattr(importance, "_model", None) is not None:
        importance.bind(m)
    torch.manual_seed(seed)                          # the random criterion draws its scores here
    prune(m, example, importance, pruning_ratio=ratio, global_pruning=global_pruning, ignored_layers=[classifier(m)],
          compensate=compensate, fill_data=fill_data)
    return m.eval()


def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """One epoch of AdamW (constant ``lr``, batch 64) on (x, y), BatchNorm re-estimated; eval mode.

    Parameters
    ----------
    model : nn.Module
    x : Tensor, shape (n, 1, 28, 28)
    y : LongTensor, shape (n,)
    lr : float
    seed : int

    Returns
    -------
    nn.Module
        ``model``, trained in place.
    """
    _train_epochs(model, x, y, epochs=1, batch_size=64, lr=lr, weight_decay=1e-4, seed=seed, one_cycle=False)
    return model.eval()


def _completeness(importance: Any) -> dict:
    """Errors of the conductance scores per layer: completeness (cut layers only: ``mean``, ``max``,
    ``above``) and the per-unit error estimate (every layer: ``unit_mean``, ``unit_max``, ``unit_above``)."""
    result = getattr(importance, "result", None)
    if result is None:
        return {}
    out = {}
    for layer, v in result.completeness().items():
        row: dict[str, Any] = {}
        if v.get("is_cut"):
            row.update(mean=round(float(v["mean"]), 5), max=round(float(v["max"]), 5), above=int(v["above"]))
        if "unit_error_mean" in v:
            row.update(unit_mean=round(float(v["unit_error_mean"]), 5), unit_max=round(float(v["unit_error_max"]), 5),
                       unit_above=int(v["unit_error_above"]))
        if row:
            out[layer] = row
    return out


def _runs(criterion: str, settings: dict) -> range:
    """The seeds a criterion is run with: several draws of random channels, one run of any other."""
    return range(settings["seeds"] if criterion == "random" else 1)


def study_network(name: str, model: nn.Module, settings: dict, log: Callable[[str], None], seed: int = 0,
                  progress: Optional[bool] = None) -> dict:
    """Every criterion at every ratio on one Fashion-MNIST network; returns the numbers.

    Parameters
    ----------
    name : str
        The network's name in the numbers and messages.
    model : nn.Module
    settings : dict
        Ratios, criteria and sizes of the run (quick or full).
    log : callable str -> None
    seed : int
    progress : bool or None
        A bar counting the pruned networks (per criterion, seed and ratio, and the global 50%);
        None: when stderr is a terminal.

    Returns
    -------
    dict
    """
    x_cal, y_cal = fi.fashion_tensors("train", settings["n_cal"])
    calibration = [(x_cal[s:s + 64], y_cal[s:s + 64]) for s in range(0, settings["n_cal"], 64)]
    x_all, y_all = fi.fashion_tensors("train")
    ft = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(seed + 1))[:settings["n_ft"]]
    x_ft, y_ft = x_all[ft], y_all[ft]
    x_te, y_te = fi.fashion_tensors("test", settings["n_test"])
    example = x_cal[:1]
    out: dict = {"base_accuracy": fi.evaluate(model, x_te, y_te), "ratios": settings["ratios"], "criteria": {}}
    n_runs = sum(len(_runs(c, settings)) for c in CRITERIA)
    bar = Progress(progress, n_runs * (len(settings["ratios"]) + 1), f"pruning the {name}", "networks")
    for criterion in CRITERIA:
        runs = _runs(criterion, settings)
        rows: dict = {"pruned": [], "pruned_mean_fill": [], "fine_tuned": [], "global50": []}
        imp = make_importance(criterion, calibration, n_steps=settings["n_steps"])
        seconds = None
        if hasattr(imp, "fit"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                imp.fit(model)
            seconds = imp.seconds
            out.setdefault("warnings", {})[criterion] = sorted({str(w.message)[:200] for w in caught})
        for r in runs:
            acc, acc_fill, acc_ft = [], [], []
            for ratio in settings["ratios"]:
                start = time.perf_counter()
                pruned = prune_copy(model, imp, ratio, example, seed=seed + r)
                if seconds is None and criterion != "random":
                    seconds = time.perf_counter() - start
                acc.append(fi.evaluate(pruned, x_te, y_te))
                filled = prune_copy(model, imp, ratio, example, compensate="mean", fill_data=calibration, seed=seed + r)
                acc_fill.append(fi.evaluate(filled, x_te, y_te))
                acc_ft.append(fi.evaluate(fine_tune(pruned, x_ft, y_ft, seed=seed + r), x_te, y_te))
                bar.update(1)
            glob = prune_copy(model, imp, 0.5, example, global_pruning=True, seed=seed + r)
            bar.update(1)
            rows["pruned"].append(acc)
            rows["pruned_mean_fill"].append(acc_fill)
            rows["fine_tuned"].append(acc_ft)
            rows["global50"].append(fi.evaluate(glob, x_te, y_te))
        rows["score_seconds"] = seconds
        if criterion == "conductance":
            rows["completeness"] = _completeness(imp)
        out["criteria"][criterion] = rows
        log(f"{name}: {criterion}: pruned {np.round(np.mean(rows['pruned'], 0), 3).tolist()} "
            f"mean-filled {np.round(np.mean(rows['pruned_mean_fill'], 0), 3).tolist()} "
            f"fine-tuned {np.round(np.mean(rows['fine_tuned'], 0), 3).tolist()} "
            f"(scores {seconds and round(seconds, 2)} s)")
    bar.close()
    return out


def _views(names: list) -> torch.Tensor:
    """Each photo at three scales (resize 256, 288, 320; crop 224) and mirrored: (6 * len(names), 3, 224, 224)."""
    from ...assets import photo_batch

    views = [photo_batch(names, resize=r) for r in (256, 288, 320)]
    x = torch.cat(views)
    return torch.cat([x, x.flip(-1)])


def study_efficientnet(settings: dict, log: Callable[[str], None], progress: Optional[bool] = None) -> dict:
    """EfficientNet-Lite0 pruned by each criterion; top-1 agreement and logit margins on held-out photos.

    Parameters
    ----------
    settings : dict
    log : callable str -> None
    progress : bool or None
        A bar counting the pruned networks; None: when stderr is a terminal.

    Returns
    -------
    dict
    """
    from ...assets import efficientnet_lite0

    model = efficientnet_lite0().eval()
    x_cal, x_held = _views(EFFNET_CAL), _views(EFFNET_HELD_OUT)
    with torch.no_grad():
        y_cal = model(x_cal).argmax(1)           # no labels: the unpruned network's own top-1
        ref = model(x_held)
    top = ref.argmax(1)
    calibration = [(x_cal[s:s + 8], y_cal[s:s + 8]) for s in range(0, x_cal.shape[0], 8)]

    def margin(logits: torch.Tensor) -> torch.Tensor:
        others = logits.clone()
        others[torch.arange(len(top)), top] = -float("inf")
        return logits[torch.arange(len(top)), top] - others.max(1).values

    base_margin = margin(ref)
    out: dict = {"ratios": settings["effnet_ratios"], "calibration_photos": EFFNET_CAL,
                 "held_out_photos": EFFNET_HELD_OUT,
                 "views": int(x_held.shape[0]), "base_mean_margin": float(base_margin.mean()), "criteria": {}}
    n_runs = sum(len(_runs(c, settings)) for c in CRITERIA)
    bar = Progress(progress, n_runs * len(settings["effnet_ratios"]), "pruning EfficientNet-Lite0", "networks")
    for criterion in CRITERIA:
        imp = make_importance(criterion, calibration, n_steps=settings["n_steps"])
        seconds = None
        if hasattr(imp, "fit"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp.fit(model)
            seconds = imp.seconds
        runs = _runs(criterion, settings)
        rows: dict = {"agreement": [], "margin_change": [], "agreement_mean_fill": []}
        for r in runs:
            agree, dm, agree_fill = [], [], []
            for ratio in settings["effnet_ratios"]:
                pruned = prune_copy(model, imp, ratio, x_cal[:1], seed=r)
                with torch.no_grad():
                    logits = pruned(x_held)
                agree.append(float((logits.argmax(1) == top).float().mean()))
                dm.append(float((margin(logits) - base_margin).mean()))
                filled = prune_copy(model, imp, ratio, x_cal[:1], compensate="mean", fill_data=calibration, seed=r)
                with torch.no_grad():
                    agree_fill.append(float((filled(x_held).argmax(1) == top).float().mean()))
                bar.update(1)
            rows["agreement"].append(agree)
            rows["margin_change"].append(dm)
            rows["agreement_mean_fill"].append(agree_fill)
        rows["score_seconds"] = seconds
        if criterion == "conductance":
            rows["completeness"] = _completeness(imp)
        out["criteria"][criterion] = rows
        log(f"efficientnet: {criterion}: agreement {np.round(np.mean(rows['agreement'], 0), 3).tolist()} "
            f"mean-filled {np.round(np.mean(rows['agreement_mean_fill'], 0), 3).tolist()}")
    bar.close()
    return out
