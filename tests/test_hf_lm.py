"""Language models and the transformer families of conductance.hf (models built from configs, float64).

GPT-2, Llama / Mistral / Qwen2 with grouped-query attention, BERT, RoBERTa and DistilBERT: the
listed heads and MLP neurons against Captum's LayerConductance, heads summing to the attention
output, per-example (position, token) targets, the named LM targets, baselines and ablation.
"""

import warnings

import pytest
import torch
from torch import nn

import conductance as cd
from conductance import hf

transformers = pytest.importorskip("transformers")
captum_attr = pytest.importorskip("captum.attr")

VOCAB, HIDDEN, HEADS, BLOCKS, FFN = 40, 16, 4, 2, 24


def _config(name):
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    llama_like = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=BLOCKS, num_attention_heads=HEADS,
                      num_key_value_heads=2, max_position_embeddings=32, **common)
    bert_like = dict(hidden_size=HIDDEN, num_hidden_layers=BLOCKS, num_attention_heads=HEADS, intermediate_size=FFN,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.3)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=HIDDEN, n_layer=BLOCKS, n_head=HEADS, n_inner=FFN, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, initializer_range=0.3, **common))
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(initializer_range=0.3, **llama_like))
    if name == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(initializer_range=0.3, **llama_like))
    if name == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(initializer_range=0.3, **llama_like))
    if name == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=32,
                                                                    pad_token_id=0, **bert_like))
    if name == "roberta":
        return transformers.RobertaForMaskedLM(transformers.RobertaConfig(vocab_size=VOCAB, max_position_embeddings=40,
                                                                          pad_token_id=1, **bert_like))
    if name == "distilbert":
        return transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=HIDDEN, n_layers=BLOCKS, n_heads=HEADS, hidden_dim=FFN, dropout=0.0,
            attention_dropout=0.0, max_position_embeddings=32, initializer_range=0.3, pad_token_id=0))
    raise ValueError(name)


FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "bert", "roberta", "distilbert"]
DECODERS = ("gpt2", "llama", "mistral", "qwen2")


def _model(name, seed=0):
    torch.manual_seed(seed)
    return _config(name).double().eval()


def _ids(batch=3, tokens=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, tokens), generator=g)


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def gpt2():
    return _model("gpt2")


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------

def test_per_example_position_token_targets_equal_single_example_calls(gpt2):
    ids = _ids()
    targets = [(5, 7), (2, 11), (4, 30)]
    layers = hf.layers(gpt2)
    together = hf.layer_conductance(gpt2, ids, layers, target=targets, n_steps=24)
    assert together.raw.target.tolist() == [list(t) for t in targets]
    for i, t in enumerate(targets):
        alone = hf.layer_conductance(gpt2, ids[i:i + 1], layers, target=[t], n_steps=24)
        for name in layers:
            assert alone[name].abs().max() > 1e-6, name
            torch.testing.assert_close(together[name][i:i + 1], alone[name], rtol=1e-9, atol=1e-12)
    # the batch's examples explain different scalars: example 0's value is not example 1's target
    other = hf.layer_conductance(gpt2, ids[:1], layers, target=[targets[1]], n_steps=24)
    assert not torch.allclose(other["transformer.h.1"], together["transformer.h.1"][:1])


