"""Bad input gets a clear error (or warning), and the model is left exactly as it was.

Every case of issue 2's "Bad input gets a clear error" list, for ``layer_conductance`` and,
where it applies, ``neuron_conductance``. Each failing call is made twice, once with autograd
enabled and once under ``torch.no_grad()``; afterwards no module of the model may carry a
forward hook or forward pre-hook, and the global autograd mode must be what it was before.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules import module as nn_module

import conductance as cd
from conductance import ConductanceError, ConductanceWarning

# --------------------------------------------------------------------------- models


class Branchy(nn.Module):
    """A small MLP with the awkward corners the error checks need.

    - ``unused``: defined but never called by ``forward``;
    - ``aux``: an auxiliary head that runs but does not feed the main output;
    - ``post``: runs after the main output and is returned separately
      (``forward`` returns ``(logits, softmax(logits), aux)``; the scores are element 0).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(8, 3)
        self.unused = nn.Linear(8, 8)
        self.aux = nn.Linear(8, 2)
        self.post = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor):
        h = self.act(self.fc1(x))
        aux = self.aux(h)
        out = self.fc2(h)
        return out, self.post(out), aux


class LSTMNet(nn.Module):
    """An LSTM (tuple output) followed by a linear head on the last time step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class Exploding(nn.Module):
    """Raises inside ``forward`` on its ``fail_on``-th call, after ``fc1`` has already run."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)
        self.calls = 0
        self.fail_on = fail_on
        self.hooks_at_failure = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = torch.relu(self.fc1(x))
        if self.calls == self.fail_on:
            self.hooks_at_failure = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self.modules())
            raise RuntimeError("boom inside the user's forward")
        return self.fc2(h)


