"""The engine: one path run for many layers, chunking, targets, adaptive refinement (T10)."""

import warnings

import pytest
import torch
from torch import nn

import conductance as cd
from conductance import ConductanceWarning
from models import CountingModel, TwoBranch, random_cnn, random_mlp


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture
def cnn_case():
    torch.manual_seed(1)
    return random_cnn(seed=1), torch.randn(3, 2, 6, 6), torch.randn(3, 2, 6, 6) * 0.1


def test_many_layers_in_one_call_equal_separate_calls(cnn_case):
    model, x, base = cnn_case
    layers = ["0", "1", "2", "3", "6"]
    together = cd.layer_conductance(model, x, layers, baselines=base, n_steps=12)
    for name in layers:
        alone = cd.layer_conductance(model, x, name, baselines=base, n_steps=12)
        torch.testing.assert_close(together[name], alone[name])
        assert not together[name].requires_grad
    assert no_hooks_left(model)


@pytest.mark.parametrize("method", ["gausslegendre", "uniform", "uniform_left", "captum"])
def test_chunk_size_does_not_change_fixed_rules(cnn_case, method):
    model, x, base = cnn_case
    results = [cd.layer_conductance(model, x, ["1", "3"], baselines=base, n_steps=10, method=method,
                                    internal_batch_size=size) for size in (3, 7, 1000)]
    for other in results[1:]:
        for name in ("1", "3"):
            torch.testing.assert_close(other[name], results[0][name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(other.delta[name], results[0].delta[name], rtol=1e-5, atol=1e-5)


def test_chunk_size_does_not_change_adaptive(cnn_case):
    model, x, base = cnn_case
    a = cd.layer_conductance(model, x, "3", baselines=base, tolerance=1e-3, internal_batch_size=5)
    b = cd.layer_conductance(model, x, "3", baselines=base, tolerance=1e-3, internal_batch_size=64)
    assert torch.equal(a.n_points, b.n_points)
    torch.testing.assert_close(a["3"], b["3"], rtol=1e-5, atol=1e-6)


def test_per_example_targets_equal_separate_calls(cnn_case):
    model, x, base = cnn_case
    targets = torch.tensor([2, 0, 1])
    batched = cd.layer_conductance(model, x, "3", baselines=base, target=targets, n_steps=8, units="channel")
    for i in range(3):
        single = cd.layer_conductance(model, x[i:i + 1], "3", baselines=base[i:i + 1], target=int(targets[i]),
                                      n_steps=8, units="channel")
        torch.testing.assert_close(batched["3"][i:i + 1], single["3"])
    # target=None explains each example's top logit
    top = model(x).argmax(1)
    default = cd.layer_conductance(model, x, "3", baselines=base, n_steps=8, units="channel")
    assert torch.equal(default.target, top)
    torch.testing.assert_close(default["3"], cd.layer_conductance(model, x, "3", baselines=base, target=top,
                                                                  n_steps=8, units="channel")["3"])


def test_channel_units_sum_the_neuron_map(cnn_case):
    model, x, base = cnn_case
    neuron = cd.layer_conductance(model, x, "1", baselines=base, n_steps=9)
    channel = cd.layer_conductance(model, x, "1", baselines=base, n_steps=9, units="channel")
    assert neuron["1"].shape == (3, 4, 6, 6) and channel["1"].shape == (3, 4)
    torch.testing.assert_close(channel["1"], neuron["1"].sum((2, 3)), rtol=1e-5, atol=1e-6)


def test_completeness_error_shrinks_with_steps_and_is_reported():
    """T10: on random networks the completeness error of every cut layer goes to zero."""
    model = random_mlp(seed=4, act=nn.Tanh)
    x = torch.randn(6, 5) * 4
    errors = []
    for n in (2, 8, 64):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConductanceWarning)
            r = cd.layer_conductance(model, x, ["1", "3"], n_steps=n, method="uniform")
        for name in ("1", "3"):
            torch.testing.assert_close(r.delta[name], r[name].sum(1) - r.output_diff)
        errors.append(max(r.relative_error[n].max().item() for n in ("1", "3")))
    assert errors[0] > 1e-3
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 1e-3


@pytest.mark.parametrize("make", [lambda: random_mlp(seed=2), lambda: random_cnn(seed=2)])
def test_efficient_form_agrees_with_literal_formula(make):
    """T10: the Stieltjes sum equals the per-unit-Jacobian formula of the paper."""
    model = make()
    torch.manual_seed(5)
    shape = (5,) if isinstance(model[0], nn.Linear) else (2, 6, 6)
    x = torch.randn(1, *shape)
    base = torch.randn(1, *shape) * 0.2
    ours = cd.layer_conductance(model, x, "1", baselines=base, target=1, n_steps=48, method="gausslegendre")
    literal = cd.reference.layer_conductance(model, x[0], "1", baseline=base[0], target=1, n_steps=48,
                                             rule="gausslegendre")
    assert literal.abs().max() > 1e-3
    assert ours.relative_error["1"].max() < 1e-4
    torch.testing.assert_close(ours["1"][0], literal, rtol=2e-3, atol=2e-4)


def test_adaptive_points_are_never_evaluated_twice():
    inner = random_mlp(seed=6, act=nn.ReLU)
    model = CountingModel(inner).eval()
    x = torch.randn(4, 5) * 3
    base = torch.randn(4, 5) * 0.1  # distinct per example, so every (example, a) is a distinct row
    r = cd.layer_conductance(model, x, ["inner.1", "inner.3"], baselines=base, target=0, tolerance=1e-4,
                             max_steps=120,
                             internal_batch_size=6)
    # call 0 (the four inputs) settles the target and checks which layers are cuts; then the path
    assert model.calls[0].shape[0] == 4
    path_calls = model.calls[1:]
    rows = torch.cat(path_calls)
    assert rows.shape[0] == int(r.n_points.sum()) == r.extra["model_evaluations"]
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]
    assert all(c.shape[0] <= 6 for c in path_calls)
    assert r.n_points.min() < r.n_points.max() or r.n_points.min() > 5  # examples refine independently


