"""Integration paths and quadrature rules.

Every rule here describes a set of points ``a_0 < a_1 < ... < a_n`` on the straight
path ``x(a) = x' + a (x - x')`` and how consecutive points are combined:

- ``"trapezoid"`` intervals: ``(g_k + g_{k+1}) / 2 * (y_{k+1} - y_k)``
- ``"left"`` intervals: ``g_k * (y_{k+1} - y_k)``

Point weights (for integrals of the form ``integral h(a) da``, used by neuron
conductance and internal influence) follow from the same choice. Captum's rules
(``"captum"`` and the ``"riemann_*"`` names) are reproduced as Captum 0.9 computes them:
LayerConductance takes a left sum over Captum's positions on ``n_steps + 1`` points; its point
measures weight ``n_steps`` points by Captum's step sizes (:func:`captum_point_rule`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConductanceError

#: Captum 0.9's Riemann rules, by Captum's names; each reproduces Captum's numbers for that method.
CAPTUM_RIEMANN = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
#: Rules that reproduce Captum's arithmetic ("captum" is Captum's default for each measure).
CAPTUM_RULES = ("captum",) + CAPTUM_RIEMANN
#: Fixed rules a user can ask for by name, with the adaptive rule on top.
FIXED_METHODS = ("gausslegendre", "uniform", "uniform_left") + CAPTUM_RULES
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
    """Gauss-Legendre nodes mapped from [-1, 1] to [0, 1], increasing; shape (n,).

    Parameters
    ----------
    n : int
        Number of nodes, at least 1.

    Returns
    -------
    ndarray, shape (n,)
    """
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
        ``"uniform_left"`` (uniform grid, left sums), ``"captum"`` (Captum 0.9's
        LayerConductance default: ``n_steps + 1`` Gauss-Legendre nodes, left sums) or one of
        Captum's ``"riemann_*"`` names (LayerConductance with that method: Captum's
        ``n_steps + 1`` positions for it, left sums).
    n_steps : int
        Number of intervals; the grid has ``n_steps + 1`` points.

    Returns
    -------
    Grid
    """
    if method in CAPTUM_RIEMANN:
        alphas, _ = captum_rule(method, n_steps + 1)
        return Grid(alphas, "left", bool(alphas[0] == 0.0 and alphas[-1] == 1.0))
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