@pytest.mark.filterwarnings("ignore::conductance.errors.ConductanceWarning")  # few points: only the agreement matters
def test_index_tuple_matches_captum_and_callable_with_examples(gpt2):
    """One shared (position, token) tuple, a list of tuples, and target(output, examples) agree with Captum."""
    ids = _ids()
    layer = "transformer.h.0.mlp.c_proj"
    emb = gpt2.get_input_embeddings()
    with torch.no_grad():
        embeds = emb(ids)

    def forward(x):
        return gpt2(inputs_embeds=x).logits

    per = [(5, 3), (1, 8), (3, 20)]
    lc = captum_attr.LayerConductance(forward, gpt2.get_submodule(layer))
    ref = lc.attribute(embeds, baselines=torch.zeros_like(embeds), target=per, n_steps=16,
                       attribute_to_layer_input=True)
    ours = hf.layer_conductance(gpt2, ids, {layer + ":input": "element"}, target=per, n_steps=16, method="captum",
                                baseline="zeros")
    torch.testing.assert_close(ours[layer + ":input"], ref, rtol=1e-5, atol=1e-9)

    pos, tok = torch.tensor([p for p, _ in per]), torch.tensor([t for _, t in per])

    def by_example(output, examples):
        return output.logits[torch.arange(len(examples)), pos[examples], tok[examples]]

    with_examples = hf.layer_conductance(gpt2, ids, {layer + ":input": "element"}, target=by_example, n_steps=16,
                                         method="captum", baseline="zeros")
    torch.testing.assert_close(with_examples[layer + ":input"], ours[layer + ":input"], rtol=1e-12, atol=1e-14)
    # one tuple for every example, and the one-argument callable form, still work
    shared = hf.layer_conductance(gpt2, ids, {layer + ":input": "neuron"}, target=(4, 9), n_steps=8)
    old = hf.layer_conductance(gpt2, ids, {layer + ":input": "neuron"}, target=lambda out: out.logits[:, 4, 9],
                               n_steps=8)
    torch.testing.assert_close(shared[layer + ":input"], old[layer + ":input"], rtol=1e-12, atol=1e-14)


def test_bad_targets_for_lm_outputs_name_the_forms(gpt2):
    ids = _ids()
    layers = {"transformer.h.0": "layer"}
    for target, words in [(None, "(position, token)"), (3, "(position, token)"), ([(1, 2)], "expected (3, 2)"),
                          ([(1, 2, 3)] * 3, "indices"), ([(6, 2)] * 3, "out of range"),
                          ([(0, VOCAB)] * 3, "out of range"), (torch.tensor([1, 2, 3]), "expected (3, 2)")]:
        with pytest.raises(cd.ConductanceError, match=words.replace("(", r"\(").replace(")", r"\)")):
            hf.layer_conductance(gpt2, ids, layers, target=target, n_steps=2)
    with pytest.raises(cd.ConductanceError, match="next_token kind"):
        hf.next_token("score")
    with pytest.raises(cd.ConductanceError, match="named targets"):
        hf.layer_conductance(gpt2, ids, layers, target="loss", n_steps=2)
    assert _hooks(gpt2) == 0


def test_next_token_targets(gpt2):
    """logit / logprob / prob of the next token at a position counted over each example's real tokens."""
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0   # example 1 is right-padded: its last real token is at position 3
    kw = {"forward_kwargs": {"attention_mask": mask}, "n_steps": 8, "baseline": "zeros"}
    layers = hf.layers(gpt2, ["block", "mlp"])
    tok = torch.tensor([3, 17, 25])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.ConductanceWarning)   # 8 points: only the equality matters here
        logit = hf.layer_conductance(gpt2, ids, layers, target=hf.next_token("logit", token=tok), **kw)
        explicit = hf.layer_conductance(gpt2, ids, layers, target=[(5, 3), (3, 17), (5, 25)], **kw)
    for name in layers:
        torch.testing.assert_close(logit[name], explicit[name], rtol=1e-12, atol=1e-14)
    assert logit.target == "logit of the token [3, 17, 25] after position [5, 3, 5]"

    with torch.no_grad():
        out = gpt2(ids, attention_mask=mask).logits
        base = gpt2(inputs_embeds=torch.zeros(3, 6, HIDDEN, dtype=torch.float64), attention_mask=mask).logits
    rows, pos = torch.arange(3), torch.tensor([5, 3, 5])
    top = out[rows, pos].argmax(-1)
    for kind, f in [("logprob", lambda z: torch.log_softmax(z, -1)), ("prob", lambda z: torch.softmax(z, -1))]:
        r = hf.layer_conductance(gpt2, ids, layers, target=kind, forward_kwargs={"attention_mask": mask},
                                 baseline="zeros", tolerance=1e-3)
        assert r.target.startswith({"logprob": "log-probability", "prob": "probability"}[kind] + " of the top "
                                   "predicted token after position [5, 3, 5]")
        want = f(out[rows, pos])[rows, top] - f(base[rows, pos])[rows, top]
        # (the adaptive rule keeps F in float32)
        torch.testing.assert_close(r.output_diff.double(), want, rtol=1e-6, atol=1e-9)
        for b in hf.layers(gpt2, "block"):   # blocks are cuts: they carry all of F(x) - F(x')
            torch.testing.assert_close(r[b].squeeze(1).double(), want, rtol=1.02e-3, atol=0)
    with pytest.raises(cd.ConductanceError, match="position 4 of example 1 is out of range"):
        hf.layer_conductance(gpt2, ids, layers, target=hf.next_token("logit", position=4), **kw)


