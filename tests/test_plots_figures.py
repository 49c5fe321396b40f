"""Plots as objects: no pyplot figures left open, keywords reach matplotlib, titles stay inside,
``ax=`` in a grid, the shaping options of pixel maps, Captum's argument order, wrapped token maps."""

import math

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from conductance import plots  # noqa: E402
from conductance.errors import ConductanceError  # noqa: E402

RNG = np.random.default_rng(0)
IMAGE = RNG.uniform(0, 1, (3, 12, 10))
ATTR = RNG.normal(0, 1, (3, 12, 10))


def every_plot(**extra):
    """One call of every plotting function (keywords for the drawing call in ``extra``)."""
    values = RNG.normal(0, 1, (6, 9))
    return [
        plots.top_units(values[0], k=5, **extra.get("top_units", {})),
        plots.pixel_map(IMAGE, ATTR, **extra.get("pixel_map", {})),
        plots.pixel_maps(IMAGE, {"a": ATTR, "b": -ATTR}),
        plots.image_attr(ATTR, IMAGE),
        plots.token_map(["a", "b", "c"], values[0, :3], **extra.get("token_map", {})),
        plots.curves({"x": (np.arange(9), values[1])}, **extra.get("curves", {})),
        plots.flip_share({"r": np.array([1, 2, np.inf])}),
        plots.error_vs_steps({"gl": (np.array([4, 8]), np.array([0.1, 0.01]))}),
        plots.sign_heatmap(values, 0.5, **extra.get("sign_heatmap", {})),
    ]


def test_figures_are_not_left_open_in_pyplot():
    plt.close("all")
    figs = every_plot()
    assert all(isinstance(f, Figure) for f in figs)
    assert plt.get_fignums() == []
    for f in figs:           # and each one renders
        FigureCanvasAgg(f).draw()


def test_keywords_reach_matplotlib():
    figs = every_plot(top_units={"color": "green"}, pixel_map={"interpolation": "bilinear"},
                      token_map={"cmap": "viridis"}, curves={"linewidth": 3.5},
                      sign_heatmap={"alpha": 0.4})
    bars = figs[0].axes[0].patches
    assert all(matplotlib.colors.to_hex(b.get_facecolor()) == "#008000" for b in bars)
    assert figs[1].axes[0].images[0].get_interpolation() == "bilinear"
    assert figs[4].axes[0].images[0].get_cmap().name == "viridis"
    assert figs[5].axes[0].get_lines()[0].get_linewidth() == 3.5
    assert figs[8].axes[0].images[0].get_alpha() == 0.4


def test_long_titles_wrap_inside_the_figure():
    title = "conductance of the filters of a block " * 8
    for fig in (plots.top_units(np.arange(5.0), title=title),
                plots.pixel_maps(IMAGE, {"a": ATTR}, title=title),
                plots.curves({"x": ([0, 1], [1, 2])}, title=title)):
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        box = fig.bbox
        texts = [t for ax in fig.axes for t in (ax.title,)] + ([fig._suptitle] if fig._suptitle else [])
        long = [t for t in texts if t.get_text() == title.strip() or t.get_text() == title]
        assert long
        for t in long:
            extent = t.get_window_extent(renderer)
            assert extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1, (extent, box)
            assert extent.height > 2 * t.get_fontsize()      # wrapped onto several lines


def test_ax_in_a_grid_draws_only_there():
    fig = Figure(figsize=(8, 6))
    axes = fig.subplots(2, 2)
    got = [plots.top_units(np.arange(4.0) - 1, ax=axes[0, 0], title="bars"),
           plots.pixel_map(IMAGE, ATTR, ax=axes[0, 1], title="pixels", colorbar=False),
           plots.token_map(["x", "y"], [0.5, -1.0], ax=axes[1, 0], title="tokens", colorbar=False),
           plots.curves({"c": ([0, 1, 2], [0, 1, 4])}, ax=axes[1, 1], title="curve")]
    assert all(g is fig for g in got)
    assert len(fig.axes) == 4 and tuple(fig.get_size_inches()) == (8, 6)
    assert [ax.get_title() for ax in axes.ravel()] == ["bars", "pixels", "tokens", "curve"]
    assert fig._suptitle is None
    with pytest.raises(ConductanceError, match="wrap splits the tokens"):
        plots.token_map(list("abcdefgh"), np.arange(8.0), ax=axes[1, 0], wrap=3)
    with pytest.raises(ConductanceError, match="ax must be a matplotlib Axes"):
        plots.top_units([1.0, 2.0], ax="left")
    # a grid of pixel maps inside one cell of a larger figure
    outer = Figure(figsize=(8, 4))
    left, right = outer.subfigures(1, 2)
    assert plots.pixel_maps(IMAGE, {"a": ATTR, "b": ATTR}, fig=right, ncols=3) is right
    assert len(right.axes) == 3 and len(left.axes) == 0