def test_adaptive_meets_tolerance_or_warns():
    model = random_mlp(seed=7, act=nn.ReLU)
    x = torch.randn(5, 5) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConductanceWarning)
        r = cd.layer_conductance(model, x, ["1", "3"], tolerance=1e-3, max_steps=500)
    for name in ("1", "3"):
        assert (r.relative_error[name] <= 1e-3).all()
    with pytest.warns(ConductanceWarning, match=r"examples \[.*\].*max_steps"):
        cd.layer_conductance(model, x * 10, ["1", "3"], tolerance=1e-9, max_steps=6)


def test_fixed_rule_warns_when_completeness_is_poor():
    model = random_mlp(seed=7, act=nn.ReLU)
    x = torch.randn(5, 5) * 3
    with pytest.warns(ConductanceWarning, match="completeness error above 5%"):
        cd.layer_conductance(model, x, "1", n_steps=1, method="uniform_left")


def test_adaptive_converges_to_literal_reference():
    model = random_cnn(seed=3, act=nn.Tanh)
    torch.manual_seed(8)
    x = torch.randn(1, 2, 6, 6) * 3
    literal = cd.reference.layer_conductance(model, x[0], "3", target=0, n_steps=64, rule="gausslegendre")
    far = near = None
    for tol in (3e-2, 2e-4):
        r = cd.layer_conductance(model, x, "3", target=0, tolerance=tol, max_steps=1000)
        dist = ((r["3"][0] - literal).norm() / literal.norm()).item()
        far, near = (dist, near) if far is None else (far, dist)
    assert near < 2e-3
    assert near <= far