def test_continuation_logprob_is_teacher_forced_sum(gpt2):
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[2, :2] = 0   # example 2 is left-padded
    length = torch.tensor([2, 3, 1])
    r = hf.layer_conductance(gpt2, ids, hf.layers(gpt2, "block"), target=hf.continuation(length),
                             forward_kwargs={"attention_mask": mask}, n_steps=48, baseline="zeros")

    def summed(logits):
        lp = torch.log_softmax(logits, -1)
        return torch.stack([sum(lp[b, t - 1, ids[b, t]] for t in range(6 - int(length[b]), 6)) for b in range(3)])

    with torch.no_grad():
        at_x = summed(gpt2(ids, attention_mask=mask).logits)
        at_base = summed(gpt2(inputs_embeds=torch.zeros(3, 6, HIDDEN, dtype=torch.float64),
                              attention_mask=mask).logits)
    torch.testing.assert_close(r.output_diff, at_x - at_base, rtol=1e-10, atol=1e-12)
    assert r.baseline == "zeros"
    for b in r.layers:
        assert (r.relative_error[b] < 0.01).all(), (b, r.relative_error[b])
    with pytest.raises(cd.ConductanceError, match="continuation length 6"):
        hf.layer_conductance(gpt2, ids, hf.layers(gpt2, "block"), target=hf.continuation(6), n_steps=2)


@pytest.mark.filterwarnings("ignore::conductance.errors.ConductanceWarning")  # few points: only equality matters
def test_only_the_targets_logits_are_computed_and_read_right(gpt2):
    """(position, token) targets, next_token and continuation have the model compute the logits of the
    positions they read only (logits_to_keep), and read them right: the values equal the run on
    every position's logits (forward_kwargs={"logits_to_keep": 0}), to rounding."""
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[2, :2] = 0   # example 2 is left-padded: its positions differ from the others'
    layers = hf.layers(gpt2, ["block", "mlp"])
    seen = []
    hook = gpt2.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        for target, kept in [([(5, 7), (2, 11), (4, 30)], 1), ((-1, 9), 1), (hf.next_token("logprob"), 1),
                             (hf.next_token("prob", position=1, token=4), 1),
                             (hf.continuation(torch.tensor([2, 3, 1])), 3)]:
            kw = dict(target=target, forward_kwargs={"attention_mask": mask}, n_steps=6, method="captum")
            seen.clear()
            lean = hf.layer_conductance(gpt2, ids, layers, **kw)
            # (the top predicted token of next_token("logprob") is chosen from the first forward's kept logits)
            assert set(seen) == {kept}, (target, seen)
            kw["forward_kwargs"] = {"attention_mask": mask, "logits_to_keep": 0}
            seen.clear()
            full = hf.layer_conductance(gpt2, ids, layers, **kw)
            assert set(seen) == {ids.shape[1]}
            torch.testing.assert_close(lean.output_diff, full.output_diff, rtol=1e-10, atol=1e-12)
            for name in layers:
                assert full[name].abs().max() > 1e-6
                torch.testing.assert_close(lean[name], full[name], rtol=1e-9, atol=1e-12)
            if isinstance(target, list):   # the result names the sequence positions, not the kept ones
                assert lean.raw.target.tolist() == [list(t) for t in target]
    finally:
        hook.remove()


