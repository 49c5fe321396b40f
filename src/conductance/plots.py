"""Pictures of attributions: top units, pixel maps, token strips, curves and sign heat maps.

Every function accepts torch tensors or numpy arrays, draws on ``ax`` when one is given (or on a
new figure), and returns the matplotlib ``Figure``. New figures are ``matplotlib.figure.Figure``
objects made without pyplot: nothing is left open in pyplot's list of figures (a notebook still
shows a returned figure; ``fig.savefig`` saves it; to draw in a pyplot window, pass ``ax=`` from
``plt.subplots()``). Extra keyword arguments go to the matplotlib call that draws the data (named
in each docstring), after ours, so they override our choices. Long titles wrap inside the figure.
matplotlib is imported only when a function runs (``pip install matplotlib`` or
``pip install 'conductance[plots]'``); on a Linux machine without a display the non-interactive
Agg backend is selected, so plotting works in scripts, tests and CI.

Colours follow one convention everywhere: red is positive, blue is negative, white/grey is zero,
and diverging colour limits are symmetric around zero so that the two signs are comparable.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from .errors import ConductanceError

__all__ = ["top_units", "pixel_map", "pixel_image", "pixel_maps", "image_attr", "token_map", "curves",
           "sign_matrix", "sign_heatmap", "error_vs_steps", "flip_share"]

POSITIVE = "#c0392b"
NEGATIVE = "#2c6fbb"
DIVERGING = "RdBu_r"

ArrayLike = Any  # torch.Tensor, np.ndarray, or nested sequences of numbers


# --------------------------------------------------------------------------------------------
# helpers


def _pyplot():
    """Import pyplot, choosing the Agg backend on a Linux machine with no display."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ModuleNotFoundError("conductance.plots needs matplotlib: pip install matplotlib "
                                  "(or pip install 'conductance[plots]')") from exc
    headless = (sys.platform.startswith("linux") and not os.environ.get("DISPLAY")
                and not os.environ.get("WAYLAND_DISPLAY"))
    # Only before pyplot is first imported, and never over an explicit choice (Jupyter sets MPLBACKEND).
    if headless and "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _array(x: ArrayLike, name: str) -> np.ndarray:
    """``x`` as a float64 numpy array; NaN/Inf or non-numbers raise a ConductanceError."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if x.is_complex():
            raise ConductanceError(f"{name} must be real numbers, got a complex tensor")
        x = x.double().numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ConductanceError(f"{name} must be numbers (a tensor or an array), got {type(x).__name__}: {exc}"
                               ) from None
    if not np.isfinite(a).all():
        raise ConductanceError(f"{name} contains NaN or Inf; plot finite values (check the computation that "
                               "produced them)")
    return a


def _figure(figsize: tuple[float, float]) -> Any:
    """A new Figure that pyplot does not track (so it is freed with its last reference)."""
    _pyplot()
    from matplotlib.figure import Figure
    # constrained layout keeps titles, tick labels and colour bars inside the saved picture
    return Figure(figsize=figsize, layout="constrained")


def _new(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """(figure, axes): the given axes and its figure, or a new figure with one axes."""
    if ax is not None:
        if not hasattr(ax, "figure") or not hasattr(ax, "imshow"):
            raise ConductanceError(f"ax must be a matplotlib Axes (e.g. one of plt.subplots()'s), got "
                                   f"{type(ax).__name__}")
        return ax.figure, ax
    fig = _figure(figsize)
    return fig, fig.add_subplot()


def _title(ax: Any, title: Optional[str]) -> None:
    """Set an axes title that wraps at word boundaries instead of running past the figure's edge."""
    if title is not None:
        ax.set_title(title, wrap=True)


def _limit(values: np.ndarray) -> float:
    """Symmetric colour limit: the largest |value|, or 1 when everything is zero (keeps the norm valid)."""
    m = float(np.abs(values).max()) if values.size else 0.0
    return m if m > 0 else 1.0


# --------------------------------------------------------------------------------------------
# top units


