"""The request object: every setting checked once, before the model runs; memory budget and layout
as keywords instead of module globals."""

import inspect
import numbers
import sys
import types

import pytest
import torch
from torch import nn

import conductance as cd
from conductance import ConductanceError, ConductanceWarning, engine
from conductance.request import Request
from models import random_cnn, random_mlp


class ForwardCounter:
    """Counts the model's forward passes through a pre-hook on the model itself (registered here)."""

    def __init__(self, model: nn.Module):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._pre)

    def _pre(self, module, args):
        self.count += 1

    def remove(self):
        self.handle.remove()


BAD_SETTINGS = [
    (dict(n_steps=0), "n_steps"),
    (dict(n_steps=2.5), "n_steps"),
    (dict(tolerance=1.5), "tolerance"),
    (dict(tolerance=0.01, method="gausslegendre"), "tolerance"),
    (dict(max_steps=1), "max_steps"),
    (dict(n_steps=20, max_steps=100), "max_steps"),            # a budget for a fixed rule
    (dict(tolerance=0.01, n_steps=60, max_steps=64), "max_steps"),  # starting grid above the budget
    (dict(method="simpson"), "unknown method"),
    (dict(units="pixel"), "unknown units"),
    (dict(internal_batch_size=0), "internal_batch_size"),
    (dict(internal_batch_size=True), "internal_batch_size"),
    (dict(additional_forward_args=[1, 2]), "additional_forward_args"),
    (dict(forward_kwargs=[("scale", 2)]), "forward_kwargs"),
    (dict(memory_budget=0), "memory_budget"),
    (dict(memory_budget=2.5e9), "memory_budget"),
    (dict(memory_budget=True), "memory_budget"),
    (dict(channels_last="yes"), "channels_last"),
    (dict(channels_last=1), "channels_last"),
]


def _calls(model, x):
    return {
        "layer_conductance": lambda **kw: cd.layer_conductance(model, x, "1", **kw),
        "layer_importance": lambda **kw: cd.layer_importance(model, x, "1", ["conductance", "gradient"], **kw),
        "neuron_conductance": lambda **kw: cd.neuron_conductance(model, x, "1", [0, 2], **kw),
        "aggregate": lambda **kw: cd.aggregate(model, [(x, torch.tensor([0, 1, 2]))], "1",
                                               **{"units": "neuron", **kw}),
    }


@pytest.mark.parametrize("settings, name", BAD_SETTINGS)
@pytest.mark.parametrize("call", ["layer_conductance", "layer_importance", "neuron_conductance", "aggregate"])
def test_bad_settings_are_refused_before_the_model_runs(call, settings, name):
    model = random_mlp(seed=1)
    x = torch.randn(3, 5)
    counter = ForwardCounter(model)
    with pytest.raises(ConductanceError, match=name):
        _calls(model, x)[call](**settings)
    counter.remove()
    assert counter.count == 0
    assert not model._forward_pre_hooks and not any(m._forward_hooks for m in model.modules())


def test_feature_selection_checks_the_path_settings_before_any_model_runs():
    model = random_mlp(seed=2, n_out=3)
    x = torch.randn(12, 5)
    y = torch.arange(12) % 3
    counter = ForwardCounter(model)
    with pytest.raises(ConductanceError, match="memory_budget"):
        cd.feature_selection(model, x, y, "1", measures="conductance", ks=1, units="neuron",
                             importance_kwargs=dict(memory_budget=-1))
    counter.remove()
    assert counter.count == 0


def test_settings_are_checked_once_per_call(monkeypatch):
    """neuron conductance's adaptive grid runs on the call's own problem: one check of the settings and
    one problem (the inputs' forward once), where it used to build and check both twice."""
    from conductance import inputs, request
    checks, builds = [], []
    original_check, original_build = request.check_steps, inputs.build_problem

    def check(*args):
        checks.append(args)
        return original_check(*args)

    def build(*args, **kwargs):
        builds.append(kwargs)
        return original_build(*args, **kwargs)

    monkeypatch.setattr(request, "check_steps", check)
    for module in ("conductance.inputs", "conductance.attribute", "conductance.neuron"):
        monkeypatch.setattr(sys.modules[module], "build_problem", build)
    model = random_mlp(seed=3)
    x = torch.randn(2, 5)
    for call in (lambda: cd.layer_conductance(model, x, ["1", "3"], tolerance=1e-3),
                 lambda: cd.layer_importance(model, x, "1", ["conductance", "activation",
                                                             "layer_integrated_gradients"]),
                 lambda: cd.neuron_conductance(model, x, "1", [0, 3], tolerance=1e-3),
                 lambda: cd.neuron_conductance(model, x, "1", [0, 3], n_steps=16)):
        checks.clear()
        builds.clear()
        call()
        assert len(checks) == 1 and len(builds) == 1


