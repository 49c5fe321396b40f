"""Issue 15: every bad argument gets a ConductanceError naming it, before the model runs.

Explicit cases for each kind (layers, neurons, targets, forward arguments, dtype, device, token
ids, settings, huge n_steps), the per-example rule for forward arguments, and Hypothesis property
tests: generated shapes, dtypes, targets and settings give either the correct result (checked
against the literal reference) or an error whose message names the argument; never a NaN result
without an error, never a hook left behind.
"""

from __future__ import annotations

import copy
import re
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import conductance as cd
from conductance import reference
from conductance.paths import gauss_legendre_nodes

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class Counting(nn.Module):
    """Linear -> tanh -> linear, counting its forward calls (a check that ran before the model did not)."""

    def __init__(self, d=3, h=4, c=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)
        self.calls = 0

    def forward(self, x, *args, **kwargs):
        self.calls += 1
        return self.fc2(self.act(self.fc1(x)))


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def refused_before_running(call, model, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.ConductanceWarning)
        with pytest.raises(cd.ConductanceError, match=match):
            call()
    assert model.calls == 0, "the model ran before the argument was checked"
    assert no_hooks(model)


X = torch.randn(5, 3)
L = cd.layer_conductance


@pytest.mark.parametrize("kw, match", [
    (dict(layers=1), r"layers must be a dotted module name .*got int 1 .*the string '1'"),
    (dict(layers=[1.5]), r"each of layers must be .*got float 1.5"),
    (dict(layers=None), r"layers must be .*got NoneType"),
    (dict(additional_forward_args=[X]), r"additional_forward_args must be a tuple .*got a list.*\(your_list,\)"),
    (dict(additional_forward_args={"a": 1}), r"additional_forward_args .*got a dict: pass keyword arguments as "
                                              r"forward_kwargs="),
    (dict(forward_kwargs=[("a", 1)]), r"forward_kwargs must be a dict"),
    (dict(forward_kwargs={1: 2}), r"forward_kwargs must be a dict .*non-string keys"),
    (dict(tolerance=1.5), r"tolerance must be .*between 0 and 1"),
    (dict(tolerance=1.0), r"tolerance must be .*between 0 and 1"),
    (dict(tolerance=True), r"tolerance must be"),
    (dict(tolerance=0.01, n_steps=64, max_steps=8),
     r"starts from n_steps = 64 pairs, 2 \* n_steps \+ 1 = 129 points .*max_steps=8"),
    (dict(n_steps=8, max_steps=16), r"max_steps=16 is the adaptive rule's budget, but method='gausslegendre'"),
    (dict(method="uniform", max_steps=16), r"max_steps=16 .*method='uniform' is a fixed rule"),
    (dict(n_steps=8, internal_batch_size=True), r"internal_batch_size must be a positive integer, got True"),
    (dict(n_steps=8, internal_batch_size=2.5), r"internal_batch_size must be a positive integer"),
    (dict(n_steps=10 ** 5), r"n_steps=100000 asks for 100001 path points .*at most 20000"),
    (dict(tolerance=0.01, max_steps=10 ** 6), r"max_steps=1000000 is above the bound of 20000"),
])
def test_bad_settings_are_refused_before_the_model_runs(kw, match):
    model = Counting().eval()
    layers = kw.pop("layers", "fc1")
    refused_before_running(lambda: L(model, X, layers, **kw), model, match)


def test_meta_inputs_and_meta_weights_are_refused_before_the_model_runs():
    model = Counting().eval()
    refused_before_running(lambda: L(model, X.to("meta"), "fc1", n_steps=4), model, "inputs are on the meta device")
    meta = Counting().to("meta").eval()
    refused_before_running(lambda: L(meta, X, "fc1", n_steps=4), meta, "weights are on the meta device")