def top_units(values: ArrayLike, k: int = 10, labels: Optional[Sequence[Any]] = None, *, ax: Any = None,
              title: Optional[str] = None, absolute: bool = True, errors: Optional[ArrayLike] = None,
              ylabel: str = "attribution", xlabel: str = "unit", **kwargs: Any) -> Any:
    """Bar chart of the ``k`` units with the largest ``|values|`` (signed bars, largest first).

    Parameters
    ----------
    values : (n_units,) or any shape (flattened row-major, so labels are flat unit indices)
    k : number of bars (fewer when there are fewer units)
    labels : n_units names for the x axis (default: the flat unit index)
    absolute : rank by ``|value|`` (default) or by value (largest positive first)
    errors : same shape as ``values``, optional; drawn as error bars (e.g. a standard deviation)
    **kwargs : passed to ``ax.bar`` (e.g. ``color``, ``width``, ``edgecolor``)

    Returns
    -------
    Figure; ``fig.top_indices`` holds the flat indices of the bars, left to right.

    Example
    -------
    >>> fig = plots.top_units(result["features.3"][0], k=10)
    """
    v = _array(values, "values").reshape(-1)
    if v.size == 0:
        raise ConductanceError("values is empty; pass one value per unit, shape (n_units,)")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ConductanceError(f"k must be a positive integer, got {k!r}")
    if labels is not None and len(labels) != v.size:
        raise ConductanceError(f"labels has {len(labels)} names but values has {v.size} units; give one label "
                               "per unit")
    err = None
    if errors is not None:
        err = _array(errors, "errors").reshape(-1)
        if err.size != v.size:
            raise ConductanceError(f"errors has {err.size} values but values has {v.size}; give one per unit")
    key = -np.abs(v) if absolute else -v
    order = np.argsort(key, kind="stable")[:int(k)]
    heights = v[order]
    fig, ax = _new(ax, (max(4.0, 0.45 * len(order) + 1.5), 3.2))
    ax.bar(np.arange(len(order)), heights, **{"color": [POSITIVE if h >= 0 else NEGATIVE for h in heights],
                                              "yerr": None if err is None else err[order],
                                              "capsize": 2 if err is not None else 0, **kwargs})
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(np.arange(len(order)))
    names = [str(labels[i]) if labels is not None else str(int(i)) for i in order]
    ax.set_xticklabels(names, rotation=45 if max(len(n) for n in names) > 3 else 0,
                       ha="right" if max(len(n) for n in names) > 3 else "center")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _title(ax, title if title is not None else
           f"top {len(order)} of {v.size} units by {'|value|' if absolute else 'value'}")
    fig.top_indices = [int(i) for i in order]
    return fig


# --------------------------------------------------------------------------------------------
# pixel maps


def _channels_first(x: np.ndarray) -> np.ndarray:
    """(H, W, 1|3) -> (1|3, H, W) when the last dimension alone looks like channels (Captum's layout)."""
    if x.ndim == 3 and x.shape[-1] in (1, 3) and x.shape[0] not in (1, 3):
        return np.transpose(x, (2, 0, 1))
    return x


def _image_hw(image: ArrayLike, rescale: bool) -> np.ndarray:
    """The photo as (H, W, 3) or (H, W) in [0, 1]."""
    img = _array(image, "image")
    if img.ndim == 4 and img.shape[0] == 1:
        img = img[0]
    img = _channels_first(img)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
    elif img.ndim != 2:
        raise ConductanceError(f"image must be (3, H, W), (1, H, W) or (H, W) (channels first, as torch "
                               f"stores it; (H, W, 3) works too), got shape {img.shape}")
    if rescale:
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    elif img.min() < -1e-6 or img.max() > 1 + 1e-6:
        raise ConductanceError(f"image values span [{img.min():.3g}, {img.max():.3g}] but must be in [0, 1]: pass "
                               "the photo before normalisation (undo the mean/std), or rescale=True to stretch "
                               "it to [0, 1]")
    return np.clip(img, 0.0, 1.0)


