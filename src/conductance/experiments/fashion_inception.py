"""A small Inception-style network (the paper's architecture, scaled down) trained on Fashion-MNIST.

The paper studies Inception v1 (GoogLeNet) trained on ImageNet. No pretrained GoogLeNet can be
installed here, so the many-image protocols (ablation over 100 images, feature selection with 30 + 20
images per class) run on a network built from the same parts: Inception modules whose four branches
(1x1; 1x1 reduce then 3x3; 1x1 reduce then 5x5; 3x3 max-pool then 1x1) are concatenated along the
channels, convolutions followed by BatchNorm and ReLU as in torchvision's ``BasicConv2d``, max-pool
between the stages, global average pooling and one linear classifier. Its four module outputs
(``inception3a``, ``inception3b``, ``inception4a``, ``inception4b``, named after GoogLeNet's) are cuts.

Weights are trained once per configuration (seeded, deterministic on the CPU) and cached under
``$CONDUCTANCE_CACHE`` (default ``~/.cache/conductance``) in a file named after the configuration and
``VERSION``; a missing or unreadable file is retrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..errors import ConductanceError
from ..progress import Progress
from . import cache_dir  # noqa: F401  (shared cache folder; re-exported)

__all__ = ["BasicConv", "InceptionModule", "FashionInception", "TrainConfig", "TrainedModel", "QUICK_CONFIG",
           "FULL_CONFIG", "INCEPTION_LAYERS", "cache_dir", "cache_path", "train", "evaluate", "load_or_train",
           "fashion_tensors", "VERSION"]

#: Bump when the architecture or the training procedure changes: cached weights are then retrained.
VERSION = "fashion-inception-v2"

#: The Inception module outputs (cuts of the network), lowest first.
INCEPTION_LAYERS = ["inception3a", "inception3b", "inception4a", "inception4b"]

# (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) per module, GoogLeNet's ordering of the numbers.
_MODULES = {
    "inception3a": (32, 16, 16, 16, 4, 8, 8),      # -> 48 channels, 14x14
    "inception3b": (48, 16, 16, 24, 8, 12, 12),    # -> 64 channels, 14x14
    "inception4a": (64, 24, 24, 40, 8, 16, 16),    # -> 96 channels, 7x7
    "inception4b": (96, 32, 24, 48, 8, 24, 24),    # -> 128 channels, 7x7
}


class BasicConv(nn.Module):
    """Convolution (no bias) + BatchNorm + ReLU, as torchvision's GoogLeNet ``BasicConv2d``."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution, BatchNorm, ReLU.

        Parameters
        ----------
        x : Tensor, shape (batch, cin, H, W)

        Returns
        -------
        Tensor, shape (batch, cout, H', W')
        """
        return self.relu(self.bn(self.conv(x)))


class InceptionModule(nn.Module):
    """Four parallel branches concatenated along channels: (batch, cin, H, W) -> (batch, cout, H, W).

    cout = c1 + c3 + c5 + pool_proj. Each branch alone is not a cut; the concatenation is.
    """

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool_proj: int):
        super().__init__()
        self.branch1 = BasicConv(cin, c1, 1)
        self.branch2 = nn.Sequential(BasicConv(cin, c3r, 1), BasicConv(c3r, c3, 3))
        self.branch3 = nn.Sequential(BasicConv(cin, c5r, 1), BasicConv(c5r, c5, 5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), BasicConv(cin, pool_proj, 1))
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The four branches, concatenated along channels.

        Parameters
        ----------
        x : Tensor, shape (batch, cin, H, W)

        Returns
        -------
        Tensor, shape (batch, cout, H, W)
        """
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


