"""Settings of the pruning study: the criteria compared, the quick and full sizes, the photos and parts."""

from __future__ import annotations

from typing import Any

from .. import fashion_inception as fi
from .network import RESNET_FULL, RESNET_QUICK

#: Criteria compared, in the order shown.
CRITERIA = ("conductance", "conductance_class_abs", "grad_x_activation", "activation", "taylor", "l1", "random")


#: Statistic of the calibration values used for conductance and gradient x activation (docs/pruning.md).
SIGNED_STATISTIC = "class_max"


QUICK: dict[str, Any] = dict(ratios=[0.1, 0.3, 0.5, 0.7], n_cal=256, n_test=2000, n_ft=2000, seeds=3, n_steps=16,
                             inception=fi.QUICK_CONFIG, resnet=RESNET_QUICK, effnet_ratios=[0.05, 0.1])


FULL: dict[str, Any] = dict(ratios=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], n_cal=512, n_test=10000, n_ft=5000,
                            seeds=3, n_steps=32, inception=fi.FULL_CONFIG, resnet=RESNET_FULL,
                            effnet_ratios=[0.05, 0.1, 0.2, 0.3])


EFFNET_CAL = ["chelsea", "coffee", "rocket", "astronaut"]


EFFNET_HELD_OUT = ["motorcycle", "china", "flower", "grace_hopper"]


PARTS = ("inception", "resnet", "efficientnet")