def _attribution_hw(attribution: ArrayLike, hw: Optional[tuple[int, int]]) -> np.ndarray:
    """Attribution summed over channels: (H, W)."""
    a = _array(attribution, "attribution")
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3:
        a = _channels_first(a).sum(0)
    elif a.ndim != 2:
        raise ConductanceError(f"attribution must be (C, H, W) or (H, W), got shape {a.shape}")
    if hw is not None and a.shape != tuple(hw):
        raise ConductanceError(f"attribution is {a.shape[0]}x{a.shape[1]} pixels but the image is {hw[0]}x{hw[1]}; "
                               "pass an attribution over the image's pixels (e.g. neuron_conductance of a "
                               "filter w.r.t. the input, one example)")
    return a


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """``a`` (H, W) smoothed by a Gaussian of ``sigma`` pixels (separable, edges mirrored)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(a, pad, mode="symmetric" if a.shape[axis] > radius else "edge")
        a = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=axis) @ kernel
    return a


def _percentile(value: Optional[float], name: str) -> Optional[float]:
    if value is None:
        return None
    if not isinstance(value, (int, float, np.floating)) or isinstance(value, bool) or not 0 <= value <= 100:
        raise ConductanceError(f"{name} is a percentile of |attribution|, a number in [0, 100]; got {value!r}")
    return float(value)


def shape_attribution(attribution: np.ndarray, *, clip: Optional[float] = None, threshold: Optional[float] = None,
                      smooth: float = 0.0) -> tuple[np.ndarray, float]:
    """The (H, W) attribution as drawn, and its colour limit.

    ``smooth``: Gaussian blur of ``smooth`` pixels (a per-pixel map of a deep unit is speckled; a
    blur of 2-4 pixels shows where it looks). ``threshold``: percentile of ``|a|`` below which
    pixels are set to 0 (e.g. 90 keeps the top 10%). ``clip``: percentile of ``|a|`` that becomes
    the colour limit; larger values saturate (e.g. 99: a few extreme pixels no longer wash out the
    rest). Percentiles are taken after smoothing; the limit is symmetric around zero.

    Parameters
    ----------
    attribution : ndarray, shape (H, W)
    clip, threshold : float, optional
        Percentiles in [0, 100].
    smooth : float
        Blur in pixels; 0 for none.

    Returns
    -------
    shown : ndarray, shape (H, W)
    limit : float
        The colour limit (positive).
    """
    clip = _percentile(clip, "clip")
    threshold = _percentile(threshold, "threshold")
    if not isinstance(smooth, (int, float, np.floating)) or isinstance(smooth, bool) or not smooth >= 0:
        raise ConductanceError(f"smooth is a blur radius in pixels (a number >= 0), got {smooth!r}")
    a = _gaussian_blur(attribution, float(smooth)) if smooth > 0 else attribution
    magnitude = np.abs(a)
    if threshold is not None:
        a = np.where(magnitude >= np.percentile(magnitude, threshold), a, 0.0)
    m = float(np.percentile(magnitude, clip)) if clip is not None else _limit(a)
    m = m if m > 0 else _limit(a)
    return np.clip(a, -m, m), m


def _grey(img: np.ndarray) -> np.ndarray:
    # ITU-R 601 luma: how bright the photo looks, so the colour layer carries only the attribution
    return img if img.ndim == 2 else img @ np.array([0.299, 0.587, 0.114])


def pixel_image(image: ArrayLike, attribution: ArrayLike, mode: str = "overlay", *, alpha: float = 0.75,
                cmap: str = DIVERGING, rescale: bool = False, clip: Optional[float] = None,
                threshold: Optional[float] = None, smooth: float = 0.0) -> np.ndarray:
    """The RGB picture that :func:`pixel_map` shows, as an array (H, W, 3) in [0, 1].

    ``"overlay"``: the photo in grey, blended with a diverging colour map of the attribution
    summed over channels (limits symmetric, ``±max|a|``); a pixel's colour weight is
    ``alpha * |a| / max|a|``, so unattributed pixels show the plain grey photo.
    ``"scale"``: the photo multiplied by ``|a| / max|a|`` (the paper's Figure 1): bright where the
    attribution is large in either sign, black where it is zero.
    ``clip``, ``threshold``, ``smooth``: see :func:`shape_attribution` (``max|a|`` becomes the
    clipped limit).

    Parameters
    ----------
    image : array, shape (3, H, W), (1, H, W), (H, W) or (H, W, 3)
    attribution : array, shape (C, H, W) or (H, W)
    mode : str
        ``"overlay"`` or ``"scale"``.
    alpha : float
        Largest colour weight, in [0, 1].
    cmap : str
        Matplotlib colour map name.
    rescale : bool
        Stretch the image to [0, 1].

    Returns
    -------
    ndarray, shape (H, W, 3)
    """
    img = _image_hw(image, rescale)
    a, m = shape_attribution(_attribution_hw(attribution, img.shape[:2]), clip=clip, threshold=threshold,
                             smooth=smooth)
    if mode == "overlay":
        _pyplot()
        from matplotlib import colormaps
        colour = colormaps[cmap]((a / m + 1) / 2)[..., :3]
        weight = (alpha * np.abs(a) / m)[..., None]
        grey = _grey(img)[..., None]
        return np.clip((1 - weight) * grey + weight * colour, 0.0, 1.0)
    if mode == "scale":
        rgb = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)
        return rgb * (np.abs(a) / m)[..., None]
    raise ConductanceError(f"unknown mode {mode!r}; choose 'overlay' (grey photo with a red/blue map of the "
                           "attribution) or 'scale' (photo scaled by |attribution|, as in the paper)")


def pixel_map(image: ArrayLike, attribution: ArrayLike, mode: str = "overlay", *, ax: Any = None,
              title: Optional[str] = None, alpha: float = 0.75, cmap: str = DIVERGING, colorbar: bool = True,
              rescale: bool = False, clip: Optional[float] = None, threshold: Optional[float] = None,
              smooth: float = 0.0, **kwargs: Any) -> Any:
    """One photo with its per-pixel attribution.

    Parameters
    ----------
    image : (3, H, W), (1, H, W) or (H, W), values in [0, 1] (``rescale=True`` stretches other ranges);
        (H, W, 3) is accepted too
    attribution : (C, H, W) (summed over channels) or (H, W)
    mode : "overlay" or "scale"; see :func:`pixel_image`
    clip, threshold, smooth : percentile colour limit, percentile below which pixels are hidden,
        Gaussian blur in pixels; see :func:`shape_attribution`
    **kwargs : passed to ``ax.imshow`` (e.g. ``interpolation``)

    The argument order is (image, attribution), like the rest of this module; Captum's
    ``visualize_image_attr`` takes (attribution, image): use :func:`image_attr` for that order.

    Returns
    -------
    matplotlib.figure.Figure

    Example
    -------
    >>> fig = plots.pixel_map(photo[0], neuron_cond[0, 0], mode="scale", title="filter 12", smooth=2)
    """
    shaping: dict[str, Any] = dict(clip=clip, threshold=threshold, smooth=smooth)
    rgb = pixel_image(image, attribution, mode, alpha=alpha, cmap=cmap, rescale=rescale, **shaping)
    fig, ax = _new(ax, (4.0, 4.0))
    ax.imshow(rgb, **{"interpolation": "nearest", **kwargs})
    ax.set_xticks([])
    ax.set_yticks([])
    _title(ax, title)
    if colorbar and mode == "overlay":
        from matplotlib import cm, colors
        _, m = shape_attribution(_attribution_hw(attribution, rgb.shape[:2]), **shaping)
        fig.colorbar(cm.ScalarMappable(colors.Normalize(-m, m), cmap), ax=ax, fraction=0.046, pad=0.04,
                     extend="both" if clip is not None else "neither")
    return fig


def image_attr(attribution: ArrayLike, image: Optional[ArrayLike] = None, mode: str = "overlay", **kwargs: Any
               ) -> Any:
    """:func:`pixel_map` with Captum's argument order: ``(attribution, image)``.

    For code ported from ``captum.attr.visualization.visualize_image_attr(attr, original_image)``.
    Arrays may be channels-last (H, W, C), as Captum's visualisation takes them, or channels-first.
    Without ``image`` the attribution alone is drawn (red positive, blue negative, on white);
    other keywords are :func:`pixel_map`'s. This is not a copy of Captum's function: its
    ``method`` / ``sign`` options map onto ``mode`` ("overlay" ~ "blended_heat_map" with
    sign "all", "scale" ~ "masked_image" with sign "absolute_value").

    Parameters
    ----------
    attribution : array, shape (H, W, C), (C, H, W) or (H, W)
    image : array, optional
        The photo, in either channel order.
    mode : str
        ``"overlay"`` or ``"scale"``.
    **kwargs
        :func:`pixel_map`'s keywords.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if image is None:
        a = _attribution_hw(attribution, None)
        image = np.ones(a.shape)
        kwargs.setdefault("alpha", 1.0)
    return pixel_map(image, attribution, mode, **kwargs)


def pixel_maps(image: ArrayLike, maps: Mapping[str, ArrayLike], mode: str = "overlay", *, ncols: int = 4,
               show_image: bool = True, title: Optional[str] = None, alpha: float = 0.75, cmap: str = DIVERGING,
               rescale: bool = False, panel_size: float = 2.6, clip: Optional[float] = None,
               threshold: Optional[float] = None, smooth: float = 0.0, fig: Any = None, **kwargs: Any) -> Any:
    """A grid of pixel maps of one photo: the photo itself, then one panel per ``{title: attribution}``.

    Each panel has its own symmetric limits (maps of different filters differ in scale).
    ``fig``: a Figure or SubFigure to draw the grid in (e.g. one cell of ``fig.subfigures``);
    by default a new Figure. ``clip``, ``threshold``, ``smooth`` and ``**kwargs`` (for
    ``ax.imshow``) apply to every panel, as in :func:`pixel_map`.

    Parameters
    ----------
    image : array, shape (3, H, W), (1, H, W), (H, W) or (H, W, 3)
    maps : dict str -> array, shape (C, H, W) or (H, W)
        Panel title -> attribution.
    mode : str
        ``"overlay"`` or ``"scale"``.
    ncols : int
        Panels per row.
    show_image : bool
        Start with a panel of the photo itself.
    panel_size : float
        Inches per panel.

    Returns
    -------
    matplotlib.figure.Figure

    Example
    -------
    >>> fig = plots.pixel_maps(photo, {f"filter {c}": cond[i, 0] for i, c in enumerate(filters)}, mode="scale")
    """
    if not isinstance(maps, Mapping) or not maps:
        raise ConductanceError("maps must be a non-empty dict {panel title: attribution (C, H, W) or (H, W)}")
    n = len(maps) + bool(show_image)
    cols = max(1, min(int(ncols), n))
    rows = math.ceil(n / cols)
    if fig is None:
        fig = _figure((panel_size * cols, panel_size * rows + (0.4 if title else 0)))
    elif not hasattr(fig, "subplots"):
        raise ConductanceError(f"fig must be a matplotlib Figure or SubFigure, got {type(fig).__name__}")
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = list(axes.ravel())
    i = 0
    if show_image:
        img = _image_hw(image, rescale)
        flat[0].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        _title(flat[0], "image")
        flat[0].set_xticks([])
        flat[0].set_yticks([])
        i = 1
    for name, attribution in maps.items():
        pixel_map(image, attribution, mode, ax=flat[i], title=str(name), alpha=alpha, cmap=cmap,
                  colorbar=False, rescale=rescale, clip=clip, threshold=threshold, smooth=smooth, **kwargs)
        i += 1
    for extra in flat[i:]:
        extra.axis("off")
    if title is not None:
        fig.suptitle(title, wrap=True)
    return fig


# --------------------------------------------------------------------------------------------
# tokens


def token_map(tokens: Sequence[str], scores: ArrayLike, row_labels: Optional[Sequence[str]] = None, *,
              ax: Any = None, title: Optional[str] = None, cmap: str = DIVERGING, annotate: Optional[bool] = None,
              colorbar: bool = True, wrap: Optional[int] = None, **kwargs: Any) -> Any:
    """Per-token colour strips: one cell per token (columns) and per row of scores.

    Parameters
    ----------
    tokens : T strings (the x axis)
    scores : (T,) or (rows, T); colour limits symmetric around zero
    row_labels : one name per row (e.g. measures or filters)
    annotate : write each score in its cell (default: when there are at most 300 cells per line).
        Numbers share one power of ten, written once in the colour bar's label, so each cell holds
        at most four characters.
    wrap : tokens per line; a long snippet is drawn as several lines of strips, like text
        (default: 24 per line when there are more than 30 tokens and no ``ax`` is given)
    **kwargs : passed to ``ax.imshow``

    Returns
    -------
    matplotlib.figure.Figure

    Example
    -------
    >>> fig = plots.token_map(["this", "is", "not", "good"], per_token, row_labels=["filter 7"])
    """
    s = _array(scores, "scores")
    tokens = [str(t) for t in tokens]
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2:
        raise ConductanceError(f"scores must be (T,) or (rows, T), got shape {s.shape}")
    if s.shape[1] != len(tokens):
        raise ConductanceError(f"scores have {s.shape[1]} columns but there are {len(tokens)} tokens; give one "
                               "score per token")
    if len(tokens) == 0:
        raise ConductanceError("tokens is empty; nothing to draw")
    if row_labels is not None and len(row_labels) != s.shape[0]:
        raise ConductanceError(f"row_labels has {len(row_labels)} names but scores have {s.shape[0]} rows")
    if wrap is not None and (not isinstance(wrap, (int, np.integer)) or isinstance(wrap, bool) or wrap < 1):
        raise ConductanceError(f"wrap is a number of tokens per line (an integer >= 1), got {wrap!r}")
    rows, T = s.shape
    if wrap is None:
        wrap = 24 if T > 30 and ax is None else T
    elif ax is not None and wrap < T:
        raise ConductanceError("wrap splits the tokens over several axes of a new figure; with ax= give "
                               "wrap=None (one strip), or drop ax")
    lines = [(lo, min(T, lo + wrap)) for lo in range(0, T, wrap)]
    per_line = lines[0][1] - lines[0][0]
    longest = max(len(t) for t in tokens)
    m = _limit(s)
    exponent = int(math.floor(math.log10(m)))
    scale = 10.0 ** exponent if not -1 <= exponent <= 1 else 1.0
    # fixed decimals, two significant digits at the largest |value|: 0.12, 1.2, 12 (or 1.2 x 1e-5)
    decimals = 1 if scale != 1.0 else max(0, 1 - exponent)
    if ax is None:
        width = min(24.0, max(4.0, 0.16 * longest * per_line ** 0.5 + 0.5 * per_line + 2))
        fig = _figure((width, len(lines) * (0.5 * rows + 1.2) + 0.4))
        axes = list(np.atleast_1d(fig.subplots(len(lines), 1, squeeze=False).ravel()))
    else:
        fig, ax = _new(ax, (0, 0))
        axes = [ax]
    show_numbers = annotate if annotate is not None else rows * per_line <= 300
    rotate = per_line > 8 or longest > 6
    image = None
    for axis, (lo, hi) in zip(axes, lines):
        image = axis.imshow(s[:, lo:hi], **{"cmap": cmap, "vmin": -m, "vmax": m, "aspect": "auto",
                                            "interpolation": "nearest", **kwargs})
        axis.set_xticks(np.arange(hi - lo))
        axis.set_xticklabels(tokens[lo:hi], rotation=60 if rotate else 0, ha="right" if rotate else "center")
        axis.set_yticks(np.arange(rows))
        axis.set_yticklabels([str(r) for r in row_labels] if row_labels is not None else [""] * rows)
        if show_numbers:
            for r in range(rows):
                for t in range(lo, hi):
                    v = s[r, t] / scale
                    text = f"{v:.{decimals}f}"
                    if text.lstrip("-").strip("0.") == "":
                        text = "0"           # no "-0.0": a value this small reads as zero
                    axis.text(t - lo, r, text, ha="center", va="center", fontsize=7,
                              color="white" if abs(s[r, t]) > 0.6 * m else "black")
    _title(axes[0], title)
    if colorbar:
        bar = fig.colorbar(image, ax=axes, fraction=0.03, pad=0.02)
        if show_numbers and scale != 1.0:
            # the bar's ticks in the cells' unit, so both read the same; the unit is named once
            from matplotlib.ticker import FuncFormatter
            bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / scale:g}"))
            bar.set_label(f"cell numbers x 1e{exponent}")
    return fig