def test_branch_is_not_a_cut_and_adaptive_refines_on_the_input():
    model = TwoBranch().eval()
    x = torch.randn(3, 4) * 2
    r = cd.layer_conductance(model, x, ["left", "right", "head"], tolerance=1e-4, max_steps=300)
    assert r.is_cut == {"left": False, "right": False, "head": True}
    # the branches together carry the whole change, each alone does not
    torch.testing.assert_close(r["left"].sum(1) + r["right"].sum(1), r.output_diff, rtol=1e-3, atol=1e-3)
    assert (r.relative_error["left"] > 1e-2).any()
    only_branches = cd.layer_conductance(model, x, ["left", "right"], tolerance=1e-4, max_steps=300)
    assert (only_branches.extra["input_relative_error"] <= 1e-4).all()
    ig = only_branches.extra["input_integrated_gradients"]
    torch.testing.assert_close(ig.sum(1), only_branches.output_diff, rtol=1e-3, atol=1e-4)


def test_one_walk_of_the_graph_finds_the_cuts_that_blocking_each_layer_finds():
    """engine.dominating (one walk for all layers) equals graph_reaches with each layer blocked in turn,
    on a graph with parallel branches, a skip connection, a layer below the branches and one unused."""
    from conductance import engine

    torch.manual_seed(0)
    x = torch.randn(2, 4, requires_grad=True)
    a = torch.tanh(x @ torch.randn(4, 4))          # a cut: everything above goes through it
    left, right = a.sin(), a.cos()                  # parallel branches: neither is a cut
    both = torch.cat([left, right], 1)              # a cut again
    skip = both[:, :4] + a                          # a skip around `both`: it is no longer a cut
    out = (skip * 2).sum(1)
    unused = (x * 3).sum()                          # not on any path of `out`
    nodes = [a.grad_fn, left.grad_fn, right.grad_fn, both.grad_fn, skip.grad_fn, unused.grad_fn]
    literal = [not engine.graph_reaches(out, x, blocked=[n]) for n in nodes]
    assert literal == [True, False, False, False, True, False]
    assert engine.dominating(out, x, nodes) == literal
    assert engine.dominating(torch.ones(2), x, nodes) == [True] * len(nodes)   # no graph at all


