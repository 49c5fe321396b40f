"""Integration paths and quadrature rules.

Every rule here describes a set of points ``a_0 < a_1 < ... < a_n`` on the straight
path ``x(a) = x' + a (x - x')`` and how consecutive points are combined:

- ``"trapezoid"`` intervals: ``(g_k + g_{k+1}) / 2 * (y_{k+1} - y_k)``
- ``"left"`` intervals: ``g_k * (y_{k+1} - y_k)``

Point weights (for integrals of the form ``integral h(a) da``, used by neuron
conductance and internal influence) follow from the same choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConductanceError

#: Fixed rules a user can ask for by name, with the adaptive rule on top.
FIXED_METHODS = ("gausslegendre", "uniform", "uniform_left", "captum")
METHODS = FIXED_METHODS + ("adaptive",)


@dataclass(frozen=True)
class Grid:
    """Points along the path and how they are combined.

    Attributes
    ----------
    alphas : np.ndarray, shape (n_points,)
        Increasing positions in [0, 1].
    interval_rule : str
        ``"trapezoid"`` or ``"left"``.
    has_endpoints : bool
        Whether ``alphas[0] == 0`` and ``alphas[-1] == 1`` (then F(x) - F(x') comes for free).
    """

    alphas: np.ndarray
    interval_rule: str
    has_endpoints: bool

    @property
    def n_points(self) -> int:
        return int(self.alphas.shape[0])


#: Up to this many nodes numpy's eigenvalue method (O(n^2) memory) is used, as Captum does; above
#: it Newton's method on the Legendre recurrence (O(n) memory).
EIGEN_NODES = 256


def gauss_legendre_nodes(n: int) -> np.ndarray:
    """Gauss-Legendre nodes mapped from [-1, 1] to [0, 1], increasing; shape (n,)."""
    if n <= EIGEN_NODES:
        nodes, _ = np.polynomial.legendre.leggauss(n)
    else:
        nodes = _legendre_roots(n)
    return 0.5 * (1.0 + nodes)


def _legendre_roots(n: int) -> np.ndarray:
    """Roots of the Legendre polynomial P_n, increasing, by Newton's method in O(n) memory.

    Starts from Tricomi's asymptotic estimate; each step evaluates P_n and P_{n-1} at all
    roots at once with the three-term recurrence (O(n^2) time, a second or so at n = 20000)."""
    k = np.arange(1, n // 2 + 1)                     # the positive half; the roots are symmetric
    x = (1 - (n - 1) / (8.0 * n ** 3)) * np.cos(np.pi * (4 * k - 1) / (4 * n + 2))
    for _ in range(20):
        p_prev, p = np.ones_like(x), x.copy()
        for j in range(2, n + 1):
            p_prev, p = p, ((2 * j - 1) * x * p - (j - 1) * p_prev) / j
        step = p / (n * (x * p - p_prev) / (x * x - 1))
        x = x - step
        if np.max(np.abs(step)) < 1e-15:
            break
    middle = np.zeros(1) if n % 2 else np.zeros(0)
    return np.concatenate([-x, middle, x[::-1]])


def fixed_grid(method: str, n_steps: int) -> Grid:
    """Grid of ``n_steps + 1`` points for a fixed rule.

    Parameters
    ----------
    method : str
        ``"gausslegendre"`` (both end points plus ``n_steps - 1`` Gauss-Legendre nodes,
        trapezoid intervals), ``"uniform"`` (uniform grid, trapezoid intervals),
        ``"uniform_left"`` (uniform grid, left sums) or ``"captum"`` (Captum 0.9's
        LayerConductance default: ``n_steps + 1`` Gauss-Legendre nodes, left sums).
    n_steps : int
        Number of intervals; the grid has ``n_steps + 1`` points.
    """
    if method == "gausslegendre":
        inner = gauss_legendre_nodes(n_steps - 1) if n_steps > 1 else np.zeros(0)
        return Grid(np.concatenate([[0.0], inner, [1.0]]), "trapezoid", True)
    if method == "uniform":
        return Grid(np.linspace(0.0, 1.0, n_steps + 1), "trapezoid", True)
    if method == "uniform_left":
        return Grid(np.linspace(0.0, 1.0, n_steps + 1), "left", True)
    if method == "captum":
        return Grid(gauss_legendre_nodes(n_steps + 1), "left", False)
    raise ValueError(f"unknown fixed method {method!r}; choose one of {FIXED_METHODS}")


def point_weights(alphas: np.ndarray, interval_rule: str) -> np.ndarray:
    """Weights ``w_k`` with ``sum_k w_k h(a_k)`` approximating ``integral h(a) da`` over the grid.

    The weights are the ones implied by the interval rule, so a point-weighted integral
    and an interval (Stieltjes) sum use the same evaluations consistently. Shape (n_points,).
    """
    widths = np.diff(alphas)
    weights = np.zeros_like(alphas)
    if interval_rule == "left":
        weights[:-1] = widths
    elif interval_rule == "trapezoid":
        weights[:-1] += widths / 2
        weights[1:] += widths / 2
    else:
        raise ValueError(f"unknown interval rule {interval_rule!r}")
    return weights


def captum_neuron_grid(n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Points and weights of Captum 0.9's NeuronConductance default ("riemann_trapezoid").

    Its weights are ``1/n`` with both ends halved, so they sum to ``(n - 1) / n`` rather
    than 1; reproduced here only so results can be compared with Captum's.
    """
    if n_steps < 2:
        raise ConductanceError("method='captum' for neuron conductance needs n_steps >= 2, as Captum does")
    alphas = np.linspace(0.0, 1.0, n_steps)
    weights = np.full(n_steps, 1.0 / n_steps)
    weights[0] /= 2
    weights[-1] /= 2
    return alphas, weights