class FashionInception(nn.Module):
    """Inception-style classifier for (batch, 1, 28, 28) images (pixels in [0, 1]) -> (batch, 10) logits.

    stem (3x3 conv 1->16, 28x28; max-pool; 3x3 conv 16->32, 14x14) -> inception3a -> inception3b
    -> max-pool (7x7) -> inception4a -> inception4b -> global average pool -> linear(128 -> 10).
    """

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.stem1 = BasicConv(1, 16, 3)
        self.pool1 = nn.MaxPool2d(2)
        self.stem2 = BasicConv(16, 32, 3)
        self.inception3a = InceptionModule(*_MODULES["inception3a"])
        self.inception3b = InceptionModule(*_MODULES["inception3b"])
        self.pool2 = nn.MaxPool2d(2)
        self.inception4a = InceptionModule(*_MODULES["inception4a"])
        self.inception4b = InceptionModule(*_MODULES["inception4b"])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inception4b.out_channels, n_classes)
        # channels-last memory is 1.5-2x faster on the CPU for these small convolutions and max-pools
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits.

        Parameters
        ----------
        x : Tensor, shape (batch, 1, 28, 28)

        Returns
        -------
        Tensor, shape (batch, 10)
        """
        if x.dim() != 4 or x.shape[1] != 1:
            raise ConductanceError(f"FashionInception expects images of shape (batch, 1, 28, 28); got "
                                   f"{tuple(x.shape)}")
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem2(self.pool1(self.stem1(x)))
        x = self.inception3b(self.inception3a(x))
        x = self.inception4b(self.inception4a(self.pool2(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; every field enters the cache key."""

    n_train: int = 60000          # training images used (the first n of a seeded permutation)
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3              # AdamW, one-cycle schedule
    weight_decay: float = 1e-4
    seed: int = 0
    n_test: int = 10000           # test images the stored accuracy is measured on (the first n)
    bn_images: int = 5000         # training images that re-estimate the BatchNorm statistics at the end

    def key(self) -> str:
        """File-name-safe key: the version plus a hash of the settings.

        Returns
        -------
        str
        """
        text = json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)  # every field changes the key
        return f"{VERSION}-n{self.n_train}-e{self.epochs}-s{self.seed}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


#: Settings of the quick reproduction (fits the 2-minute budget with everything else).
QUICK_CONFIG = TrainConfig(n_train=8000, epochs=1, batch_size=64, lr=3e-3)
#: Settings of the full reproduction.
FULL_CONFIG = TrainConfig(n_train=60000, epochs=3, batch_size=128, lr=3e-3)


@dataclass
class TrainedModel:
    """A trained network with how it was obtained."""

    model: nn.Module  # a FashionInception, or the pruning study's FashionResNet
    config: Any  # its TrainConfig (or the pruning study's ResNetConfig)
    path: str
    test_accuracy: float
    trained_now: bool
    train_seconds: Optional[float] = None
    history: list = field(default_factory=list)


def cache_path(config: TrainConfig) -> str:
    """Where the weights of ``config`` are cached.

    Parameters
    ----------
    config : TrainConfig

    Returns
    -------
    str
    """
    return os.path.join(cache_dir(), f"{config.key()}.pt")