@pytest.mark.parametrize("method", ["captum", "gausslegendre"])
def test_comparison_sums_read_through_views_equal_those_from_copies(method):
    """integrate_fixed sums a coarser grid's intervals through strided views of a chunk when the points
    are in plain layout, and from gathered copies otherwise (channels-last points): the same
    comparison values and per-unit estimates, to float32 rounding, over several chunks."""
    model = random_cnn(seed=4)
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(2)) * 3
    kw = dict(target=1, n_steps=6, method=method, internal_batch_size=15)   # 7 positions, 5 a chunk
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.ConductanceWarning)
        views = cd.layer_conductance(model, x, ["1", "3"], channels_last=False, **kw)
        copies = cd.layer_conductance(model, x, ["1", "3"], channels_last=True, **kw)
    # layer 1's integrand is curved: its comparison values are not the values again (layer 3 feeds a
    # linear head, so a trapezoid rule is exact there and they are)
    assert (views.extra["coarse"]["1"] - views["1"]).abs().max() > 3e-3 * views["1"].abs().max()
    for name in ("1", "3"):
        coarse = views.extra["coarse"][name]
        torch.testing.assert_close(coarse, copies.extra["coarse"][name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(views.unit_error[name], copies.unit_error[name], rtol=1e-3, atol=1e-7)


def test_layer_input_and_tuple_outputs():
    torch.manual_seed(0)

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.head(out[:, -1])

    model = Recurrent().eval()
    x = torch.randn(2, 5, 3)
    r = cd.layer_conductance(model, x, ["lstm[0]", "head"], tolerance=1e-3, attribute_to_layer_input=False)
    assert r["lstm[0]"].shape == (2, 5, 4)
    torch.testing.assert_close(r["lstm[0]"].flatten(1).sum(1), r.output_diff, rtol=2e-3, atol=1e-3)
    as_input = cd.layer_conductance(model, x, "head", n_steps=16, attribute_to_layer_input=True)
    assert as_input["head"].shape == (2, 4)
    torch.testing.assert_close(as_input["head"].sum(1), as_input.output_diff, rtol=5e-2, atol=5e-2)


def test_additional_forward_args_follow_their_example():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x, scale, *, shift):
            return torch.tanh(self.lin(x)) * scale.unsqueeze(1) + shift.unsqueeze(1)

    torch.manual_seed(0)
    model = Scaled().eval()
    x = torch.randn(3, 3)
    scale = torch.tensor([1.0, 2.0, -3.0])
    r = cd.layer_conductance(model, x, "lin", target=0, additional_forward_args=(scale,),
                             forward_kwargs={"shift": torch.tensor([0.5, 0.0, 1.0])}, n_steps=20)
    for i in range(3):
        single = cd.layer_conductance(model, x[i:i + 1], "lin", target=0, additional_forward_args=scale[i:i + 1],
                                      forward_kwargs={"shift": torch.tensor([0.5, 0.0, 1.0])[i:i + 1]}, n_steps=20)
        torch.testing.assert_close(r["lin"][i:i + 1], single["lin"])


def test_adaptive_memory_budget_stops_refinement_and_says_so():
    model = random_mlp(seed=7, act=nn.ReLU)
    x = torch.randn(3, 5) * 3
    # room for 20 points of the two recorded layers (7 float32 units each; y and g per point)
    with pytest.warns(ConductanceWarning, match="memory budget"):
        r = cd.layer_conductance(model, x, ["1", "3"], tolerance=1e-9, max_steps=500,
                                 memory_budget=20 * 2 * 7 * 4 * 2)
    assert r.extra["memory_limited"]
    assert int(r.n_points.sum()) <= 20


def test_float64_models_work_with_fixed_and_adaptive_rules():
    model = random_mlp(seed=14).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    for kw in (dict(n_steps=20), dict(tolerance=1e-3)):
        r = cd.layer_conductance(model, x, "3", **kw)
        assert r["3"].dtype == torch.float64
        assert (r.relative_error["3"] < 5e-2).all()


class _ViewingCNN(nn.Module):
    """A CNN that flattens with .view(), which fails on channels-last activations."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.act = nn.Tanh()
        self.fc = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        h = self.act(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


@pytest.mark.parametrize("make", [lambda: random_cnn(seed=3), _ViewingCNN])
def test_channels_last_points_change_nothing_but_speed(make):
    from conductance import engine
    model = make().eval()
    x = torch.randn(3, 2, 6, 6)
    layer = "0" if isinstance(model, nn.Sequential) else "conv"
    assert engine.wants_channels_last(model, x)
    runs = {}
    for flag in (True, False):
        runs[flag] = cd.layer_conductance(model, x, layer, n_steps=24, units="channel", channels_last=flag)
        assert no_hooks_left(model)
    torch.testing.assert_close(runs[True][layer], runs[False][layer], rtol=1e-5, atol=1e-6)
    # the model that .view()s fell back to the inputs' layout instead of failing
    assert not runs[True].relative_error[layer].isnan().any()


def test_adaptive_sums_intervals_one_at_a_time_and_frees_finished_examples(monkeypatch):
    """Examples finish after different numbers of points; the finished ones' stored points are
    dropped (refining them again would fail) and the results equal the reference."""
    from conductance import engine
    model = random_mlp(seed=7, act=nn.ReLU)
    x = torch.randn(4, 5) * 3
    free = cd.layer_conductance(model, x, ["1", "3"], tolerance=1e-4, max_steps=200)
    assert len(set(free.n_points.tolist())) > 1
    fine = cd.layer_conductance(model.double(), x.double(), ["1", "3"], target=free.target, n_steps=1000)
    model.float()
    for layer in ("1", "3"):
        scale = fine[layer].abs().max()
        assert (free[layer].double() - fine[layer]).abs().max() <= 2e-3 * scale
    seen = []
    original = engine.interval_contributions

    def spy(*args, **kwargs):
        seen.append(args[1].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "interval_contributions", spy)
    again = cd.layer_conductance(model, x, ["1", "3"], tolerance=1e-4, max_steps=200)
    # adaptive intervals are summed one at a time (no stacked copies of the stored points)
    assert seen and set(seen) == {1}
    torch.testing.assert_close(again["3"], free["3"])


def test_every_cut_layer_meets_the_tolerance():
    """Cut layers whose residuals differ along the path: refinement must bring every one of them
    within the tolerance, not only the worst one on the starting grid."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 9), nn.Softplus(beta=4), nn.Linear(9, 9),
                          nn.Tanh(), nn.Linear(9, 3)).eval()
    x = torch.randn(6, 5) * 3
    layers = ["1", "3", "5"]
    r = cd.layer_conductance(model, x, layers, tolerance=2e-4, max_steps=1000)
    # the layers do disagree: on a coarse fixed grid their errors differ by more than 10x somewhere
    coarse = cd.layer_conductance(model, x, layers, n_steps=8)
    spread = torch.stack([coarse.relative_error[n] for n in layers])
    assert (spread.max(0).values > 10 * spread.min(0).values).any()
    for name in layers:
        assert r.is_cut[name]
        assert (r.relative_error[name] <= 2e-4 * (1 + 1e-6)).all(), name
    # the reported residuals are the final grid's, for every cut layer, and add up to delta
    for e in range(x.shape[0]):
        res = r.extra["interval_residuals"][e]
        assert res.shape == (int(r.n_points[e]) - 1, len(layers))
        for j, name in enumerate(layers):
            assert abs(res[:, j].sum().item() - r.delta[name][e].item()) < 1e-4 * abs(r.output_diff[e].item()) + 1e-6


