"""Measures as small functions of what the engine recorded.

A path measure maps the values at the two ends of a path interval,
``y0, g0, y1, g1`` (each (m, *layer_shape)) and the interval's ends ``a0, a1``
(each (m,)) to the interval's contribution (m, *layer_shape). The engine sums the
contributions over the path; nothing here runs the model.
"""

from __future__ import annotations

import torch


def _widths(a0: torch.Tensor, a1: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return (a1 - a0).to(like.dtype).view((-1,) + (1,) * (like.dim() - 1))


def conductance(y0: torch.Tensor, g0: torch.Tensor, y1: torch.Tensor, g1: torch.Tensor,
                a0: torch.Tensor, a1: torch.Tensor, rule: str) -> torch.Tensor:
    """Stieltjes sum of ``dF/dy`` against the change of ``y`` over one interval (the efficient form)."""
    g = g0 if rule == "left" else 0.5 * (g0 + g1)
    return g * (y1 - y0)


def internal_influence(y0: torch.Tensor, g0: torch.Tensor, y1: torch.Tensor, g1: torch.Tensor,
                       a0: torch.Tensor, a1: torch.Tensor, rule: str) -> torch.Tensor:
    """``integral dF/dy da`` over one interval (Leino et al. 2018), on the same straight path."""
    g = g0 if rule == "left" else 0.5 * (g0 + g1)
    return g * _widths(a0, a1, g)


PATH_MEASURES = {"conductance": conductance, "internal_influence": internal_influence}

#: Measures read at the input alone (a = 1): no path.
POINT_MEASURES = ("activation", "gradient", "grad_x_activation")
#: Integrated gradients on a straight line in the layer's own space: a path run per layer.
LIG = "layer_integrated_gradients"
MEASURES = tuple(PATH_MEASURES) + POINT_MEASURES + (LIG,)
