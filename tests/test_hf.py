"""Conductance of Hugging Face transformers through the word-embedding path (conductance.hf)."""


import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import conductance as cd
from conductance import hf

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, BLOCKS = 32, 4, 2


class TinyClassifier(nn.Module):
    """A randomly initialised 2-block BERT + masked mean pooling + linear head, float64."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        config = transformers.BertConfig(vocab_size=50, hidden_size=HIDDEN, num_hidden_layers=BLOCKS,
                                         num_attention_heads=HEADS, intermediate_size=64, max_position_embeddings=16,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                         initializer_range=0.3, pad_token_id=0)
        self.encoder = transformers.BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(HIDDEN, 3)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                         inputs_embeds=inputs_embeds).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


@pytest.fixture(scope="module")
def tiny():
    model = TinyClassifier().double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 50, (3, 6), generator=g)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    ids[2, 4:] = 0  # the third example is two tokens shorter, padded
    mask[2, 4:] = 0
    return model, ids, mask


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_completeness_of_every_block_and_heads_sum(tiny):
    model, ids, mask = tiny
    layers = hf.bert_layers(model, "heads", "ffn", "layers", "embeddings")
    r = hf.layer_conductance(model, ids, layers, forward_kwargs={"attention_mask": mask}, n_steps=256)
    cuts = [n for n, u in layers.items() if u in ("layer", "token")]
    assert len(cuts) == BLOCKS + 1
    for name in cuts:
        assert r.is_cut[name]
        total = r.reduce(name, "layer").squeeze(1)
        # the trapezoid error falls as 1/n^2: 2e-4 relative at 256 steps on this model (a 1/n rule gives 1e-2)
        assert ((total - r.output_diff).abs() <= 1e-3 * r.output_diff.abs()).all(), name
    assert r.output_diff.abs().min() > 1e-3  # the check above is not vacuous
    for name in (n for n, u in layers.items() if u == "head"):
        assert not r.is_cut[name]
        assert r[name].shape == (3, HEADS)
        assert torch.allclose(r[name].sum(1), r.reduce(name, "layer").squeeze(1), atol=1e-12)
        # heads are contiguous slices of the hidden vector
        manual = r.elements[name].reshape(3, 6, HEADS, HIDDEN // HEADS).sum((1, 3))
        assert torch.allclose(r[name], manual)
    for name in (n for n, u in layers.items() if u == "neuron"):
        assert r[name].shape == (3, 64)
        assert torch.allclose(r.per_token(name, 5).sum(1), r[name][:, 5])
    assert _hooks(model) == 0


def test_input_probe_equals_self_attention_output(tiny):
    """':input' of the output projection and element 0 of the self-attention output are the same tensor."""
    model, ids, mask = tiny
    a = "encoder.encoder.layer.1.attention.output.dense:input"
    b = "encoder.encoder.layer.1.attention.self[0]"
    r = hf.layer_conductance(model, ids, {a: "head", b: "head"}, forward_kwargs={"attention_mask": mask}, n_steps=16)
    assert torch.allclose(r[a], r[b], atol=1e-12)
    assert r[a].abs().max() > 1e-4


def _literal_ig(model, embeds, base, mask, target, n=600, chunk=200):
    """Integrated gradients of the word embeddings with a midpoint Riemann sum, through inputs_embeds."""
    total = torch.zeros_like(embeds)
    alphas = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for a in alphas.split(chunk):
        x = (base[None] + a.view(-1, 1, 1, 1) * (embeds - base)[None]).reshape(-1, *embeds.shape[1:])
        x.requires_grad_(True)
        out = model(attention_mask=mask.repeat(len(a), 1), inputs_embeds=x)
        g, = torch.autograd.grad(out.gather(1, target.repeat(len(a))[:, None]).sum(), x)
        total += g.reshape(len(a), *embeds.shape).sum(0)
    return total / n * (embeds - base)


@pytest.mark.parametrize("baseline", ["pad", "zeros", "ids"])
def test_embedding_path_is_integrated_gradients(tiny, baseline):
    model, ids, mask = tiny
    emb = model.encoder.embeddings.word_embeddings
    target = torch.tensor([0, 2, 1])
    with torch.no_grad():
        embeds = emb(ids)
        if baseline == "pad":
            base, arg = emb(torch.zeros_like(ids)), "pad"
        elif baseline == "zeros":
            base, arg = torch.zeros_like(embeds), "zeros"
        else:
            base_ids = torch.zeros_like(ids)
            base_ids[:, 0] = 1  # keep the first ([CLS]-like) token
            base, arg = emb(base_ids), base_ids
    r = hf.layer_conductance(model, ids, {"encoder.embeddings.word_embeddings": "token"}, baseline=arg,
                             forward_kwargs={"attention_mask": mask}, target=target, n_steps=512)
    ig = _literal_ig(model, embeds, base, mask, target)
    assert torch.allclose(r["encoder.embeddings.word_embeddings"], ig.sum(2), atol=1e-5)
    assert torch.allclose(r.elements["encoder.embeddings.word_embeddings"], ig, atol=1e-5)
    assert ig.sum(2).abs().max() > 0.05
    if baseline != "zeros":
        # positions whose token equals the baseline token do not move, so get nothing
        assert (r["encoder.embeddings.word_embeddings"][2, 4:] == 0).all()


def test_attention_mask_passes_through(tiny):
    """A padded example gets the same conductance as the same tokens alone without padding."""
    model, ids, mask = tiny
    layers = {"encoder.encoder.layer.0.intermediate": "neuron", "encoder.encoder.layer.1": "token"}
    padded = hf.layer_conductance(model, ids, layers, forward_kwargs={"attention_mask": mask}, target=1, n_steps=24)
    alone = hf.layer_conductance(model, ids[2:, :4], layers, forward_kwargs={"attention_mask": mask[2:, :4]},
                                 target=1, n_steps=24)
    for name in layers:
        a = padded[name][2]
        b = alone[name][0]
        if layers[name] == "token":
            assert torch.allclose(a[4:], torch.zeros(2, dtype=a.dtype), atol=1e-12)
            a = a[:4]
        assert torch.allclose(a, b, atol=1e-9), name


def test_table_top_and_names(tiny):
    model, ids, mask = tiny
    layers = hf.bert_layers(model, "heads", "ffn")
    r = hf.layer_conductance(model, ids, layers, forward_kwargs={"attention_mask": mask}, n_steps=8,
                             tokens=[[f"t{j}" for j in range(6)] for _ in range(3)])
    rows = r.table()
    assert len(rows) == BLOCKS * HEADS + BLOCKS * 64
    top = r.top(5, unit="head")
    assert [t.value for t in top] == sorted((x.value for x in rows if x.unit == "head"), reverse=True)[:5]
    best = top[0]
    assert best.name == f"L{best.block}.H{best.index}"
    assert best.value == pytest.approx(float(r[best.layer][:, best.index].mean()))
    one = r.top(3, unit="neuron", example=1, absolute=True)
    neurons = [name for name in layers if layers[name] == "neuron"]
    assert abs(one[0].value) == pytest.approx(float(max(r[name][1].abs().max() for name in neurons)))
    assert r.unit_names("encoder.encoder.layer.0.intermediate")[7] == "L0.N7"


def test_other_measures_in_one_call(tiny):
    model, ids, mask = tiny
    layer = "encoder.encoder.layer.1.attention.output.dense:input"
    rs = hf.layer_importance(model, ids, {layer: "head"}, measure=["conductance", "activation", "grad_x_activation"],
                             forward_kwargs={"attention_mask": mask}, n_steps=8)
    # activation of a head = its slice of the projection input, summed over tokens and head dims
    ctx = hf.head_inputs(model, ids, forward_kwargs={"attention_mask": mask})[1]
    assert torch.allclose(rs["activation"][layer], ctx.reshape(3, 6, HEADS, -1).sum((1, 3)))
    assert set(rs) == {"conductance", "activation", "grad_x_activation"}


def test_ablate_heads_equals_zeroed_projection_columns(tiny):
    model, ids, mask = tiny
    dense = model.encoder.encoder.layer[1].attention.output.dense
    d = HIDDEN // HEADS
    with torch.no_grad():
        with hf.ablate_heads(model, [(1, 2)]):
            ablated = model(ids, mask)
        saved = dense.weight.clone()
        dense.weight[:, 2 * d:3 * d] = 0
        expected = model(ids, mask)
        dense.weight.copy_(saved)
        full = model(ids, mask)
        # replacing every head by its own value changes nothing
        own = hf.head_inputs(model, ids, forward_kwargs={"attention_mask": mask})
        with hf.ablate_heads(model, {0: range(HEADS), 1: range(HEADS)}, values=own):
            same = model(ids, mask)
    assert torch.allclose(ablated, expected, atol=1e-12)
    assert not torch.allclose(ablated, full)
    assert torch.allclose(same, full, atol=1e-12)
    assert _hooks(model) == 0


def test_clear_errors_and_hooks_removed(tiny):
    model, ids, mask = tiny
    kw = {"forward_kwargs": {"attention_mask": mask}, "n_steps": 4}
    layer = "encoder.encoder.layer.0.attention.output.dense:input"
    with pytest.raises(cd.ConductanceError, match="5 heads do not divide"):
        hf.layer_conductance(model, ids, {layer: "head"}, num_heads=5, **kw)
    with pytest.raises(cd.ConductanceError, match="no module named 'encoder.encoder.layer.0.attention.output.dence'"):
        hf.layer_conductance(model, ids, {layer.replace("dense", "dence"): "head"}, **kw)
    with pytest.raises(cd.ConductanceError, match="Did you mean 'encoder.encoder.layer.0.intermediate'"):
        hf.layer_conductance(model, ids, "encoder.encoder.layer.0.intermediat", **kw)
    # embeddings where token ids are expected
    embeds = model.encoder.embeddings.word_embeddings(ids).detach()
    with pytest.raises(cd.ConductanceError, match="token ids"):
        hf.layer_conductance(model, embeds, layer, **kw)
    with pytest.raises(cd.ConductanceError, match="token ids must be an integer tensor"):
        hf.layer_conductance(model, ids, layer, baseline=torch.zeros(3, 6, dtype=torch.float64), **kw)
    # token ids where embeddings are expected
    with pytest.raises(TypeError, match="integer inputs .such as token ids"):
        cd.layer_conductance(model, ids, "encoder.encoder.layer.0", forward_kwargs={"attention_mask": mask})
    with pytest.raises(cd.ConductanceError, match="no embedding module named"):
        hf.layer_conductance(model, ids, layer, embedding="encoder.embeddings.words", **kw)
    with pytest.raises(cd.ConductanceError, match="unknown unit"):
        hf.layer_conductance(model, ids, {layer: "heads"}, **kw)
    # an error raised inside the run (target out of range) still removes every hook
    with pytest.raises(cd.ConductanceError, match="out of range"):
        hf.layer_conductance(model, ids, {layer: "head"}, target=7, **kw)
    with pytest.raises(cd.ConductanceError, match="block 5 out of range"):
        with hf.ablate_heads(model, [(5, 0)]):
            pass
    assert _hooks(model) == 0


def test_conductance_warning_uses_user_names(tiny):
    model, ids, mask = tiny
    with pytest.warns(cd.ConductanceWarning) as record:
        hf.layer_conductance(model, ids, {"encoder.encoder.layer.0": "layer"}, forward_kwargs={"attention_mask": mask},
                             n_steps=1, method="uniform_left")
    text = " ".join(str(w.message) for w in record)
    assert "encoder.encoder.layer.0:" in text and "model.encoder" not in text


def test_hugging_face_classifier_with_token_types():
    """A stock BertForSequenceClassification: .logits output, 'bert.' prefix, get_input_embeddings, token types."""
    torch.manual_seed(3)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=12, num_labels=3,
                                     initializer_range=0.3)
    model = transformers.BertForSequenceClassification(config).double().eval()
    ids = torch.randint(3, 40, (2, 5))
    types = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    layers = hf.bert_layers(model, "heads", "layers")
    assert list(layers)[0] == "bert.encoder.layer.0.attention.output.dense:input"
    kw = {"attention_mask": torch.ones_like(ids), "token_type_ids": types}
    r = hf.layer_conductance(model, ids, layers, forward_kwargs=kw, target=2, n_steps=256)
    with torch.no_grad():
        logits = model(ids, **kw).logits[:, 2]
        start = model(torch.zeros_like(ids), **kw).logits[:, 2]  # the pad baseline: id 0 everywhere
    assert torch.allclose(r.output_diff, logits - start, atol=1e-12)
    for name in ("bert.encoder.layer.0", "bert.encoder.layer.1"):
        assert ((r[name].squeeze(1) - r.output_diff).abs() <= 1e-3 * r.output_diff.abs()).all()
    assert _hooks(model) == 0


# ----------------------------------------------------------------------------------------------
# the real pretrained MiniLM
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_completeness_and_heads():
    from conductance.experiments.transformer import SentimentModel, load_minilm

    encoder, tokenizer = load_minilm()
    torch.manual_seed(0)
    model = SentimentModel(encoder, nn.Linear(384, 1)).eval()
    texts = ["a gripping, beautifully acted drama.", "dull and far too long.", "not bad at all"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    layers = hf.bert_layers(model, "heads", "layers")
    assert len(layers) == 12
    r = hf.layer_conductance(model, enc["input_ids"], layers,
                             forward_kwargs={"attention_mask": enc["attention_mask"]}, target=1, tolerance=0.01,
                             tokens=[tokenizer.convert_ids_to_tokens(x) for x in enc["input_ids"]])
    for name, unit in layers.items():
        if unit == "layer":
            assert r.is_cut[name]
            assert (r.relative_error[name] <= 0.0101).all(), (name, r.relative_error[name])
        else:
            assert r[name].shape == (3, 12)
            assert torch.allclose(r[name].sum(1), r.reduce(name, "layer").squeeze(1), rtol=1e-5, atol=1e-6)
    best = r.top(1, unit="head")[0]
    assert best.name == f"L{best.block}.H{best.index}"


@pytest.mark.slow
def test_reproduce_transformer_quick(tmp_path, monkeypatch):
    import json

    from conductance.experiments import transformer
    from conductance.experiments.report import Report

    monkeypatch.setenv("CONDUCTANCE_CACHE", str(tmp_path / "cache"))
    report = Report("t", {})
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always", cd.ConductanceWarning)
        transformer.run(report, quick=True, weights=None, seed=0)
    report.write(str(tmp_path / "out"))
    data = json.loads(Path(tmp_path / "out" / "results.json").read_text())
    assert data["transformer-model"]["test_accuracy"] > 0.65
    # the fixed rule's completeness warnings go to the report, one per batch with a layer above 5%
    completeness = data["transformer-completeness"]
    worst = max(e["max"] for e in completeness["relative_error"].values())
    assert (len(completeness["warnings"]) > 0) == (worst > 0.05)
    assert not [w for w in escaped if issubclass(w.category, cd.ConductanceWarning)]
    pooled = completeness["pooled_relative_error"]
    assert len(pooled) == 7
    for name, e in pooled.items():
        # the last block feeds linear pooling + head: exact; the others: the 32-step rule's error
        assert e < (1e-4 if name.endswith("layer.5") else 0.1), (name, e)
    for mode in ("zero", "baseline"):
        acc = data["transformer-ablation"][mode]["accuracy"]
        assert set(acc) == {"conductance", "internal_influence", "grad_x_activation", "gradient", "activation",
                            "random"}
        assert all(0 <= v["6"] <= 1 for v in acc.values())
