"""Pruning study: conductance against the criteria pruners use, on networks trained on Fashion-MNIST.

``conductance reproduce pruning --out DIR [--quick]``. For two networks trained in the project on
real Fashion-MNIST (the Inception-style network of :mod:`.fashion_inception` and the small
ResNet-style :class:`FashionResNet` defined here, both cached), every criterion scores the channels
of every convolution on the same calibration images; Torch-Pruning's ``MetaPruner`` removes a share
of each layer's channels; the test accuracy is measured right after pruning (with and without the
removed channels' means folded into the next layers' biases) and after one short fine-tuning epoch.
EfficientNet-Lite0 (real ImageNet weights) is pruned the same way with bundled photos as the
calibration set; no ImageNet images install here, so it reports how often the pruned network keeps
the unpruned network's top-1 label on other photos, and how its logit margins change.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..progress import Progress
from . import cache_dir
from . import fashion_inception as fi

__all__ = ["FashionResNet", "ResNetConfig", "RESNET_QUICK", "RESNET_FULL", "load_or_train_resnet", "CRITERIA",
           "make_importance", "classifier", "prune_copy", "fine_tune", "run", "QUICK", "FULL"]

RESNET_VERSION = "fashion-resnet-v1"
#: Criteria compared, in the order shown.
CRITERIA = ("conductance", "conductance_class_abs", "grad_x_activation", "activation", "taylor", "l1", "random")
#: Statistic of the calibration values used for conductance and gradient x activation (docs/pruning.md).
SIGNED_STATISTIC = "class_max"


# ----------------------------------------------------------------------------------------------
# A small ResNet for 28x28 images
# ----------------------------------------------------------------------------------------------

class _Block(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (1x1 convolution when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.relu2 = nn.ReLU()        # separate modules: each runs once per forward (hookable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.shortcut(x))


class FashionResNet(nn.Module):
    """ResNet-style classifier (batch, 1, 28, 28) -> (batch, 10): stem 16 channels, stages of
    (1, 2, 2) residual blocks with 16, 32, 64 channels (28, 14, 7 pixels), global average pool, linear.

    The identity shortcuts couple the channels of a stage: Torch-Pruning prunes them together.
    """

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(_Block(16, 16, 1))
        self.layer2 = nn.Sequential(_Block(16, 32, 2), _Block(32, 32, 1))
        self.layer3 = nn.Sequential(_Block(32, 64, 2), _Block(64, 64, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of Fashion-MNIST images.

        Parameters
        ----------
        x : Tensor, shape (batch, 1, 28, 28)

        Returns
        -------
        Tensor, shape (batch, n_classes)
        """
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@dataclass(frozen=True)
class ResNetConfig:
    """Training settings of :class:`FashionResNet`; every field enters the cache key."""

    n_train: int = 60000
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    n_test: int = 10000
    bn_images: int = 5000

    def key(self) -> str:
        """A short name of the configuration, used in the cache file name.

        Returns
        -------
        str
        """
        text = json.dumps({"version": RESNET_VERSION, **asdict(self)}, sort_keys=True)
        return (f"{RESNET_VERSION}-n{self.n_train}-e{self.epochs}-s{self.seed}-"
                f"{hashlib.sha1(text.encode()).hexdigest()[:10]}")


RESNET_QUICK = ResNetConfig(n_train=8000, epochs=1, batch_size=64)
RESNET_FULL = ResNetConfig(n_train=60000, epochs=3, batch_size=128)


