"""The result protocol, checked on every result type: save -> load -> equal, to_dataframe, to_dict,
plot(color=...), top(k), summary() and lookup by module (conductance.result, conductance.io)."""

import json
import os
import pickle
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import conductance as cd
from conductance import hf, io

sys.path.insert(0, os.path.dirname(__file__))
from models import random_mlp  # noqa: E402

pd = pytest.importorskip("pandas")
pytest.importorskip("safetensors")
matplotlib = pytest.importorskip("matplotlib")
plt = pytest.importorskip("matplotlib.pyplot")

TYPES = ["layer", "transformer", "aggregate", "curve", "summary", "selection"]
RED = (1.0, 0.0, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# one small real result of every type (module scope: computed once)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return random_mlp(seed=3), torch.randn(6, 5)


@pytest.fixture(scope="module")
def layer(mlp):
    model, x = mlp
    # the adaptive rule fills extra with per-example grids, masks and residual lists: the file must keep them
    return cd.layer_conductance(model, x, ["1", "3"], tolerance=0.05, max_steps=64)


@pytest.fixture(scope="module")
def minilm():
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from conductance.experiments.transformer import SentimentModel, load_minilm

    try:
        encoder, tokenizer = load_minilm()
    except Exception as exc:     # the weights package is an extra
        pytest.skip(f"MiniLM weights not installed: {exc}")
    torch.manual_seed(0)
    model = SentimentModel(encoder, nn.Linear(384, 1)).eval()
    enc = tokenizer(["a gripping, beautifully acted drama.", "dull and far too long."], padding=True,
                    return_tensors="pt")
    return model, enc, tokenizer


@pytest.fixture(scope="module")
def transformer(minilm):
    model, enc, tokenizer = minilm
    layers = {"encoder.layer.1.attention.output.dense:input": "head", "encoder.layer.1": "token"}
    layers = {k.replace("encoder.", f"{_prefix(model)}encoder."): u for k, u in layers.items()}
    with warnings.catch_warnings():     # 4 steps are inaccurate (it warns); these tests check the files and views
        warnings.simplefilter("ignore", cd.ConductanceWarning)
        return hf.layer_conductance(model, enc["input_ids"], layers,
                                    forward_kwargs={"attention_mask": enc["attention_mask"]}, target=0, n_steps=4,
                                    tokens=[tokenizer.convert_ids_to_tokens(x) for x in enc["input_ids"]])


def _prefix(model):
    names = dict(model.named_modules())
    return next(n[:-len("encoder.layer.1")] for n in names if n.endswith("encoder.layer.1"))


@pytest.fixture(scope="module")
def aggregate(mlp):
    model, _ = mlp
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 5, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(3)]
    return cd.aggregate(model, data, ["1", "3"], units="neuron", n_steps=8, progress=False)


@pytest.fixture(scope="module")
def curve(mlp):
    model, x = mlp
    ranking = cd.layer_conductance(model, x, "3", n_steps=8)["3"]
    return cd.deletion_curve(model, x, "3", ranking, ks=[0, 2, 4, 7], random_seeds=2)


@pytest.fixture(scope="module")
def summary(mlp):
    model, x = mlp
    r = cd.layer_importance(model, x, "3", ["conductance", "activation"], n_steps=8)
    counts = {m: cd.flip_count(model, x, "3", r[m]["3"]) for m in r}
    top = {"conductance": cd.flipped_by_top_k(model, x, "3", r["conductance"]["3"], k=2)}
    return cd.ablation_summary(counts, top, k=2, layer="3", mode="zero")


@pytest.fixture(scope="module")
def selection():
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).eval()
    X = torch.randn(36, 6)
    y = torch.arange(3).repeat_interleave(12)
    return cd.feature_selection(model, X, y, "1", measures=["conductance", "activation"], ks=(1, 2, 4),
                                random_seeds=2, importance_kwargs={"n_steps": 8})


def _get(request, kind):
    return request.getfixturevalue(kind)


# ----------------------------------------------------------------------------------------------
# save -> load -> equal
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("kind", TYPES)
def test_save_load_gives_an_equal_object(request, tmp_path, kind, suffix):
    result = _get(request, kind)
    path = str(tmp_path / f"r{suffix}")
    result.save(path)
    back = cd.load(path)
    assert type(back) is type(result)
    assert back == result and result == back
    assert back.summary() == result.summary()
    assert json.dumps(back.to_dict(), sort_keys=True) == json.dumps(result.to_dict(), sort_keys=True)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == [f"r{suffix}"]     # no temporary file left


