"""Per-unit accuracy: ``result.unit_error`` estimates each layer's per-unit error, and ``tolerance``
bounds it (not only the layer's completeness)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import conductance as cd
from conductance import ConductanceWarning
from models import TwoBranch, random_cnn, random_mlp


class Complementary(nn.Module):
    """Units in identical pairs ``h = c_k x``, read through opposite gates:
    ``F = sum_k w_k relu(h1_k - t_k) + w_k (h2_k - relu(h2_k - t_k))``. The gates' jumps cancel in
    the sum, so ``F = (sum_k w_k c_k) x`` is linear along the path and completeness is exact on any
    grid, while every unit's gradient jumps at ``a = t_k / (c_k x)``: per-unit values converge
    slowly. Closed form (baseline 0, ``c_k x > 0``): ``Cond(h1_k) = w_k relu(c_k x - t_k)``,
    ``Cond(h2_k) = w_k (c_k x - relu(c_k x - t_k))``.
    """

    def __init__(self, scales: torch.Tensor, thresholds: torch.Tensor, weights: torch.Tensor):
        super().__init__()
        self.register_buffer("c", scales)
        self.register_buffer("t", thresholds)
        self.register_buffer("w", weights)
        self.units = nn.Identity()

    def forward(self, x):                      # x: (batch, 1)
        h = self.units(torch.cat([x * self.c, x * self.c], dim=1))
        h1, h2 = h.chunk(2, dim=1)
        return (self.w * (torch.relu(h1 - self.t) + h2 - torch.relu(h2 - self.t))).sum(1)

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        reach = x.double() * self.c.double()
        w = self.w.double()
        gated = torch.relu(reach - self.t.double())
        return torch.cat([w * gated, w * (reach - gated)], dim=1)


@pytest.fixture
def complementary():
    scales = torch.tensor([0.8, 1.3, 1.0, 0.6, 1.7, 1.1])
    thresholds = torch.tensor([0.37, 0.61, 0.93, 0.27, 1.55, 1.81])
    weights = torch.tensor([0.9, -0.4, 0.7, 1.1, -0.6, 0.8])
    return Complementary(scales, thresholds, weights).eval(), torch.tensor([[2.1], [1.7], [2.6]])


def _distance(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    v, r = values.double().flatten(1), reference.double().flatten(1)
    return (v - r).norm(dim=1) / r.norm(dim=1)


def test_closed_form_case_meets_completeness_coarsely_but_not_per_unit(complementary):
    model, x = complementary
    exact = model.exact(x)
    # the closed form is right: completeness holds for it
    torch.testing.assert_close(exact.sum(1), (model(x) - model(torch.zeros_like(x))).double())
    coarse = cd.layer_conductance(model, x, "units", n_steps=8)
    assert (coarse.relative_error["units"] < 1e-5).all()          # the sum is right ...
    actual = _distance(coarse["units"], exact)
    assert (actual > 0.03).all()                                  # ... the units are not
    # the estimate sees it, and bounds the actual error to within 1.5x
    est = coarse.unit_error["units"]
    assert (est > 0.02).all() and (actual <= 1.5 * est).all()


@pytest.mark.parametrize("tolerance", [0.02, 0.005])
def test_tolerance_holds_per_unit_against_the_closed_form(complementary, tolerance):
    model, x = complementary
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConductanceWarning)
        r = cd.layer_conductance(model, x, "units", tolerance=tolerance, max_steps=2000)
    assert (r.unit_error["units"] <= tolerance).all()
    actual = _distance(r["units"], model.exact(x))
    assert (actual <= 1.5 * tolerance).all(), actual
    # a completeness-only stop would have ended on the starting grid
    assert (r.n_points > 17).all()


def test_fixed_rule_estimate_is_the_change_from_halving_the_points():
    """On a uniform grid the coarse and quarter grids are the uniform grids with half and a quarter of
    the intervals, so the estimate is ``f ||T_4k - T_2k|| / ||T_4k||`` with
    ``f = clamp(r / (1 - r), 1, 2)``, ``r = ||T_4k - T_2k|| / ||T_2k - T_k||``, from three separate calls."""
    model = random_cnn(seed=2, act=nn.ReLU)
    torch.manual_seed(4)
    x = torch.randn(3, 2, 6, 6) * 2
    kw = dict(method="uniform", units="channel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the coarse calls warn about their own accuracy
        fine = cd.layer_conductance(model, x, ["1", "3"], n_steps=24, **kw)
        half = cd.layer_conductance(model, x, ["1", "3"], n_steps=12, target=fine.target, **kw)
        quarter = cd.layer_conductance(model, x, ["1", "3"], n_steps=6, target=fine.target, **kw)
    stretched = 0
    for layer in ("1", "3"):
        T, T2, T4 = (r[layer].double() for r in (fine, half, quarter))
        d1, d2 = (T - T2).norm(dim=1), (T2 - T4).norm(dim=1)
        ratio = d1 / d2
        f = torch.where(ratio >= 2 / 3, torch.full_like(ratio, 2.0), ratio / (1 - ratio)).clamp(1.0, 2.0)
        stretched += int((f > 1).sum())
        expected = f * d1 / T.norm(dim=1)
        torch.testing.assert_close(fine.unit_error[layer], expected, rtol=1e-4, atol=1e-7)
        # the comparison values are the coarse values pushed further out: T - f (T - T_2)
        torch.testing.assert_close(fine.extra["coarse"][layer], (T - f[:, None] * (T - T2)).float(),
                                   rtol=1e-4, atol=1e-6)
    # both branches of f occur here (plain halving and a stretched change), so both are checked
    assert 0 < stretched < 6


def test_fixed_rule_estimates_bound_the_distance_to_the_literal_reference():
    """Against the slow literal formula (per-unit Jacobians), on random ReLU networks, every fixed rule.

    Small networks with few kinks are the hard case for the estimate (measured on these: 46 of 48
    pairs within 1.5x, 45 with the plain halving estimate; the misses are the Gauss-Legendre rule
    at 9 and 17 points on one network, whose coarser grids all miss the same kink)."""
    pairs, bounded, cautious = 0, 0, []
    for seed in range(3):
        model = random_mlp(seed=seed, act=nn.ReLU).double()
        torch.manual_seed(10 + seed)
        x = torch.randn(1, 5, dtype=torch.float64) * 3
        literal = cd.reference.layer_conductance(model, x[0], "1", target=0, n_steps=1000,
                                                 rule="gausslegendre").double()
        for method in ("gausslegendre", "uniform", "uniform_left", "captum"):
            for n in (8, 16, 32, 64):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConductanceWarning)
                    r = cd.layer_conductance(model, x, "1", target=0, n_steps=n, method=method)
                actual = float(_distance(r["1"], literal[None])[0])
                est = float(r.unit_error["1"][0])
                pairs += 1
                bounded += actual <= 1.5 * est
                cautious.append(est / actual)
    assert bounded >= 0.9 * pairs
    # cautious, not absurdly so
    assert sorted(cautious)[len(cautious) // 2] < 4


def test_non_cut_layers_get_an_estimate_and_meet_the_tolerance():
    model = TwoBranch().eval()
    x = torch.randn(3, 4) * 3
    r = cd.layer_conductance(model, x, ["left", "right"], tolerance=0.01, max_steps=1000)
    assert r.is_cut == {"left": False, "right": False}
    ref = cd.layer_conductance(model.double(), x.double(), ["left", "right"], target=r.target,
                               n_steps=4000)
    model.float()
    for layer in ("left", "right"):
        assert (r.unit_error[layer] <= 0.01).all()
        assert (_distance(r[layer], ref[layer]) <= 0.015).all()


def test_internal_influence_estimate_and_tolerance():
    model = random_mlp(seed=5, act=nn.ReLU)
    x = torch.randn(4, 5) * 3
    results = cd.layer_importance(model, x, ["1", "3"], ["conductance", "internal_influence"], tolerance=0.01,
                                  max_steps=2000)
    ref = cd.layer_importance(model.double(), x.double(), ["1", "3"], "internal_influence",
                              target=results["conductance"].target, n_steps=6000)
    model.float()
    ii = results["internal_influence"]
    for layer in ("1", "3"):
        assert (ii.unit_error[layer] <= 0.01).all()
        assert (_distance(ii[layer], ref[layer]) <= 0.015).all()


def test_layer_integrated_gradients_estimate():
    model = random_mlp(seed=5, act=nn.ReLU)
    x = torch.randn(3, 5) * 3
    r = cd.layer_importance(model, x, "3", "layer_integrated_gradients", tolerance=0.01, max_steps=2000)
    ref = cd.layer_importance(model.double(), x.double(), "3", "layer_integrated_gradients", target=r.target,
                              n_steps=6000)
    model.float()
    assert (r.unit_error["3"] <= 0.01).all()
    assert (_distance(r["3"], ref["3"]) <= 0.015).all()


def test_point_measures_have_no_integration_error():
    model = random_mlp(seed=5)
    r = cd.layer_importance(model, torch.randn(2, 5), "1", "grad_x_activation")
    assert torch.equal(r.unit_error["1"], torch.zeros(2, dtype=torch.float64))
    assert "no integration error" in r.summary()


def test_neuron_conductance_tolerance_holds_per_unit(complementary):
    model, x = complementary
    out, err = cd.neuron_conductance(model, x, "units", [0, 3, 7], tolerance=0.01, max_steps=2000,
                                     return_unit_error=True)
    assert err.shape == (3, x.shape[0])
    assert (err <= 0.01).all()
    # the input is one feature: each unit's attribution through it is its conductance (closed form)
    exact = model.exact(x)[:, [0, 3, 7]].T
    assert ((out[..., 0].double() - exact).abs() <= 0.015 * exact.abs().clamp(min=1e-3)).all()


def test_neuron_conductance_fixed_rule_reports_and_warns():
    model = random_cnn(seed=3)
    torch.manual_seed(2)
    x = torch.randn(2, 2, 6, 6) * 2
    neurons = [(0, 2, 2), (1, 3, 3), (3, 1, 4)]
    with pytest.warns(ConductanceWarning, match="per-unit error estimate above 5%"):
        cd.neuron_conductance(model, x, "1", neurons, n_steps=2, method="uniform")
    fine = cd.neuron_conductance(model, x, "1", neurons, n_steps=2000, method="uniform")
    for n in (4, 8):
        out, err = cd.neuron_conductance(model, x, "1", neurons, n_steps=n, method="uniform",
                                         return_unit_error=True)
        actual = torch.stack([_distance(out[u], fine[u]) for u in range(len(neurons))])
        assert (actual > 1e-5).all() and (actual <= 1.5 * err).all()
    # a smooth (tanh) network: the trapezoid rule is second order, the estimate about 3x cautious
    # (from 9 points on; at 5 points, halving to 3 can be far more cautious)
    assert (err <= 5 * actual).all()


def test_fixed_rule_warns_on_per_unit_error_alone(complementary):
    model, x = complementary
    with pytest.warns(ConductanceWarning, match="per-unit error estimate above 5%") as record:
        cd.layer_conductance(model, x, "units", n_steps=4)
    assert not any("completeness error above" in str(w.message) for w in record)


def test_unit_error_does_not_depend_on_the_chunk_size():
    model = random_mlp(seed=7, act=nn.ReLU)
    x = torch.randn(4, 5) * 3
    a = cd.layer_conductance(model, x, ["1", "3"], tolerance=0.01, internal_batch_size=5)
    b = cd.layer_conductance(model, x, ["1", "3"], tolerance=0.01, internal_batch_size=64)
    assert torch.equal(a.n_points, b.n_points)
    for layer in ("1", "3"):
        torch.testing.assert_close(a.unit_error[layer], b.unit_error[layer], rtol=1e-4, atol=1e-7)


def test_low_precision_model_stops_at_its_precision_floor(complementary):
    model, x = complementary
    model = model.to(torch.bfloat16)
    with pytest.warns(ConductanceWarning, match="precision floor") as record:
        r = cd.layer_conductance(model, x.to(torch.bfloat16), "units", tolerance=1e-4, max_steps=4000)
    assert r.extra["precision_limited"]
    # it stopped well before the budget, and the values are still close to the closed form
    assert (r.n_points < 4000).all()
    assert (_distance(r["units"], model.float().exact(x)) < 0.1).all()
    assert "max_steps" in str(record[0].message)


def test_summary_and_warning_show_the_per_unit_error():
    model = random_mlp(seed=7, act=nn.ReLU)
    r = cd.layer_conductance(model, torch.randn(2, 5) * 3, ["1", "3"])
    text = r.summary()
    assert "per-unit error" in text and "completeness error" in text
    assert r.tolerance == 0.02


def test_transformer_heads_get_their_own_per_unit_error():
    """cd.hf reduces element values to heads after the engine; the estimate follows the same reduction
    and matches the distance of the heads' values to a converged run."""
    transformers = pytest.importorskip("transformers")
    from conductance import hf
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=20, max_position_embeddings=12, initializer_range=0.4)
    model = transformers.BertModel(config).double().eval()

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = model
            self.out = nn.Linear(16, 2).double()

        def forward(self, input_ids, attention_mask=None):
            return self.out(self.bert(input_ids, attention_mask=attention_mask).last_hidden_state[:, 0])

    net = Head().eval()
    ids = torch.randint(3, 30, (2, 6))
    layers = hf.layers(net, kind="attention")
    coarse = hf.layer_conductance(net, ids, layers, target=0, n_steps=8)
    fine = hf.layer_conductance(net, ids, layers, target=0, n_steps=2000)
    for layer in layers:
        est = coarse.unit_error[layer]
        actual = _distance(coarse[layer], fine[layer])
        assert est.shape == (2,) and (actual > 1e-4).all()
        assert (actual <= 1.5 * est).all()
    assert "per-unit error" in coarse.summary()


def test_a_grid_with_no_coarser_grid_does_not_claim_exact_values():
    """Two points (n_steps=1; Captum's point rules: n_steps=2) leave nothing to halve: the estimate is
    the distance to zero (100%) or more, and the fixed rule warns, instead of an estimate of 0."""
    model = random_cnn(seed=3, act=nn.ReLU)
    x = torch.randn(2, 2, 6, 6) * 2
    for method in ("uniform", "uniform_left", "gausslegendre"):
        with pytest.warns(ConductanceWarning, match="per-unit error"):
            r = cd.layer_conductance(model, x, "1", n_steps=1, method=method, units="channel")
        assert (r.unit_error["1"] >= 1 - 1e-6).all(), (method, r.unit_error["1"])
    with pytest.warns(ConductanceWarning, match="per-unit error"):
        _, err = cd.neuron_conductance(model, x, "1", [0, 1], n_steps=2, method="riemann_trapezoid", units="channel",
                                       return_unit_error=True)
    assert (err >= 1 - 1e-6).all(), err