# --------------------------------------------------------------------------------------------
# curves


def _xy(label: str, pair: Any) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ConductanceError(f"curve {label!r} must be a pair (x, y), got {type(pair).__name__}")
    x = _array(pair[0], f"x of {label!r}").reshape(-1)
    y = _array(pair[1], f"y of {label!r}")
    if y.ndim not in (1, 2) or y.shape[-1] != x.size:
        raise ConductanceError(f"curve {label!r}: x has {x.size} points but y has shape {y.shape}; y must be "
                               f"({x.size},) or (repeats, {x.size})")
    return x, y


def curves(series: Mapping[str, Any], xlabel: str = "", ylabel: str = "", *, ax: Any = None,
           title: Optional[str] = None, logx: bool = False, logy: bool = False,
           styles: Optional[Mapping[str, dict]] = None, band: str = "minmax", markers: bool = False,
           **kwargs: Any) -> Any:
    """Line plot of several curves ``{label: (x (n,), y (n,) or (repeats, n))}``.

    A 2-D ``y`` (e.g. one row per random seed) is drawn as its mean with a shaded band (``band``:
    "minmax" or "std"). ``styles[label]`` passes matplotlib keyword arguments to that line;
    ``**kwargs`` go to every ``ax.plot`` (``styles`` win over them).

    Parameters
    ----------
    series : dict str -> (x, y)
        ``x`` (n,), ``y`` (n,) or (repeats, n).
    xlabel, ylabel : str
    logx, logy : bool
        Logarithmic axes.
    styles : dict str -> dict, optional
    band : str
        ``"minmax"`` or ``"std"``.
    markers : bool
        Mark each point.

    Returns
    -------
    matplotlib.figure.Figure

    Example
    -------
    >>> fig = plots.curves({"conductance": (ks, logit), "random": (ks, random_logits)}, "units removed", "logit")
    """
    if not isinstance(series, Mapping) or not series:
        raise ConductanceError("series must be a non-empty dict {label: (x, y)}")
    if band not in ("minmax", "std"):
        raise ConductanceError(f"band must be 'minmax' or 'std', got {band!r}")
    data = {str(label): _xy(str(label), pair) for label, pair in series.items()}
    fig, ax = _new(ax, (5.5, 3.6))
    for label, (x, y) in data.items():
        style = {**kwargs, **dict((styles or {}).get(label, {}))}
        if markers:
            style.setdefault("marker", "o")
            style.setdefault("markersize", 3)
        if y.ndim == 2:
            mean = y.mean(0)
            lo, hi = (y.min(0), y.max(0)) if band == "minmax" else (mean - y.std(0), mean + y.std(0))
            spread = "min-max" if band == "minmax" else "±1 std"
            (line,) = ax.plot(x, mean, label=f"{label} (mean of {y.shape[0]}, band {spread})", **style)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        else:
            ax.plot(x, y, label=label, **style)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _title(ax, title)
    ax.grid(True, alpha=0.3, which="both" if (logx or logy) else "major")
    ax.legend(fontsize=8)
    return fig