def _altered(result):
    """A copy of ``result`` (through a file) with one stored number changed."""
    if isinstance(result, cd.LayerResult):
        result.attributions["3"][1, 2] += 1e-6
    elif isinstance(result, hf.TransformerResult):
        block = "encoder.layer.1" if "encoder.layer.1" in result.elements else result.layers[1]
        result.elements[block][0, 1, 3] += 1e-6
    elif isinstance(result, cd.AggregateResult):
        result.stats["1"]["sum"][0, 0] += 1e-9
    elif isinstance(result, cd.AblationCurve):
        result.logit[0, 1] += 1e-9
    elif isinstance(result, cd.AblationSummary):
        result.top_k["conductance"][0] = ~result.top_k["conductance"][0]
    else:
        result.rows[0]["accuracy"] += 1e-9
    return result


@pytest.mark.parametrize("kind", TYPES)
def test_equality_sees_one_changed_value(request, tmp_path, kind):
    result = _get(request, kind)
    path = str(tmp_path / "r.safetensors")
    result.save(path)
    other = _altered(cd.load(path))
    assert other != result and not (other == result)  # noqa: SIM201 (__eq__ itself, not only __ne__)
    assert cd.load(path) == result


def test_transformer_result_round_trip_keeps_its_views(transformer, tmp_path):
    path = str(tmp_path / "t.safetensors")
    transformer.save(path)
    back = cd.load(path)
    for name in transformer.layers:
        assert torch.equal(back[name], transformer[name])
        assert torch.equal(back.unit_error[name], transformer.unit_error[name])
        assert torch.equal(back.reduce(name, "element"), transformer.reduce(name, "element"))
    assert back.raw == transformer.raw and back.tokens == transformer.tokens
    assert back.top(3) == transformer.top(3)
    # the values are the engine result's own tensors: stored once, and shared again when read
    for name in transformer.layers:
        assert any(back.elements[name] is t for t in back.raw.attributions.values())
    _, arrays = io.read(path)
    assert sum(a.size for a in arrays.values()) < 1.1 * sum(
        t.numel() for t in list(transformer.raw.attributions.values()) + list(transformer.raw.extra["coarse"].values()))


def test_layer_result_file_keeps_dtypes_and_extra(layer, tmp_path):
    half = cd.LayerResult(**{**layer._fields(), "attributions": {n: v.to(torch.bfloat16)
                                                                 for n, v in layer.attributions.items()}})
    path = str(tmp_path / "h.safetensors")
    half.save(path)
    back = cd.load(path)
    assert back["1"].dtype == torch.bfloat16 and torch.equal(back["1"], half["1"])
    assert back == half
    assert isinstance(back.extra["alphas"], list) and len(back.extra["alphas"]) == 6
    assert all(torch.equal(a, b) for a, b in zip(back.extra["alphas"], layer.extra["alphas"]))
    assert all(torch.equal(back.extra["coarse"][n], layer.extra["coarse"][n]) for n in layer)
    df = half.to_dataframe()
    assert np.array_equal(df[df.layer == "1"].value.to_numpy(), half["1"].double().flatten().numpy())


def test_extra_alphas_has_one_shape_everywhere():
    """extra["alphas"]: the adaptive grid of the path the values were integrated on, one float64 tensor
    (n_points[e],) per example from 0 to 1; layer integrated gradients (one path per layer) puts its grids
    under extra["layer_alphas"][layer], the same per-example lists; fixed rules have none."""
    model = random_mlp(seed=3)
    x = torch.randn(3, 5) * 2
    rs = cd.layer_importance(model, x, ["1", "3"], ["conductance", "layer_integrated_gradients"], tolerance=1e-3)
    for r in rs.values():
        grids = r.extra["alphas"] if r.measure == "conductance" else r.extra["layer_alphas"]["3"]
        assert isinstance(grids, list) and len(grids) == 3
        for a in grids:
            assert a.dtype == torch.float64 and a.dim() == 1
            assert a[0] == 0 and a[-1] == 1 and (a.diff() > 0).all()
    conductance = rs["conductance"]
    assert [a.numel() for a in conductance.extra["alphas"]] == conductance.n_points.tolist()
    lig = rs["layer_integrated_gradients"]
    assert "alphas" not in lig.extra and set(lig.extra["layer_alphas"]) == {"1", "3"}
    assert "alphas" not in cd.layer_conductance(model, x, "1", n_steps=32).extra