def test_request_resolves_the_rule_and_defaults():
    adaptive = Request.make()
    assert (adaptive.method, adaptive.tolerance, adaptive.n_steps) == ("adaptive", 0.02, None)
    assert adaptive.memory_budget == 3 * 2 ** 30 and adaptive.channels_last is None
    assert adaptive.initial_steps == 8 and adaptive.max_steps == 256
    fixed = Request.make(n_steps=10, additional_forward_args=torch.ones(2), forward_kwargs={"a": 1})
    assert (fixed.method, fixed.tolerance, fixed.n_steps) == ("gausslegendre", None, 10)
    assert isinstance(fixed.additional_forward_args, tuple) and len(fixed.additional_forward_args) == 1
    assert fixed.forward_kwargs == {"a": 1}
    assert Request.make(method="captum").n_steps == 50
    with pytest.raises(AttributeError):   # frozen: checked once, then read-only
        fixed.method = "uniform"  # type: ignore[misc]


def test_memory_budget_stops_the_adaptive_rule_as_the_old_global_did(monkeypatch):
    """``memory_budget=B`` gives the result a run with the default budget set to B gives (the way users
    had to do it before), and a budget large enough lets the rule finish."""
    model = random_mlp(seed=7, act=nn.ReLU)
    x = torch.randn(3, 5) * 3
    per_point = 2 * 7 * 4 * 2          # two layers of 7 float32 units, value and gradient: 112 bytes
    budget = 20 * per_point
    with pytest.warns(ConductanceWarning, match=r"memory budget for stored points \(2240 bytes\).*memory_budget="):
        keyword = cd.layer_conductance(model, x, ["1", "3"], tolerance=1e-9, max_steps=500, memory_budget=budget)
    assert keyword.extra["memory_limited"] and keyword.extra["memory_budget"] == budget
    assert int(keyword.n_points.sum()) <= 20
    monkeypatch.setattr(engine, "ADAPTIVE_STORE_BYTES", budget)   # the old way, for comparison only
    with pytest.warns(ConductanceWarning, match="memory budget"):
        old = cd.layer_conductance(model, x, ["1", "3"], tolerance=1e-9, max_steps=500)
    monkeypatch.undo()
    assert torch.equal(old.n_points, keyword.n_points)
    for n in ("1", "3"):
        assert torch.equal(old[n], keyword[n])
    roomy = cd.layer_conductance(model, x, ["1", "3"], tolerance=1e-3, max_steps=500, memory_budget=10 ** 6)
    assert not roomy.extra["memory_limited"] and "memory_budget" not in roomy.extra
    assert int(roomy.n_points.sum()) > 20
    # neuron conductance refines its grid under the same budget
    with pytest.warns(ConductanceWarning, match="memory budget"):
        cd.neuron_conductance(model, x, "1", [0], tolerance=1e-9, max_steps=500, memory_budget=12 * 2 * 7 * 4)


def _layouts(model):
    """Record whether each forward's input to the model is channels-last."""
    seen = []
    handle = model[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                    and not args[0].is_contiguous()))
    return seen, handle


