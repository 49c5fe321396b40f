"""The paper's image experiments, on the real networks and data that install offline.

The paper ("How Important Is a Neuron?", Dhamdhere, Sundararajan, Yan) studies Inception v1
(GoogLeNet) trained on ImageNet, on ImageNet validation images. Here:

* per-photo analysis (top label, filter conductance at several blocks with the completeness error,
  per-pixel conductance of the top filters as in the paper's Figure 1, and the ablation flip count
  of every measure) on EfficientNet-Lite0 with its real ImageNet weights and the eight real photos
  bundled with scikit-image, scikit-learn and matplotlib (:mod:`conductance.assets`); and on
  torchvision's GoogLeNet too when the user gives a file of its pretrained weights;
* the protocols that need many labelled images (the ablation study over 100 images per layer, the
  feature-selection task with 30 selection and 20 evaluation images per class) on a small
  Inception-style network trained on Fashion-MNIST in the project
  (:mod:`conductance.experiments.fashion_inception`).

Entry point: :func:`run` (``conductance reproduce image --out DIR [--quick] [--weights FILE]``). The package:
:mod:`.config` (the quick and full settings), :mod:`.compute` (the measurements), :mod:`.sections` and
:mod:`.sections_photos` (the report sections made from them); :func:`run` only orders them. Every public
name of the former module ``image`` stays importable from here.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from typing import Optional

import torch

from ...errors import ConductanceWarning
from .. import fashion_inception as fi
from .compute import (
    PhotoAnalysis,
    analyse_photos,
    consistent_filter_maps,
    fashion_ablation,
    fashion_selection,
    load_googlenet,
)
from .config import BLACK, MEASURES, PAPER_ABLATION, ImageSettings, settings_for
from .sections import (
    ablation_section,
    fashion_model_section,
    selection_section,
    settings_section,
    warnings_section,
)
from .sections_photos import COARSE_MAP, SMOOTH_HIDE_BELOW, SMOOTH_PIXELS, photo_sections  # noqa: F401

__all__ = ["ImageSettings", "settings_for", "load_googlenet", "PhotoAnalysis", "analyse_photos",
           "fashion_ablation", "fashion_selection", "run", "PAPER_ABLATION", "MEASURES"]


def _log(message: str) -> None:
    """Progress on stderr (the full run takes minutes)."""
    import sys

    print(f"[image {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(report, *, quick: bool = False, weights: Optional[str] = None, seed: int = 0,
        progress: Optional[bool] = None) -> None:
    """Add the image experiments to ``report`` (see the module docstring).

    Parameters
    ----------
    report : conductance.experiments.report.Report
    quick : reduced sizes (2 photos, 2 blocks, a small training run, 20 ablation images, 10 + 6
        selection images per class); under a minute including training from an empty cache. The
        quick run uses one torch thread: its small batches gain little from more, and on a machine
        busy with other processes two threads made it ten times slower.
    weights : path of a torchvision GoogLeNet state dict; when given, the per-photo analysis also
        runs on GoogLeNet with those weights
    seed : seeds the training, the choice of Fashion-MNIST images and the random rankings
    progress : tqdm bars on stderr for the long loops (training batches, path points, photos, ablated
        rows, images); None: when stderr is a terminal
    """
    old = torch.get_num_threads()
    if quick:
        torch.set_num_threads(1)
    try:
        _run(report, quick=quick, weights=weights, seed=seed, progress=progress)
    finally:
        torch.set_num_threads(old)


def _run(report, *, quick: bool, weights: Optional[str], seed: int, progress: Optional[bool]) -> None:
    from ... import assets

    s = settings_for(quick)
    if seed != 0:
        s.train_config = replace(s.train_config, seed=seed)
    google = load_googlenet(weights) if weights else None  # fail at once on a bad file
    torch.manual_seed(seed)
    settings_section(report, s, weights, seed)
    classes = assets.imagenet_classes()

    # EfficientNet-Lite0 on the bundled photos
    _log(f"EfficientNet-Lite0 on {len(s.photos)} photos, blocks {s.effnet_blocks}")
    model = assets.efficientnet_lite0()
    x = assets.photo_batch(s.photos)
    a = analyse_photos(model, x, s.photos, s.effnet_blocks, s.effnet_pixel_block, top_filters=s.top_filters,
                       measures=s.measures, rule=s.photo_rule, pixel_rule=s.pixel_rule, max_units=s.max_units,
                       classes=classes, seed=seed, progress=progress)
    consistent = consistent_filter_maps(model, a, s.pixel_rule, BLACK, progress=progress)
    photo_sections(report, a, net="EfficientNet-Lite0", key="image-effnet", settings=s, rule=s.photo_rule,
                   consistent=consistent)
    del model

    if google is not None:
        _log(f"GoogLeNet ({weights}) on {len(s.photos)} photos, blocks {s.googlenet_blocks}")
        g = analyse_photos(google, x, s.photos, s.googlenet_blocks, s.googlenet_pixel_block,
                           top_filters=s.top_filters, measures=s.measures, rule=s.photo_rule, pixel_rule=s.pixel_rule,
                           max_units=s.max_units, classes=classes, seed=seed, progress=progress)
        consistent = consistent_filter_maps(google, g, s.pixel_rule, BLACK, progress=progress)
        photo_sections(report, g, net="GoogLeNet (torchvision, weights from file)", key="image-googlenet",
                       settings=s, rule=s.photo_rule, consistent=consistent)
        del google

    # the small Inception on Fashion-MNIST
    _log("Fashion-MNIST Inception: loading or training " + fi.cache_path(s.train_config))
    trained = fi.load_or_train(s.train_config, log=_log, progress=progress)
    net = trained.model
    fashion_model_section(report, trained)

    xt, yt = fi.fashion_tensors("test")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(xt.shape[0], generator=gen)
    ab_idx = perm[:s.ablation_images]
    _log(f"Fashion-MNIST ablation: {s.ablation_images} images, layers {s.ablation_layers}")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always", ConductanceWarning)
        ab = fashion_ablation(net, xt[ab_idx], s.ablation_layers, measures=s.measures, rule=s.fashion_rule,
                              random_seeds=s.random_seeds, seed=seed, progress=progress)
        # selection images come from the rest of the test split
        rest = perm[s.ablation_images:]
        _log(f"Fashion-MNIST feature selection: layers {s.selection_layers}")
        sel = fashion_selection(net, xt[rest], yt[rest], s.selection_layers, n_select=s.n_select,
                                n_evaluate=s.n_evaluate, ks=s.ks, measures=s.measures, rule=s.selection_rule,
                                random_seeds=s.selection_random_seeds, seed=seed, progress=progress)
    ablation_section(report, ab, s)
    selection_section(report, sel, s)
    warnings_section(report, records)
