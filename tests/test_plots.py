"""Plots draw what they claim: the right bars in the right order, the thresholded signs, one cell
per token, pictures of the right shape, and clear errors for inputs that do not fit."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import conductance as cd  # noqa: E402
from conductance import plots  # noqa: E402
from conductance.errors import ConductanceError  # noqa: E402
from models import random_cnn  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _bars(fig):
    ax = fig.axes[0]
    return ([p.get_height() for p in ax.patches], [t.get_text() for t in ax.get_xticklabels()])


# --------------------------------------------------------------------------------------------
# top units


def test_top_units_bars_are_the_k_largest_magnitudes_in_order():
    values = torch.tensor([0.1, -0.9, 0.3, 0.0, 0.7, -0.2, 0.05])
    fig = plots.top_units(values, k=4)
    heights, ticks = _bars(fig)
    assert heights == pytest.approx([-0.9, 0.7, 0.3, -0.2])
    assert ticks == ["1", "4", "2", "5"]
    assert fig.top_indices == [1, 4, 2, 5]
    # red for positive, blue for negative
    colours = [matplotlib.colors.to_hex(p.get_facecolor()) for p in fig.axes[0].patches]
    assert colours == [plots.NEGATIVE, plots.POSITIVE, plots.POSITIVE, plots.NEGATIVE]


def test_top_units_signed_ranking_labels_and_error_bars():
    values = np.array([[0.1, -0.9], [0.3, 0.7]])  # flattened row-major: indices 0..3
    fig = plots.top_units(values, k=10, labels=["a", "b", "c", "d"], absolute=False, errors=np.full(4, 0.05))
    heights, ticks = _bars(fig)
    assert heights == pytest.approx([0.7, 0.3, 0.1, -0.9])   # k larger than the units: all of them
    assert ticks == ["d", "c", "a", "b"]
    bars = [c for c in fig.axes[0].containers if isinstance(c, matplotlib.container.BarContainer)][0]
    segments = bars.errorbar.lines[2][0].get_segments()
    assert [s[1][1] - s[0][1] for s in segments] == pytest.approx([0.1] * 4)   # ± the given 0.05


@pytest.mark.parametrize("kwargs, match", [
    (dict(values=[1.0, 2.0], k=0), "k must be a positive integer"),
    (dict(values=[1.0, 2.0], labels=["x"]), "labels has 1 names but values has 2"),
    (dict(values=[1.0, float("nan")]), "NaN or Inf"),
    (dict(values=[]), "empty"),
    (dict(values=[1.0, 2.0], errors=[1.0]), "errors has 1 values"),
])
def test_top_units_rejects_bad_input(kwargs, match):
    with pytest.raises(ConductanceError, match=match):
        plots.top_units(**kwargs)


def test_layer_result_plot_shows_top_units_and_completeness_error():
    torch.manual_seed(0)
    model = random_cnn(0)
    x = torch.rand(2, 2, 8, 8)
    result = cd.layer_conductance(model, x, ["1", "3"], units="channel", n_steps=32)
    fig = result.plot("3", example=1, k=3)
    heights, ticks = _bars(fig)
    values = result["3"][1]
    order = torch.argsort(values.abs(), descending=True)[:3]
    assert heights == pytest.approx(values[order].tolist())
    assert ticks == [str(int(i)) for i in order]
    title = fig.axes[0].get_title()
    assert f"completeness error {100 * float(result.relative_error['3'][1]):.2f}%" in title
    assert "example 1" in title
    with pytest.raises(ConductanceError, match="several layers"):
        result.plot()
    with pytest.raises(ConductanceError, match="out of range"):
        result.plot("3", example=5)
    # drawing into a given axes returns that axes' figure
    fig2, ax = plt.subplots()
    assert result.plot("1", ax=ax) is fig2


# --------------------------------------------------------------------------------------------
# pixel maps


def _photo_and_map():
    torch.manual_seed(1)
    image = torch.rand(3, 12, 10)
    attribution = torch.zeros(3, 12, 10)
    attribution[:, 2, 3] = torch.tensor([1.0, 0.5, 0.5])      # +2 after summing channels: the maximum
    attribution[0, 7, 7] = -1.0                               # -1
    return image, attribution


def test_overlay_is_grey_photo_where_attribution_is_zero_and_coloured_by_sign():
    image, attribution = _photo_and_map()
    rgb = plots.pixel_image(image, attribution, "overlay")
    assert rgb.shape == (12, 10, 3)
    grey = (image.permute(1, 2, 0).double().numpy() @ np.array([0.299, 0.587, 0.114]))
    zero = np.ones((12, 10), bool)
    zero[2, 3] = zero[7, 7] = False
    # no attribution: the photo in grey, unchanged, in all three channels
    assert np.allclose(rgb[zero], np.repeat(grey[zero][:, None], 3, axis=1))
    # the largest positive pixel: 1/4 grey photo, 3/4 the top (dark red) end of the colour map
    top = np.array(matplotlib.colormaps["RdBu_r"](1.0)[:3])
    assert np.allclose(rgb[2, 3], 0.25 * grey[2, 3] + 0.75 * top)
    assert top[0] > top[2] + 0.2
    r, g, b = rgb[7, 7]
    assert b > r                # a negative pixel leans blue
    fig = plots.pixel_map(image, attribution, "overlay", title="filter 3")
    assert fig.axes[0].images[0].get_array().shape == (12, 10, 3)
    assert fig.axes[0].get_title() == "filter 3"
    assert len(fig.axes) == 2   # the picture and its colour bar


def test_scale_mode_multiplies_the_photo_by_normalised_magnitude():
    image, attribution = _photo_and_map()
    rgb = plots.pixel_image(image, attribution, "scale")
    weight = np.zeros((12, 10))
    weight[2, 3], weight[7, 7] = 1.0, 0.5                     # |sum over channels| / max
    expected = image.permute(1, 2, 0).double().numpy() * weight[..., None]
    assert np.allclose(rgb, expected)
    # a grey (H, W) photo and an (H, W) attribution work too
    flat = plots.pixel_image(image[0], attribution.sum(0), "scale")
    assert flat.shape == (12, 10, 3) and np.allclose(flat[..., 0], image[0].numpy() * weight)


def test_pixel_map_errors():
    image, attribution = _photo_and_map()
    with pytest.raises(ConductanceError, match="12x8 pixels but the image is 12x10"):
        plots.pixel_map(image, attribution[:, :, :8])
    with pytest.raises(ConductanceError, match=r"must be in \[0, 1\]"):
        plots.pixel_map(image * 3 - 1, attribution)
    with pytest.raises(ConductanceError, match="unknown mode"):
        plots.pixel_map(image, attribution, mode="blend")
    with pytest.raises(ConductanceError, match="image must be"):
        plots.pixel_map(torch.rand(5, 12, 10), attribution)
    # an ImageNet-normalised photo can be stretched back explicitly
    rgb = plots.pixel_image(image * 3 - 1, attribution, "scale", rescale=True)
    assert rgb.max() <= 1 and np.isclose(rgb[2, 3].max(), float(image[:, 2, 3].max() - image.min())
                                         / float(image.max() - image.min()))


def test_pixel_maps_grid_has_the_photo_and_one_panel_per_map():
    image, attribution = _photo_and_map()
    fig = plots.pixel_maps(image, {"a": attribution, "b": -attribution, "c": attribution[1]}, mode="scale",
                           ncols=2, title="three filters")
    drawn = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in drawn] == ["image", "a", "b", "c"]
    assert all(ax.images[0].get_array().shape[:2] == (12, 10) for ax in drawn)
    with pytest.raises(ConductanceError, match="non-empty dict"):
        plots.pixel_maps(image, {})


# --------------------------------------------------------------------------------------------
# tokens


def test_token_map_has_one_cell_per_token():
    tokens = ["this", "is", "not", "good"]
    scores = np.array([[0.1, -0.2, 0.9, -0.5], [0.0, 0.3, -0.4, 0.2]])
    fig = plots.token_map(tokens, scores, row_labels=["filter 7", "filter 9"])
    ax = fig.axes[0]
    cells = ax.images[0].get_array()
    assert cells.shape == (2, 4) and np.allclose(cells, scores)
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    assert [t.get_text() for t in ax.get_yticklabels()] == ["filter 7", "filter 9"]
    assert len(ax.texts) == 8                                   # one annotation per cell
    lo, hi = ax.images[0].get_clim()
    assert lo == -hi == pytest.approx(-0.9)                     # symmetric limits
    single = plots.token_map(tokens, torch.tensor([1.0, 2.0, 3.0, 4.0]), annotate=False).axes[0]
    assert single.images[0].get_array().shape == (1, 4) and not single.texts


def test_token_map_errors():
    with pytest.raises(ConductanceError, match="4 columns but there are 3 tokens"):
        plots.token_map(["a", "b", "c"], np.zeros(4))
    with pytest.raises(ConductanceError, match="row_labels has 1 names but scores have 2 rows"):
        plots.token_map(["a", "b"], np.zeros((2, 2)), row_labels=["x"])
    with pytest.raises(ConductanceError, match=r"\(T,\) or \(rows, T\)"):
        plots.token_map(["a"], np.zeros((1, 1, 1)))


# --------------------------------------------------------------------------------------------
# sign heat map


def test_sign_matrix_thresholds_and_permutes():
    rng = np.random.default_rng(0)
    values = rng.normal(0, 0.02, size=(9, 6))
    values[0, 0], values[1, 1], values[2, 2] = 0.01, -0.01, 0.0099   # |v| == threshold keeps its sign
    signs = np.where(np.abs(values) < 0.01, 0, np.sign(values))
    assert signs[0, 0] == 1 and signs[1, 1] == -1 and signs[2, 2] == 0
    plain, rows, cols = plots.sign_matrix(values, 0.01, cluster=False)
    assert np.array_equal(plain, signs) and list(rows) == list(range(9)) and list(cols) == list(range(6))
    matrix, rows, cols = plots.sign_matrix(values, 0.01, cluster=True)
    assert sorted(rows.tolist()) == list(range(9)) and sorted(cols.tolist()) == list(range(6))
    assert np.array_equal(matrix, signs[rows][:, cols])
    fig = plots.sign_heatmap(values, 0.01)
    assert np.array_equal(fig.sign_matrix, matrix)
    assert np.array_equal(fig.axes[0].images[0].get_array(), matrix)


def _patterns():
    """Rows drawn from two sign patterns, interleaved; columns of two kinds, interleaved."""
    a = np.array([1, -1, 1, -1, 1, -1, 0, 0]) * 0.5
    b = np.array([-1, 1, -1, 1, 0, 0, 1, -1]) * 0.5
    return np.stack([a, b, a, b, a, b, a])


def test_clustering_puts_equal_rows_together():
    values = _patterns()
    matrix, rows, cols = plots.sign_matrix(values, 0.01, cluster=True)
    kinds = [0 if r % 2 == 0 else 1 for r in rows]               # rows 0, 2, 4, 6 are pattern a
    changes = sum(kinds[i] != kinds[i + 1] for i in range(len(kinds) - 1))
    assert changes == 1                                          # two contiguous blocks
    assert np.array_equal(matrix, np.sign(values)[rows][:, cols].astype(np.int8))


def test_clustering_without_scipy_orders_by_mean_sign(monkeypatch):
    # What a user without scipy gets: the fallback order, still a permutation.
    monkeypatch.setitem(sys.modules, "scipy.cluster.hierarchy", None)
    values = np.array([[-1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])
    matrix, rows, cols = plots.sign_matrix(values, 0.01, cluster=True)
    assert rows.tolist() == [1, 3, 0, 2]                         # mean signs 1, 1/3, -1/3, -1/3 (stable)
    assert np.array_equal(matrix, np.sign(values)[rows][:, cols])


def test_sign_matrix_errors():
    with pytest.raises(ConductanceError, match=r"\(examples, units\)"):
        plots.sign_matrix(np.zeros(5))
    with pytest.raises(ConductanceError, match="threshold must be"):
        plots.sign_matrix(np.zeros((2, 2)), threshold=-1)


# --------------------------------------------------------------------------------------------
# curves and errors


def test_curves_draw_the_given_points_and_means():
    x = np.arange(5)
    y = x ** 2.0
    reps = np.stack([x + 0.0, x + 2.0])
    fig = plots.curves({"square": (x, y), "random": (x, reps)}, "k", "logit", title="t")
    lines = fig.axes[0].get_lines()
    assert np.allclose(lines[0].get_ydata(), y)
    assert np.allclose(lines[1].get_ydata(), x + 1.0)            # mean of the repeats
    assert fig.axes[0].get_xlabel() == "k" and fig.axes[0].get_ylabel() == "logit"
    with pytest.raises(ConductanceError, match="x has 5 points but y has shape"):
        plots.curves({"bad": (x, y[:4])})
    with pytest.raises(ConductanceError, match="pair"):
        plots.curves({"bad": y})


def test_error_vs_steps_is_log_log_and_keeps_exact_zeros_visible():
    fig = plots.error_vs_steps({"gausslegendre": ([4, 8, 16], [1e-3, 1e-7, 0.0]),
                                "uniform": ([4, 8, 16], np.array([[0.1, 0.05, 0.02], [0.3, 0.1, 0.04]]))},
                               tolerance=0.01)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert np.allclose(ax.get_lines()[0].get_ydata(), [1e-3, 1e-7, 1e-16])
    assert np.allclose(ax.get_lines()[1].get_ydata(), [0.2, 0.075, 0.03])
    with pytest.raises(ConductanceError, match="must be >= 0"):
        plots.error_vs_steps({"r": ([1, 2], [-1.0, 0.0])})
    with pytest.raises(ConductanceError, match="positive for a log axis"):
        plots.error_vs_steps({"r": ([0, 2], [1.0, 0.5])})


# --------------------------------------------------------------------------------------------
# .plot() of ablation and aggregate results


def test_ablation_curve_and_summary_plots():
    model = random_cnn(3)
    torch.manual_seed(3)
    x = torch.rand(4, 2, 8, 8)
    result = cd.layer_conductance(model, x, "3", units="channel", n_steps=16)
    curve = cd.deletion_curve(model, x, "3", result, units="channel", random_seeds=3)
    fig = curve.plot()
    lines = fig.axes[0].get_lines()
    assert np.allclose(lines[0].get_ydata(), curve.mean_logit)
    assert np.allclose(lines[1].get_ydata(), curve.random_mean_logit)
    assert np.allclose(lines[0].get_xdata(), curve.ks)
    agreement = curve.plot("agreement", random=False).axes[0].get_lines()
    assert len(agreement) == 1 and np.allclose(agreement[0].get_ydata(), curve.mean_agreement)

    counts = {"conductance": torch.tensor([1.0, 3.0, math.inf, 2.0]), "random": torch.tensor([4.0, 5.0, 1.0, 6.0])}
    summary = cd.ablation_summary(counts, k=3, layer="3")
    ax = summary.plot().axes[0]
    first = ax.get_lines()[0]
    assert np.array_equal(first.get_xdata(), np.arange(7))
    assert np.allclose(first.get_ydata(), [0, 0.25, 0.5, 0.75, 0.75, 0.75, 0.75])   # never reaches 1: one inf
    assert "3/4 flipped" in first.get_label()


def test_aggregate_plot_shows_top_means_with_std():
    model = random_cnn(4)
    torch.manual_seed(4)
    data = [(torch.rand(4, 2, 8, 8), torch.tensor([0, 1, 0, 1])), (torch.rand(3, 2, 8, 8), torch.tensor([0, 0, 1]))]
    agg = cd.aggregate(model, data, ["3"], units="channel", n_steps=8, progress=False)
    fig = agg.plot("3", group=0, k=3)
    heights, ticks = _bars(fig)
    mean = agg.mean("3", 0)
    order = np.argsort(-np.abs(mean), kind="stable")[:3]
    assert heights == pytest.approx(mean[order].tolist())
    assert ticks == [str(i) for i in order]
    assert "class 0 (4 examples)" in fig.axes[0].get_title()
    with pytest.raises(ConductanceError, match="no examples in group"):
        agg.plot("3", group=7)


# --------------------------------------------------------------------------------------------
# matplotlib: lazy import, hint, headless backend


def test_missing_matplotlib_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install matplotlib.*conductance\[plots\]"):
        plots.top_units([1.0, 2.0])


def test_headless_machine_gets_the_agg_backend():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    code = ("import sys; import conductance.plots as p; assert 'matplotlib' not in sys.modules; "
            "p.top_units([1.0, -2.0]); import matplotlib; print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if sys.platform.startswith("linux"):
        assert out.stdout.strip().lower() == "agg"


def test_sign_heatmap_tick_labels_follow_the_clustered_order():
    values = _patterns()
    names = [f"review {i}" for i in range(values.shape[0])]
    fig = plots.sign_heatmap(values, 0.01, row_labels=names)
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert ticks == [names[i] for i in fig.row_order]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [str(c) for c in fig.col_order]
    with pytest.raises(ConductanceError, match="row_labels has 2 names but values have 7 rows"):
        plots.sign_heatmap(values, row_labels=["a", "b"])
