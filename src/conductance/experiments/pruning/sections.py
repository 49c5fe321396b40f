"""The pruning study's report sections: prose, tables and figures made from the measured numbers."""

from __future__ import annotations

from typing import Any

import numpy as np


def _curves(name: str, res: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    ratios = res["ratios"]
    for ax, key, title in zip(axes, ("pruned", "pruned_mean_fill", "fine_tuned"),
                              ("right after pruning", "pruned, removed channels' means folded in",
                               "after one fine-tuning epoch")):
        for criterion, rows in res["criteria"].items():
            a = np.array(rows[key])
            ax.plot(ratios, a.mean(0), marker="o", label=criterion, ls="--" if criterion == "random" else "-")
            if a.shape[0] > 1:
                ax.fill_between(ratios, a.min(0), a.max(0), alpha=0.2)
        ax.axhline(res["base_accuracy"], color="k", lw=0.8, ls=":")
        ax.set_title(title)
        ax.set_xlabel("share of channels removed per layer")
    axes[0].set_ylabel(f"{name}: test accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def network_section(report: Any, name: str, res: dict, settings: dict) -> None:
    """Accuracy of one Fashion-MNIST network pruned by every criterion, as curves and a table.

    Parameters
    ----------
    report : Report
    name : str
        ``inception`` or ``resnet``.
    res : dict
        :func:`.compute.study_network`'s result.
    settings : dict
        :data:`QUICK` or :data:`FULL`.
    """
    sec = report.section(f"Pruning the Fashion-MNIST {name}", key=f"pruning-{name}")
    sec.text(f"Per-layer pruning with Torch-Pruning's MetaPruner of the {name} network (test accuracy "
             f"{res['base_accuracy']:.4f} on {settings['n_test']} test images); every criterion scores the "
             f"channels on the same {settings['n_cal']} calibration images.")
    sec.figure(_curves(name, res), f"{name}: accuracy against the share of channels removed",
               name=f"pruning-{name}")
    rows = []
    for criterion, r in res["criteria"].items():
        for i, ratio in enumerate(res["ratios"]):
            rows.append([criterion, ratio, float(np.mean([a[i] for a in r["pruned"]])),
                         float(np.mean([a[i] for a in r["pruned_mean_fill"]])),
                         float(np.mean([a[i] for a in r["fine_tuned"]]))])
    sec.table(rows, ["criterion", "ratio", "pruned", "pruned, mean fill", "fine-tuned"])
    sec.numbers(**res)


def efficientnet_section(report: Any, eff: dict) -> None:
    """Top-1 agreement and margin change of EfficientNet-Lite0 pruned by every criterion.

    Parameters
    ----------
    report : Report
    eff : dict
        :func:`.compute.study_efficientnet`'s result.
    """
    sec = report.section("Pruning EfficientNet-Lite0 (real ImageNet weights)", key="pruning-efficientnet")
    sec.text("No ImageNet images install here: calibration on views of four bundled photos, agreement with the "
             "unpruned network's top-1 label on views of four other photos.")
    sec.table([[c, ratio, float(np.mean([a[i] for a in r["agreement"]])),
                float(np.mean([a[i] for a in r["agreement_mean_fill"]])),
                float(np.mean([a[i] for a in r["margin_change"]]))]
               for c, r in eff["criteria"].items() for i, ratio in enumerate(eff["ratios"])],
              ["criterion", "ratio", "top-1 agreement", "agreement, mean fill", "mean margin change"])
    sec.numbers(**eff)