def test_aggregate_file_is_readable_by_both_loaders(aggregate, tmp_path):
    path = str(tmp_path / "a.safetensors")
    aggregate.save(path)
    assert cd.AggregateResult.load(path) == cd.load(path) == aggregate
    assert io.file_format(path) == "conductance.aggregate/2"


# ----------------------------------------------------------------------------------------------
# damaged, foreign and future files
# ----------------------------------------------------------------------------------------------

def test_flipped_byte_is_caught_by_the_checksum(layer, tmp_path):
    path = str(tmp_path / "r.npz")
    layer.save(path)
    meta, arrays = io.read(path)
    arrays["a0"] = arrays["a0"].copy()
    arrays["a0"].flat[0] += 1.0
    with open(path, "wb") as f:       # the same metadata (with the old checksum), one value changed
        np.savez(f, __meta__=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8), **arrays)
    with pytest.raises(cd.ConductanceError, match="does not match the checksum"):
        cd.load(path)


def test_truncated_and_foreign_files_are_refused(layer, tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "r.safetensors")
    layer.save(path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(cd.ConductanceError, match="not a readable conductance result file"):
        cd.load(path)
    foreign = str(tmp_path / "weights.safetensors")
    save_file({"w": torch.zeros(3)}, foreign)
    with pytest.raises(cd.ConductanceError, match="not a readable conductance result file"):
        cd.load(foreign)
    plain = str(tmp_path / "plain.npz")
    np.savez(plain, x=np.zeros(2))
    with pytest.raises(cd.ConductanceError, match="no conductance metadata"):
        cd.load(plain)
    with pytest.raises(FileNotFoundError):
        cd.load(str(tmp_path / "missing.npz"))


def test_a_future_format_version_is_named(layer, tmp_path):
    path = str(tmp_path / "r.npz")
    io.write(path, {"format": "conductance.layer_result/9", "fields": None}, {})
    with pytest.raises(cd.ConductanceError, match="'conductance.layer_result/9'.*another version"):
        cd.load(path)


def test_unsaveable_content_is_refused_before_writing(layer, tmp_path):
    odd = cd.LayerResult(**{**layer._fields(), "extra": {"fn": print}})
    with pytest.raises(cd.ConductanceError, match=r"cannot save LayerResult\['extra'\]\['fn'\]"):
        odd.save(str(tmp_path / "r.npz"))
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# tables and plain content
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", TYPES)
def test_to_dict_is_strict_json(request, kind):
    d = _get(request, kind).to_dict()
    text = json.dumps(d, allow_nan=False)        # no tensors, arrays, NaN or infinities
    assert json.loads(text) == d


def test_layer_result_dataframe(layer):
    df = layer.to_dataframe()
    assert list(df.columns) == ["layer", "example", "unit", "value", "unit_error"]
    assert len(df) == sum(v[0].numel() * v.shape[0] for v in layer.values())
    for name, values in layer.items():
        part = df[df.layer == name]
        table = part.pivot(index="example", columns="unit", values="value").to_numpy()
        assert np.array_equal(table, values.flatten(1).numpy())
        errors = part.groupby("example").unit_error.first().to_numpy()
        assert np.allclose(errors, layer.unit_error[name].numpy(), rtol=0, atol=0)


def test_transformer_result_dataframe(transformer):
    df = transformer.to_dataframe()
    assert {"layer", "block", "kind", "example", "unit", "name", "value", "unit_error"} <= set(df.columns)
    assert len(df) == sum(transformer[n][0].numel() * transformer[n].shape[0] for n in transformer.layers)
    for name in transformer.layers:
        part = df[df.layer == name]
        table = part.pivot(index="example", columns="unit", values="value").to_numpy()
        assert np.allclose(table, transformer[name].flatten(1).double().numpy(), rtol=0, atol=0)
        assert part[part.example == 0].name.tolist() == transformer.unit_names(name, 0)
        errors = part.groupby("example").unit_error.first().to_numpy()
        assert np.allclose(errors, transformer.unit_error[name].double().numpy(), rtol=1e-6, atol=0)


def test_aggregate_dataframe(aggregate):
    df = aggregate.to_dataframe()
    assert len(df) == len(aggregate.groups) * 14
    for g in aggregate.groups:
        part = df[(df.group == g) & (df.layer == "3")]
        assert np.array_equal(part["mean"].to_numpy(), aggregate.mean("3", g).ravel())


def test_curve_dataframe(curve):
    df = curve.to_dataframe()
    batch, n_k = curve.logit.shape
    assert list(df.columns) == ["ranking", "seed", "example", "k", "logit", "agreement"]
    assert len(df) == batch * n_k * (1 + len(curve.seeds))
    mine = df[df.ranking == "ranking"].pivot(index="example", columns="k", values="logit").to_numpy()
    assert np.array_equal(mine, curve.logit)
    seed1 = df[(df.ranking == "random") & (df.seed == curve.seeds[1])]
    assert np.array_equal(seed1.pivot(index="example", columns="k", values="agreement").to_numpy(),
                          curve.random_agreement[1])


def test_summary_dataframe(summary):
    df = summary.to_dataframe()
    assert list(df.columns) == ["measure", "example", "flip_count", "top_k_flipped"]
    assert len(df) == sum(c.numel() for c in summary.flip_counts.values())
    for name, counts in summary.flip_counts.items():
        part = df[df.measure == name]
        assert np.array_equal(part.flip_count.to_numpy(), counts.double().numpy())
        assert part.top_k_flipped.tolist() == summary.top_k[name].tolist()


def test_selection_dataframe(selection):
    df = selection.to_dataframe()
    assert len(df) == len(selection.rows)
    assert df.columns[:4].tolist() == ["measure", "k", "n_units", "accuracy"]
    assert df.accuracy.tolist() == [r["accuracy"] for r in selection.rows]


def test_missing_pandas_is_a_conductance_error(layer, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(cd.ConductanceError, match="pip install pandas"):
        layer.to_dataframe()


# ----------------------------------------------------------------------------------------------
# top(k, layer=None)
# ----------------------------------------------------------------------------------------------

def test_layer_result_top_matches_topk(layer):
    rows = layer.top(3)
    assert [r.layer for r in rows] == ["1"] * 3 + ["3"] * 3
    for name in layer:
        mine = [r for r in rows if r.layer == name]
        best = torch.topk(layer[name][0].flatten(), 3)
        assert [r.unit for r in mine] == best.indices.tolist()
        assert [r.value for r in mine] == pytest.approx(best.values.tolist(), rel=0, abs=0)
    by_size = layer.top(2, "3", example=4, absolute=True)
    best = torch.topk(layer["3"][4].abs(), 2)
    assert [r.unit for r in by_size] == best.indices.tolist() and all(r.example == 4 for r in by_size)
    # the older call top(layer, k) keeps its (unit, value) pairs
    assert layer.top("3", 2) == [(r.unit, r.value) for r in layer.top(2, "3")]
    assert layer.top("3") == [(r.unit, r.value) for r in layer.top(5, "3")]


def test_transformer_top_ranks_across_layers(transformer):
    rows = transformer.top(4)
    values = torch.cat([transformer.mean(n).flatten() for n in transformer.layers])
    assert [r.value for r in rows] == pytest.approx(torch.topk(values, 4).values.tolist(), rel=1e-12)
    heads = transformer.layers[0]
    assert transformer.top(2, heads) == transformer.top(2, layers=[heads]) == transformer.top(2, "head")
    assert [r.index for r in transformer.top(2, heads)] == torch.topk(transformer.mean(heads), 2).indices.tolist()


def test_aggregate_top_takes_the_layer_second(aggregate):
    g = aggregate.groups[0]
    rows = aggregate.top(3, "3", group=g)
    assert [r.unit for r in rows] == torch.topk(torch.from_numpy(aggregate.mean("3", g)), 3).indices.tolist()
    assert [r.layer for r in aggregate.top(2)] == ["1", "1", "3", "3"]
    with pytest.raises(cd.ConductanceError, match="pass a class as group="):
        aggregate.top(3, g)


def test_curve_top_ranks_examples_by_their_fall(curve):
    rows = curve.top(3)
    area = torch.from_numpy(curve.auc_logit_per_example)
    assert [r.example for r in rows] == torch.topk(-area, 3).indices.tolist()
    assert rows[0].unablated_logit == curve.unablated_logit[rows[0].example]
    with pytest.raises(cd.ConductanceError, match="only"):
        curve.top(2, "1")


def test_summary_top_ranks_measures(summary):
    order = summary.top(2)
    shares = [r["top_k_share"] for _, r in order]
    assert shares == sorted(shares, reverse=True) and {n for n, _ in order} == set(summary.rows)
    assert summary.top(1)[0][1] == summary.rows[order[0][0]]


def test_selection_top_ranks_rows_by_accuracy(selection):
    rows = selection.top(3)
    measured = [r for r in selection.rows if r["measure"] != "random"]
    best = torch.topk(torch.tensor([r["accuracy"] for r in measured], dtype=torch.float64), 3).values.tolist()
    assert [r["accuracy"] for r in rows] == pytest.approx(best, abs=0)
    assert all(r["measure"] == "activation" for r in selection.top(2, measure="activation"))


# ----------------------------------------------------------------------------------------------
# plot(color=...)
# ----------------------------------------------------------------------------------------------

def _plot(result, kind):
    if kind in ("layer", "aggregate", "transformer"):
        return result.plot(result.layers[0] if kind != "layer" else "1", k=4, color="red")
    return result.plot(color="red")


@pytest.mark.parametrize("kind", TYPES)
def test_plot_passes_color_and_leaves_no_pyplot_figure(request, kind):
    from matplotlib.colors import to_rgba

    result = _get(request, kind)
    before = plt.get_fignums()
    fig = _plot(result, kind)
    assert plt.get_fignums() == before
    ax = fig.axes[0]
    if kind in ("layer", "aggregate", "transformer"):
        assert len(ax.patches) == 4 and all(p.get_facecolor() == RED for p in ax.patches)
    else:
        first = ax.get_lines()[0]
        assert to_rgba(first.get_color()) == RED
        if kind == "curve":     # the random rankings keep their own colour
            assert to_rgba(ax.get_lines()[1].get_color()) != RED


# ----------------------------------------------------------------------------------------------
# layers by module
# ----------------------------------------------------------------------------------------------

def test_layer_result_indexed_by_module(layer, mlp, tmp_path):
    model, _ = mlp
    assert layer[model[1]] is layer["1"] and layer[model[3]] is layer["3"]
    assert model[1] in layer and model[0] not in layer and "1" in layer
    assert list(layer) == ["1", "3"] and len(layer) == 2
    assert layer.top(2, model[3]) == layer.top(2, "3")
    with pytest.raises(KeyError, match="not one of this result's layers"):
        layer[model[0]]
    path = str(tmp_path / "r.npz")
    layer.save(path)
    back = cd.load(path)
    with pytest.raises(cd.ConductanceError, match="bind"):
        back[model[1]]
    assert back.bind(model)[model[1]] is back["1"]
    copied = pickle.loads(pickle.dumps(layer))      # still picklable; the copy knows names only
    assert copied == layer and "1" in copied and model[1] not in copied


def test_other_results_take_modules(aggregate, curve, selection, transformer, minilm, mlp):
    model, _ = mlp
    assert np.array_equal(aggregate[model[3]], aggregate.mean("3"))
    assert np.array_equal(aggregate.mean(model[1], aggregate.groups[0]), aggregate.mean("1", aggregate.groups[0]))
    assert curve.top(2, model[3]) == curve.top(2)
    assert selection.top(1, selection.layer) == selection.top(1)
    tmodel = minilm[0]
    block = tmodel.get_submodule(transformer.layers[1])
    dense = tmodel.get_submodule(transformer.layers[0][:-len(":input")])
    assert torch.equal(transformer[block], transformer[transformer.layers[1]])
    assert torch.equal(transformer[dense], transformer[transformer.layers[0]])


def test_a_module_for_two_layers_is_ambiguous(mlp):
    model, x = mlp
    r = cd.layer_importance(model, x, "2", "activation")
    r2 = cd.LayerResult(**{**r._fields(), "attributions": {"2": r["2"], "2:input": r["2"]}}).bind(model)
    with pytest.raises(cd.ConductanceError, match="several layers"):
        r2[model[2]]
    assert r2["2:input"] is r["2"]
