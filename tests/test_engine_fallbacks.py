"""The engine's fallbacks decided without reading exception text: channels-last points and uncopied recorded
values are dropped by a probe (the same points evaluated again without them) when a model cannot take
them during the path; the model's own errors are raised."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import conductance as cd
from conductance import engine
from conductance.inputs import build_problem

COMMON = dict(baselines=None, target=0, additional_forward_args=None, forward_kwargs=None, internal_batch_size=None,
              attribute_to_layer_input=False, method="gausslegendre")


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


class ViewsLargeBatches(nn.Module):
    """A CNN that flattens with .view() (which fails on channels-last activations) only when it gets more
    rows than ``rows``: the forward at the inputs before the path runs, the path's chunks fail."""

    def __init__(self, rows: int):
        super().__init__()
        torch.manual_seed(5)
        self.rows = rows
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.act = nn.Tanh()
        self.fc = nn.Linear(3 * 6 * 6, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = self.act(self.conv(x))
        flat = h.view(h.shape[0], -1) if h.shape[0] > self.rows else h.reshape(h.shape[0], -1)
        return self.fc(flat)


def test_channels_last_dropped_during_the_path_by_a_probe():
    x = torch.randn(2, 2, 6, 6)
    ex, a = torch.tensor([0, 0, 1, 1]), torch.tensor([0.1, 0.6, 0.3, 0.9], dtype=torch.float64)
    model = ViewsLargeBatches(rows=2).eval()
    problem, _ = build_problem(model, x, "conv", channels_last=True, **COMMON)
    assert problem.channels_last          # the forward at the inputs (2 rows) took channels-last points
    plain, _ = build_problem(ViewsLargeBatches(rows=2).eval(), x, "conv", channels_last=False, **COMMON)
    got, want = engine.evaluate(problem, ex, a), engine.evaluate(plain, ex, a)
    assert not problem.channels_last and not problem.copy_layer_outputs   # only the layout was dropped
    torch.testing.assert_close(got.ys["conv"], want.ys["conv"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.gs["conv"], want.gs["conv"], rtol=1e-5, atol=1e-6)
    assert no_hooks_left(model)
    # and through the public call, against the inputs' own layout
    runs = {flag: cd.layer_conductance(ViewsLargeBatches(rows=2).eval(), x, "conv", n_steps=12, units="channel",
                                       channels_last=flag) for flag in (True, False)}
    torch.testing.assert_close(runs[True]["conv"], runs[False]["conv"], rtol=1e-5, atol=1e-6)


class InPlaceOnLargeBatches(nn.Module):
    """An MLP whose ReLU after the first recorded layer runs in place only for more than ``rows`` rows, so
    the cut check (one example) does not see it; that layer's recorded value is a leaf autograd guards."""

    def __init__(self, rows: int, inplace: bool = True):
        super().__init__()
        torch.manual_seed(11)
        self.rows, self.inplace = rows, inplace
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.eval()

    def forward(self, x):
        h = self.fc1(x)
        h = torch.relu_(h) if self.inplace and h.shape[0] > self.rows else torch.relu(h)
        return self.fc3(torch.tanh(self.fc2(h)))


@pytest.mark.filterwarnings("ignore::conductance.ConductanceWarning")   # ReLU kinks: 7% at 65 points, both runs
def test_an_in_place_change_of_a_leaf_during_the_path_falls_back_to_copies():
    x = torch.randn(3, 5) * 2
    ex, a = torch.tensor([0, 1, 2, 2]), torch.tensor([0.2, 0.5, 0.9, 0.4], dtype=torch.float64)
    problem, _ = build_problem(InPlaceOnLargeBatches(rows=3), x, ["fc1", "fc2"], **COMMON)
    expected, _ = build_problem(InPlaceOnLargeBatches(rows=3, inplace=False), x, ["fc1", "fc2"], **COMMON)
    assert not problem.copy_layer_outputs
    got, want = engine.evaluate(problem, ex, a), engine.evaluate(expected, ex, a)
    assert problem.copy_layer_outputs
    assert (want.ys["fc1"] < 0).any()     # the in-place ReLU would have clipped these
    for name in ("fc1", "fc2"):
        torch.testing.assert_close(got.ys[name], want.ys[name])
        torch.testing.assert_close(got.gs[name], want.gs[name])
    full = cd.layer_conductance(InPlaceOnLargeBatches(rows=3), x, ["fc1", "fc2"], n_steps=64, target=0)
    ref = cd.layer_conductance(InPlaceOnLargeBatches(rows=3, inplace=False), x, ["fc1", "fc2"], n_steps=64, target=0)
    for name in ("fc1", "fc2"):
        assert ref[name].abs().max() > 1e-2
        torch.testing.assert_close(full[name], ref[name])


class FailsOnLargeBatches(ViewsLargeBatches):
    """Raises ``error`` on forwards of more than ``rows`` rows (``times`` of them, then runs); takes
    channels-last activations (it never .view()s)."""

    def __init__(self, rows: int, error: type, times: float = float("inf")):
        super().__init__(rows=10 ** 9)
        self.fail_rows, self.error, self.times, self.failed = rows, error, times, 0

    def forward(self, x):
        if x.shape[0] > self.fail_rows and self.failed < self.times:
            self.calls += 1
            self.failed += 1
            raise self.error("the model's own failure")
        return super().forward(x)


@pytest.mark.parametrize("error, times, attempts", [(RuntimeError, float("inf"), 2), (RuntimeError, 1, 3),
                                                    (ValueError, float("inf"), 1)])
def test_the_models_own_error_is_raised(error, times, attempts):
    """A RuntimeError in channels-last layout that the inputs' layout does not cure is raised as the model
    raised it there (2 attempts); one that the inputs' layout cures but that does not happen again in
    channels-last layout is not the layout's either: the first error is raised (3 attempts) and the
    layout kept; other exceptions are raised at once."""
    model = FailsOnLargeBatches(rows=2, error=error, times=times).eval()
    problem, _ = build_problem(model, torch.randn(2, 2, 6, 6), "conv", channels_last=True, **COMMON)
    before = model.calls
    with pytest.raises(error, match="the model's own failure"):
        engine.evaluate(problem, torch.tensor([0, 0, 1, 1]), torch.full((4,), 0.5, dtype=torch.float64))
    assert model.calls - before == attempts
    if times == 1:
        assert problem.channels_last and model.failed == 1
    assert no_hooks_left(model)


def test_a_model_that_views_fails_twice_in_channels_last_at_the_inputs_and_keeps_its_layout():
    """The forward at the inputs: channels-last fails, the inputs' layout runs, channels-last fails again;
    a one-off failure there is raised instead."""
    model = ViewsLargeBatches(rows=0).eval()          # .view() on every forward
    x = torch.randn(2, 2, 6, 6)
    problem, out = build_problem(model, x, "conv", channels_last=True, **COMMON)
    assert not problem.channels_last and model.calls == 3
    torch.testing.assert_close(out, model(x))
    once = FailsOnLargeBatches(rows=0, error=RuntimeError, times=1).eval()
    with pytest.raises(RuntimeError, match="the model's own failure"):
        build_problem(once, x, "conv", channels_last=True, **COMMON)
    assert once.failed == 1 and no_hooks_left(once)


def test_the_leaf_refusal_is_read_from_autograds_own_messages():
    """The one in-place failure no version counter shows: autograd's refusal, raised here by autograd itself
    for a leaf and for a view of one; other in-place failures and other errors are not it."""
    from conductance.engine import ModifiedInPlace, is_leaf_in_place_refusal
    caught = []
    for change in (lambda t: t.relu_(), lambda t: t[:2].mul_(2)):
        leaf = torch.randn(3, requires_grad=True)
        with pytest.raises(RuntimeError) as info:
            change(leaf)
        caught.append(info.value)
    assert "a leaf Variable" in str(caught[0]) and "a view of a leaf Variable" in str(caught[1])
    assert all(is_leaf_in_place_refusal(e) for e in caught)
    a = torch.randn(3, requires_grad=True)
    b = a * 2
    c = b * b                                   # saves b for the backward
    b.add_(1)
    with pytest.raises(RuntimeError) as saved:
        c.sum().backward()
    assert "modified by an inplace operation" in str(saved.value)
    assert not is_leaf_in_place_refusal(saved.value)   # a version counter shows this one (ModifiedInPlace)
    assert not is_leaf_in_place_refusal(ModifiedInPlace("leaf Variable that requires grad is being used in an "
                                                        "in-place operation"))
    assert not is_leaf_in_place_refusal(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
