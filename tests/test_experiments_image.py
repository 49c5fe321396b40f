"""The image experiments: the Inception-style Fashion-MNIST network, its cache, GoogLeNet weight files,
and (slow) the quick reproduction end to end."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

import conductance as cd
from conductance import assets
from conductance.datasets import fashion_mnist_available
from conductance.experiments import fashion_inception as fi
from conductance.experiments import image
from conductance.experiments.image.compute import _split_per_class

needs_fashion = pytest.mark.skipif(not fashion_mnist_available(),
                                   reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

# A training run small enough for the fast tests (about 30 batches).
TINY = fi.TrainConfig(n_train=1920, epochs=1, batch_size=64, lr=3e-3, seed=0, n_test=1000, bn_images=1000)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDUCTANCE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_inception_shapes_and_cuts():
    torch.manual_seed(0)
    net = fi.FashionInception().eval()
    x = torch.rand(3, 1, 28, 28)
    seen = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.shape))
             for n in fi.INCEPTION_LAYERS]
    out = net(x)
    for h in hooks:
        h.remove()
    assert out.shape == (3, 10)
    assert seen == {"inception3a": (3, 48, 14, 14), "inception3b": (3, 64, 14, 14),
                    "inception4a": (3, 96, 7, 7), "inception4b": (3, 128, 7, 7)}
    # each module output is the concatenation of its four branches, in order
    m = net.inception3b
    z = torch.rand(2, 48, 14, 14)
    parts = [m.branch1(z), m.branch2(z), m.branch3(z), m.branch4(z)]
    assert [p.shape[1] for p in parts] == [16, 24, 12, 12]
    torch.testing.assert_close(m(z), torch.cat(parts, 1))
    # the module outputs are cuts (completeness holds), a single branch is not
    r = cd.layer_conductance(net, x, fi.INCEPTION_LAYERS + ["inception4a.branch2"], units="channel", n_steps=64)
    assert all(r.is_cut[n] for n in fi.INCEPTION_LAYERS) and not r.is_cut["inception4a.branch2"]
    with pytest.raises(cd.ConductanceError, match=r"\(batch, 1, 28, 28\)"):
        net(torch.rand(2, 3, 28, 28))


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed")
    old = os.environ.get("CONDUCTANCE_CACHE")
    os.environ["CONDUCTANCE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        first = fi.load_or_train(TINY)
        second = fi.load_or_train(TINY)
    finally:
        if old is None:
            del os.environ["CONDUCTANCE_CACHE"]
        else:
            os.environ["CONDUCTANCE_CACHE"] = old
    return first, second


@needs_fashion
def test_training_beats_chance(tiny_trained):
    first, _ = tiny_trained
    x, y = fi.fashion_tensors("test", 1000)
    torch.manual_seed(0)
    untrained = fi.evaluate(fi.FashionInception(), x, y)
    trained = fi.evaluate(first.model, x, y)
    assert untrained < 0.25  # an untrained network is near chance (0.1)
    assert trained > 0.6 and trained > untrained + 0.4
    assert first.trained_now and len(first.history) == 1
    assert first.test_accuracy == trained  # stored accuracy: the first n_test test images


@needs_fashion
def test_cache_round_trip(tiny_trained):
    first, second = tiny_trained
    assert first.trained_now and not second.trained_now
    assert first.path == second.path and os.path.basename(first.path).startswith(fi.VERSION)
    assert second.test_accuracy == first.test_accuracy
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = fi.fashion_tensors("test", 16)[0]
    with torch.no_grad():
        assert torch.equal(first.model(x), second.model(x))


@needs_fashion
def test_cache_key_seeding_and_corrupt_file(cache):
    cfg = fi.TrainConfig(n_train=128, epochs=1, batch_size=64, seed=3, n_test=100, bn_images=128)
    other_seed = fi.TrainConfig(n_train=128, epochs=1, batch_size=64, seed=4, n_test=100, bn_images=128)
    assert fi.cache_path(cfg) != fi.cache_path(other_seed)
    a = fi.load_or_train(cfg)
    assert a.trained_now and a.path.startswith(str(cache))
    with open(a.path, "wb") as f:  # a damaged file is retrained, identically (seeded)
        f.write(b"not a torch file")
    b = fi.load_or_train(cfg)
    assert b.trained_now
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def _googlenet(num_classes=1000):
    from torchvision.models import googlenet

    torch.manual_seed(0)
    return googlenet(weights=None, aux_logits=True, init_weights=True, num_classes=num_classes).eval()


def test_googlenet_weights_file_loads(tmp_path):
    original = _googlenet()
    # non-trivial BatchNorm statistics so that the outputs depend on every saved tensor
    for m in original.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "googlenet.pth"
    torch.save(original.state_dict(), path)  # with the aux classifiers, as torchvision saves it
    loaded = image.load_googlenet(str(path))
    assert not loaded.training and loaded.aux1 is None and not loaded.transform_input
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x))
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": original.state_dict(), "epoch": 3}, nested)
    with torch.no_grad():
        torch.testing.assert_close(image.load_googlenet(str(nested))(x), original(x))


def test_googlenet_weights_file_mismatch(tmp_path):
    wrong_net = tmp_path / "fashion.pth"
    torch.save(fi.FashionInception().state_dict(), wrong_net)
    with pytest.raises(cd.ConductanceError, match="not a torchvision GoogLeNet state dict.*missing"):
        image.load_googlenet(str(wrong_net))
    ten_classes = tmp_path / "ten.pth"
    torch.save(_googlenet(num_classes=10).state_dict(), ten_classes)
    with pytest.raises(cd.ConductanceError, match=r"wrong shape \(e.g. fc\.(weight|bias)"):
        image.load_googlenet(str(ten_classes))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(cd.ConductanceError, match="could not read"):
        image.load_googlenet(str(garbage))
    a_list = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], a_list)
    with pytest.raises(cd.ConductanceError, match="not a state dict"):
        image.load_googlenet(str(a_list))
    with pytest.raises(cd.ConductanceError, match="does not exist"):
        image.load_googlenet(str(tmp_path / "missing.pth"))
    # the library's own loader gives the same errors (image.load_googlenet is a name for it)
    with pytest.raises(cd.ConductanceError, match=r"wrong shape \(e.g. fc\.(weight|bias)"):
        assets.googlenet(weights_path=str(ten_classes))


def test_split_per_class():
    labels = torch.arange(4).repeat_interleave(7)
    sel, ev = _split_per_class(labels, 4, 2, seed=0)
    assert sel.numel() == 16 and ev.numel() == 8
    assert not set(sel.tolist()) & set(ev.tolist())
    assert torch.bincount(labels[sel]).tolist() == [4] * 4 and torch.bincount(labels[ev]).tolist() == [2] * 4
    with pytest.raises(cd.ConductanceError, match="fewer than"):
        _split_per_class(labels, 6, 2, seed=0)


@pytest.mark.slow
@needs_fashion
def test_quick_run_records_every_number(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("matplotlib")
    from conductance.experiments.report import Report

    monkeypatch.setenv("CONDUCTANCE_CACHE", str(tmp_path / "cache"))  # trains from an empty cache
    # a seeded random GoogLeNet with BatchNorm statistics re-estimated on the photos, as a weights file
    net = assets.googlenet(calibration=assets.photo_batch(["chelsea", "coffee", "rocket", "china"]), seed=0)
    weights = tmp_path / "googlenet.pth"
    torch.save(net.state_dict(), weights)
    report = Report("test", {})
    image.run(report, quick=True, weights=str(weights), seed=0)
    _, json_path = report.write(str(tmp_path / "out"))
    data = json.loads(Path(json_path).read_text())
    assert data["image-settings"]["quick"] is True
    assert "QUICK" in report.to_html()

    tolerance = 0.05  # the engine warns above 5% for a fixed rule
    for key in ("image-effnet-photos", "image-googlenet-photos"):
        photos = data[key]
        assert set(photos["photos"]) == {"chelsea", "coffee"}
        for p in photos["photos"].values():
            for b in p["blocks"].values():
                assert b["relative_error"] >= 0
                if b["relative_error"] > tolerance:
                    assert any("completeness error above 5%" in w for w in photos["warnings"])
                # the sum over filters is F(x) - F(x') up to that error
                assert abs(b["sum"] - p["output_diff"]) <= b["relative_error"] * abs(p["output_diff"]) * 1.001 + 1e-6
    effnet = data["image-effnet-photos"]["photos"]
    assert effnet["coffee"]["label_name"] == "espresso"
    assert effnet["chelsea"]["label_name"] in {"tabby", "tiger cat", "Egyptian cat"}

    n_units = {"_blocks.10": 112, "_blocks.15": 320, "inception4d": 528, "inception5b": 1024}
    for key in ("image-effnet-ablation", "image-googlenet-ablation"):
        for block, modes in data[key]["blocks"].items():
            assert set(modes) == {"zero", "baseline"}
            for entry in modes.values():
                for measure, counts in entry["flip_counts"].items():
                    assert len(counts) == 2
                    for c in counts:
                        assert c is None or (isinstance(c, int) and 1 <= c <= min(32, n_units[block]))
                    flipped = [c for c in counts if c is not None]
                    assert entry["rows"][measure]["flipped"] == len(flipped)
    assert data["image-effnet-pixels"]["pixel_sum_relative_error_max"] < 1.0
    assert os.path.exists(os.path.join(tmp_path, "out", "figures", data["image-effnet-pixels"]["figures"][0]))

    model = data["image-fashion-model"]
    assert model["trained_now"] and model["test_accuracy"] > 0.6  # chance is 0.1
    ab = data["image-fashion-ablation"]
    assert ab["relative_error_max"] < 0.2
    assert set(ab["modes"]) == {"zero", "baseline"}
    for entry in ab["modes"]["zero"].values():
        for row in entry["rows"].values():
            assert row["examples"] == 20  # one random order per image in the quick run
            assert 0 <= row["more_than_k"] <= row["examples"] and 0 <= row["top_k_flipped"] <= row["examples"]
            if row["max_flips"] is not None:
                assert row["max_flips"] == int(row["max_flips"]) and 1 <= row["max_flips"] <= 96
                assert 1 <= row["mean_flips"] <= row["max_flips"]
    sel = data["image-fashion-selection"]
    for entry in sel["layers"].values():
        assert entry["n_select"] == 100 and entry["n_evaluate"] == 60
        assert entry["all_units_accuracy"] > 0.5
        for row in entry["rows"]:
            assert 0 <= row["accuracy"] <= 1
    assert math.isfinite(sel["relative_error_mean"])

    # docs/REPRODUCTION.md's tables are printed from this file: every image table renders, one row per photo
    from test_reproduction_tables import _check_shape, _tables, rt
    tables = rt.render(data)
    assert {"photos", "pixels", "effnet-ablation", "effnet-means", "fashion-zero", "fashion-baseline",
            "fashion-errors", "selection"} <= set(tables)
    for lines in tables.values():
        for t in _tables(lines):
            _check_shape(t)
    assert [r[0] for r in _tables(tables["photos"])[0][2:]] == list(data["image-effnet-photos"]["photos"])
