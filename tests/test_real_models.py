"""Real pretrained EfficientNet-Lite0 on real photos, and the command line (slow)."""

import os
import subprocess
import sys

import pytest
import torch

import conductance as cd

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("PIL")
from conductance import assets  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def effnet_case():
    torch.set_num_threads(2)
    model = assets.efficientnet_lite0()
    x = assets.photo_batch(["chelsea", "coffee"])
    yield model, x
    torch.set_num_threads(1)


def test_real_weights_recognise_the_photos(effnet_case):
    model, x = effnet_case
    with torch.no_grad():
        top = model(x).argmax(1).tolist()
    names = assets.imagenet_classes()
    assert names[top[0]] in {"tabby", "tiger cat", "Egyptian cat"}
    assert names[top[1]] == "espresso"


def test_adaptive_reaches_tolerance_on_every_block(effnet_case):
    model, x = effnet_case
    layers = ["_blocks.4", "_blocks.10", "_blocks.15"]
    x = x[:1]
    r = cd.layer_conductance(model, x, layers, units="channel", tolerance=0.02, max_steps=96)
    assert all(r.is_cut[n] for n in layers)
    for n in layers:
        assert (r.relative_error[n] <= 0.02).all()
        assert r[n].abs().max() > 0.1
    # with the same budget, the captum-compatible rule is measurably worse
    with pytest.warns(cd.ConductanceWarning, match="completeness error above 5%"):
        fixed = cd.layer_conductance(model, x, layers, units="channel", method="captum",
                                     n_steps=int(r.n_points.max()) - 1)
    worst_fixed = max(fixed.relative_error[n].max().item() for n in layers)
    worst_adaptive = max(r.relative_error[n].max().item() for n in layers)
    assert worst_adaptive < worst_fixed


def test_neuron_conductance_on_real_filters(effnet_case):
    model, x = effnet_case
    layer = "_blocks.4"
    per_pixel = cd.neuron_conductance(model, x[:1], layer, [0, 11], units="channel", n_steps=16)
    assert per_pixel.shape == (2, 1, 3, 224, 224)
    with pytest.warns(cd.ConductanceWarning):  # 17 fixed points are coarse here, and the result says so
        layer_values = cd.layer_conductance(model, x[:1], layer, units="channel", n_steps=16)[layer][0, [0, 11]]
    sums = per_pixel.flatten(2).sum(2)[:, 0]
    torch.testing.assert_close(sums, layer_values, rtol=0.15, atol=0.1)


def test_command_line_demo_runs_on_the_real_model():
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-m", "conductance.cli", "demo", "--photo", "chelsea", "--layers",
                           "_blocks.4", "_blocks.15", "--n-steps", "16", "--top", "3"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "tiger cat" in done.stdout or "tabby" in done.stdout
    assert "_blocks.15" in done.stdout and "completeness error" in done.stdout


def test_command_line_help_and_bad_layer():
    done = subprocess.run([sys.executable, "-m", "conductance.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "conductance.cli", "demo", "--layers", "_block.4", "--n-steps",
                          "2"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2
    assert "_blocks.4" in bad.stderr and "Traceback" not in bad.stderr