def fashion_tensors(split: str, n: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as float images (n, 1, 28, 28) in [0, 1] and labels (n,) (the first n in file order).

    Parameters
    ----------
    split : str
        ``"train"`` or ``"test"``.
    n : int, optional
        How many; all by default.

    Returns
    -------
    images : Tensor, shape (n, 1, 28, 28), float32
    labels : LongTensor, shape (n,)
    """
    from ..datasets import load_fashion_mnist

    images, labels = load_fashion_mnist(split)
    if n is not None:
        images, labels = images[:n], labels[:n]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on images x (n, 1, 28, 28) with labels y (n,).

    Parameters
    ----------
    model : nn.Module
    x : Tensor, shape (n, 1, 28, 28)
    y : LongTensor, shape (n,)
    batch_size : int

    Returns
    -------
    float
        In [0, 1].
    """
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            correct += int((model(x[start:start + batch_size]).argmax(1) == y[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, x.shape[0])


def train(config: TrainConfig, log: Optional[Callable[[str], None]] = None,
          progress: Optional[bool] = None) -> tuple[FashionInception, list]:
    """Train a fresh :class:`FashionInception` with ``config``; returns (model in eval mode, history).

    Seeded: the initial weights, the choice of training images and the batch order come from
    ``config.seed``, so a rerun on the same machine and torch version gives the same weights.

    Parameters
    ----------
    config : TrainConfig
    log : callable str -> None, optional
    progress : bool, optional
        A bar counting the training batches of all epochs on stderr (None: when stderr is a terminal).

    Returns
    -------
    model : FashionInception
    history : list
        One entry per epoch.
    """
    x_all, y_all = fashion_tensors("train")
    g = torch.Generator().manual_seed(config.seed)
    if not 1 <= config.n_train <= x_all.shape[0]:
        raise ConductanceError(f"n_train must be between 1 and {x_all.shape[0]}, got {config.n_train}")
    idx = torch.randperm(x_all.shape[0], generator=g)[:config.n_train]
    x, y = x_all[idx], y_all[idx]
    torch.manual_seed(config.seed)
    model = FashionInception()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = (config.n_train + config.batch_size - 1) // config.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch,
                                                pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    bar = Progress(progress, config.epochs * steps_per_epoch, "training the Fashion-MNIST Inception", "batches")
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(config.n_train, generator=g)
        total, start = 0.0, time.perf_counter()
        for b in range(steps_per_epoch):
            batch = order[b * config.batch_size:(b + 1) * config.batch_size]
            xb = x[batch]
            # random horizontal flips (garments are left-right symmetric): a cheap regulariser
            flip = torch.rand(xb.shape[0], generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = loss_fn(model(xb), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * batch.numel()
            bar.update(1)
        history.append({"epoch": epoch + 1, "loss": total / config.n_train,
                        "seconds": round(time.perf_counter() - start, 1)})
        if log:
            log(f"epoch {epoch + 1}/{config.epochs}: loss {total / config.n_train:.4f} "
                f"({history[-1]['seconds']} s)")
    bar.close()
    # Precise BatchNorm: the running averages lag behind the weights (badly so after a short run), so
    # re-estimate them as exact averages over training images with the final weights.
    from ..assets import recalibrate_batchnorm

    n_bn = min(config.bn_images, config.n_train)
    with torch.no_grad():
        recalibrate_batchnorm(model, [x[s:s + 500] for s in range(0, n_bn, 500)])
    return model.eval(), history


def load_or_train(config: TrainConfig = FULL_CONFIG, log: Optional[Callable[[str], None]] = None,
                  retrain: bool = False, progress: Optional[bool] = None) -> TrainedModel:
    """The network for ``config``: loaded from the cache, or trained (and cached) when missing.

    The test accuracy (on the first ``config.n_test`` Fashion-MNIST test images) is stored with
    the weights and re-measured after loading only if it is missing.

    Parameters
    ----------
    config : TrainConfig
    log : callable str -> None, optional
    retrain : bool
        Train even when the cache has the weights.
    progress : bool, optional
        A bar over the training batches when it trains (see :func:`train`).

    Returns
    -------
    TrainedModel
    """
    path = cache_path(config)
    if not retrain and os.path.exists(path):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model = FashionInception()
            model.load_state_dict(blob["state_dict"])
            model.eval()
            acc = blob.get("test_accuracy")
            if acc is None:
                acc = evaluate(model, *fashion_tensors("test", config.n_test))
            return TrainedModel(model, config, path, float(acc), trained_now=False,
                                train_seconds=blob.get("train_seconds"), history=list(blob.get("history", [])))
        except Exception as exc:  # noqa: BLE001 - a corrupt, truncated or stale file of any kind: retrain
            if log:
                log(f"cached weights {path} unreadable ({exc}); retraining")
    start = time.perf_counter()
    model, history = train(config, log, progress=progress)
    seconds = time.perf_counter() - start
    acc = evaluate(model, *fashion_tensors("test", config.n_test))
    tmp = path + f".tmp{os.getpid()}"
    torch.save({"state_dict": model.state_dict(), "config": asdict(config), "version": VERSION,
                "test_accuracy": acc, "train_seconds": seconds, "history": history}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return TrainedModel(model, config, path, acc, trained_now=True, train_seconds=seconds, history=history)