@pytest.mark.parametrize("model_dtype, input_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_dtype_mismatch_names_both_sides_and_the_fix(model_dtype, input_dtype):
    model = Counting().to(model_dtype).eval()
    want = str(model_dtype).replace("torch.", "")
    with pytest.raises(cd.ConductanceError, match=rf"inputs are {input_dtype} but the model's weights are "
                                                  rf"{model_dtype}: convert one side, inputs.to\(torch.{want}\)"):
        L(model, X.to(input_dtype), "fc1", n_steps=4)
    assert model.calls == 1 and no_hooks(model)         # the one forward at the inputs, never the path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_inputs_to_a_cuda_model_name_both_devices():
    model = Counting().cuda().eval()
    with pytest.raises(cd.ConductanceError, match=r"inputs are on cpu but the model's weights are on cuda:0"):
        L(model, X, "fc1", n_steps=4)
    assert no_hooks(model)


def test_target_callable_returning_class_indices_is_refused():
    model = Counting().eval()
    with pytest.raises(cd.ConductanceError, match=r"target callable returned a torch.int64 tensor.*not class "
                                                  r"indices.*target=<class index>"):
        L(model, X, "fc1", n_steps=4, target=lambda o: o.argmax(1))
    assert no_hooks(model)


@pytest.mark.parametrize("neurons, match", [
    (torch.tensor([0, 1]), r"neurons must be an int, a tuple of ints .*got Tensor.*t.tolist\(\)"),
    ([0.5], r"neurons must be .*got float 0.5"),
    ([(0, 1.0)], r"neurons must be .*got tuple \(0, 1.0\)"),
    ([True], r"neurons must be .*got bool True"),
])
def test_neurons_of_the_wrong_kind_are_refused_before_the_model_runs(neurons, match):
    model = Counting().eval()
    refused_before_running(lambda: cd.neuron_conductance(model, X, "fc1", neurons, n_steps=4), model, match)


def test_token_ids_outside_the_vocabulary_are_refused_before_the_model_runs():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 2)
            self.calls = 0

        def forward(self, ids):
            self.calls += 1
            return self.fc(torch.tanh(self.proj(self.word_embeddings(ids))).mean(1))

    model = Tiny().eval()
    ids = torch.tensor([[1, 2, 3], [4, 12, 5]])
    refused_before_running(lambda: cd.hf.layer_conductance(model, ids, ["proj"], n_steps=4), model,
                           r"input_ids hold ids outside the vocabulary: the embedding 'word_embeddings' has 10 rows "
                           r"\(valid ids 0..9\), got ids from 1 to 12 \(at \[example, token\] \[\[1, 1\]\]\)")
    refused_before_running(lambda: cd.hf.layer_conductance(model, ids.clamp(max=9), ["proj"], n_steps=4,
                                                           baseline=torch.tensor([0, -1, 0])), model,
                           r"baseline token ids hold ids outside the vocabulary")
    refused_before_running(lambda: cd.hf.layer_conductance(model, ids.clamp(max=9), ["proj"], n_steps=4,
                                                           pad_token_id=10), model, r"pad token id .* outside")
    r = cd.hf.layer_conductance(model, ids.clamp(max=9), ["proj"], n_steps=16, pad_token_id=0)   # in range: runs
    assert float(r.relative_error["proj"].max()) < 1e-3


# ---- Gauss-Legendre nodes in O(n) memory --------------------------------------------------------

def test_gauss_legendre_nodes_above_the_eigen_method_match_numpy_and_need_little_memory():
    for n in (257, 700):
        np.testing.assert_allclose(gauss_legendre_nodes(n), 0.5 * (1 + np.polynomial.legendre.leggauss(n)[0]),
                                   rtol=0, atol=1e-15)
    tracemalloc.start()
    try:
        nodes = gauss_legendre_nodes(6000)          # numpy's method would allocate 6000^2 floats (288 MB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2 ** 20, peak
    assert nodes.shape == (6000,) and np.all(np.diff(nodes) > 0) and nodes[0] > 0 and nodes[-1] < 1
    # the quadrature integrates a polynomial of degree 2n - 1 exactly: check the nodes with degree 11 on 6 points
    # via their weights from the Legendre derivative is numpy's business; here: symmetric about 1/2
    np.testing.assert_allclose(nodes + nodes[::-1], 1.0, atol=1e-15)


# ---- the per-example rule for forward arguments -------------------------------------------------

