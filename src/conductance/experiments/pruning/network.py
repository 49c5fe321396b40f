"""A small ResNet for 28x28 Fashion-MNIST images (the pruning study's second network), its training and cache."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from .. import cache_dir
from .. import fashion_inception as fi

RESNET_VERSION = "fashion-resnet-v1"


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
    from ...assets import recalibrate_batchnorm

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