def captum_rule(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Captum 0.9's ``(alphas, step_sizes)`` for its method ``name`` on ``n`` points; shapes (n,).

    ``name`` is a ``"riemann_*"`` name or ``"captum_gausslegendre"`` (Captum's meaning of
    "gausslegendre": Gauss-Legendre nodes with their weights, no end points; ours differs).
    Captum builds its Riemann positions with float32 ``torch.linspace``; they are built the same
    way here so that results agree to float32 rounding, not just to the rule.

    Parameters
    ----------
    name : str
    n : int
        Number of points (Captum's ``n_steps``).

    Returns
    -------
    alphas, step_sizes : ndarray, shape (n,)
    """
    if name == "captum_gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return 0.5 * (1.0 + nodes), 0.5 * weights
    if name not in CAPTUM_RIEMANN:
        raise ValueError(f"not a Captum rule: {name!r}")
    if n < 2:
        raise ConductanceError(f"method={name!r} needs at least 2 path points, as in Captum; raise n_steps")
    kind = name.split("_", 1)[1]
    lo, hi = {"left": (0.0, 1 - 1 / n), "right": (1 / n, 1.0), "middle": (1 / (2 * n), 1 - 1 / (2 * n)),
              "trapezoid": (0.0, 1.0)}[kind]
    alphas = np.asarray(torch.linspace(lo, hi, n, dtype=torch.float32).tolist(), dtype=np.float64)
    steps = np.full(n, 1.0 / n)
    if kind == "trapezoid":
        steps[0] /= 2
        steps[-1] /= 2
    return alphas, steps


def captum_point_rule(method: str, n_steps: int, measure: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions and weights with which Captum 0.9 integrates a point measure; shapes (n_steps,).

    Captum's NeuronConductance, InternalInfluence and LayerIntegratedGradients take ``n_steps``
    points (not ``n_steps + 1``) and weight each by its step size. ``method="captum"`` is each
    class's default: ``"riemann_trapezoid"`` for ``measure="neuron_conductance"``, Captum's
    Gauss-Legendre rule for ``"internal_influence"`` and ``"layer_integrated_gradients"``.

    Parameters
    ----------
    method : str
        ``"captum"`` or a ``"riemann_*"`` name.
    n_steps : int
    measure : str

    Returns
    -------
    alphas, weights : ndarray, shape (n_steps,)
    """
    if method == "captum":
        name = "riemann_trapezoid" if measure == "neuron_conductance" else "captum_gausslegendre"
    elif method in CAPTUM_RIEMANN:
        name = method
    else:
        raise ValueError(f"not a Captum rule: {method!r}")
    return captum_rule(name, n_steps)


def point_weights(alphas: np.ndarray, interval_rule: str) -> np.ndarray:
    """Weights ``w_k`` with ``sum_k w_k h(a_k)`` approximating ``integral h(a) da`` over the grid.

    The weights are the ones implied by the interval rule, so a point-weighted integral
    and an interval (Stieltjes) sum use the same evaluations consistently. Shape (n_points,).

    Parameters
    ----------
    alphas : ndarray, shape (n_points,)
        Increasing positions.
    interval_rule : str
        ``"left"`` or ``"trapezoid"``.

    Returns
    -------
    ndarray, shape (n_points,)
        They add up to ``alphas[-1] - alphas[0]``.
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


def coarse_positions(n_points: int) -> np.ndarray:
    """Indices of the coarse grid of a fixed rule with ``n_points`` points: every other point from the
    first, and always the last (so both grids span the whole path).

    Parameters
    ----------
    n_points : int
        At least 1.

    Returns
    -------
    ndarray of int, shape ((n_points + 1) // 2,) or one more for an even ``n_points``
    """
    idx = np.arange(0, n_points, 2)
    if idx[-1] != n_points - 1:
        idx = np.append(idx, n_points - 1)
    return idx


def quarter_positions(n_points: int) -> np.ndarray:
    """Indices of the grid two halvings down: :func:`coarse_positions` of the coarse grid.

    Parameters
    ----------
    n_points : int

    Returns
    -------
    ndarray of int, shape (n_quarter,)
        Increasing indices into the full grid, first and last point included.
    """
    coarse = coarse_positions(n_points)
    return coarse[coarse_positions(len(coarse))]


def _trapezoid_on(alphas: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Trapezoid point weights on the points ``keep`` (zero elsewhere), with the pieces the grid
    leaves out at either end of [0, 1] given to its first and last points."""
    weights = np.zeros(alphas.shape[0])
    if alphas.shape[0] == 1:
        weights[0] = 1.0
        return weights
    weights[keep] = point_weights(alphas[keep], "trapezoid")
    weights[0] += alphas[0]
    weights[-1] += 1.0 - alphas[-1]
    return weights


def comparison_point_weights(alphas: np.ndarray) -> dict[str, np.ndarray]:
    """Point weights of the comparison sums for a point-weighted integral ``integral h(a) da``.

    ``"trapezoid"``: the trapezoid rule on all the points; ``"coarse"`` and ``"quarter"``: on every
    other and every fourth point (the last always kept). Each gives the pieces a grid leaves out at
    either end of [0, 1] to its first and last points. The sums with these weights go to
    :func:`conductance.engine.comparison_values`; each array has shape (n_points,). A grid of one
    or two points has no coarser grid: ``"coarse"`` is then zero and there is no ``"quarter"``.

    Parameters
    ----------
    alphas : ndarray, shape (n_points,)
        Increasing positions in [0, 1].

    Returns
    -------
    dict str -> ndarray, shape (n_points,)
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    n = alphas.shape[0]
    if len(coarse_positions(n)) == n:
        # one or two points: no coarser grid; zero weights make the estimate the distance to zero
        return {"trapezoid": _trapezoid_on(alphas, np.arange(n)), "coarse": np.zeros(n)}
    return {"trapezoid": _trapezoid_on(alphas, np.arange(n)),
            "coarse": _trapezoid_on(alphas, coarse_positions(n)),
            "quarter": _trapezoid_on(alphas, quarter_positions(n))}