class Mixer(nn.Module):
    """y = tanh(x @ W) * scale; W is (d, d), scale is per example (batch, d)."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Identity()
        self.head = nn.Linear(4, 2)

    def forward(self, x, W, scale=None):
        h = self.hidden(torch.tanh(x @ W))
        return self.head(h if scale is None else h * scale)


def test_a_shared_tensor_whose_first_dim_equals_the_batch_size_warns_and_shared_fixes_it():
    torch.manual_seed(1)
    model = Mixer().double().eval()
    x = torch.randn(4, 4, dtype=torch.float64)
    W = torch.randn(4, 4, dtype=torch.float64)          # shared, but (batch, batch)-shaped by coincidence
    with pytest.warns(cd.ConductanceWarning, match=r"additional_forward_args\[0\] of shape \(4, 4\): the first "
                                                   r"dimension equals the batch size \(4\).*conductance.shared"):
        with pytest.raises(RuntimeError, match="cannot be multiplied"):    # row i of W went with example i
            L(model, x, "hidden", additional_forward_args=(W,), n_steps=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cd.ConductanceWarning)
        r = L(model, x, "hidden", additional_forward_args=(cd.shared(W),), n_steps=32)

    class Fixed(nn.Module):             # the same function with W inside: the literal reference can run it
        def __init__(self):
            super().__init__()
            self.inner = copy.deepcopy(model)

        def forward(self, x):
            return self.inner(x, W)

    fixed = Fixed().eval()
    for i in range(4):
        ref = reference.layer_conductance(fixed, x[i], "inner.hidden", target=int(r.target[i]), n_steps=64,
                                          rule="gausslegendre")
        torch.testing.assert_close(r["hidden"][i].float(), ref, rtol=1e-4, atol=1e-5)


def test_per_example_forward_arguments_go_with_their_example():
    torch.manual_seed(2)
    model = Mixer().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    W = torch.randn(4, 4, dtype=torch.float64)
    scale = torch.rand(3, 4, dtype=torch.float64) + 0.5     # (batch, d): per example
    together = L(model, x, "hidden", additional_forward_args=(cd.shared(W), scale), n_steps=16, target=0)
    for i in range(3):
        alone = L(model, x[i:i + 1], "hidden", additional_forward_args=(cd.shared(W), scale[i:i + 1]), n_steps=16,
                  target=0)
        torch.testing.assert_close(together["hidden"][i], alone["hidden"][0])


# ---- property tests -----------------------------------------------------------------------------

class Quadratic(nn.Module):
    """hidden = W x + b; scores = (hidden^2 / 2) @ V. Conductance of hidden unit j for class c is
    V[j, c] (h_j(x)^2 - h_j(x')^2) / 2 for every trapezoid rule (the integrand is linear in alpha)."""

    def __init__(self, d, h, c, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.hidden = nn.Linear(d, h)
        self.V = nn.Parameter(torch.randn(h, c, generator=g))
        with torch.no_grad():
            self.hidden.weight.copy_(torch.randn(h, d, generator=g))
            self.hidden.bias.copy_(torch.randn(h, generator=g))

    def forward(self, x):
        return (self.hidden(x) ** 2 / 2) @ self.V


BAD = {"dtype": None, "tolerance": [0.0, 1.0, 1.5, -0.1, float("nan")], "internal_batch_size": [0, -1, 2.5, True],
       "n_steps": [0, -3, 2.5, 10 ** 6], "method": ["bogus", "Uniform"], "target": ["list+1", "int_callable", "float",
                                                                                   "out_of_range"],
       "max_steps": [1, 0, 2.0]}


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 4), D=st.integers(1, 4), H=st.integers(1, 4), C=st.integers(1, 3), seed=st.integers(0, 99),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       target=st.sampled_from([None, 0, "last", "list", "callable"]),
       rule=st.sampled_from(["gausslegendre", "uniform", "uniform_left", "captum", "adaptive", "default"]),
       n_steps=st.integers(1, 24), tolerance=st.floats(1e-4, 0.3), ibs=st.sampled_from([None, 1, 3, 64]),
       bad=st.sampled_from([None, None, None] + sorted(BAD)), pick=st.integers(0, 10))
def test_generated_calls_give_the_right_answer_or_an_error_naming_the_argument(B, D, H, C, seed, dtype, target, rule,
                                                                              n_steps, tolerance, ibs, bad, pick):
    model = Quadratic(D, H, C, seed).to(dtype).eval()
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    t = {"last": C - 1, "list": [(i % C) for i in range(B)], "callable": lambda o: o[:, -1]}.get(target, target)
    kw: dict = dict(target=t, internal_batch_size=ibs)
    if rule == "adaptive":
        kw.update(tolerance=tolerance, max_steps=64)
    elif rule != "default":
        kw.update(method=rule, n_steps=n_steps + (rule == "captum"))
    if bad is not None:                 # one argument made wrong: the call must be refused, naming it
        if bad == "dtype":
            x = x.to(torch.float64 if dtype == torch.float32 else torch.float32)
        elif bad == "target":
            t = {"list+1": [0] * (B + 1), "int_callable": lambda o: o.argmax(1), "float": 1.0,
                 "out_of_range": C}[BAD["target"][pick % 4]]
            kw["target"] = t
        else:
            kw[bad] = BAD[bad][pick % len(BAD[bad])]
            if bad == "max_steps":
                kw.update(tolerance=tolerance, method=None, n_steps=None)
    names = {"dtype": "float", "target": "target", "tolerance": "tolerance", "internal_batch_size":
             "internal_batch_size", "n_steps": "n_steps", "method": "method", "max_steps": "max_steps"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.ConductanceWarning)
        try:
            r = L(model, x, "hidden", **kw)
        except (cd.ConductanceError, TypeError) as exc:
            assert bad is not None, f"{kw} refused: {exc}"
            assert names[bad] in str(exc), str(exc)
            assert no_hooks(model)
            hypothesis.event(f"refused ({bad})")
            return
    assert bad is None, f"no error for a bad {bad}: {kw}"
    hypothesis.event(f"computed ({r.method})")
    assert no_hooks(model)
    values = r["hidden"]
    assert torch.isfinite(values).all() and torch.isfinite(r.relative_error["hidden"]).all()
    cls = (torch.full((B,), C - 1) if target == "callable" else
           torch.zeros(B, dtype=torch.long) if r.target is None else r.target.long())    # None: a single output
    if r.method in ("gausslegendre", "uniform", "adaptive"):
        # exact for these rules on this model: the closed form and the literal reference
        with torch.no_grad():
            h1 = model.hidden(x).double()
            h0 = model.hidden(torch.zeros_like(x)).double()
        closed = model.V.double().T[cls] * (h1 ** 2 - h0 ** 2) / 2
        tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(values.double(), closed, **tol)
        ref_t = (lambda o: o[:, -1]) if target == "callable" else None if r.target is None else int(cls[0])
        ref = reference.layer_conductance(copy.deepcopy(model), x[0], "hidden", target=ref_t, n_steps=8,
                                          rule="gausslegendre")
        torch.testing.assert_close(values[0].float(), ref, rtol=2e-4, atol=2e-4)
    else:
        # rules that are not exact here still report their completeness error truthfully
        torch.testing.assert_close(r.delta["hidden"], values.flatten(1).sum(1) - r.output_diff)


class RootOf(nn.Module):
    """hidden = W x + b, F = sum(sqrt(hidden + shift)): NaN wherever hidden + shift < 0 on the path."""

    def __init__(self, d, h, shift, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.hidden = nn.Linear(d, h).double()
        with torch.no_grad():
            self.hidden.weight.copy_(torch.randn(h, d, generator=g, dtype=torch.float64))
            self.hidden.bias.copy_(torch.randn(h, generator=g, dtype=torch.float64))
        self.shift = shift

    def forward(self, x):
        return torch.sqrt(self.hidden(x) + self.shift).sum(1)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(B=st.integers(1, 3), D=st.integers(1, 3), H=st.integers(1, 3), seed=st.integers(0, 999),
       shift=st.floats(-1.0, 4.0), rule=st.sampled_from([dict(n_steps=6), dict(tolerance=0.05, max_steps=40),
                                                          dict(n_steps=6, method="captum")]))
def test_a_model_that_may_make_nan_never_gives_a_nan_result_without_an_error(B, D, H, seed, shift, rule):
    model = RootOf(D, H, shift, seed).eval()
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.ConductanceWarning)
        try:
            r = L(model, x, "hidden", **rule)
        except cd.ConductanceError as exc:
            assert re.search(r"NaN or Inf", str(exc)) and "alpha=" in str(exc), str(exc)
            assert no_hooks(model)
            hypothesis.event("NaN refused")
            return
    hypothesis.event("finite")
    assert no_hooks(model)
    for t in (r["hidden"], r.delta["hidden"], r.relative_error["hidden"], r.output_diff):
        assert torch.isfinite(t).all()


def test_integer_per_example_arguments_never_warn_even_when_square():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = nn.Linear(4, 4)
            self.head = nn.Linear(4, 1)

        def forward(self, x, mask):
            return self.head(torch.tanh(self.hidden(x)) * mask)

    torch.manual_seed(3)
    model = Masked().eval()
    x = torch.randn(4, 4)
    mask = (torch.rand(4, 4) > 0.3).long()                   # (batch, features) with features == batch
    with warnings.catch_warnings():
        warnings.simplefilter("error", cd.ConductanceWarning)
        r = L(model, x, "hidden", additional_forward_args=(mask,), n_steps=32)
    for i in range(4):
        alone = L(model, x[i:i + 1], "hidden", additional_forward_args=(mask[i:i + 1],), n_steps=32)
        torch.testing.assert_close(r["hidden"][i], alone["hidden"][0])