def test_captum_rule_keeps_the_inputs_layout():
    """method='captum' reproduces Captum's arithmetic, so its points keep the inputs' memory layout;
    the other rules send channels-last points to a convolutional model."""
    from conductance.inputs import build_problem
    model = random_cnn(seed=2)
    x = torch.randn(2, 2, 6, 6)
    common = dict(baselines=None, target=None, additional_forward_args=None, forward_kwargs=None,
                  internal_batch_size=None, attribute_to_layer_input=False)
    captum, _ = build_problem(model, x, "0", method="captum", **common)
    default, _ = build_problem(model, x, "0", method="gausslegendre", **common)
    assert not captum.channels_last and default.channels_last
    ex, a = torch.tensor([0, 1]), torch.tensor([0.5, 0.5], dtype=torch.float64)
    from conductance import engine
    assert engine.interpolate(captum, ex, a).is_contiguous()
    assert engine.interpolate(default, ex, a).is_contiguous(memory_format=torch.channels_last)


def _in_place_mlp(inplace: bool, first: bool = True) -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=inplace and first), nn.Linear(8, 8),
                         nn.ReLU(inplace=inplace), nn.Linear(8, 3)).eval()


@pytest.mark.filterwarnings("ignore::conductance.ConductanceWarning")
@pytest.mark.parametrize("kwargs", [dict(n_steps=30), dict(tolerance=1e-3), dict(n_steps=30, method="captum")])
@pytest.mark.parametrize("first", [True, False])
def test_models_that_change_a_layer_output_in_place(kwargs, first):
    """Recorded layers followed by an in-place ReLU (the lowest layer's value is a leaf, which autograd
    guards; the upper one is not, which only its version counter shows): recorded values must be the
    layers' own, as for the same model without in-place ops."""
    x = torch.randn(4, 5) * 2
    layers = ["0", "2"]
    plain = cd.layer_conductance(_in_place_mlp(False), x, layers, **kwargs)
    model = _in_place_mlp(True, first)
    r = cd.layer_conductance(model, x, layers, **kwargs)
    assert no_hooks_left(model)
    for name in layers:
        assert plain[name].abs().max() > 1e-2
        torch.testing.assert_close(r[name], plain[name])