def test_clip_threshold_and_smooth_change_the_picture_as_documented():
    image = np.full((1, 6, 6), 0.8)
    a = np.ones((6, 6))
    a[0, 0] = 100.0                                   # one extreme pixel
    plain = plots.pixel_image(image, a, "scale")
    assert np.isclose(plain[3, 3, 0], 0.8 * 1 / 100)  # washed out by the extreme pixel
    clipped = plots.pixel_image(image, a, "scale", clip=90)
    assert np.allclose(clipped, 0.8)                  # limit = 90th percentile = 1: everything saturates
    ramp = np.arange(36, dtype=float).reshape(6, 6) + 1
    kept = plots.shape_attribution(ramp, threshold=50)[0]
    assert (kept[ramp < np.percentile(ramp, 50)] == 0).all() and (kept[ramp >= np.percentile(ramp, 50)] > 0).all()
    delta = np.zeros((21, 21))
    delta[10, 10] = 1.0
    sigma = 1.5
    blurred, limit = plots.shape_attribution(delta, smooth=sigma)
    x = np.arange(-5, 6)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    assert np.isclose(blurred.sum(), 1.0) and np.allclose(blurred[10, 5:16], k[5] * k)
    assert np.isclose(limit, k[5] ** 2)
    for bad in ({"clip": 150}, {"threshold": -1}, {"smooth": -2}, {"clip": "high"}):
        with pytest.raises(ConductanceError, match="percentile|blur radius"):
            plots.pixel_image(image, a, **bad)


def test_image_attr_takes_captums_order_and_channels_last():
    ours = plots.pixel_map(IMAGE, ATTR, colorbar=False).axes[0].images[0].get_array()
    captum_order = plots.image_attr(ATTR, IMAGE, colorbar=False).axes[0].images[0].get_array()
    channels_last = plots.image_attr(np.transpose(ATTR, (1, 2, 0)), np.transpose(IMAGE, (1, 2, 0)),
                                     colorbar=False).axes[0].images[0].get_array()
    assert np.allclose(captum_order, ours) and np.allclose(channels_last, ours)
    alone = plots.image_attr(torch.tensor(ATTR), colorbar=False).axes[0].images[0].get_array()
    a = ATTR.sum(0)
    assert np.allclose(alone[a == a.max()], matplotlib.colormaps["RdBu_r"](1.0)[:3])   # full colour at max


def test_long_token_maps_wrap_and_numbers_share_a_power_of_ten():
    tokens = [f"tok{i}" for i in range(70)]
    scores = 1e-4 * np.sin(np.arange(70.0) + 0.5)
    fig = plots.token_map(tokens, scores)
    strips = [ax for ax in fig.axes if ax.images]
    assert len(strips) == math.ceil(70 / 24)
    labels = [t.get_text() for ax in strips for t in ax.get_xticklabels()]
    assert labels == tokens
    drawn = np.concatenate([ax.images[0].get_array().data.ravel() for ax in strips])
    assert np.allclose(drawn, scores)
    e = math.floor(math.log10(np.abs(scores).max()))
    assert e == -5
    cells = [t.get_text() for ax in strips for t in ax.texts]
    expected = [f"{v / 10.0 ** e:.1f}" for v in scores]
    assert cells == ["0" if x in ("0.0", "-0.0") else x for x in expected] and max(len(c) for c in cells) <= 5
    tiny = plots.token_map(["a", "b"], [1e-9, -0.5])
    assert [t.get_text() for t in tiny.axes[0].texts] == ["0", "-0.50"]
    bar = [ax for ax in fig.axes if not ax.images][0]
    assert f"x 1e{e}" in bar.get_ylabel()