def test_one_forward_before_the_path_and_none_after(gpt2):
    """The target check, the cut check and F and the layers at both ends of Captum's grid (which has
    neither end) come from one forward of the inputs and baselines together; the path's own
    points are the only other rows the model sees, and the result equals the run that checks
    them with forwards of their own (chunks too small to hold the rows)."""
    ids = _ids()
    layers = hf.layers(gpt2, "mlp")
    rows = []
    hook = gpt2.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0] if kwargs.get("input_ids") is not None
                                            else args[0].shape[0]), with_kwargs=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", cd.ConductanceWarning)
            one = hf.layer_conductance(gpt2, ids, layers, target=[(5, 7), (2, 11), (4, 30)], n_steps=8,
                                       method="captum")
            assert rows == [2 * 3, 9 * 3]   # inputs + baselines, then 9 points per example in one chunk
            rows.clear()
            apart = hf.layer_conductance(gpt2, ids, layers, target=[(5, 7), (2, 11), (4, 30)], n_steps=8,
                                         method="captum", internal_batch_size=2)
            assert len(rows) > 2 and max(rows) <= 3
    finally:
        hook.remove()
    assert one.is_cut == apart.is_cut
    torch.testing.assert_close(one.output_diff, apart.output_diff, rtol=1e-12, atol=1e-14)
    for name in layers:
        torch.testing.assert_close(one[name], apart[name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(one.unit_error[name], apart.unit_error[name], rtol=1e-6, atol=1e-12)


@pytest.mark.filterwarnings("ignore::conductance.errors.ConductanceWarning")  # few points: only equality matters
@pytest.mark.parametrize("kind", ["logit", "logprob", "prob"])
def test_top_token_is_chosen_from_the_first_forward(gpt2, kind):
    """next_token(token=None) picks each example's top next token from the engine's first forward (the
    one that checks the target), not from a full-logits forward of its own: the model sees the
    inputs + baselines and then the path points only, and the tokens and values are those of the
    top tokens computed from the model's own full logits, given explicitly."""
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0   # example 1 is right-padded: its last real token is at position 3
    pos = torch.tensor([5, 3, 5])
    with torch.no_grad():
        top = gpt2(ids, attention_mask=mask).logits[torch.arange(3), pos].argmax(-1)
    assert len(set(top.tolist())) > 1
    layers = hf.layers(gpt2, ["block", "mlp"])
    rows = []
    hook = gpt2.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0] if kwargs.get("input_ids") is not None
                                            else args[0].shape[0]), with_kwargs=True)
    kw = dict(forward_kwargs={"attention_mask": mask}, n_steps=8, method="captum")
    try:
        chosen = hf.layer_conductance(gpt2, ids, layers, target=hf.next_token(kind), **kw)
        assert rows == [2 * 3, 9 * 3]   # inputs + baselines, then the path's 9 points per example
    finally:
        hook.remove()
    given = hf.layer_conductance(gpt2, ids, layers, target=hf.next_token(kind, token=top), **kw)
    torch.testing.assert_close(chosen.output_diff, given.output_diff, rtol=0, atol=0)
    for name in layers:
        assert given[name].abs().max() > 1e-6
        torch.testing.assert_close(chosen[name], given[name], rtol=0, atol=0)
    assert chosen.target == given.target.replace(f"token {top.tolist()}", "top predicted token")
    if kind == "logit":   # reported as the (position, token) pairs explained
        assert chosen.raw.target.tolist() == torch.stack([pos, top], 1).tolist() == given.raw.target.tolist()
    with pytest.raises(cd.ConductanceError, match="needs a language model output"):
        hf.layer_conductance(_Classifier(gpt2), ids, {"lm.transformer.h.0": "layer"}, target=hf.next_token(kind),
                             embedding="lm.transformer.wte", n_steps=2)
    assert _hooks(gpt2) == 0


