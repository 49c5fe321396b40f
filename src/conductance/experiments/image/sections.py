"""The image experiments' report sections: settings, the Fashion-MNIST network and its protocols, made
from the measured numbers (the per-photo sections: :mod:`.sections_photos`).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Optional

import numpy as np
import torch

from .. import fashion_inception as fi
from .compute import warning_messages
from .config import PAPER_ABLATION, ImageSettings


def rule_text(rule: dict) -> str:
    """An integration rule in words, for the report's prose.

    Parameters
    ----------
    rule : dict
        Adaptive (``tolerance``, ``max_steps``) or fixed (``method``, ``n_steps``) settings.

    Returns
    -------
    str
    """
    if "tolerance" in rule:
        return (f"adaptive rule to {100 * rule['tolerance']:g}% estimated per-unit error and completeness error "
                f"(at most {rule['max_steps']} points)")
    return f"{rule.get('method', 'gausslegendre')} rule with {rule['n_steps']} intervals ({rule['n_steps'] + 1} points)"


def _err_text(err: torch.Tensor) -> str:
    return f"max {100 * float(err.max()):.3g}%, mean {100 * float(err.mean()):.3g}%"


def settings_section(report, s: ImageSettings, weights: Optional[str], seed: int) -> None:
    """Our settings against the paper's.

    Parameters
    ----------
    report : Report
    s : ImageSettings
    weights : str, optional
        The GoogLeNet weights file, if given.
    seed : int
    """
    sec = report.section("Image experiments: settings and differences from the paper", key="image-settings")
    if s.quick:
        sec.text("This is the QUICK version (reduced sizes for a fast check; numbers are noisy). Run without --quick "
                 "for the full version.")
    rows = [
        ["network (per-photo analysis)", "Inception v1 (GoogLeNet), ImageNet",
         "EfficientNet-Lite0, real ImageNet-1k weights" + ("; and torchvision GoogLeNet from " + str(weights)
                                                            if weights else "")],
        ["images (per-photo analysis)", "ImageNet validation images",
         f"{len(s.photos)} real photos bundled with scikit-image / scikit-learn / matplotlib: {', '.join(s.photos)}"],
        ["layers", "mixed3a ... mixed5b", f"EfficientNet block outputs {', '.join(s.effnet_blocks)}"
         + (f"; GoogLeNet {', '.join(s.googlenet_blocks)}" if weights else "")],
        ["network (ablation, feature selection)", "Inception v1 on ImageNet",
         f"small Inception-style network (4 Inception modules) trained here on Fashion-MNIST "
         f"({s.train_config.n_train} images, {s.train_config.epochs} epoch(s))"],
        ["ablation images", "100 ImageNet images", f"{s.ablation_images} Fashion-MNIST test images per layer, "
                                                    f"layers {', '.join(s.ablation_layers)}"],
        ["feature selection", "about 50 validation images per label: 30 select / 20 evaluate",
         f"{s.n_select} select / {s.n_evaluate} evaluate per class, 10 Fashion-MNIST classes (test split), "
         f"layers {', '.join(s.selection_layers)}, k in {list(s.ks)}"],
        ["baseline, explained output", "black image, top label's logit", "black image, top label's logit"],
        ["ablation", "remove filters (unspecified how)", "set the filter's whole channel to zero (mode 'zero')"],
        ["integration (photos)", "not stated", rule_text(s.photo_rule)],
        ["integration (Fashion-MNIST ablation)", "not stated", rule_text(s.fashion_rule)],
        ["integration (Fashion-MNIST feature selection)", "not stated", rule_text(s.selection_rule)],
    ]
    sec.table(rows, ["", "paper", "ours"], caption="Setting of the paper and ours")
    sec.text("No pretrained GoogLeNet can be installed offline, so the paper's network is used only when a weights "
             "file is given (--weights). The protocols that need many labelled images run on a network built from "
             "the same Inception modules but trained on Fashion-MNIST (28x28 grey images, 10 classes); its numbers "
             "are not expected to equal the paper's, which come from a 1000-class network with many more filters "
             "per layer.")
    sec.numbers(quick=s.quick, seed=seed, threads=torch.get_num_threads(), photos=s.photos,
                effnet_blocks=s.effnet_blocks, googlenet_weights=weights, train_config=asdict(s.train_config),
                ablation_layers=s.ablation_layers,
                ablation_images=s.ablation_images, selection_layers=s.selection_layers, n_select=s.n_select,
                n_evaluate=s.n_evaluate, ks=list(s.ks), photo_rule=s.photo_rule, pixel_rule=s.pixel_rule,
                fashion_rule=s.fashion_rule, selection_rule=s.selection_rule, measures=list(s.measures),
                max_units=s.max_units)


def fashion_model_section(report, trained: fi.TrainedModel) -> None:
    """The Fashion-MNIST Inception: architecture, cache and test accuracy.

    Parameters
    ----------
    report : Report
    trained : fashion_inception.TrainedModel
    """
    net = trained.model
    sec = report.section("Inception-style network on Fashion-MNIST", key="image-fashion-model")
    sec.text(f"Architecture: stem (two 3x3 convolutions), Inception modules {', '.join(fi.INCEPTION_LAYERS)} (branches "
             "1x1 | 1x1 reduce + 3x3 | 1x1 reduce + 5x5 | 3x3 max-pool + 1x1, concatenated; convolutions with "
             "BatchNorm and ReLU as in torchvision's GoogLeNet), max-pool between the 14x14 and the 7x7 stage, "
             "global average pooling, one linear layer. "
             + ("Trained now" if trained.trained_now else "Loaded from the cache")
             + f" ({trained.path}); test accuracy on the first {trained.config.n_test} test images: "
             f"{100 * trained.test_accuracy:.2f}%"
             + (f"; training took {trained.train_seconds:.0f} s" if trained.train_seconds else "") + ".")
    sec.table([[ln, net.get_submodule(ln).out_channels, "14x14" if "3" in ln else "7x7"] for ln in fi.INCEPTION_LAYERS],
              ["module", "filters (channels)", "resolution"], caption="Inception modules studied")
    sec.numbers(test_accuracy=trained.test_accuracy, trained_now=trained.trained_now, cache=trained.path,
                train_seconds=trained.train_seconds, config=asdict(trained.config), history=trained.history,
                parameters=sum(p.numel() for p in net.parameters()), version=fi.VERSION)


def ablation_section(report, ab: dict, s: ImageSettings) -> None:
    """Ablation on the Fashion-MNIST Inception: flip counts and curves of every measure.

    Parameters
    ----------
    report : Report
    ab : dict
        :func:`.compute.fashion_ablation`'s result.
    s : ImageSettings
    """
    from ... import plots

    sec = report.section("Ablation on the Inception-style network (Fashion-MNIST)", key="image-fashion-ablation")
    sec.text(f"{s.ablation_images} Fashion-MNIST test images, per layer studied. For each image and measure, the "
             "layer's filters are ranked (highest first) and removed cumulatively until the top label changes. "
             "Columns as in the paper: mean number of filters removed (over the images whose label changed), "
             "images that needed more than 10, the maximum, and the images whose label changed when their top 10 "
             "filters were removed at once; 'never' counts images whose label did not change even with every filter "
             "removed (included in '> 10'). The paper's numbers are for Inception v1 on 100 ImageNet images "
             "(layer not stated). Removal sets a filter's whole channel to zero (mode 'zero', the paper's wording); "
             "the second table sets it to its value at the black baseline image instead (mode 'baseline'), which is "
             "the change conductance attributes: with BatchNorm, a filter is far from zero on a black image. "
             f"Rankings: {rule_text(s.fashion_rule)}. 'random' pools {s.random_seeds} random orders per image.")
    numbers: dict[str, dict[str, Any]] = {}
    for mode, summaries in ab["summaries"].items():
        rows = []
        numbers[mode] = {}
        for layer, summary in summaries.items():
            for m, r in summary.rows.items():
                paper = PAPER_ABLATION.get(m, {}) if mode == "zero" else {}
                rows.append([layer, m, r["examples"], r["mean_flips"] if r["mean_flips"] is not None else "-",
                             paper.get("mean_flips", ""), r["more_than_k"], paper.get("more_than_10", ""),
                             r["max_flips"] if r["max_flips"] is not None else "-", paper.get("max_flips", ""),
                             r["top_k_flipped"], paper.get("top_10_flipped", ""), r["never"]])
            numbers[mode][layer] = {"rows": summary.rows,
                                    "flip_counts": {m: [None if math.isinf(v) else int(v) for v in c.tolist()]
                                                    for m, c in summary.flip_counts.items()}}
        sec.table(rows, ["layer", "measure", "images", "mean flips", "paper", "> 10", "paper", "max", "paper",
                         "top-10 flips", "paper", "never"],
                  caption=f"Mode '{mode}': filters removed until the top label changes, ours (Fashion-MNIST "
                          "Inception) and the paper's (Inception v1, ImageNet, of 100 images; 'zero' mode only)")
    layers = list(ab["relative_error"])
    errs = torch.cat([ab["relative_error"][ln] for ln in layers])
    unit_errs = torch.cat([ab["unit_error"][ln] for ln in layers])
    sec.text("Per-unit error of the conductance rankings (per image and layer): " + _err_text(unit_errs)
             + "; completeness error: " + _err_text(errs) + "; "
             + "; ".join(f"{ln}: {_err_text(ab['relative_error'][ln])}" for ln in layers)
             + f". Path points per image: {float(ab['n_points'].float().mean()):.0f} on average. "
             + f"Rule: {rule_text(s.fashion_rule)}.")
    sec.numbers(modes=numbers, paper=PAPER_ABLATION, relative_error_max=float(errs.max()),
                relative_error_mean=float(errs.mean()), unit_error_max=float(unit_errs.max()),
                unit_error_mean=float(unit_errs.mean()),
                relative_error={ln: {"max": float(ab["relative_error"][ln].max()),
                                     "mean": float(ab["relative_error"][ln].mean())} for ln in layers},
                mean_points=float(ab["n_points"].float().mean()), seconds=round(ab["seconds"], 1))
    layer = layers[-1] if len(layers) < 3 else layers[2]
    for mode, summaries in ab["summaries"].items():
        fig = plots.flip_share(summaries[layer].flip_counts, k=10,
                               title=f"Fashion-MNIST Inception, {layer}, mode '{mode}'")
        sec.figure(fig, f"Share of the {s.ablation_images} images whose top label has changed after removing the "
                        f"first n filters of {layer} in each ranking's order (mode '{mode}')",
                   name=f"fashion-ablation-flip-share-{mode}")


def selection_section(report, sel: dict, s: ImageSettings) -> None:
    """Feature selection on the Fashion-MNIST Inception: held-out accuracy against the pooled filters.

    Parameters
    ----------
    report : Report
    sel : dict
        :func:`.compute.fashion_selection`'s result.
    s : ImageSettings
    """
    from ... import plots

    sec = report.section("Feature selection on the Inception-style network (Fashion-MNIST)",
                         key="image-fashion-selection")
    sec.text(f"Per class, {s.n_select} Fashion-MNIST test images rank the filters of a layer by the class's mean "
             f"measure (each image explaining its own label's logit) and {s.n_evaluate} other images evaluate. The "
             "top k filters of every class are pooled; a logistic regression on their spatially averaged "
             "activations is fitted on the selection images and scored on the evaluation images "
             "(cd.feature_selection). Random filters of the same number are the floor. The paper describes this "
             "task (about 50 validation images per label, 30 / 20) but its classifier and numbers could not be "
             "recovered, so the paper column says so.")
    numbers = {}
    for layer, res in sel["results"].items():
        rows = []
        for r in res.rows:
            if r["measure"] == "random":
                continue
            rows.append([r["measure"], r["k"], r["n_units"], r["accuracy"], r["random_accuracy"],
                         # accuracies are shares of the same images: their difference is exact to 12 digits,
                         # and unrounded an equal pair printed as -1.11e-16 (+ 0.0: no "-0")
                         round(r["accuracy"] - r["random_accuracy"], 12) + 0.0, "not recovered"])
        sec.table(rows, ["measure", "k", "filters pooled", "accuracy", "random filters", "gain", "paper"],
                  caption=f"{layer} ({res.n_layer_units} filters; all filters: {res.all_units_accuracy:.3f}); "
                          f"{res.select_index.numel()} selection / {res.evaluate_index.numel()} evaluation images")
        err = sel["relative_error"][layer]
        numbers[layer] = {**res.to_dict(), "relative_error_max": float(err.max()),
                          "relative_error_mean": float(err.mean()),
                          "unit_error_max": float(sel["unit_error"][layer].max()),
                          "unit_error_mean": float(sel["unit_error"][layer].mean())}
        numbers[layer].pop("selected", None)
    errs = torch.cat(list(sel["relative_error"].values()))
    sec.text("Per-unit error of conductance on the selection images (own label's logit): "
             + _err_text(torch.cat(list(sel["unit_error"].values()))) + "; completeness error: " + _err_text(errs)
             + f". Rule: {rule_text(s.selection_rule)}.")
    sec.numbers(layers=numbers, relative_error_max=float(errs.max()), relative_error_mean=float(errs.mean()),
                seconds=round(sel["seconds"], 1), paper="not recovered (PAPER.md section 4)")
    layer = list(sel["results"])[-1] if len(sel["results"]) < 3 else list(sel["results"])[2]
    res = sel["results"][layer]
    series = {}
    for m in res.measures:
        pts = sorted((r["n_units"], r["accuracy"]) for r in res.rows if r["measure"] == m)
        series[m] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
    rnd = sorted({(r["n_units"], r["accuracy"]) for r in res.rows if r["measure"] == "random"})
    series["random filters"] = (np.array([p[0] for p in rnd]), np.array([p[1] for p in rnd]))
    fig = plots.curves(series, "filters pooled over the classes", "held-out accuracy", markers=True,
                       title=f"Feature selection, Fashion-MNIST Inception, {layer}",
                       styles={"random filters": {"color": "black", "linestyle": "--"}})
    sec.figure(fig, f"Held-out accuracy against the number of pooled filters of {layer}, per measure",
               name="fashion-selection")


def warnings_section(report, records: list) -> None:
    """The warnings the Fashion-MNIST protocols raised, each message once (no section when there were none).

    Parameters
    ----------
    report : Report
    records : list of warnings.WarningMessage
    """
    caught = warning_messages(records)
    if caught:
        report.section("Image experiments: warnings", key="image-warnings").text(
            "Warnings raised during the Fashion-MNIST protocols:\n\n" + "\n\n".join(caught)).numbers(warnings=caught)
