"""Pruning study: conductance against the criteria pruners use, on networks trained on Fashion-MNIST.

``conductance reproduce pruning --out DIR [--quick]``. For two networks trained in the project on
real Fashion-MNIST (the Inception-style network of :mod:`..fashion_inception` and the small
ResNet-style :class:`FashionResNet` of :mod:`.network`, both cached), every criterion scores the channels
of every convolution on the same calibration images; Torch-Pruning's ``MetaPruner`` removes a share
of each layer's channels; the test accuracy is measured right after pruning (with and without the
removed channels' means folded into the next layers' biases) and after one short fine-tuning epoch.
EfficientNet-Lite0 (real ImageNet weights) is pruned the same way with bundled photos as the
calibration set; no ImageNet images install here, so it reports how often the pruned network keeps
the unpruned network's top-1 label on other photos, and how its logit margins change.

The package: :mod:`.network` (the ResNet), :mod:`.config` (settings), :mod:`.compute` (the
measurements), :mod:`.sections` (the report sections made from them); :func:`run` only orders them.
Every public name of the former module ``pruning`` stays importable from here.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from .. import fashion_inception as fi
from .compute import classifier, fine_tune, make_importance, prune_copy, study_efficientnet, study_network  # noqa: F401
from .config import CRITERIA, EFFNET_CAL, EFFNET_HELD_OUT, FULL, PARTS, QUICK, SIGNED_STATISTIC  # noqa: F401
from .network import RESNET_FULL, RESNET_QUICK, RESNET_VERSION, FashionResNet, ResNetConfig, load_or_train_resnet  # noqa: F401
from .sections import efficientnet_section, network_section

__all__ = ["FashionResNet", "ResNetConfig", "RESNET_QUICK", "RESNET_FULL", "load_or_train_resnet", "CRITERIA",
           "make_importance", "classifier", "prune_copy", "fine_tune", "run", "QUICK", "FULL"]


def run(report: Any, *, quick: bool = False, seed: int = 0, log: Callable[[str], None] = print,
        parts: tuple = PARTS, progress: Optional[bool] = None, **_: Any) -> dict:
    """Add the pruning study to ``report``; returns its numbers.

    ``parts``: which of :data:`PARTS` to run (``CONDUCTANCE_PRUNING_PARTS=inception,resnet`` from the
    command line). Each finished part is also written to ``$CONDUCTANCE_PRUNING_JSON`` when set.

    Parameters
    ----------
    report : Report
    quick : bool
    seed : int
    log : callable str -> None
    parts : tuple of str
    progress : bool or None
        Bars counting the pruned networks of each part; None: when stderr is a terminal.

    Returns
    -------
    dict
    """
    torch.manual_seed(seed)
    settings = QUICK if quick else FULL
    env_parts = os.environ.get("CONDUCTANCE_PRUNING_PARTS")
    if env_parts:
        parts = tuple(p.strip() for p in env_parts.split(",") if p.strip())
    dump = os.environ.get("CONDUCTANCE_PRUNING_JSON")
    results: dict = {}

    def save() -> None:
        if dump:
            from ..report import to_jsonable

            with open(dump, "w") as f:
                json.dump(to_jsonable(results), f, indent=1)

    nets = [("inception", lambda: fi.load_or_train(settings["inception"], log=log)),
            ("resnet", lambda: load_or_train_resnet(settings["resnet"], log=log))]
    for name, load in nets:
        if name not in parts:
            continue
        trained = load()
        log(f"{name}: test accuracy {trained.test_accuracy:.4f} ({trained.path})")
        start = time.perf_counter()
        res = study_network(name, trained.model, settings, log, seed=seed, progress=progress)
        res["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = res
        network_section(report, name, res, settings)
        save()
    if "efficientnet" not in parts:
        return results
    start = time.perf_counter()
    try:
        eff = study_efficientnet(settings, log, progress=progress)
        eff["seconds"] = round(time.perf_counter() - start, 1)
        results["efficientnet"] = eff
        efficientnet_section(report, eff)
        save()
    except ImportError as exc:
        log(f"efficientnet part skipped: {exc}")
    return results