def flip_share(flip_counts: Mapping[str, ArrayLike], k: Optional[int] = 10, *, ax: Any = None,
               title: Optional[str] = None, **kwargs: Any) -> Any:
    """Share of examples whose label has changed after removing up to n units, per ranking.

    ``flip_counts[name]``: (examples,) counts from :func:`conductance.flip_count` (``inf``: never
    flipped, so the curve stays below 1). A vertical line marks ``k``. ``**kwargs`` go to ``ax.plot``.

    Parameters
    ----------
    flip_counts : dict str -> array, shape (examples,)
    k : int, optional
        Where to draw the vertical line; None for none.
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not isinstance(flip_counts, Mapping) or not flip_counts:
        raise ConductanceError("flip_counts must be a non-empty dict {ranking name: counts (examples,)}")
    arrays = {}
    for name, counts in flip_counts.items():
        c = (counts.detach().cpu().double().numpy() if hasattr(counts, "detach")
             else np.asarray(counts, dtype=np.float64)).reshape(-1)
        if c.size == 0 or np.isnan(c).any():
            raise ConductanceError(f"flip counts of {name!r} must be a non-empty array of counts or inf")
        arrays[str(name)] = c
    finite = np.concatenate([c[np.isfinite(c)] for c in arrays.values()])
    top = int(finite.max()) if finite.size else 1
    n = np.arange(0, top + 1)
    series = {f"{name} ({int(np.isfinite(c).sum())}/{c.size} flipped)": (n, (c[None, :] <= n[:, None]).mean(1))
              for name, c in arrays.items()}
    fig = curves(series, "units removed (in ranking order)", "share of examples whose label changed", ax=ax,
                 title=title, styles={s: {"drawstyle": "steps-post"} for s in series}, **kwargs)
    ax = ax if ax is not None else fig.axes[0]
    if k is not None:
        ax.axvline(k, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(-0.02, 1.02)
    return fig


def error_vs_steps(errors: Mapping[str, Any], *, ax: Any = None, title: Optional[str] = None,
                   tolerance: Optional[float] = None, xlabel: str = "path points per example",
                   ylabel: str = "relative completeness error", **kwargs: Any) -> Any:
    """Completeness error against the number of path points, log-log, one line per rule.

    ``errors[rule] = (points (n,), errors (n,) or (examples, n))``; per-example errors are drawn
    as their mean with a min-max band. Errors of exactly 0 cannot be shown on a log axis and are
    raised to 1e-16 (the float64 floor). ``tolerance`` draws a horizontal reference line.
    ``**kwargs`` go to ``ax.plot``.

    Parameters
    ----------
    errors : dict str -> (points, errors)
        ``points`` (n,), ``errors`` (n,) or (examples, n).
    tolerance : float, optional
    xlabel, ylabel : str

    Returns
    -------
    matplotlib.figure.Figure

    Example
    -------
    >>> fig = plots.error_vs_steps({"gausslegendre": (points, err_gl), "uniform": (points, err_u)})
    """
    if not isinstance(errors, Mapping) or not errors:
        raise ConductanceError("errors must be a non-empty dict {rule: (points, errors)}")
    series = {}
    for rule, pair in errors.items():
        x, y = _xy(str(rule), pair)
        if (x <= 0).any():
            raise ConductanceError(f"points of {rule!r} must be positive for a log axis, got {x.min():g}")
        if (y < 0).any():
            raise ConductanceError(f"errors of {rule!r} must be >= 0 (pass |delta| / |F(x) - F(x')|)")
        series[str(rule)] = (x, np.maximum(y, 1e-16))
    fig = curves(series, xlabel, ylabel, ax=ax, title=title, logx=True, logy=True, markers=True, **kwargs)
    ax = ax if ax is not None else fig.axes[0]
    points = sorted({float(p) for x, _ in series.values() for p in x})
    if len(points) <= 12:
        # label the point counts that were run, as plain numbers, instead of powers of ten
        from matplotlib.ticker import NullLocator
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(points)
        ax.set_xticklabels([f"{p:g}" for p in points])
    if tolerance is not None:
        ax.axhline(tolerance, color="grey", linestyle="--", linewidth=1, label=f"tolerance {tolerance:g}")
        ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------
# sign heat map


def _leaf_order(rows: np.ndarray) -> np.ndarray:
    """Order of the rows that puts similar rows next to each other."""
    if rows.shape[0] < 3:
        return np.arange(rows.shape[0])
    try:
        from scipy.cluster.hierarchy import leaves_list, linkage
    except ImportError:
        # no scipy: most positive rows first, a stable and meaningful order for sign patterns
        return np.argsort(-rows.mean(1), kind="stable")
    if np.all(rows == rows[0]):
        return np.arange(rows.shape[0])
    # Average linkage on the share of positions where two sign patterns disagree.
    return leaves_list(linkage(rows, method="average", metric="hamming")).astype(int)


def sign_matrix(values: ArrayLike, threshold: float = 0.01, cluster: bool = True
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The signs of ``values`` (|v| < threshold counts as 0), rows and columns reordered.

    Parameters
    ----------
    values : (examples, units)
    threshold : values with ``|v| < threshold`` count as 0
    cluster : reorder rows and columns by hierarchical clustering (scipy; without scipy, by mean
        sign); False keeps the given order

    Returns
    -------
    (matrix (examples, units) of -1/0/+1 as int8, row_order (examples,), col_order (units,)) with
    ``matrix == signs[row_order][:, col_order]``.
    """
    v = _array(values, "values")
    if v.ndim != 2 or v.size == 0:
        raise ConductanceError(f"values must be a non-empty (examples, units) matrix, got shape {v.shape}")
    if not isinstance(threshold, (int, float, np.floating)) or not threshold >= 0:
        raise ConductanceError(f"threshold must be a number >= 0, got {threshold!r}")
    signs = np.where(np.abs(v) < threshold, 0, np.sign(v)).astype(np.int8)
    if cluster:
        row_order = _leaf_order(signs.astype(np.float64))
        col_order = _leaf_order(signs.T.astype(np.float64))
    else:
        row_order, col_order = np.arange(v.shape[0]), np.arange(v.shape[1])
    return signs[row_order][:, col_order], row_order, col_order