class Skip(nn.Module):
    """A residual block: ``a`` is not a cut, so the engine also tracks the input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)) + x)


@pytest.fixture
def net() -> Branchy:
    torch.manual_seed(0)
    return Branchy().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- helpers


def assert_no_hooks(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        assert len(mod._forward_hooks) == 0, f"forward hook left on {name!r}"
        assert len(mod._forward_pre_hooks) == 0, f"forward pre-hook left on {name!r}"
        assert len(mod._backward_hooks) == 0, f"backward hook left on {name!r}"
    assert len(nn_module._global_forward_hooks) == 0
    assert len(nn_module._global_forward_pre_hooks) == 0


def check_raises(model: nn.Module, call, exc, match: str) -> None:
    """``call()`` raises ``exc`` matching ``match`` in both grad modes; nothing is left behind."""
    assert_no_hooks(model)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConductanceWarning)
                with pytest.raises(exc, match=match):
                    call()
            assert torch.is_grad_enabled() is grad, "autograd mode not restored"
        assert_no_hooks(model)
    assert torch.is_grad_enabled()


def layer(model, inputs, layers, **kw):
    return cd.layer_conductance(model, inputs, layers, **kw)


def neuron(model, inputs, lay, neurons, **kw):
    return cd.neuron_conductance(model, inputs, lay, neurons, **kw)


# --------------------------------------------------------------------------- a good call first


def test_the_fixture_model_works(net, x):
    """The error cases below fail because of the one bad argument, not because the model is broken."""
    r = layer(net, x, ["fc1", "act", "fc2"], n_steps=16, method="uniform")
    assert r.output_diff.abs().min() > 1e-3
    for name in ("fc1", "act", "fc2"):
        assert r.is_cut[name]
        assert (r.delta[name].abs() <= 0.02 * r.output_diff.abs()).all()
    nc = neuron(net, x, "fc1", [0, 5], n_steps=16, method="uniform")
    assert nc.shape == (2, 3, 4) and nc.abs().max() > 1e-3
    assert_no_hooks(net)


# --------------------------------------------------------------------------- layer names


@pytest.mark.parametrize("wrong, closest", [("fc", "fc1"), ("fc3", "fc2"), ("act1", "act"), ("ffc1", "fc1")])
def test_unknown_layer_name_suggests_closest(net, x, wrong, closest):
    check_raises(net, lambda: layer(net, x, wrong), ValueError,
                 rf"no layer named '{wrong}'.*Did you mean.*'{closest}'")
    check_raises(net, lambda: layer(net, x, ["fc1", wrong], n_steps=4), ValueError,
                 rf"no layer named '{wrong}'.*Did you mean.*'{closest}'")
    check_raises(net, lambda: neuron(net, x, wrong, [0]), ValueError,
                 rf"no layer named '{wrong}'.*Did you mean.*'{closest}'")


@pytest.mark.parametrize("kw", [{}, {"n_steps": 4, "method": "uniform"}, {"n_steps": 4, "method": "captum"}])
def test_layer_never_reached(net, x, kw):
    check_raises(net, lambda: layer(net, x, "unused", **kw), ValueError, r"never reached.*'unused'")
    check_raises(net, lambda: layer(net, x, ["fc1", "unused"], **kw), ValueError, r"never reached.*'unused'")
    check_raises(net, lambda: layer(net, x, net.unused, **kw), ValueError, r"never reached.*'unused'")


@pytest.mark.parametrize("kw", [{}, {"n_steps": 4, "method": "uniform"}, {"n_steps": 4, "method": "captum"}])
def test_neuron_layer_never_reached(net, x, kw):
    check_raises(net, lambda: neuron(net, x, "unused", [0], **kw), ValueError, r"never reached.*'unused'")


@pytest.mark.parametrize("name", ["aux", "post"])
@pytest.mark.parametrize("kw", [{}, {"n_steps": 4, "method": "uniform"}, {"n_steps": 4, "method": "captum"}])
def test_layer_target_does_not_depend_on(net, x, name, kw):
    """``aux`` is a side head; ``post`` runs after the explained output (returned separately)."""
    check_raises(net, lambda: layer(net, x, name, **kw), ValueError, rf"does not depend on.*'{name}'")
    check_raises(net, lambda: layer(net, x, ["fc1", name], **kw), ValueError,
                 rf"does not depend on.*'{name}'")


@pytest.mark.parametrize("name", ["aux", "post"])
@pytest.mark.parametrize("kw", [{}, {"n_steps": 4, "method": "uniform"}])
def test_neuron_target_does_not_depend_on(net, x, name, kw):
    check_raises(net, lambda: neuron(net, x, name, [0], **kw), ValueError, rf"does not depend on.*'{name}'")


@pytest.mark.parametrize("name", ["unused", "aux"])
def test_neuron_fixed_rule_errors_say_the_fix(net, x, name):
    check_raises(net, lambda: neuron(net, x, name, [0], n_steps=4, method="uniform"), ValueError,
                 r"choose (a )?layers?")


# --------------------------------------------------------------------------- baselines and inputs


@pytest.mark.parametrize("shape", [(2, 4), (5,), (3, 2), (1, 3, 4)])
def test_baselines_do_not_broadcast(net, x, shape):
    b = torch.zeros(shape)
    pattern = rf"baselines of shape {tuple(shape)!s}".replace("(", r"\(").replace(")", r"\)") + r".*broadcast"
    check_raises(net, lambda: layer(net, x, "fc1", baselines=b), ValueError, pattern)
    check_raises(net, lambda: neuron(net, x, "fc1", [0], baselines=b), ValueError, pattern)


def test_broadcastable_baselines_are_accepted(net, x):
    """The check above must not reject what does broadcast: shared (4,), per-example (3, 1), a number."""
    full = layer(net, x, "fc1", n_steps=8, method="uniform", baselines=torch.full((3, 4), 0.5))["fc1"]
    for b in (torch.full((4,), 0.5), torch.full((3, 1), 0.5), 0.5):
        got = layer(net, x, "fc1", n_steps=8, method="uniform", baselines=b)["fc1"]
        torch.testing.assert_close(got, full)
    zero = layer(net, x, "fc1", n_steps=8, method="uniform")["fc1"]
    assert (zero - full).abs().max() > 1e-3


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs(net, x, value):
    bad = x.clone()
    bad[1, 2] = value
    check_raises(net, lambda: layer(net, bad, "fc1"), ValueError, r"inputs contain NaN or Inf.*\[1\]")
    check_raises(net, lambda: neuron(net, bad, "fc1", [0]), ValueError, r"inputs contain NaN or Inf")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_baselines(net, x, value):
    tensor_b = torch.zeros(4)
    tensor_b[3] = value
    for b in (value, tensor_b):
        check_raises(net, lambda b=b: layer(net, x, "fc1", baselines=b), ValueError, r"baselines contain NaN or Inf")
        check_raises(net, lambda b=b: neuron(net, x, "fc1", [0], baselines=b), ValueError,
                     r"baselines contain NaN or Inf")


@pytest.mark.parametrize("dtype", [torch.long, torch.int32])
def test_integer_inputs_point_to_embeddings(net, dtype):
    ids = torch.randint(0, 10, (3, 4), dtype=dtype, generator=torch.Generator().manual_seed(0))
    check_raises(net, lambda: layer(net, ids, "fc1"), TypeError, r"(?s)integer.*interpolated.*embedding")
    check_raises(net, lambda: neuron(net, ids, "fc1", [0]), TypeError, r"(?s)integer.*embedding")


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize("target", [3, -1, 100, torch.tensor([0, 3, 1]), [0, 1, -2]])
def test_target_out_of_range(net, x, target):
    check_raises(net, lambda: layer(net, x, "fc1", target=target), ValueError,
                 r"out of range.*3 outputs.*0\.\.2")
    check_raises(net, lambda: neuron(net, x, "fc1", [0], target=target), ValueError, r"out of range.*3 outputs")


@pytest.mark.parametrize("target", [torch.tensor([0, 1]), torch.zeros(3, 1, dtype=torch.long),
                                    torch.zeros(1, 3, dtype=torch.long), [0, 1, 2, 0]])
def test_target_wrong_shape(net, x, target):
    check_raises(net, lambda: layer(net, x, "fc1", target=target), ValueError,
                 r"target has shape.*one class per example.*\(3,\)")
    check_raises(net, lambda: neuron(net, x, "fc1", [0], target=target), ValueError, r"target has shape")


def test_target_float_tensor(net, x):
    t = torch.tensor([0.0, 1.0, 2.0])
    check_raises(net, lambda: layer(net, x, "fc1", target=t), TypeError, r"class indices.*integer dtype")


def test_target_callable_wrong_shape(net, x):
    """A callable target that returns (points, 2) instead of (points,): caught inside the hooked forward."""
    bad = lambda out: out[0][:, :2]  # noqa: E731
    check_raises(net, lambda: layer(net, x, "fc1", target=bad), ValueError, r"target callable.*shape")
    check_raises(net, lambda: neuron(net, x, "fc1", [0], target=bad), ValueError, r"target callable.*shape")


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("n_steps", [0, -3])
@pytest.mark.parametrize("method", [None, "uniform", "captum"])
def test_n_steps_below_one(net, x, n_steps, method):
    check_raises(net, lambda: layer(net, x, "fc1", n_steps=n_steps, method=method), ValueError,
                 rf"n_steps must be an integer >= 1, got {n_steps}")
    check_raises(net, lambda: neuron(net, x, "fc1", [0], n_steps=n_steps, method=method), ValueError,
                 rf"n_steps must be an integer >= 1, got {n_steps}")


@pytest.mark.parametrize("method", ["riemann", "trapezoid", "Uniform", "gauss", ""])
def test_unknown_method(net, x, method):
    check_raises(net, lambda: layer(net, x, "fc1", method=method), ValueError,
                 rf"unknown method '{method}'.*gausslegendre.*captum")
    check_raises(net, lambda: neuron(net, x, "fc1", [0], method=method), ValueError,
                 rf"unknown method '{method}'.*gausslegendre")


@pytest.mark.parametrize("units", ["filter", "channels", "Neuron", None])
def test_unknown_units(net, x, units):
    check_raises(net, lambda: layer(net, x, "fc1", units=units), ValueError,
                 rf"unknown units {units!r}.*'neuron'.*'channel'")
    check_raises(net, lambda: neuron(net, x, "fc1", [0], units=units), ValueError,
                 rf"unknown units {units!r}.*'neuron'.*'channel'")


# --------------------------------------------------------------------------- neuron indices


@pytest.mark.parametrize("neurons, units, match", [
    ([8], "neuron", r"neuron 8 is out of range.*'fc1'.*\(8,\)"),
    ([0, -1], "neuron", r"neuron -1 is out of range"),
    ([(8,)], "neuron", r"out of range"),
    ([9], "channel", r"channel 9 is out of range.*8 channels"),
])
@pytest.mark.parametrize("kw", [{}, {"n_steps": 4, "method": "uniform"}])
def test_neuron_index_out_of_range(net, x, neurons, units, match, kw):
    check_raises(net, lambda: neuron(net, x, "fc1", neurons, units=units, **kw), ValueError, match)


@pytest.mark.parametrize("neurons", [[(0, 1)], [(1, 2, 3)], [()]])
def test_neuron_index_wrong_length(net, x, neurons):
    check_raises(net, lambda: neuron(net, x, "fc1", neurons, n_steps=4, method="uniform"), ValueError,
                 r"does not index layer 'fc1' of shape \(8,\).*tuple of 1 indices")


def test_neuron_index_wrong_length_conv():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).eval()
    xs = torch.randn(2, 2, 6, 6)
    check_raises(conv, lambda: neuron(conv, xs, "0", [(1, 2)], n_steps=4, method="uniform"), ValueError,
                 r"does not index layer '0' of shape \(3, 4, 4\).*tuple of 3 indices.*units='channel'")
    check_raises(conv, lambda: neuron(conv, xs, "0", [(1, 2, 4)], n_steps=4, method="uniform"), ValueError,
                 r"out of range for layer '0' of shape \(3, 4, 4\)")
    check_raises(conv, lambda: neuron(conv, xs, "0", [(0, 0, 0)], units="channel", n_steps=4, method="uniform"),
                 ValueError, r"units='channel'.*one channel index")
    # correctly indexed units of the same layer work
    ok = neuron(conv, xs, "0", [(1, 2, 3), (0, 0, 0)], n_steps=4, method="uniform")
    assert ok.shape == (2, 2, 2, 6, 6) and ok.abs().max() > 0
    ok = neuron(conv, xs, "0", [2], units="channel", n_steps=4, method="uniform")
    assert ok.shape == (1, 2, 2, 6, 6) and ok.abs().max() > 0
    assert_no_hooks(conv)


# --------------------------------------------------------------------------- training mode


def test_training_mode_warns(x):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    for call in (lambda: layer(model, x, "1", n_steps=8, method="uniform"),
                 lambda: neuron(model, x, "1", [2], n_steps=8, method="uniform")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        ours = [w for w in caught if issubclass(w.category, ConductanceWarning)
                and "training mode" in str(w.message)]
        assert ours, [str(w.message) for w in caught]
        assert "eval()" in str(ours[0].message) and "dropout" in str(ours[0].message)
        assert model.training, "the library must not switch the user's model to eval behind their back"
        assert_no_hooks(model)
    # and in eval mode there is no such warning
    model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(model, x, "1", n_steps=8, method="uniform")
    assert not [w for w in caught if "training mode" in str(w.message)]


def test_training_mode_warning_via_pytest_warns(net, x):
    net.train()
    with pytest.warns(ConductanceWarning, match=r"training mode.*eval"):
        layer(net, x, "fc1", n_steps=8, method="uniform")
    assert_no_hooks(net)


# --------------------------------------------------------------------------- tuple outputs


@pytest.fixture
def lstm_net() -> LSTMNet:
    torch.manual_seed(0)
    return LSTMNet().eval()


@pytest.fixture
def seq() -> torch.Tensor:
    return 2 * torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(3))


def test_tuple_output_needs_element(lstm_net, seq):
    check_raises(lstm_net, lambda: layer(lstm_net, seq, "lstm"), ValueError,
                 r"'lstm' returns a tuple, not a tensor.*'lstm\[0\]'")
    check_raises(lstm_net, lambda: layer(lstm_net, seq, ["head", "lstm"], n_steps=4), ValueError,
                 r"'lstm' returns a tuple.*'lstm\[0\]'")
    check_raises(lstm_net, lambda: neuron(lstm_net, seq, "lstm", [(3, 1)], n_steps=4), ValueError,
                 r"'lstm' returns a tuple.*'lstm\[0\]'")


def test_tuple_output_bad_element(lstm_net, seq):
    check_raises(lstm_net, lambda: layer(lstm_net, seq, "lstm[5]"), ValueError,
                 r"'lstm\[5\]'.*cannot select element 5")
    check_raises(lstm_net, lambda: layer(lstm_net, seq, "lstm[1]"), ValueError,
                 r"'lstm\[1\]'.*element 1 is a tuple, not a tensor")


def test_tuple_output_with_element_works(lstm_net, seq):
    r = layer(lstm_net, seq, "lstm[0]", n_steps=32, method="uniform")
    value = r["lstm[0]"]
    assert value.shape == (2, 4, 5)
    assert r.is_cut["lstm[0]"]
    assert r.output_diff.abs().min() > 1e-2
    # the head reads only the last time step: earlier steps carry no conductance, the last one does
    assert value[:, :3].abs().max() == 0
    assert (value[:, 3].abs().sum(1) > 1e-3).all()
    torch.testing.assert_close(value.flatten(1).sum(1), r.output_diff, rtol=1e-4, atol=1e-6)
    # the (name, element) tuple form is the same layer
    r2 = layer(lstm_net, seq, [("lstm", 0)], n_steps=32, method="uniform")
    torch.testing.assert_close(r2["lstm[0]"], value)
    # neuron conductance of tuple-element units: each row sums to that unit's layer conductance
    units = [(3, 1), (3, 4), (3, 0)]
    nc = neuron(lstm_net, seq, "lstm[0]", units, n_steps=32, method="uniform")
    assert nc.shape == (3, 2, 4, 3)
    for k, u in enumerate(units):
        want = value[(slice(None),) + u]
        assert want.abs().max() > 1e-3
        torch.testing.assert_close(nc[k].flatten(1).sum(1), want, rtol=0.02, atol=2e-4)
    assert_no_hooks(lstm_net)
    assert torch.is_grad_enabled()


# --------------------------------------------------------------------------- exceptions inside the model


@pytest.mark.filterwarnings("ignore::conductance.ConductanceWarning")
@pytest.mark.parametrize("fail_on", [2, 3, 4, 5])
@pytest.mark.parametrize("which", ["layer_fixed", "layer_adaptive", "neuron_fixed", "neuron_adaptive"])
def test_exception_in_forward_leaves_no_hooks(fail_on, which):
    """The model raises on its 2nd to 5th forward (the 1st is the unhooked one at the inputs), after
    the observed layer has run: the user's exception propagates, hooks and grad mode are restored."""
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    calls = {
        "layer_fixed": lambda m: layer(m, x, ["fc1", "fc2"], n_steps=6, method="uniform", internal_batch_size=5),
        "layer_adaptive": lambda m: layer(m, x, ["fc1", "fc2"], internal_batch_size=5),
        "neuron_fixed": lambda m: neuron(m, x, "fc1", [0, 2], n_steps=6, method="uniform", internal_batch_size=5),
        "neuron_adaptive": lambda m: neuron(m, x, "fc1", [0, 2], internal_batch_size=5),
    }
    for grad in (True, False):
        model = Exploding(fail_on).eval()
        with torch.set_grad_enabled(grad):
            with pytest.raises(RuntimeError, match="boom inside the user's forward"):
                calls[which](model)
            assert torch.is_grad_enabled() is grad
        assert model.calls == fail_on
        # the library's hooks were on the model when it raised (neuron conductance's adaptive grid runs
        # on its own problem: no second unhooked forward at the inputs)
        assert model.hooks_at_failure >= 1
        assert_no_hooks(model)
    # the same call succeeds on a model that does not raise, so the failure was the model's
    ok = Exploding(fail_on=-1).eval()
    out = calls[which](ok)
    assert (out["fc1"] if which.startswith("layer") else out).abs().max() > 0
    assert_no_hooks(ok)