class _Classifier(nn.Module):
    """GPT-2 with a (batch, classes) output: the mean of the last position's logits over two halves."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids).logits[:, -1].view(input_ids.shape[0], 2, -1).mean(-1)


# ---------------------------------------------------------------------------------------------
# families
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_family_heads_and_neurons_match_captum(name):
    model = _model(name)
    fam = hf.family(model)
    assert len(fam.blocks) == BLOCKS and fam.num_heads == HEADS and fam.head_dim == HIDDEN // HEADS
    assert fam.num_neurons == FFN
    if name in ("llama", "mistral", "qwen2"):
        # grouped-query attention: 2 key/value heads shared by the 4 query heads; units are query heads
        assert model.config.num_key_value_heads == 2
    layers = hf.layers(model)
    assert list(layers.values()) == ["layer"] * BLOCKS + ["head"] * BLOCKS + ["neuron"] * BLOCKS
    ids = _ids(batch=2, tokens=5)
    targets = [(4, 5), (2, 9)]
    n = 24
    token = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.ConductanceWarning)   # 24 points: only the agreement matters here
        r = hf.layer_conductance(model, ids, layers, target=targets, n_steps=n, method="captum")
    assert r.baseline.startswith(("pad token" if name in ("bert", "roberta", "distilbert") else "eos token")
                                 + f" {token} ")
    emb = model.get_input_embeddings()
    with torch.no_grad():
        embeds = emb(ids)
        base = emb(torch.full_like(ids, token))

    def forward(x):
        return model(inputs_embeds=x).logits

    B, T = ids.shape
    for i in range(BLOCKS):
        attn, mlp = fam.attention[i], fam.mlp[i]
        for proj, unit, size in ((attn, "head", HEADS), (mlp, "neuron", FFN)):
            lc = captum_attr.LayerConductance(forward, model.get_submodule(proj))
            ref = lc.attribute(embeds, baselines=base, target=targets, n_steps=n,
                               attribute_to_layer_input=True).detach()
            got = r[proj + ":input"]
            assert got.shape == (B, size)
            want = ref.reshape(B, T, HEADS, -1).sum((1, 3)) if unit == "head" else ref.sum(1)
            assert want.abs().max() > 1e-6
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9 * float(want.abs().max()) + 1e-12)
        names = r.unit_names(attn + ":input")
        assert names == [f"L{i}.H{h}" for h in range(HEADS)]
        assert r.unit_names(mlp + ":input")[FFN - 1] == f"L{i}.N{FFN - 1}"
    # completeness on the block outputs (cuts), adaptive rule
    d = hf.layer_conductance(model, ids, hf.layers(model, "block"), target=targets, tolerance=2e-3,
                             max_steps=1024)
    for b in fam.blocks:
        assert d.is_cut[b] and (d.relative_error[b] <= 2.02e-3).all(), (b, d.relative_error[b])
    assert _hooks(model) == 0


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.filterwarnings("ignore::conductance.errors.ConductanceWarning")  # 16 points: only the sums matter here
def test_heads_sum_to_attention_output_conductance(name):
    """A block's heads together carry what its attention branch carries: the output projection's own output."""
    model = _model(name)
    fam = hf.family(model)
    ids = _ids(batch=2, tokens=5, seed=3)
    layers = {**hf.layers(model, "attention"), **dict.fromkeys(fam.attention, "layer")}
    r = hf.layer_conductance(model, ids, layers, target=[(3, 4), (4, 12)], n_steps=16)
    for a in fam.attention:
        heads = r[a + ":input"]
        total = r[a].squeeze(1)
        assert total.abs().min() > 1e-8
        torch.testing.assert_close(heads.sum(1), total, rtol=1e-9, atol=1e-13)
        assert not torch.allclose(heads, heads[:, :1].expand_as(heads))  # the heads differ


@pytest.mark.parametrize("name", FAMILIES)
def test_head_and_neuron_ablation(name):
    """Ablating head h (neuron j) removes exactly its slice's term from the projection's output."""
    model = _model(name)
    fam = hf.family(model)
    ids = _ids(batch=2, tokens=5, seed=4)
    seen = {}

    def record(key):
        def hook(mod, args, out):
            seen[key] = (args[0].detach(), out.detach())
        return hook

    def run(context=None):
        handles = [model.get_submodule(fam.attention[1]).register_forward_hook(record("attn")),
                   model.get_submodule(fam.mlp[0]).register_forward_hook(record("mlp"))]
        try:
            with torch.no_grad(), (context or torch.enable_grad()):
                logits = model(ids).logits
        finally:
            for h in handles:
                h.remove()
        return logits, dict(seen)

    def weight_rows(proj, columns):
        w = model.get_submodule(proj).weight
        return w[columns, :] if type(model.get_submodule(proj)).__name__ == "Conv1D" else w[:, columns].T

    logits, plain = run()
    d = fam.head_dim
    head = slice(2 * d, 3 * d)
    _, ablated = run(hf.ablate_heads(model, [(1, 2)]))
    x, out = plain["attn"]
    torch.testing.assert_close(ablated["attn"][1], out - x[..., head] @ weight_rows(fam.attention[1], head))
    logits_n, ablated = run(hf.ablate_neurons(model, {0: [3, 7]}))
    x, out = plain["mlp"]
    torch.testing.assert_close(ablated["mlp"][1], out - x[..., [3, 7]] @ weight_rows(fam.mlp[0], [3, 7]))
    assert not torch.allclose(logits_n, logits)
    # putting the heads' own values back changes nothing
    values = hf.head_inputs(model, ids)
    same, _ = run(hf.ablate_heads(model, {0: range(HEADS), 1: [0]}, values=values))
    torch.testing.assert_close(same, logits, rtol=1e-12, atol=1e-12)
    assert _hooks(model) == 0
    with pytest.raises(cd.ConductanceError, match="out of range"):
        with hf.ablate_neurons(model, [(0, FFN)]):
            pass
    with pytest.raises(cd.ConductanceError, match="block 5 out of range"):
        with hf.ablate_heads(model, [(5, 0)]):
            pass
    assert _hooks(model) == 0


def test_unknown_family_names_layers_by_hand():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
            self.out = nn.Linear(8, 3)

        def forward(self, ids):
            h = self.embed(ids)
            for b in self.blocks:
                h = b(h)
            return self.out(h.mean(1))

    with pytest.raises(cd.ConductanceError, match=r"block 0 are \['blocks.0.0'\]. Name the layers by hand"):
        hf.layers(Toy())
    with pytest.raises(cd.ConductanceError, match="unknown kind"):
        hf.layers(_model("gpt2"), "heads")


# ---------------------------------------------------------------------------------------------
# baselines, errors, modes
# ---------------------------------------------------------------------------------------------

# few points: only the baselines matter here
@pytest.mark.filterwarnings("ignore::conductance.errors.ConductanceWarning")
def test_baselines_recorded_and_pad_error(gpt2):
    ids = _ids()
    layers = hf.layers(gpt2, "block")
    auto = hf.layer_conductance(gpt2, ids, layers, target="logit", n_steps=8)
    eos = hf.layer_conductance(gpt2, ids, layers, target="logit", n_steps=8, baseline=2)
    assert auto.baseline == "eos token 2 (config.eos_token_id; the config has no pad_token_id)"
    torch.testing.assert_close(auto["transformer.h.1"], eos["transformer.h.1"], rtol=0, atol=0)
    zeros = hf.layer_conductance(gpt2, ids, layers, target="logit", n_steps=8, baseline="zeros")
    gpt2.config.eos_token_id = None
    try:
        fallback = hf.layer_conductance(gpt2, ids, layers, target="logit", n_steps=8)
    finally:
        gpt2.config.eos_token_id = 2
    assert fallback.baseline == "zeros (the config has no pad_token_id and no eos_token_id)"
    torch.testing.assert_close(fallback["transformer.h.1"], zeros["transformer.h.1"], rtol=0, atol=0)
    with pytest.raises(cd.ConductanceError, match="baseline='pad' needs the pad token id.*unk_token_id"):
        hf.layer_conductance(gpt2, ids, layers, target="logit", n_steps=2, baseline="pad")
    unk = hf.layer_conductance(gpt2, ids, layers, target="logit", n_steps=8, baseline=5)
    as_ids = hf.layer_conductance(gpt2, ids, layers, target="logit", n_steps=8, baseline=torch.full_like(ids, 5))
    assert unk.baseline == "token 5 at every position"
    torch.testing.assert_close(unk["transformer.h.1"], as_ids["transformer.h.1"], rtol=0, atol=0)
    assert not torch.allclose(unk["transformer.h.1"], zeros["transformer.h.1"])
    bert = _model("bert")
    r = hf.layer_conductance(bert, ids, hf.layers(bert, "block"), target=[(1, 4)] * 3, n_steps=4)
    assert r.baseline == "pad token 0 (config.pad_token_id)"
    r = hf.layer_conductance(bert, ids, hf.layers(bert, "block"), target=[(1, 4)] * 3, n_steps=4, pad_token_id=3)
    assert r.baseline == "pad token 3 (pad_token_id=)"


def test_errors_say_user_layer_names_and_modes(gpt2):
    ids = _ids()
    with pytest.raises(cd.ConductanceError) as info:
        hf.layer_conductance(gpt2, ids, {"transformer.h.0.attn": "layer"}, target="logit", n_steps=2)
    message = str(info.value)
    assert "'transformer.h.0.attn[0]'" in message and "'model." not in message
    with pytest.raises(cd.ConductanceError, match="returns a tensor of shape .* name it without the brackets: "
                                                  "'transformer.h.0'"):
        hf.layer_conductance(gpt2, ids, {"transformer.h.0[0]": "layer"}, target="logit", n_steps=2)
    with torch.inference_mode():
        with pytest.raises(cd.ConductanceError, match="inference_mode"):
            hf.layer_conductance(gpt2, ids, hf.layers(gpt2, "mlp"), target="logit", n_steps=2)
        with pytest.raises(cd.ConductanceError, match="inference_mode"):
            cd.layer_conductance(nn.Linear(3, 2), torch.ones(1, 3), [""], n_steps=2)
    assert _hooks(gpt2) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():   # no_grad around the call is fine
            r = hf.layer_conductance(gpt2, ids, hf.layers(gpt2, "block"), target="logit", n_steps=64)
    assert (r.relative_error["transformer.h.1"] < 0.05).all()


@pytest.mark.slow
# 16 points: the equality of two views is what matters
@pytest.mark.filterwarnings("ignore::conductance.errors.ConductanceWarning")
def test_real_minilm_family_matches_bert_layers():
    """The pretrained all-MiniLM-L6-v2 (a real BERT), wrapped with a head: found from its modules."""
    from conductance.experiments.transformer import SentimentModel, load_minilm

    encoder, tokenizer = load_minilm()
    model = SentimentModel(encoder, nn.Linear(encoder.config.hidden_size, 1)).eval()
    fam = hf.family(model)
    assert (fam.model_type, len(fam.blocks), fam.num_heads, fam.head_dim, fam.num_neurons) == ("bert", 6, 12, 32, 1536)
    assert list(hf.layers(model, "attention")) == list(hf.bert_layers(model, "heads"))
    assert fam.mlp[0].endswith("encoder.layer.0.output.dense")
    enc = tokenizer(["a gripping, beautifully acted drama."], return_tensors="pt")
    r = hf.layer_conductance(model, enc["input_ids"], hf.layers(model, ["block", "mlp"]),
                             forward_kwargs={"attention_mask": enc["attention_mask"]}, n_steps=16)
    assert r.baseline == f"pad token {tokenizer.pad_token_id} (config.pad_token_id)"
    # the MLP neurons are the down projection's input: the same values as the intermediate module's output
    ffn = hf.layer_conductance(model, enc["input_ids"], {f.replace("output.dense", "intermediate"): "neuron"
                                                         for f in fam.mlp[:1]},
                               forward_kwargs={"attention_mask": enc["attention_mask"]}, n_steps=16)
    first = fam.mlp[0] + ":input"
    torch.testing.assert_close(r[first], ffn[fam.mlp[0].replace("output.dense", "intermediate")], rtol=1e-5,
                               atol=1e-7)
    assert r[first].shape == (1, 1536) and r[first].abs().max() > 1e-6
