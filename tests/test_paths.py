"""conductance.paths as a module: grids, quadrature nodes and weights, comparison grids."""

import numpy as np
import pytest
import torch

from conductance import paths
from conductance.errors import ConductanceError


@pytest.mark.parametrize("method", paths.FIXED_METHODS)
@pytest.mark.parametrize("n_steps", [1, 2, 7, 32])
def test_every_fixed_rule_has_n_steps_plus_one_increasing_points(method, n_steps):
    grid = paths.fixed_grid(method, n_steps)
    assert grid.n_points == n_steps + 1
    assert np.all(np.diff(grid.alphas) > 0)
    assert grid.alphas[0] >= 0.0 and grid.alphas[-1] <= 1.0
    assert grid.has_endpoints == bool(grid.alphas[0] == 0.0 and grid.alphas[-1] == 1.0)
    expected_rule = "trapezoid" if method in ("gausslegendre", "uniform") else "left"
    assert grid.interval_rule == expected_rule


def test_end_points_of_each_rule():
    n = 4
    ends = {"gausslegendre": (0.0, 1.0), "uniform": (0.0, 1.0), "uniform_left": (0.0, 1.0),
            "riemann_trapezoid": (0.0, 1.0), "riemann_left": (0.0, 0.8), "riemann_right": (0.2, 1.0),
            "riemann_middle": (0.1, 0.9)}
    for method, (lo, hi) in ends.items():
        a = paths.fixed_grid(method, n).alphas      # n + 1 = 5 points
        assert a[0] == pytest.approx(lo, abs=1e-7) and a[-1] == pytest.approx(hi, abs=1e-7), method
    captum = paths.fixed_grid("captum", n)
    assert not captum.has_endpoints and captum.alphas[0] > 0 and captum.alphas[-1] < 1
    np.testing.assert_allclose(paths.fixed_grid("uniform", 4).alphas, [0, 0.25, 0.5, 0.75, 1.0])


def test_our_gausslegendre_grid_is_the_nodes_between_both_end_points():
    grid = paths.fixed_grid("gausslegendre", 3)        # 0, two nodes, 1
    r = 1 / np.sqrt(3)                                  # the 2-node rule's nodes on [-1, 1] are -+1/sqrt(3)
    np.testing.assert_allclose(grid.alphas, [0.0, (1 - r) / 2, (1 + r) / 2, 1.0], atol=1e-15)


def test_unknown_fixed_method_is_refused():
    with pytest.raises(ValueError, match="unknown fixed method 'simpson'"):
        paths.fixed_grid("simpson", 4)


@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_gauss_legendre_integrates_polynomials_exactly_to_degree_2n_minus_1(n):
    nodes, weights = paths.captum_rule("captum_gausslegendre", n)
    np.testing.assert_allclose(nodes, paths.gauss_legendre_nodes(n), atol=0)
    for degree in range(2 * n):
        assert np.sum(weights * nodes ** degree) == pytest.approx(1 / (degree + 1), rel=1e-12), degree
    # and not beyond: degree 2n is where an n-point rule stops being exact (visibly so for small n)
    if n <= 5:
        assert abs(np.sum(weights * nodes ** (2 * n)) - 1 / (2 * n + 1)) > 1e-6