def test_in_place_change_seen_during_evaluation_falls_back_to_copies():
    """The engine's own safety net: without the cut check's warning, a forward that changes a recorded
    value in place is detected by its version counter and rerun with copies."""
    from conductance import engine
    from conductance.inputs import build_problem
    x = torch.randn(3, 5)
    common = dict(baselines=None, target=0, additional_forward_args=None, forward_kwargs=None,
                  internal_batch_size=None, attribute_to_layer_input=False, method="gausslegendre")
    ex, a = torch.tensor([0, 1, 2]), torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    expected, _ = build_problem(_in_place_mlp(False), x, ["0", "2"], **common)
    problem, _ = build_problem(_in_place_mlp(True, first=False), x, ["0", "2"], **common)
    assert not problem.copy_layer_outputs
    got, want = engine.evaluate(problem, ex, a), engine.evaluate(expected, ex, a)
    assert problem.copy_layer_outputs and not expected.copy_layer_outputs
    for name in ("0", "2"):
        assert (want.ys[name] < 0).any()   # the in-place ReLU would have clipped these
        torch.testing.assert_close(got.ys[name], want.ys[name])
        torch.testing.assert_close(got.gs[name], want.gs[name])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_trapezoid_total_is_the_sum_of_the_contributions(layout):
    from conductance import engine
    torch.manual_seed(2)
    y0, g0, y1, g1 = (torch.randn(1, 6, 5, 4).contiguous(memory_format=layout) for _ in range(4))
    expected = ((g0.double() + g1.double()) / 2 * (y1.double() - y0.double())).sum()
    total = engine.trapezoid_total(y0, g0, y1, g1, engine.Scratch())
    assert total.dtype == torch.float64
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    # mixed layouts cannot be read as one flat order: the caller falls back to the elementwise sum
    assert engine.trapezoid_total(y0, g0.contiguous(memory_format=torch.channels_last if layout ==
                                                        torch.contiguous_format else torch.contiguous_format),
                                  y1, g1, engine.Scratch()) is None


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
@pytest.mark.parametrize("order", [("conductance", "internal_influence"), ("internal_influence", "conductance")])
def test_channel_trapezoid_sums_equal_the_mean_gradient_formula(layout, order):
    """Channel units take g0 + g1, halve the channel sums, and let the last measure multiply into
    that buffer: every measure must still get (g0 + g1) / 2 times its own factor, in any memory
    layout and measure order, and the results must not change when the buffers are reused."""
    from conductance import engine
    from conductance.measures import PATH_MEASURES
    torch.manual_seed(3)
    y0, g0, y1, g1 = (torch.randn(3, 5, 4, 6, dtype=torch.float64) for _ in range(4))
    if layout != "contiguous":
        y0, y1 = (t.contiguous(memory_format=torch.channels_last) for t in (y0, y1))
        if layout == "channels_last":   # "mixed": values channels-last, gradients not (GoogLeNet's last block)
            g0, g1 = (t.contiguous(memory_format=torch.channels_last) for t in (g0, g1))
    width = torch.tensor([0.1, 0.25, 0.05], dtype=torch.float64)
    measures = {m: PATH_MEASURES[m] for m in order}
    scratch = engine.Scratch()
    parts = engine.interval_contributions(measures, y0, g0, y1, g1, width, "trapezoid", "channel", scratch)
    gbar = (g0 + g1) / 2
    expected = {"conductance": (gbar * (y1 - y0)).sum(dim=(2, 3)),
                "internal_influence": (gbar * width.view(-1, 1, 1, 1)).sum(dim=(2, 3))}
    assert set(parts) == set(order)
    for m in order:
        assert parts[m].shape == (3, 5)
        torch.testing.assert_close(parts[m], expected[m], rtol=1e-12, atol=1e-12)
    kept = {m: p.clone() for m, p in parts.items()}
    engine.interval_contributions(measures, y1, g1, y0, g0, width, "trapezoid", "channel", scratch)
    for m in order:
        assert torch.equal(parts[m], kept[m])   # fresh tensors, not views of the reused buffers
    # neuron units keep the mean gradient (full-size contributions, views of the buffers)
    whole = engine.interval_contributions(measures, y0, g0, y1, g1, width, "trapezoid", "neuron", scratch)
    torch.testing.assert_close(whole["conductance"], gbar * (y1 - y0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", ["trapezoid", "left_and_right"])
def test_sums_added_by_position_equal_the_literal_sums(rule):
    """add_by_position adds each interval (one path position of a block of examples) into running sums
    in place: the running sums plus the rule's sums written out in float64, for both path measures."""
    from conductance import engine
    from conductance.measures import PATH_MEASURES
    g = torch.Generator().manual_seed(0)
    k, b, shape = 9, 3, (4, 5)
    y = torch.randn(k + 1, b, *shape, generator=g)
    grad = torch.randn(k + 1, b, *shape, generator=g)
    widths = torch.rand(k, generator=g, dtype=torch.float64)
    start = {m: [torch.randn(b, *shape, generator=g) for _ in range(2)] for m in PATH_MEASURES}
    totals = {m: (s[0].clone(), s[1].clone()) if rule == "left_and_right" else s[0].clone() for m, s in start.items()}
    engine.add_by_position(dict(PATH_MEASURES), y[:-1].unbind(0), grad[:-1].unbind(0), y[1:].unbind(0),
                           grad[1:].unbind(0), widths, totals, rule, engine.Scratch())
    yd, gd = y.double(), grad.double()
    dy, w = yd[1:] - yd[:-1], widths.view(-1, 1, 1, 1)
    ends = [gd[:-1], gd[1:]] if rule == "left_and_right" else [(gd[:-1] + gd[1:]) / 2]
    for m, other in (("conductance", dy), ("internal_influence", w)):
        got = totals[m] if rule == "left_and_right" else (totals[m],)
        for i, gbar in enumerate(ends):
            want = start[m][i].double() + (gbar * other).sum(0)
            torch.testing.assert_close(got[i].double(), want, rtol=1e-5, atol=1e-5)
            assert (got[i].double() - start[m][i].double()).abs().max() > 0.1   # the sums were added


@pytest.mark.parametrize("method", ["captum", "gausslegendre", "uniform_left"])
def test_sums_by_position_equal_the_written_out_contributions(monkeypatch, method):
    """integrate_fixed sums element-level layers position by position into its running sums; the
    written-out contributions summed over positions (the path for channel units and for layers on
    another device) give the same values, comparison values and per-unit estimates, over several
    chunks (4 examples, 11 points each, 3 positions a chunk)."""
    from conductance import engine
    model = random_mlp(seed=3)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(5)) * 2
    kw = dict(n_steps=10, method=method, internal_batch_size=12, target=1)
    measures = ["conductance", "internal_influence"]
    calls = []
    original = engine.add_by_position
    monkeypatch.setattr(engine, "add_by_position", lambda *a: calls.append(1) or original(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConductanceWarning)
        direct = cd.layer_importance(model, x, ["1", "3"], measure=measures, **kw)
        assert calls
        monkeypatch.setattr(engine, "ACCUMULATORS", {})
        calls.clear()
        written = cd.layer_importance(model, x, ["1", "3"], measure=measures, **kw)
        assert not calls
    for m in measures:
        for name in ("1", "3"):
            torch.testing.assert_close(direct[m][name], written[m][name], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(direct[m].extra["coarse"][name], written[m].extra["coarse"][name],
                                       rtol=1e-5, atol=1e-6)
            # (layer 3 feeds the linear head: its trapezoid sums are exact and its estimates rounding)
            torch.testing.assert_close(direct[m].unit_error[name], written[m].unit_error[name], rtol=1e-3,
                                       atol=1e-6)
    # layer 1's integrand is curved, so the estimate compared is not zero
    assert (direct["conductance"].unit_error["1"] > 1e-4).all()


class SqrtNet(nn.Module):
    """h = W x + c, s = sqrt(h), F = v . s: NaN values of layer ``s`` wherever h < 0 on the path, an
    infinite gradient at h = 0."""

    def __init__(self, c):
        super().__init__()
        self.h = nn.Linear(2, 3)
        with torch.no_grad():
            self.h.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
            self.h.bias.copy_(torch.tensor(c))
        self.s = Sqrt()
        self.out = nn.Linear(3, 1)

    def forward(self, x):
        return self.out(self.s(self.h(x))).squeeze(1)


class Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)


@pytest.mark.parametrize("chunk", [None, 2, 5])
@pytest.mark.parametrize("measure", ["conductance", "internal_influence"])
@pytest.mark.parametrize("method", ["gausslegendre", "uniform_left"])
def test_non_finite_values_and_gradients_found_in_any_chunk(chunk, measure, method):
    """The NaN / Inf check of a fixed rule's chunk is taken from its interval sums: a NaN that appears
    only past the middle of the path (in a later chunk; chunk=2: one position a chunk) and an infinite
    gradient at the baseline are still refused, naming the layer and the points."""
    x = torch.tensor([[1.0, 1.0], [0.5, 2.0]])
    kw = dict(n_steps=8, internal_batch_size=chunk, method=method)
    late_nan = SqrtNet([0.1, 0.1, 0.6]).eval()         # h_2 = 0.6 - alpha x_0 < 0 for alpha > 0.6 (example 0)
    with pytest.raises(cd.ConductanceError, match=r"layer 's' is the first recorded layer with non-finite values "
                                                   r"\(at example 0 at alpha=0\.[6-9]"):
        cd.layer_importance(late_nan, x, ["h", "s"], measure=measure, **kw)
    at_zero = SqrtNet([0.0, 0.3, 2.0]).eval()          # h_0 = alpha x_0: sqrt'(0) is infinite at the baseline
    with pytest.raises(cd.ConductanceError, match=r"gradient of the output with respect to layer 'h' is NaN or Inf "
                                                   r"\(at example 0 at alpha=0, example 1 at alpha=0\)"):
        cd.layer_importance(at_zero, x, ["h", "s"], measure=measure, **kw)
    # sqrt'(0) at the input only (h_0 = 1 - alpha x_0, example 0): a left sum reads that gradient only
    # through its right sums (the trapezoid comparison), which must see it too
    at_one = SqrtNet([1.0, 0.3, 2.0]).eval()
    with torch.no_grad():
        at_one.h.weight[0] = torch.tensor([-1.0, 0.0])
    with pytest.raises(cd.ConductanceError, match=r"gradient of the output with respect to layer 'h' is NaN or Inf "
                                                   r"\(at example 0 at alpha=1\)"):
        cd.layer_importance(at_one, x, ["h", "s"], measure=measure, **kw)
    assert no_hooks_left(late_nan) and no_hooks_left(at_zero) and no_hooks_left(at_one)
    fine = SqrtNet([0.1, 0.1, 2.0]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConductanceWarning)   # 8 steps are coarse here
        r = cd.layer_importance(fine, x, ["h", "s"], measure=measure, **kw)
    assert torch.isfinite(r["s"]).all() and torch.isfinite(r["h"]).all()
