"""The knowledge-neurons study: vocabulary, the Knowledge-Neurons integrated gradients against literal
references, the cached LM, and the quick run end to end on the real Rotten Tomatoes snippets."""

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from conductance.experiments import knowledge_neurons as kn  # noqa: E402
from conductance.experiments.report import Report  # noqa: E402

TINY = kn.LMConfig(n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=16, vocab_size=300, n_train=300,
                   epochs=1, batch=16, lr=3e-3)


def test_tokenize_and_vocabulary():
    assert kn.tokenize("It's a GOOD film, isn't it?") == ["it's", "a", "good", "film", ",", "isn't", "it", "?"]
    vocab = kn.Vocabulary.build(["the film the end", "a film"], size=6)
    # specials first, then by frequency, ties alphabetical; the size bound drops "end"
    assert vocab.words == ["[PAD]", "[UNK]", "[BOS]", "film", "the", "a"]
    assert vocab.encode("The end film") == [kn.BOS, 4, kn.UNK, 3]
    with pytest.raises(ValueError, match="starts with"):
        kn.Vocabulary(["film", "[PAD]"])


def _random_lm(seed=0):
    torch.manual_seed(seed)
    model = kn.build_model(TINY, 40).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_kn_integrated_gradients_matches_a_literal_riemann_sum_and_converges_to_completeness():
    model = _random_lm()
    ids = torch.tensor([[kn.BOS, 5, 9, 17, 3]])
    token, block = 11, 1
    proj = model.get_submodule(f"transformer.h.{block}.mlp.c_proj")
    seen = {}
    h = proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("w", a[0][0, -1].clone()))
    with torch.no_grad():
        model(ids)
    h.remove()
    w = seen["w"]

    def prob_at(a):
        # the last position's MLP activations replaced by ``a`` (a leaf we differentiate)
        def hook(m, args):
            x = args[0].clone()
            x[0, -1] = a
            return (x,)
        hh = proj.register_forward_pre_hook(hook)
        try:
            return torch.softmax(model(ids).logits[0, -1].double(), -1)[token]
        finally:
            hh.remove()

    literal = torch.zeros_like(w, dtype=torch.float64)
    m = kn.KN_STEPS
    for k in range(1, m + 1):
        a = (k / m * w).requires_grad_(True)
        g, = torch.autograd.grad(prob_at(a), a)
        literal += g.double() / m
    literal *= w.double()
    got, diff = kn.kn_integrated_gradients(model, ids, token, block)
    torch.testing.assert_close(got, literal, rtol=1e-5, atol=1e-9)
    with torch.no_grad():
        expected_diff = float(prob_at(w)) - float(prob_at(torch.zeros_like(w)))
    assert diff == pytest.approx(expected_diff, abs=1e-9)
    # Gauss-Legendre on many points: integrated gradients along a straight line sum to P(w) - P(0)
    converged, _ = kn.kn_integrated_gradients(model, ids, token, block, n_steps=256, rule="gausslegendre", chunk=64)
    assert float(converged.sum()) == pytest.approx(expected_diff, rel=1e-6, abs=1e-10)
    assert abs(float(got.sum()) - expected_diff) > abs(float(converged.sum()) - expected_diff)


def test_cached_model_reloads_identically_and_a_tampered_file_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDUCTANCE_CACHE", str(tmp_path))
    logs = []
    model, vocab, info = kn.load_or_train(TINY, log=logs.append)
    assert not info["cached"] and os.path.isfile(info["path"])
    again, vocab2, info2 = kn.load_or_train(TINY, log=logs.append)
    assert info2["cached"] and vocab2.words == vocab.words
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # a weight changed behind the digest's back: the file is not trusted, the model is rebuilt
    saved = torch.load(info["path"], weights_only=True)
    saved["state"]["transformer.wte.weight"][0, 0] += 1.0
    torch.save(saved, info["path"])
    logs.clear()
    rebuilt, _, info3 = kn.load_or_train(TINY, log=logs.append)
    assert not info3["cached"] and any("unusable" in line for line in logs)
    assert torch.equal(rebuilt.state_dict()["transformer.wte.weight"], model.state_dict()["transformer.wte.weight"])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("matplotlib")
    from conductance.datasets import load_rotten_tomatoes
    try:
        load_rotten_tomatoes("test")
    except FileNotFoundError as exc:
        pytest.skip(f"Rotten Tomatoes not available: {exc}")
    folder = tmp_path_factory.mktemp("kn")
    mp = pytest.MonkeyPatch()
    mp.setenv("CONDUCTANCE_CACHE", str(folder / "cache"))
    torch.set_num_threads(1)
    report = Report("kn", {})
    try:
        kn.run(report, quick=True, settings={"n_prompts": 6})
        report.write(str(folder / "out"))
    finally:
        mp.undo()
    return json.loads((folder / "out" / "results.json").read_text()), folder


def test_quick_run_learned_and_conductance_top_units_carry_the_prediction(quick_run):
    data, folder = quick_run
    ppl = data["kn-model"]["perplexity"]
    assert ppl["lm"] < 0.9 * ppl["unigram"]
    per = data["kn-interventions"]["per_prompt"]
    prompts = data["kn-interventions"]["prompts"]
    assert len(prompts) == 6 and all(p["prob"] > 0 for p in prompts)
    for action in ("suppress", "baseline"):
        cond = np.array(per[f"neuron-{action}"]["conductance"]["10"])
        rand = np.array(per[f"neuron-{action}"]["random"]["10"])
        # the conductance top-10 lower the target probability, more than random units, on most prompts
        assert np.median(cond) < np.median(rand) and np.median(cond) < 0
        assert (cond < rand).mean() >= 0.5
    amp = np.array(per["neuron-amplify"]["conductance"]["10"])
    assert np.median(amp) > np.median(per["neuron-amplify"]["random"]["10"])
    assert (folder / "out" / "figures" / "kn-neurons.png").is_file()


def test_quick_run_conductance_meets_its_default_accuracy(quick_run):
    data, _ = quick_run
    err = data["kn-accuracy"]["error"]
    # measured against 512-point Gauss-Legendre: within the default tolerance 0.02 on every layer
    assert max(max(row) for row in err["conductance"]) < 0.02
    cost = data["kn-accuracy"]["cost"]
    assert all(p >= 2 for p in cost["conductance_points"]["values"])
    assert cost["kn_points"]["values"][0] == kn.KN_STEPS * data["kn-model"]["config"]["n_layer"]


def test_reproduce_accepts_knowledge_neurons():
    from conductance.cli import build_parser

    args = build_parser().parse_args(["reproduce", "knowledge_neurons", "--quick", "--out", "x"])
    assert args.experiment == "knowledge_neurons" and args.quick
