"""The image experiments' per-photo report sections (ImageNet networks on the bundled photos): prose,
tables, pixel-map figures and flip counts made from :func:`.compute.analyse_photos`' numbers.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from .compute import PhotoAnalysis
from .config import ImageSettings
from .sections import rule_text


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return (x * 0.5 + 0.5).clamp(0, 1)


def _clip(attribution: torch.Tensor, q: float = 0.99) -> torch.Tensor:
    """Per-pixel map (3, H, W) summed over colours and clipped at the q-quantile of |value| (for display only:
    a few pixels carry most of the conductance and would turn every other pixel black)."""
    a = attribution.sum(0)
    m = torch.quantile(a.abs().flatten().double(), q).float().clamp_min(1e-12)
    return a.clamp(-m, m)


#: The smoothed view of pixel maps: Gaussian blur (pixels) and the share of pixels hidden (percentile).
SMOOTH_PIXELS, SMOOTH_HIDE_BELOW = 3.0, 80.0


#: A map whose estimated per-unit error is above this is marked coarse in the report (a fixed rule warns there too).
COARSE_MAP = 0.05


def _pixel_figure(image: torch.Tensor, maps: dict, title: str):
    """Three rows: the photo scaled by |conductance| (the paper's Figure 1), a red/blue overlay of the
    sign, and the overlay smoothed and thresholded (per-pixel maps of deep filters read as speckle)."""
    from matplotlib.figure import Figure

    from ... import plots

    cols = len(maps) + 1
    fig = Figure(figsize=(2.5 * cols, 7.6), layout="constrained")
    axes = fig.subplots(3, cols, squeeze=False)
    img = _unnormalise(image)
    labels = ("photo", "red +, blue -",
              f"smoothed ({SMOOTH_PIXELS:g} px), top {100 - SMOOTH_HIDE_BELOW:g}% of pixels")
    for r in range(3):
        axes[r, 0].imshow(img.permute(1, 2, 0).numpy())
        axes[r, 0].set_title(labels[r], fontsize=9, wrap=True)
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
    for j, (name, m) in enumerate(maps.items(), start=1):
        clipped = _clip(m)
        plots.pixel_map(img, clipped, mode="scale", ax=axes[0, j], title=name, colorbar=False)
        plots.pixel_map(img, clipped, mode="overlay", ax=axes[1, j], colorbar=False)
        plots.pixel_map(img, m, mode="overlay", ax=axes[2, j], colorbar=False, smooth=SMOOTH_PIXELS,
                        threshold=SMOOTH_HIDE_BELOW, clip=99.5)
    fig.suptitle(title, fontsize=10, wrap=True)
    return fig


def photo_sections(report, a: PhotoAnalysis, *, net: str, key: str, settings: ImageSettings, rule: dict,
                   consistent: Optional[tuple[int, int, torch.Tensor]] = None) -> None:
    """The per-photo sections of one ImageNet network: labels, filter conductance, completeness, pixel maps,
    the consistent filter and the ablation flip counts.

    Parameters
    ----------
    report : Report
    a : PhotoAnalysis
        :func:`.compute.analyse_photos`'s result.
    net : str
        The network's name in the titles.
    key : str
        Prefix of the section keys and figure names.
    settings : ImageSettings
    rule : dict
        The integration settings of the layer conductance (described in the text).
    consistent : (int, int, torch.Tensor), optional
        :func:`.compute.consistent_filter_maps`'s result; None: no consistent-filter figure.
    """
    from ... import plots

    cond = a.importance["conductance"]
    sec = report.section(f"{net}: per-photo results", key=f"{key}-photos")
    sec.text(f"{net}, black-photo baseline, the explained output F is the top label's logit. Filter (channel) "
             f"conductance at {len(a.blocks)} block outputs (each a cut, so the filters' conductances must add "
             f"up to F(x) - F(x')): {rule_text(rule)}. The per-unit error is the estimated relative L2 distance of "
             "the block's vector of filter conductances to the exact integral (result.unit_error); the relative "
             "completeness error is |sum of the layer's conductances - (F(x) - F(x'))| / |F(x) - F(x')|.")
    rows: list[list[Any]] = []  # table rows mix numbers and text
    per_photo = {}
    for i, name in enumerate(a.names):
        entry: dict[str, Any] = {"label": int(a.labels[i]), "label_name": a.label_names[i],
                                 "logit": float(a.logits[i]), "output_diff": float(a.output_diff[i]),
                                 "n_points": int(cond.n_points[i]), "blocks": {}}
        for block in a.blocks:
            values = cond[block][i]
            top = torch.argsort(values, descending=True)[:settings.top_filters]
            err = float(cond.relative_error[block][i])
            unit_err = float(cond.unit_error[block][i])
            entry["blocks"][block] = {"relative_error": err, "unit_error": unit_err,
                                      "top_filters": [int(c) for c in top],
                                      "top_conductance": [float(values[c]) for c in top],
                                      "sum": float(values.sum())}
            rows.append([name if block == a.blocks[0] else "", a.label_names[i] if block == a.blocks[0] else "",
                         block, int(values.numel()),
                         ", ".join(f"{int(c)} ({float(values[c]):+.2f})" for c in top),
                         float(values.sum()), float(a.output_diff[i]), 100 * unit_err, 100 * err])
        per_photo[name] = entry
    sec.table(rows, ["photo", "top label", "block", "filters", "top filters (conductance)", "sum over filters",
                     "F(x) - F(x')", "per-unit error %", "completeness error %"],
              caption=f"{net}: top filters by conductance per block, their per-unit error and the completeness error")
    errors = torch.stack([cond.relative_error[b] for b in a.blocks])
    unit_errors = torch.stack([cond.unit_error[b] for b in a.blocks])
    sec.numbers(rule=rule, photos=per_photo, max_relative_error=float(errors.max()),
                mean_relative_error=float(errors.mean()), max_unit_error=float(unit_errors.max()),
                mean_unit_error=float(unit_errors.mean()), mean_points=float(cond.n_points.float().mean()),
                seconds={k: round(v, 1) for k, v in a.seconds.items()}, warnings=a.warnings)
    sec.text(f"Largest per-unit error over photos and blocks: {100 * float(unit_errors.max()):.2f}% (mean "
             f"{100 * float(unit_errors.mean()):.2f}%); largest completeness error {100 * float(errors.max()):.3f}% "
             f"(mean {100 * float(errors.mean()):.3f}%); {float(cond.n_points.float().mean()):.0f} path points per "
             "photo on average.")

    # the paper's Figure 1: each photo scaled by the per-pixel conductance of its top filters
    figs = report.section(f"{net}: per-pixel conductance of the top filters", key=f"{key}-pixels")
    figs.text(f"For each photo, the {settings.top_filters} filters of {a.pixel_block} with the largest conductance, "
              "and the conductance of each filter through each pixel (cd.neuron_conductance with units='channel', "
              f"summed over the colour channels, {rule_text(settings.pixel_rule)}). As in the paper's Figure 1, the "
              "photo is scaled by |conductance| of the pixel (black: none flows through it; top row); the middle row "
              "shows the sign (red positive, blue negative) over the grey photo. For display only, each map is clipped "
              "at the 99th percentile of its |values|. Per-pixel maps of a deep filter read as speckle, so the "
              f"bottom row shows the same map blurred by a Gaussian of {SMOOTH_PIXELS:g} pixels, with only the "
              f"{100 - SMOOTH_HIDE_BELOW:g}% of pixels of largest |blurred value| coloured: where the filter looks. "
              "The map of a filter sums "
              "to its conductance in the limit of many path points; the check below compares the two numerically "
              "(the per-pixel form and the layer form discretise the path integral differently).")
    files = []
    for i, name in enumerate(a.names):
        maps = {f"filter {int(c)}: {float(cond[a.pixel_block][i, c]):+.2f}": a.pixel[i, j]
                for j, c in enumerate(a.pixel_filters[i])}
        fig = _pixel_figure(a.images[i], maps, f"{name}: {a.label_names[i]} ({net}, {a.pixel_block})")
        files.append(figs.figure(fig, f"{name}: photo scaled by the per-pixel conductance of the top filters of "
                                      f"{a.pixel_block}", name=f"{key}-pixels-{name}", dpi=80))
    sum_err, map_err = a.pixel_sum_error, a.pixel_unit_error
    figs.numbers(block=a.pixel_block, rule=settings.pixel_rule,
                 filters={n: [int(c) for c in a.pixel_filters[i]] for i, n in enumerate(a.names)},
                 pixel_sum_relative_error_max=float(sum_err.max()),
                 pixel_sum_relative_error_mean=float(sum_err.mean()),
                 pixel_unit_error={n: [float(v) for v in map_err[i]] for i, n in enumerate(a.names)},
                 pixel_unit_error_max=float(map_err.max()), pixel_unit_error_mean=float(map_err.mean()),
                 figures=files)
    coarse = int((map_err > COARSE_MAP).sum())
    figs.table([[n] + [f"{int(c)}: {100 * float(v):.1f}%" + (" (coarse)" if float(v) > COARSE_MAP else "")
                       for c, v in zip(a.pixel_filters[i], map_err[i])] for i, n in enumerate(a.names)],
               ["photo"] + [f"filter {j + 1}: per-unit error" for j in range(map_err.shape[1])],
               caption="Per-unit error of each map: estimated relative L2 distance of the map's pixel values to "
                       "the exact integral (result.unit_error of cd.neuron_conductance)")
    figs.text(f"Per-unit error of the maps: largest {100 * float(map_err.max()):.1f}% (mean "
              f"{100 * float(map_err.mean()):.1f}%). "
              + (f"{coarse} of {map_err.numel()} maps are above {100 * COARSE_MAP:.0f}% (marked coarse): they show "
                 "where a filter's conductance comes from, but single pixels of those maps are not to be compared; "
                 "a tighter map needs more path points (neuron_conductance with tolerance=0.02)."
                 if coarse else f"Every map is within {100 * COARSE_MAP:.0f}%."))
    figs.text(f"Sum over the pixels of each map against the filter's conductance from the layer run above: "
              f"largest relative difference {100 * float(sum_err.max()):.2g}% "
              f"(mean {100 * float(sum_err.mean()):.2g}%).")
    if consistent is not None:
        channel, count, per_pixel = consistent
        maps = {f"{n} ({float(cond[a.pixel_block][i, channel]):+.2f})": per_pixel[i] for i, n in enumerate(a.names)}
        # one panel per photo, each photo under its own map: draw them as a grid of single maps
        from matplotlib.figure import Figure
        n = len(a.names)
        cols = 4
        fig = Figure(figsize=(2.6 * cols, 2.6 * math.ceil(n / cols)), layout="constrained")
        axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False)
        for ax, (title, m), img in zip(axes.ravel(), maps.items(), a.images):
            plots.pixel_map(_unnormalise(img), _clip(m), mode="scale", ax=ax, title=title, colorbar=False)
        for ax in axes.ravel()[n:]:
            ax.axis("off")
        fig.suptitle(f"filter {channel} of {a.pixel_block} on every photo")
        name = figs.figure(fig, f"One filter across the photos: filter {channel} of {a.pixel_block}, among the top 5 "
                                f"by conductance for {count} of {n} photos", name=f"{key}-consistent-filter", dpi=80)
        figs.numbers(consistent_filter=channel, consistent_filter_top5_count=count, consistent_figure=name)
        figs.text(f"Filter {channel} of {a.pixel_block} is among the top 5 filters for {count} of the {n} photos; "
                  "the figure shows where its conductance comes from in each (the paper reports filters that respond "
                  "to the same kind of region across images).")

    # ablation flip counts per photo and measure
    ab = report.section(f"{net}: ablation flip counts per photo", key=f"{key}-ablation")
    limit = (f"the first {settings.max_units} filters of the ranking" if settings.max_units
             else "all the block's filters")
    ab.text("Per photo and block, filters are ranked by each measure (highest first), removed cumulatively in that "
            "order, and we count how many must be removed before the top label changes (cd.compare_rankings; "
            f"'-' = never within {limit}). 'random' is a random order (the floor). Per-photo tables: mode 'zero' "
            "(the filter's channel set to zero, the paper's removal). The summary also gives mode 'baseline' (the "
            "filter set to its value at the black photo, the change conductance attributes).")

    def counts(summary, m):
        return [None if math.isinf(v) else int(v) for v in summary.flip_counts[m].tolist()]

    names = list(next(iter(a.ablation.values())).rows)
    numbers = {}
    for block, summary in a.ablation.items():
        rows = []
        for i, photo in enumerate(a.names):
            rows.append([photo] + [("-" if c is None else c) for c in (counts(summary, m)[i] for m in names)])
        rows.append(["mean (flipped photos)"] + [summary.rows[m]["mean_flips"] if summary.rows[m]["mean_flips"]
                                                 is not None else "-" for m in names])
        rows.append(["top-10 removal flips"] + [f"{summary.rows[m]['top_k_flipped']}/{summary.rows[m]['examples']}"
                                                for m in names])
        ab.table(rows, ["photo"] + names, caption=f"{net}, {block}, mode 'zero': filters removed until the top "
                                                  "label changes")
        base = a.ablation_baseline[block]
        numbers[block] = {"zero": {"rows": summary.rows, "flip_counts": {m: counts(summary, m) for m in names}},
                          "baseline": {"rows": base.rows, "flip_counts": {m: counts(base, m) for m in names}}}
    ab.numbers(blocks=numbers, max_units=settings.max_units)
    summary_rows, means = [], {}
    for mode, table in (("zero", a.ablation), ("baseline", a.ablation_baseline)):
        for block, summary in table.items():
            summary_rows.append([block, mode] + [
                (f"{summary.rows[m]['mean_flips']:.1f} ({summary.rows[m]['flipped']}/{summary.rows[m]['examples']})"
                 if summary.rows[m]["mean_flips"] is not None else f"- (0/{summary.rows[m]['examples']})")
                for m in names])
        means[mode] = {m: float(np.mean([t.rows[m]["mean_flips"] for t in table.values()
                                         if t.rows[m]["mean_flips"] is not None] or [np.nan])) for m in names}
    ab.table(summary_rows, ["block", "mode"] + names,
             caption=f"{net}: mean filters removed until the label changes (photos that changed / photos)")
    for mode in means:
        ranked = sorted((m for m in names if not math.isnan(means[mode][m])), key=lambda m: means[mode][m])
        ab.text(f"Mode '{mode}', mean flip count averaged over the blocks: "
                + ", ".join(f"{m} {means[mode][m]:.1f}" for m in names)
                + (f". Fewest filters: {ranked[0]}." if ranked else "."))
    ab.numbers(mean_over_blocks=means)
