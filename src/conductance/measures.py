"""Measures as small functions of what the engine recorded.

A path measure maps one path interval to its contribution, from

- ``gbar``: the interval's gradient ``dF/dy`` as the rule takes it: ``(g0 + g1) / 2`` for the
  trapezoid rule, ``g0`` for the left rule,
- ``dy``: the layer's change ``y1 - y0`` over the interval,
- ``width``: ``a1 - a0``, broadcastable against ``dy``,
- ``out``: a scratch tensor of ``dy``'s shape that the measure may overwrite and return (it may
  be ``gbar``'s own buffer: the measures are elementwise, so writing in place is safe),

each (m, *layer_shape) but ``width``. Both measures are linear in ``gbar``, which the engine uses
(the trapezoid rule is the mean of the left and right sums; for units summed over positions it
gets ``g0 + g1`` and halves the units' sums). Writing into ``out`` keeps the
bookkeeping free of large temporary allocations. Nothing here runs the model.
"""

from __future__ import annotations

import torch


def conductance(gbar: torch.Tensor, dy: torch.Tensor, width: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Stieltjes sum of ``dF/dy`` against the change of ``y`` over one interval (the efficient form).

    Parameters
    ----------
    gbar, dy : Tensor, shape (m, *layer_shape)
    width : Tensor, broadcastable to ``gbar``
        Unused (conductance does not depend on it).
    out : Tensor, shape (m, *layer_shape)

    Returns
    -------
    Tensor, shape (m, *layer_shape)
        ``out``, holding ``gbar * dy``.
    """
    return torch.mul(gbar, dy, out=out)


def internal_influence(gbar: torch.Tensor, dy: torch.Tensor, width: torch.Tensor, out: torch.Tensor
                       ) -> torch.Tensor:
    """``integral dF/dy da`` over one interval (Leino et al. 2018), on the same straight path.

    Parameters
    ----------
    gbar : Tensor, shape (m, *layer_shape)
    dy : Tensor, shape (m, *layer_shape)
        Unused.
    width : Tensor, broadcastable to ``gbar``
    out : Tensor, shape (m, *layer_shape)

    Returns
    -------
    Tensor, shape (m, *layer_shape)
        ``out``, holding ``gbar * width``.
    """
    return torch.mul(gbar, width, out=out)


def add_conductance(total: torch.Tensor, gbar: torch.Tensor, dy: torch.Tensor, width: torch.Tensor,
                    scale: float = 1.0) -> None:
    """``total += scale * gbar * dy`` in place: :func:`conductance` added straight into a running sum.

    Parameters
    ----------
    total, gbar, dy : Tensor, shape (b, *layer_shape)
        The running sum of a block of ``b`` examples, and one interval of each of them.
    width : Tensor, 0-dim
        Unused.
    scale : float
    """
    total.addcmul_(gbar, dy, value=scale)


def add_internal_influence(total: torch.Tensor, gbar: torch.Tensor, dy: torch.Tensor, width: torch.Tensor,
                           scale: float = 1.0) -> None:
    """``total += scale * gbar * width`` in place: :func:`internal_influence` added into a running sum.

    Parameters
    ----------
    total, gbar : Tensor, shape (b, *layer_shape)
    dy : Tensor, shape (b, *layer_shape)
        Unused.
    width : Tensor, 0-dim
        The interval's width, shared by the ``b`` examples.
    scale : float
    """
    total.addcmul_(gbar, width, value=scale)


PATH_MEASURES = {"conductance": conductance, "internal_influence": internal_influence}

#: For each path measure, the same contribution added in place into a running sum, one path position
#: (a block of examples) at a time: the engine's fixed rules sum element-level layers this way, so the
#: per-interval contributions are never written out whole (see ``engine.add_by_position``).
ACCUMULATORS = {conductance: add_conductance, internal_influence: add_internal_influence}

#: Measures read at the input alone (a = 1): no path.
POINT_MEASURES = ("activation", "gradient", "grad_x_activation")
#: Integrated gradients on a straight line in the layer's own space: a path run per layer.
LIG = "layer_integrated_gradients"
MEASURES = tuple(PATH_MEASURES) + POINT_MEASURES + (LIG,)