def _train_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
                  weight_decay: float, seed: int, one_cycle: bool = True) -> list:
    """Seeded AdamW training with horizontal flips; BatchNorm re-estimated at the end; returns the history."""
    from ..assets import recalibrate_batchnorm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = (x.shape[0] + batch_size - 1) // batch_size
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps, pct_start=0.25)
             if one_cycle else None)
    history = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(x.shape[0], generator=g)
        total, start = 0.0, time.perf_counter()
        for b in range(steps):
            batch = order[b * batch_size:(b + 1) * batch_size]
            xb = x[batch]
            flip = torch.rand(xb.shape[0], generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = nn.functional.cross_entropy(model(xb), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += float(loss.detach()) * batch.numel()
        history.append({"epoch": epoch + 1, "loss": total / x.shape[0],
                        "seconds": round(time.perf_counter() - start, 1)})
    with torch.no_grad():
        recalibrate_batchnorm(model, [x[s:s + 500] for s in range(0, min(5000, x.shape[0]), 500)])
    return history


def load_or_train_resnet(config: ResNetConfig = RESNET_FULL, log: Optional[Callable[[str], None]] = None
                         ) -> fi.TrainedModel:
    """:class:`FashionResNet` for ``config``, from ``$CONDUCTANCE_CACHE`` or trained (and cached) now.

    Parameters
    ----------
    config : ResNetConfig
    log : callable str -> None, optional
        Progress messages.

    Returns
    -------
    TrainedModel
    """
    path = os.path.join(cache_dir(), f"{config.key()}.pt")
    if os.path.exists(path):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model = FashionResNet()
            model.load_state_dict(blob["state_dict"])
            return fi.TrainedModel(model.eval(), config, path, float(blob["test_accuracy"]), trained_now=False,
                                   train_seconds=blob.get("train_seconds"), history=list(blob.get("history", [])))
        except Exception as exc:  # noqa: BLE001 - any unreadable or stale file: retrain
            if log:
                log(f"cached weights {path} unreadable ({exc}); retraining")
    x_all, y_all = fi.fashion_tensors("train")
    idx = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(config.seed))[:config.n_train]
    torch.manual_seed(config.seed)
    model = FashionResNet()
    start = time.perf_counter()
    history = _train_epochs(model, x_all[idx], y_all[idx], epochs=config.epochs, batch_size=config.batch_size,
                            lr=config.lr, weight_decay=config.weight_decay, seed=config.seed)
    seconds = time.perf_counter() - start
    model.eval()
    acc = fi.evaluate(model, *fi.fashion_tensors("test", config.n_test))
    tmp = path + f".tmp{os.getpid()}"
    torch.save({"state_dict": model.state_dict(), "config": asdict(config), "version": RESNET_VERSION,
                "test_accuracy": acc, "train_seconds": seconds, "history": history}, tmp)
    os.replace(tmp, path)
    return fi.TrainedModel(model, config, path, acc, trained_now=True, train_seconds=seconds, history=history)


# ----------------------------------------------------------------------------------------------
# Criteria, pruning, fine-tuning
# ----------------------------------------------------------------------------------------------

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

    from ..pruning import CalibratedTaylorImportance, ConductanceImportance

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
    from ..pruning import prune

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


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------

QUICK: dict[str, Any] = dict(ratios=[0.1, 0.3, 0.5, 0.7], n_cal=256, n_test=2000, n_ft=2000, seeds=3, n_steps=16,
                             inception=fi.QUICK_CONFIG, resnet=RESNET_QUICK, effnet_ratios=[0.05, 0.1])
FULL: dict[str, Any] = dict(ratios=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], n_cal=512, n_test=10000, n_ft=5000,
                            seeds=3, n_steps=32, inception=fi.FULL_CONFIG, resnet=RESNET_FULL,
                            effnet_ratios=[0.05, 0.1, 0.2, 0.3])


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


EFFNET_CAL = ["chelsea", "coffee", "rocket", "astronaut"]
EFFNET_HELD_OUT = ["motorcycle", "china", "flower", "grace_hopper"]


def _views(names: list) -> torch.Tensor:
    """Each photo at three scales (resize 256, 288, 320; crop 224) and mirrored: (6 * len(names), 3, 224, 224)."""
    from ..assets import photo_batch

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
    from ..assets import efficientnet_lite0

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


PARTS = ("inception", "resnet", "efficientnet")


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
            from .report import to_jsonable

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
        save()
    if "efficientnet" not in parts:
        return results
    start = time.perf_counter()
    try:
        eff = study_efficientnet(settings, log, progress=progress)
        eff["seconds"] = round(time.perf_counter() - start, 1)
        results["efficientnet"] = eff
        sec = report.section("Pruning EfficientNet-Lite0 (real ImageNet weights)", key="pruning-efficientnet")
        sec.text("No ImageNet images install here: calibration on views of four bundled photos, agreement with the "
                 "unpruned network's top-1 label on views of four other photos.")
        sec.table([[c, ratio, float(np.mean([a[i] for a in r["agreement"]])),
                    float(np.mean([a[i] for a in r["agreement_mean_fill"]])),
                    float(np.mean([a[i] for a in r["margin_change"]]))]
                   for c, r in eff["criteria"].items() for i, ratio in enumerate(eff["ratios"])],
                  ["criterion", "ratio", "top-1 agreement", "agreement, mean fill", "mean margin change"])
        sec.numbers(**eff)
        save()
    except ImportError as exc:
        log(f"efficientnet part skipped: {exc}")
    return results