@pytest.mark.parametrize("method, n_steps, automatic", [("gausslegendre", 12, True), ("captum", 12, False)])
def test_channels_last_true_and_false_give_equal_results(method, n_steps, automatic):
    model = random_cnn(seed=4)
    x = torch.randn(2, 2, 6, 6)
    results = {}
    for flag in (None, True, False):
        seen, handle = _layouts(model)
        results[flag] = cd.layer_conductance(model, x, ["0", "2"], method=method, n_steps=n_steps, units="channel",
                                             channels_last=flag)
        per = cd.neuron_conductance(model, x, "2", [1, 4], units="channel", method=method, n_steps=n_steps,
                                    channels_last=flag)
        handle.remove()
        # the path points took the layout asked for (None: the automatic choice of the rule)
        want = automatic if flag is None else flag
        assert seen and all(s == want for s in seen[1:])
        results[flag, "neuron"] = per
    for key in ("0", "2"):
        assert results[True][key].abs().max() > 1e-2
        torch.testing.assert_close(results[True][key], results[False][key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[True, "neuron"], results[False, "neuron"], rtol=1e-5, atol=1e-6)
    # the automatic choice equals the forced one bit for bit
    assert torch.equal(results[None]["2"], results[automatic]["2"])


def _public_globals():
    """Every module-level number, string, bool or tuple of the package's modules."""
    out = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("conductance") or not isinstance(module, types.ModuleType):
            continue
        for key, value in vars(module).items():
            if key.startswith("__") or inspect.ismodule(value) or callable(value):
                continue
            if isinstance(value, (numbers.Number, str, bool, tuple, frozenset)):
                out[name, key] = value
    return out


def test_no_module_global_is_changed_by_any_call():
    model = random_cnn(seed=5)
    x = torch.randn(2, 2, 6, 6)
    before = _public_globals()
    assert ("conductance.engine", "ADAPTIVE_STORE_BYTES") in before
    assert ("conductance.engine", "CHANNELS_LAST") in before
    assert ("conductance.adaptive", "REFINE_SHARE") in before
    with pytest.warns(ConductanceWarning):
        cd.layer_conductance(model, x, "0", tolerance=1e-6, memory_budget=4096, channels_last=False)
    cd.layer_importance(model, x, "2", ["conductance", "layer_integrated_gradients"], n_steps=8,
                        channels_last=True)
    cd.neuron_conductance(model, x, "0", [1], units="channel", tolerance=0.05, memory_budget=10 ** 7)
    assert _public_globals() == before


def test_refine_share_and_unit_floor_are_request_fields(monkeypatch):
    """The adaptive rule reads both from the request: the defaults reproduce a plain call exactly, a
    larger share bisects more pairs per round (more points), and both reach the integrator."""
    import dataclasses

    from conductance import attribute
    from conductance.attribute import importance_results
    model = random_mlp(seed=7, act=nn.ReLU)
    x = torch.randn(3, 5) * 3
    base = Request.make(tolerance=1e-3, max_steps=500)
    seen = []
    original = attribute.integrate_adaptive

    def spy(*args, **kwargs):
        seen.append((kwargs["unit_floor"], kwargs["refine_share"], kwargs["store_bytes"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(attribute, "integrate_adaptive", spy)
    runs = {}
    for key, request in (("default", base), ("share", dataclasses.replace(base, refine_share=1.0)),
                         ("floor", dataclasses.replace(base, unit_floor=0.25, memory_budget=10 ** 7))):
        runs[key] = importance_results(model, x, ["1", "3"], ["conductance"], baselines=None, target=0,
                                       request=request)["conductance"]
    assert seen == [(1e-3, 0.3, 3 * 2 ** 30), (1e-3, 1.0, 3 * 2 ** 30), (0.25, 0.3, 10 ** 7)]
    plain = cd.layer_conductance(model, x, ["1", "3"], target=0, tolerance=1e-3, max_steps=500)
    assert torch.equal(runs["default"]["3"], plain["3"])
    assert torch.equal(runs["default"].n_points, plain.n_points)
    # bisecting every pair each round doubles the grid until the budget: more points than the default
    assert int(runs["share"].n_points.min()) > int(runs["default"].n_points.max())


def test_neuron_module_runs_no_model_itself():
    """neuron.py evaluates points through the engine: no hooks, forwards or backward passes of its own."""
    from conductance import neuron
    source = inspect.getsource(neuron)
    for word in ("Recorder", "model_output", "autograd.grad", "register_forward", "build_problem(model, inputs, layer"):
        if word.startswith("build_problem"):
            assert source.count(word) == 1
        else:
            assert word not in source


@pytest.mark.slow
def test_channels_last_on_the_real_efficientnet():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("PIL")
    from conductance import assets
    model = assets.efficientnet_lite0()
    x = assets.photo_batch(["chelsea"])
    runs = {flag: cd.layer_conductance(model, x, "_blocks.4", units="channel", n_steps=6, channels_last=flag)
            for flag in (True, False)}
    layer = runs[True]["_blocks.4"]
    assert layer.abs().max() > 1e-3
    torch.testing.assert_close(layer, runs[False]["_blocks.4"], rtol=1e-3, atol=1e-4 * float(layer.abs().max()))


def test_hf_and_aggregate_pass_the_keywords_on():
    """cd.hf.layer_conductance and cd.aggregate forward memory_budget (it stops the adaptive rule as in
    layer_conductance) and refuse a bad channels_last before the model runs."""
    transformers = pytest.importorskip("transformers")
    from conductance import hf
    torch.manual_seed(3)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=12, num_labels=3,
                                     initializer_range=0.3)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(3, 40, (2, 5))
    counter = ForwardCounter(model)
    with pytest.raises(ConductanceError, match="channels_last"):
        hf.layer_conductance(model, ids, "bert.encoder.layer.0", target=1, channels_last="auto")
    assert counter.count == 0
    counter.remove()
    with pytest.warns(ConductanceWarning, match=r"memory budget for stored points \(20000 bytes\)"):
        r = hf.layer_conductance(model, ids, "bert.encoder.layer.0", target=1, tolerance=1e-9, max_steps=400,
                                 memory_budget=20_000)
    assert r.raw.extra["memory_limited"] and r.raw.extra["memory_budget"] == 20_000
    mlp = random_mlp(seed=9, act=nn.ReLU)
    x = torch.randn(3, 5) * 3
    with pytest.warns(ConductanceWarning, match="memory budget"):
        cd.aggregate(mlp, [(x, torch.tensor([0, 1, 2]))], ["1", "3"], units="neuron", tolerance=1e-9, max_steps=500,
                     memory_budget=2240)