def sign_heatmap(values: ArrayLike, threshold: float = 0.01, cluster: bool = True, *, ax: Any = None,
                 title: Optional[str] = None, xlabel: str = "units", ylabel: str = "examples",
                 row_labels: Optional[Sequence[Any]] = None, col_labels: Optional[Sequence[Any]] = None,
                 symbol: str = "v", **kwargs: Any) -> Any:
    """Heat map of the sign of ``values`` (examples, units): red +, blue -, white |v| < threshold.

    Rows and columns are clustered (see :func:`sign_matrix`). The figure carries the drawn matrix
    as ``fig.sign_matrix`` and the orders as ``fig.row_order`` / ``fig.col_order``.
    ``row_labels`` / ``col_labels`` (one per row / column of ``values``) name the ticks, in the
    drawn order; without them the ticks are the original indices when there are at most 40.
    ``symbol`` names the values in the colour bar's legend (``|symbol| < threshold``), so it can
    match the text around the figure (e.g. "c" for conductance). ``**kwargs`` go to ``ax.imshow``.

    Parameters
    ----------
    values : array, shape (examples, units)
    threshold : float
        Magnitudes below it are drawn white.
    cluster : bool
        Reorder rows and columns so that similar sign patterns sit together.
    row_labels, col_labels : sequence, optional
    symbol : str

    Returns
    -------
    matplotlib.figure.Figure

    Example
    -------
    >>> fig = plots.sign_heatmap(conductances, threshold=0.01, title="sign of filter conductance")
    """
    _pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap

    matrix, row_order, col_order = sign_matrix(values, threshold, cluster)
    rows, cols = matrix.shape
    fig, ax = _new(ax, (min(12.0, max(6.0, 0.02 * cols + 4)), min(9.0, max(3.5, 0.01 * rows + 3))))
    cmap = ListedColormap([NEGATIVE, "#ffffff", POSITIVE])
    image = ax.imshow(matrix, **{"cmap": cmap, "norm": BoundaryNorm([-1.5, -0.5, 0.5, 1.5], 3), "aspect": "auto",
                                 "interpolation": "nearest", **kwargs})
    for labels, order, n, axis, what in ((row_labels, row_order, rows, ax.yaxis, "row_labels"),
                                         (col_labels, col_order, cols, ax.xaxis, "col_labels")):
        if labels is not None and len(labels) != n:
            raise ConductanceError(f"{what} has {len(labels)} names but values have {n} "
                                   f"{'rows' if what == 'row_labels' else 'columns'}")
        if labels is not None or n <= 40:
            axis.set_ticks(np.arange(n))
            axis.set_ticklabels([str(labels[i]) if labels is not None else str(int(i)) for i in order])
    if col_labels is not None:
        ax.tick_params(axis="x", labelrotation=60)
    bar = fig.colorbar(image, ax=ax, ticks=[-1, 0, 1], fraction=0.04, pad=0.02)
    bar.ax.set_yticklabels(["−", f"|{symbol}| < {threshold:g}", "+"])
    ax.set_xlabel(xlabel + (" (clustered)" if cluster else ""))
    ax.set_ylabel(ylabel + (" (clustered)" if cluster else ""))
    share = {s: float((matrix == s).mean()) for s in (-1, 0, 1)}
    _title(ax, title if title is not None else
           f"sign of {rows}x{cols} values: {100 * share[1]:.0f}% +, {100 * share[-1]:.0f}% −, "
           f"{100 * share[0]:.0f}% ~0")
    fig.sign_matrix, fig.row_order, fig.col_order = matrix, row_order, col_order
    return fig