def test_exception_in_target_callable_leaves_no_hooks(net, x):
    def target(out):
        raise KeyError("target blew up")
    check_raises(net, lambda: layer(net, x, ["fc1", "act"], target=target, n_steps=4), KeyError, "target blew up")
    check_raises(net, lambda: neuron(net, x, "fc1", [1], target=target, n_steps=4), KeyError, "target blew up")


def test_user_hooks_survive(net, x):
    """Only the library's own hooks are removed: a hook the user registered stays (and keeps firing)."""
    seen = []
    handle = net.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    try:
        with pytest.raises(ValueError, match="never reached"):
            layer(net, x, ["fc1", "unused"], n_steps=4)
        layer(net, x, "fc1", n_steps=4, method="uniform")
        assert len(net.fc1._forward_hooks) == 1
        assert sum(1 for _, m in net.named_modules() for _ in m._forward_hooks) == 1
        assert seen, "the user's hook must keep running during attribution"
    finally:
        handle.remove()
    assert_no_hooks(net)


# --------------------------------------------------------------------------- autograd mode


@pytest.mark.parametrize("which", ["layer", "neuron"])
def test_no_grad_context_non_cut_layer_adaptive(which):
    torch.manual_seed(0)
    model = Skip().eval()
    x = torch.randn(2, 4)
    call = (lambda: layer(model, x, "a")["a"]) if which == "layer" else (lambda: neuron(model, x, "a", [0, 3]))
    want = call()
    assert want.abs().max() > 1e-2
    with torch.no_grad():
        got = call()
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(got, want)
    assert_no_hooks(model)


