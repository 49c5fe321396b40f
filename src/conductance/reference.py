"""A slow, literal implementation of the paper's formulas, for checking the engine.

It shares no code with the engine: it builds full Jacobians ``dy/dx`` at every path
point and applies Cond^y_i = (x_i - x'_i) * sum_k w_k * dF/dy(x(a_k)) * dy/dx_i(x(a_k))
with Gauss-Legendre quadrature (or the midpoint rule for piecewise-linear networks).
Use it on small models and single examples only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch
from torch import nn


def _quadrature(n_steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        return 0.5 * (nodes + 1.0), 0.5 * weights
    if rule == "midpoint":
        return (np.arange(n_steps) + 0.5) / n_steps, np.full(n_steps, 1.0 / n_steps)
    raise ValueError(f"unknown rule {rule!r}; use 'gausslegendre' or 'midpoint'")


def _module(model: nn.Module, layer: str) -> nn.Module:
    return dict(model.named_modules())[layer]


def neuron_conductance(model: nn.Module, x: torch.Tensor, layer: str, *, baseline: Optional[torch.Tensor] = None,
                       target: Optional[int | Callable] = None, n_steps: int = 200,
                       rule: str = "midpoint") -> torch.Tensor:
    """Cond^y_i for every unit y of ``layer`` and every input feature i, for one example.

    Parameters
    ----------
    x : Tensor, shape (*input_shape)
        One example, without a batch dimension.
    target : int, callable on the output (1, ...) returning (1,), or None for a scalar output.

    Returns
    -------
    Tensor, shape (*layer_shape, *input_shape)
    """
    x = x.detach().to(torch.float64)
    base = torch.zeros_like(x) if baseline is None else baseline.detach().to(torch.float64).expand_as(x)
    # a float64 copy: the caller's model is left as it was (dtype included). Its hooks are copied
    # with it on purpose: some are part of what the model computes (torch.nn.utils.prune's masks).
    model = copy.deepcopy(model).double()
    module = _module(model, layer)
    alphas, weights = _quadrature(n_steps, rule)

    def f_and_y(point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        store: dict[str, torch.Tensor] = {}
        handle = module.register_forward_hook(lambda m, a, out: store.setdefault("y", out))
        try:
            out = model(point.unsqueeze(0))
        finally:
            handle.remove()
        if callable(target):
            F = target(out)[0]
        elif target is None:
            F = out.reshape(-1)[0]
        else:
            F = out[0, target]
        return F, store["y"]

    total: Optional[torch.Tensor] = None
    for a, w in zip(alphas, weights):
        point = (base + float(a) * (x - base)).requires_grad_(True)
        F, y = f_and_y(point)
        (dF_dy,) = torch.autograd.grad(F, y, retain_graph=True)
        dF_dy = dF_dy[0]
        jac = torch.autograd.functional.jacobian(lambda p: f_and_y(p)[1][0], point, vectorize=True)  # (*S, *X)
        term = float(w) * dF_dy.reshape(dF_dy.shape + (1,) * x.dim()) * jac
        total = term if total is None else total + term
    assert total is not None  # _quadrature refuses n_steps < 1
    return (total * (x - base)).to(torch.float32)


def layer_conductance(model: nn.Module, x: torch.Tensor, layer: str, **kwargs) -> torch.Tensor:
    """Cond^y = sum_i Cond^y_i for every unit of ``layer``, one example; shape (*layer_shape).

    Parameters
    ----------
    model : nn.Module
    x : Tensor, shape (*input_shape)
        One example, without a batch dimension.
    layer : str
        Dotted module name.
    **kwargs
        ``baseline``, ``target``, ``n_steps``, ``rule``: as for :func:`neuron_conductance`.

    Returns
    -------
    Tensor, shape (*layer_shape)
    """
    x_dims = x.dim()
    per_input = neuron_conductance(model, x, layer, **kwargs)
    return per_input.flatten(per_input.dim() - x_dims).sum(-1)


def integrated_gradients(model: nn.Module, x: torch.Tensor, *, baseline: Optional[torch.Tensor] = None,
                         target: Optional[int] = None, n_steps: int = 200, rule: str = "midpoint") -> torch.Tensor:
    """IG_i for one example (shape of ``x``): (x_i - x'_i) * integral dF/dx_i da.

    Parameters
    ----------
    model : nn.Module
    x : Tensor, shape (*input_shape)
        One example, without a batch dimension.
    baseline : Tensor, optional
        Broadcastable to ``x``; zeros by default.
    target : int, optional
        Output index; None for a scalar output.
    n_steps : int
    rule : str
        ``"midpoint"`` or ``"gausslegendre"``.

    Returns
    -------
    Tensor, shape (*input_shape)
    """
    x = x.detach().to(torch.float64)
    base = torch.zeros_like(x) if baseline is None else baseline.detach().to(torch.float64).expand_as(x)
    model = copy.deepcopy(model).double()
    alphas, weights = _quadrature(n_steps, rule)
    total = torch.zeros_like(x)
    for a, w in zip(alphas, weights):
        point = (base + float(a) * (x - base)).requires_grad_(True)
        out = model(point.unsqueeze(0))
        F = out.reshape(-1)[0] if target is None else out[0, target]
        (grad,) = torch.autograd.grad(F, point)
        total += float(w) * grad
    return (total * (x - base)).to(torch.float32)
