"""Fused CPU kernels for the interval sums of channel units (optional: numba).

Most of the adaptive rule's bookkeeping is one sum, repeated about twice per new point and layer:
each channel's ``sum over positions of (g0 + g1) * (y1 - y0) / 2``. Written as torch operations it
is four passes over full-size tensors (add, subtract, multiply, sum) and three temporaries; on one
CPU thread a single fused loop that reads the four inputs once is about twice as fast (GoogLeNet
block sizes, docs/accuracy.md). numba compiles that loop when it is installed (the ``fast`` extra);
without it, or wherever the kernel does not apply, :func:`channel_trapezoid` returns None and the
engine uses its torch operations, which give the same sums (float rounding).

The kernel is serial. torch's own operations use every intra-op thread, so beyond
:data:`MAX_THREADS` (one) the kernel stands aside: ``benchmarks/bench_kernels.py`` measured it
1.1-2.4x faster than torch's operations for the trapezoid sums on one thread, but 0.84-1.35x of
their speed on two, and the left and right sums 0.68-1.08x on two (docs/accuracy.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch

from .errors import warn

#: The kernels are used while torch runs on at most this many intra-op threads.
MAX_THREADS = 1

# reassociation (vector lanes in the reductions) and fused multiply-add, but never the flags that let
# the compiler assume finite values: a NaN or Inf must reach the sums, where the engine looks for it
_FAST_MATH = {"reassoc", "contract", "nsz"}

_CHANNEL_LAST_AXES = {3: (0, 2, 1), 4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_lock = threading.Lock()
_compiled: Optional[dict[str, Callable[..., None]]] = None
_unavailable = False


def _channels_first(y0: np.ndarray, g0: np.ndarray, y1: np.ndarray, g1: np.ndarray, out: np.ndarray) -> None:
    # (m, C, S) arrays, positions innermost: one dot product per channel
    m_count, c_count, s_count = y0.shape
    for m in range(m_count):
        for c in range(c_count):
            acc = 0.0
            for s in range(s_count):
                acc += (g0[m, c, s] + g1[m, c, s]) * (y1[m, c, s] - y0[m, c, s])
            out[m, c] = 0.5 * acc


def _channels_last(y0: np.ndarray, g0: np.ndarray, y1: np.ndarray, g1: np.ndarray, out: np.ndarray) -> None:
    # (m, S, C) arrays, channels innermost: a float64 row of channel sums, added position by position
    m_count, s_count, c_count = y0.shape
    acc = np.zeros(c_count)
    for m in range(m_count):
        acc[:] = 0.0
        for s in range(s_count):
            for c in range(c_count):
                acc[c] += (g0[m, s, c] + g1[m, s, c]) * (y1[m, s, c] - y0[m, s, c])
        for c in range(c_count):
            out[m, c] = 0.5 * acc[c]


def _kernels() -> Optional[dict[str, Callable[..., None]]]:
    """The compiled kernels, compiled on first use; None when numba is not installed or fails."""
    global _compiled, _unavailable
    if _compiled is not None or _unavailable:
        return _compiled
    with _lock:
        if _compiled is not None or _unavailable:
            return _compiled
        try:
            import numba
        except ImportError:
            _unavailable = True
            return None
        compiled: dict[str, Callable[..., None]] = {}
        for name, fn in (("first", _channels_first), ("last", _channels_last)):
            # compiled now for both dtypes (C-contiguous 3-d inputs, a 2-d output), so that a
            # failure shows here, once, and not in the middle of a run; sums in float64, stored in the inputs' dtype
            signatures = [f"void({t}[:, :, ::1], {t}[:, :, ::1], {t}[:, :, ::1], {t}[:, :, ::1], {t}[:, ::1])"
                          for t in ("float32", "float64")]
            try:
                try:
                    # cached on disk next to this module (or in numba's user cache): later processes load it
                    compiled[name] = numba.njit(signatures, fastmath=_FAST_MATH, nogil=True, cache=True)(fn)
                except Exception:   # no cache location numba can use: compile for this process only
                    compiled[name] = numba.njit(signatures, fastmath=_FAST_MATH, nogil=True)(fn)
            except Exception as err:
                _unavailable = True
                warn(f"numba could not compile the fused interval-sum kernel ({type(err).__name__}: {err}); "
                     "using torch operations (same values, slower bookkeeping). Reinstall numba, or uninstall "
                     "it to silence this.")
                return None
        _compiled = compiled
        return _compiled


def available() -> bool:
    """Whether the fused kernel can run here (numba importable).

    Returns
    -------
    bool
    """
    return _kernels() is not None


def _layout(t: torch.Tensor) -> Optional[tuple[str, np.ndarray]]:
    """``t`` (m, C, ...) as a (m, C, S) or (m, S, C) array sharing its memory, or None."""
    # numpy's views cost about a microsecond each, torch's several: this runs per interval and layer
    a = (t.detach() if t.requires_grad else t).numpy()
    m, c = a.shape[0], a.shape[1]
    if a.flags.c_contiguous:
        return "first", a.reshape(m, c, -1)
    moved = a.transpose(_CHANNEL_LAST_AXES.get(a.ndim) or (0, *range(2, a.ndim), 1))
    if moved.flags.c_contiguous:
        return "last", moved.reshape(m, -1, c)
    return None


def _prepare(y0: torch.Tensor, g0: torch.Tensor, y1: torch.Tensor, g1: torch.Tensor
             ) -> Optional[tuple[Callable[..., None], list[np.ndarray]]]:
    """The kernel for the four tensors' layout and the arrays to give it, or None (see
    :func:`channel_trapezoid` for when)."""
    if (y0.dim() < 3 or y0.device.type != "cpu" or y0.dtype not in (torch.float32, torch.float64)
            or torch.get_num_threads() > MAX_THREADS):
        return None
    shape, dtype = y0.shape, y0.dtype
    for t in (g0, y1, g1):
        if t.shape != shape or t.dtype != dtype or t.device.type != "cpu":
            return None
    kernels = _kernels()
    if kernels is None:
        return None
    try:
        views = [_layout(t) for t in (y0, g0, y1, g1)]
    except RuntimeError:   # a tensor numpy cannot share (a lazy negation or conjugation bit)
        return None
    if any(v is None for v in views):
        return None
    kinds = {v[0] for v in views if v is not None}
    if len(kinds) != 1:
        return None
    return kernels[kinds.pop()], [v[1] for v in views if v is not None]


def _run(kernel: Callable[..., None], arrays: list[np.ndarray], like: torch.Tensor) -> Optional[torch.Tensor]:
    """``kernel`` on ``(y0, g0, y1, g1)`` arrays: the (m, C) trapezoid sums, or None if numba failed."""
    out = np.empty((like.shape[0], like.shape[1]), dtype=_NUMPY_DTYPES[like.dtype])
    try:
        kernel(*arrays, out)
    except Exception as err:   # a numba failure at run time: fall back, never a wrong result
        _disable(err)
        return None
    return torch.from_numpy(out)


def channel_trapezoid(y0: torch.Tensor, g0: torch.Tensor, y1: torch.Tensor, g1: torch.Tensor
                      ) -> Optional[torch.Tensor]:
    """Each channel's trapezoid sum over ``m`` intervals, ``sum((g0 + g1) / 2 * (y1 - y0))`` over the
    positions after the channel dimension, in one pass over the inputs; None where the kernel does
    not apply (numba not installed, not on the CPU, not float32/float64, more than
    :data:`MAX_THREADS` torch threads, or the four tensors do not share a dense channels-first or
    channels-last layout).

    Parameters
    ----------
    y0, g0, y1, g1 : Tensor, shape (m, C, *positions)
        Layer values and gradients at the intervals' ends.

    Returns
    -------
    Tensor, shape (m, C), in the inputs' dtype, or None
        Accumulated in float64 before the cast.
    """
    prepared = _prepare(y0, g0, y1, g1)
    return None if prepared is None else _run(prepared[0], prepared[1], y0)


def channel_left_right(y0: torch.Tensor, g0: torch.Tensor, y1: torch.Tensor, g1: torch.Tensor
                       ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Each channel's left and right sums over ``m`` intervals, ``sum(g0 * (y1 - y0))`` and
    ``sum(g1 * (y1 - y0))`` over the positions after the channel dimension (Captum's rule and its
    comparison), one pass over three of the inputs each; None where :func:`channel_trapezoid` is None.

    Parameters
    ----------
    y0, g0, y1, g1 : Tensor, shape (m, C, *positions)
        Layer values and gradients at the intervals' ends.

    Returns
    -------
    (Tensor, Tensor), each shape (m, C), in the inputs' dtype, or None
        Accumulated in float64 before the cast.
    """
    prepared = _prepare(y0, g0, y1, g1)
    if prepared is None:
        return None
    kernel, (a0, b0, a1, b1) = prepared
    # the trapezoid kernel with one end's gradient given for both ends: (g + g) / 2 is g exactly, and
    # the other end's gradient is never read (a NaN there stays out of this side's sums)
    left = _run(kernel, [a0, b0, a1, b0], y0)
    right = _run(kernel, [a0, b1, a1, b1], y0) if left is not None else None
    return None if left is None or right is None else (left, right)


def _disable(err: BaseException) -> None:
    global _compiled, _unavailable
    with _lock:
        _compiled, _unavailable = None, True
    warn(f"the fused interval-sum kernel failed ({type(err).__name__}: {err}); using torch operations "
         "from now on (same values, slower bookkeeping). Reinstall numba, or uninstall it to silence this.")


__all__ = ["MAX_THREADS", "available", "channel_left_right", "channel_trapezoid"]