def test_no_grad_context_fixed_rule():
    """With a fixed rule the engine turns autograd on only where it needs it, and restores the mode;
    results equal those computed with autograd on (a cut layer, and a non-cut layer of a residual block)."""
    torch.manual_seed(0)
    models = [(Branchy().eval(), torch.randn(3, 4), ["fc1", "fc2"], "fc1"),
              (Skip().eval(), torch.randn(2, 4), ["a", "b"], "a")]
    for model, x, names, first in models:
        want = layer(model, x, names, n_steps=8, method="uniform")
        want_n = neuron(model, x, first, [0, 3], n_steps=8, method="uniform")
        with torch.no_grad():
            got = layer(model, x, names, n_steps=8, method="uniform")
            got_n = neuron(model, x, first, [0, 3], n_steps=8, method="uniform")
            assert not torch.is_grad_enabled()
        for n in names:
            assert want[n].abs().max() > 1e-3
            torch.testing.assert_close(got[n], want[n])
        assert want_n.abs().max() > 1e-3
        torch.testing.assert_close(got_n, want_n)
        assert_no_hooks(model)


def test_library_errors_are_value_errors(net, x):
    """The library's own errors are ConductanceError, a ValueError, so ``except ValueError`` catches them."""
    assert issubclass(ConductanceError, ValueError)
    for call in (lambda: layer(net, x, "fc1", n_steps=0),
                 lambda: layer(net, x, "unused"),
                 lambda: layer(net, x, "fc1", target=7),
                 lambda: neuron(net, x, "fc1", [8], n_steps=4, method="uniform")):
        with pytest.raises(ConductanceError):
            call()
    assert_no_hooks(net)
