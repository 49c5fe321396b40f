"""Rankings of units: the orders to ablate them in (given, per example, or random) and where each unit falls."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch

from ..errors import ConductanceError
from ..layers import LayerRef
from .intervene import _describe

Ranking = Union[torch.Tensor, Sequence[int], Mapping]


# --------------------------------------------------------------------------------------------
# rankings


def _orders(ranking: Any, ref: LayerRef, batch: int, n: int, layer_shape: tuple, unit_shape: tuple, units: str,
            device: torch.device) -> torch.Tensor:
    """Turn a ranking into orders (batch, L) of flat unit indices, most important first."""
    if isinstance(ranking, Mapping):
        result_units = getattr(ranking, "units", None)
        if result_units is not None and result_units != units:
            raise ConductanceError(f"the ranking was computed with units={result_units!r} but the ablation uses "
                                   f"units={units!r}; compute both with the same units")
        if ref.name not in ranking:
            raise ConductanceError(f"the ranking has no entry for layer {ref.name!r} (it has {list(ranking)})")
        ranking = ranking[ref.name]
    if isinstance(ranking, np.ndarray):
        ranking = torch.from_numpy(ranking)
    if isinstance(ranking, (list, tuple, range)):
        ranking = torch.as_tensor(list(ranking))
    if not isinstance(ranking, torch.Tensor):
        raise ConductanceError(f"a ranking must be a tensor of scores (batch, n_units), a LayerResult, or a list / "
                               f"LongTensor of unit indices; got {type(ranking).__name__}")
    where = _describe(ref, layer_shape, units, n)
    if ranking.is_floating_point():
        shape = tuple(ranking.shape)
        if shape in (unit_shape, (n,)):
            scores = ranking.reshape(1, n).expand(batch, n)
        elif shape in ((batch,) + unit_shape, (batch, n)):
            scores = ranking.reshape(batch, n)
        else:
            raise ConductanceError(f"a ranking of scores has shape {shape}, but the layer has {n} units "
                                   f"({units}); pass scores of shape ({batch}, {n}) (one row per example), "
                                   f"{(batch,) + unit_shape}, or ({n},) shared, computed with units={units!r} "
                                   "on this layer")
        if not torch.isfinite(scores).all():
            raise ConductanceError("the ranking scores contain NaN or Inf; rank by finite scores")
        return torch.argsort(scores.to(device), dim=1, descending=True, stable=True)
    if ranking.dtype == torch.bool or ranking.is_complex():
        raise ConductanceError(f"a ranking must hold scores (floating point) or unit indices (integers); got "
                               f"{ranking.dtype}")
    order = ranking.long().to(device)
    if order.dim() == 1:
        order = order.unsqueeze(0).expand(batch, -1)
    elif order.dim() != 2 or order.shape[0] != batch:
        raise ConductanceError(f"an order of unit indices must be (L,) shared or ({batch}, L) per example; got "
                               f"shape {tuple(order.shape)}")
    if order.shape[1] == 0:
        raise ConductanceError("the ranking is empty; give at least one unit")
    if order.shape[1] > n:
        raise ConductanceError(f"the ranking lists {order.shape[1]} units but {where}; rank this layer's units "
                               f"(with units={units!r}), at most {n} of them")
    if order.min() < 0 or order.max() >= n:
        raise ConductanceError(f"the ranking holds unit indices outside 0..{n - 1}: {where}; rank this layer's "
                               "units with flat indices")
    srt = order.sort(1).values
    if (srt[:, 1:] == srt[:, :-1]).any():
        raise ConductanceError("the ranking lists a unit twice; each unit may appear once per example")
    return order


def _positions(order: torch.Tensor, n: int) -> torch.Tensor:
    """pos[b, u] = rank of unit u for example b (0 = most important); units not ranked get n."""
    pos = torch.full((order.shape[0], n), n, dtype=torch.long, device=order.device)
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return pos.scatter_(1, order, ranks)


def _random_orders(batch: int, n: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    return torch.argsort(torch.rand(batch, n, generator=gen), dim=1).to(device)


def _seeds(random_seeds: Any) -> list[int]:
    if random_seeds is None or random_seeds is False:
        return []
    if isinstance(random_seeds, numbers.Integral):
        if random_seeds < 0:
            raise ConductanceError(f"random_seeds must be >= 0 (how many random rankings) or a list of seeds; got "
                                   f"{random_seeds}")
        return list(range(int(random_seeds)))
    return [int(s) for s in random_seeds]
