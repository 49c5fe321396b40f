"""Flip counts: units removed in ranking order until the top-1 label changes (:func:`flip_count`,
:func:`flipped_by_top_k`)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..layers import LayerSpec
from ..progress import check_progress
from .rankings import Ranking, _positions
from .runner import _counting, _Session, _session


def flip_count(model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, ranking: Ranking, *,
               mode: str = "zero", values: Any = None, units: str = "neuron", max_units: Optional[int] = None,
               baselines: Any = None, additional_forward_args: Any = None, forward_kwargs: Optional[dict] = None,
               batch_size: Optional[int] = None, expand_at_layer: Optional[bool] = None,
               progress: Optional[bool] = None) -> torch.Tensor:
    """How many top-ranked units must be ablated before each example's top-1 label changes.

    For each example, units are ablated cumulatively in ranking order; the count is the
    first k at which the model's top-1 label differs from its unablated label. Every
    prefix k = 1, 2, ... is evaluated in order (a label can change back, so a search
    that assumes monotone flips would be wrong); many (example, prefix) rows share each
    forward pass, the prefix window of the examples still unflipped doubles each round,
    and the run stops as soon as every example has flipped.

    Parameters
    ----------
    ranking : Tensor, LayerResult or list of ints
        Scores (batch, n_units) or (batch, *unit_shape), highest first, per example
        (ties: lower index first); scores (n_units,) shared; or unit indices, most
        important first: a list / 1-D LongTensor shared by the batch, or a LongTensor
        (batch, L) per example. An index order may list fewer units than the layer has.
        A LayerResult is indexed by the layer's name.
    mode, values : see :func:`ablate`. With mode="baseline" and no values, the layer's
        output at ``baselines`` (default zeros) is used.
    units : {"neuron", "channel"}
    max_units : int, optional
        Largest prefix tried; default all ranked units.
    batch_size : int, optional
        Rows (example, prefix) per forward pass; default about 8M input elements, at most 1024.
    expand_at_layer : bool, optional
        True: the layers below the ablated one run once per example and the layer's output is
        expanded to one row per prefix (submodules handed the inputs get one row per example;
        the model itself still sees one input row per prefix). False: every row repeats the
        whole forward. None (default): a probe on two examples decides; expansion is kept only
        if it runs and gives the plain run's scores (a skip connection from the inputs to
        above the layer, for instance, makes it fail and the plain run is used).
    progress : bool, optional
        A bar on stderr counting the ablated rows evaluated (the total is known only at the end:
        the run stops when every example has flipped); None (default): when stderr is a terminal.

    Returns
    -------
    Tensor (batch,), float32
        The count per example, ``inf`` where the label never changed within ``max_units``.
    """
    check_progress(progress)
    s = _session(model, inputs, layer, mode, values, units, baselines, additional_forward_args, forward_kwargs,
                 batch_size, expand_at_layer)
    order = s.orders(ranking)
    limit = order.shape[1]
    k_max = limit if max_units is None else s.check_k(max_units, limit, "max_units")
    with _counting(s, progress, "flip counts"):
        return s.flip_counts(_positions(order, s.n_units), k_max)


def flipped_by_top_k(model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, ranking: Ranking, k: int = 10, *,
                     mode: str = "zero", values: Any = None, units: str = "neuron", baselines: Any = None,
                     additional_forward_args: Any = None, forward_kwargs: Optional[dict] = None,
                     batch_size: Optional[int] = None, expand_at_layer: Optional[bool] = None) -> torch.Tensor:
    """Whether ablating each example's top ``k`` units at once changes its top-1 label: BoolTensor (batch,).

    This is the paper's "removing the top 10 filters flipped 5 of 100" test. It is not the same
    as ``flip_count <= k``: a label that changed at a smaller prefix can change back by k.

    Parameters
    ----------
    model, inputs, layer, ranking, mode, values, units
        As in :func:`flip_count`.
    baselines, additional_forward_args, forward_kwargs, batch_size, expand_at_layer
        As in :func:`flip_count`.
    k : int
        How many top-ranked units to ablate together (0 <= k <= ranked units).

    Returns
    -------
    BoolTensor, shape (batch,)
        True where the top-1 label differs from the unablated one.
    """
    s = _session(model, inputs, layer, mode, values, units, baselines, additional_forward_args, forward_kwargs,
                 batch_size, expand_at_layer)
    order = s.orders(ranking)
    k = s.check_k(k, order.shape[1], "k")
    return _flipped_at(s, _positions(order, s.n_units), k)


def _flipped_at(s: _Session, pos: torch.Tensor, k: int) -> torch.Tensor:
    scores = s.at_k([pos], [k], keep=False)[0, :, 0]
    return scores.argmax(1) != s.labels