@pytest.mark.parametrize("n", [300, 301])
def test_newton_branch_above_the_eigen_limit_matches_numpy(n):
    assert n > paths.EIGEN_NODES
    ours = paths.gauss_legendre_nodes(n)
    theirs, _ = np.polynomial.legendre.leggauss(n)
    np.testing.assert_allclose(ours, 0.5 * (1 + theirs), rtol=0, atol=1e-12)
    if n % 2:
        assert ours[n // 2] == 0.5


@pytest.mark.parametrize("name", paths.CAPTUM_RIEMANN)
def test_captum_positions_are_float32_linspace_values(name):
    n = 7
    alphas, steps = paths.captum_rule(name, n)
    lo, hi = {"riemann_left": (0, 1 - 1 / n), "riemann_right": (1 / n, 1), "riemann_middle": (1 / (2 * n),
              1 - 1 / (2 * n)), "riemann_trapezoid": (0, 1)}[name]
    expected = torch.linspace(lo, hi, n, dtype=torch.float32).double().numpy()
    np.testing.assert_array_equal(alphas, expected)
    np.testing.assert_array_equal(alphas.astype(np.float32).astype(np.float64), alphas)   # float32 values
    assert steps.sum() == pytest.approx(1.0 - (1 / n if name == "riemann_trapezoid" else 0.0))
    if name == "riemann_trapezoid":
        assert steps[0] == steps[-1] == pytest.approx(0.5 / n)


def test_captum_rule_needs_two_points_and_a_known_name():
    with pytest.raises(ConductanceError, match="at least 2 path points"):
        paths.captum_rule("riemann_left", 1)
    with pytest.raises(ValueError, match="not a Captum rule"):
        paths.captum_rule("uniform", 4)


def test_captum_point_rule_defaults_per_measure():
    a, w = paths.captum_point_rule("captum", 5, "neuron_conductance")
    np.testing.assert_array_equal(a, paths.captum_rule("riemann_trapezoid", 5)[0])
    a, w = paths.captum_point_rule("captum", 5, "internal_influence")
    nodes, weights = np.polynomial.legendre.leggauss(5)
    np.testing.assert_allclose(a, (nodes + 1) / 2)
    np.testing.assert_allclose(w, weights / 2)
    assert paths.captum_point_rule("riemann_middle", 5, "internal_influence")[0].shape == (5,)


@pytest.mark.parametrize("rule", ["left", "trapezoid"])
def test_point_weights_sum_to_the_covered_length(rule):
    alphas = np.array([0.1, 0.15, 0.4, 0.42, 0.9])
    w = paths.point_weights(alphas, rule)
    assert w.shape == alphas.shape
    assert w.sum() == pytest.approx(0.8)
    if rule == "left":
        np.testing.assert_allclose(w, [0.05, 0.25, 0.02, 0.48, 0.0])
    else:
        # the trapezoid rule is exact for a linear integrand: integral of 2a from 0.1 to 0.9 is 0.8
        assert np.sum(w * 2 * alphas) == pytest.approx(0.9 ** 2 - 0.1 ** 2)
    with pytest.raises(ValueError, match="unknown interval rule"):
        paths.point_weights(alphas, "simpson")


def test_coarse_and_quarter_positions():
    np.testing.assert_array_equal(paths.coarse_positions(1), [0])
    np.testing.assert_array_equal(paths.coarse_positions(2), [0, 1])
    np.testing.assert_array_equal(paths.coarse_positions(5), [0, 2, 4])
    np.testing.assert_array_equal(paths.coarse_positions(6), [0, 2, 4, 5])
    np.testing.assert_array_equal(paths.quarter_positions(9), [0, 4, 8])
    np.testing.assert_array_equal(paths.quarter_positions(8), [0, 4, 7])     # coarse [0 2 4 6 7] -> its [0 2 4]
    for n in range(2, 40):
        coarse, quarter = paths.coarse_positions(n), paths.quarter_positions(n)
        assert coarse[0] == quarter[0] == 0 and coarse[-1] == quarter[-1] == n - 1
        assert set(quarter) <= set(coarse)
        assert len(coarse) == (n + 1) // 2 + (n % 2 == 0)


@pytest.mark.parametrize("method", ["gausslegendre", "uniform", "riemann_trapezoid"])
@pytest.mark.parametrize("n_steps", [4, 9, 16])
def test_comparison_weights_integrate_linear_functions_exactly(method, n_steps):
    alphas = paths.fixed_grid(method, n_steps).alphas
    weights = paths.comparison_point_weights(alphas)
    assert set(weights) == {"trapezoid", "coarse", "quarter"}
    for name, w in weights.items():
        assert w.shape == alphas.shape
        assert np.sum(w * (3 * alphas + 2)) == pytest.approx(3.5, rel=1e-12), name   # integral over [0, 1]
    # each comparison uses only its own points
    assert np.all(weights["coarse"][np.setdiff1d(np.arange(len(alphas)), paths.coarse_positions(len(alphas)))]
                  == 0)


def test_comparison_weights_cover_what_a_grid_without_end_points_leaves_out():
    alphas = paths.fixed_grid("captum", 6).alphas          # interior Gauss-Legendre nodes only
    for w in paths.comparison_point_weights(alphas).values():
        assert w.sum() == pytest.approx(1.0, rel=1e-12)    # constants integrate to the whole path's length


def test_comparison_weights_of_one_or_two_points_have_no_coarser_grid():
    w = paths.comparison_point_weights(np.array([0.0, 1.0]))
    assert set(w) == {"trapezoid", "coarse"}
    np.testing.assert_array_equal(w["trapezoid"], [0.5, 0.5])
    np.testing.assert_array_equal(w["coarse"], [0.0, 0.0])
    one = paths.comparison_point_weights(np.array([0.3]))
    np.testing.assert_array_equal(one["trapezoid"], [1.0])
