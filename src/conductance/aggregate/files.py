"""The aggregate file layout over :mod:`conductance.io`: npz (or safetensors) + JSON metadata, written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from .. import io as _io
from ..errors import ConductanceError
from .result import _GROUP_STATS, _UNIT_STATS, FORMAT, AggregateResult

# ----------------------------------------------------------------------------------------------
# Files: npz (or safetensors) + JSON metadata, written atomically
# ----------------------------------------------------------------------------------------------

def _write_results(path: str, results: Sequence[AggregateResult], extra: dict) -> None:
    arrays: dict[str, np.ndarray] = {}
    for i, r in enumerate(results):
        arrays.update({f"{i}.{k}": np.ascontiguousarray(v) for k, v in r._arrays().items()})
    _io.write(path, {"format": FORMAT, "results": [r._meta() for r in results], **extra}, arrays)


def _unreadable(path: str, why: Any) -> ConductanceError:
    return _io._unreadable(path, "aggregate", why)


def _read_results(path: str) -> tuple[dict[str, AggregateResult], dict]:
    meta, arrays = _io.read(path, "aggregate")
    if isinstance(meta, dict) and meta.get("format") == "conductance.aggregate/1":
        raise ConductanceError(f"{path} was written by an older version of conductance (format "
                               f"'conductance.aggregate/1', a sum of squares and no checksum); this version reads "
                               f"{FORMAT!r}. Recompute it (move the file away first); it was left as it is")
    meta = _io.verify(path, meta, arrays, (FORMAT,), "aggregate")
    results = {}
    try:
        for i, m in enumerate(meta["results"]):
            get = lambda k: arrays[f"{i}.{k}"]  # noqa: E731, B023 (called in this iteration)
            stats = {layer: {s: get(f"{j}.{s}") for s in _UNIT_STATS} for j, layer in enumerate(m["layers"])}
            errors = {layer: {s: get(f"{j}.{s}") for s in _GROUP_STATS} for j, layer in enumerate(m["layers"])}
            r = AggregateResult(counts=get("counts"), output_diff_sum=get("output_diff_sum"),
                                points_sum=get("points_sum"), stats=stats, errors=errors,
                                **{k: m[k] for k in ("measure", "layers", "unit_shapes", "units", "grouping",
                                                     "target", "near_zero", "error_threshold", "settings",
                                                     "model", "is_cut", "n_batches", "class_names")})
            G = r.n_groups
            for layer in r.layers:
                U = int(np.prod(r.unit_shapes[layer], dtype=np.int64))
                for s, v in r.stats[layer].items():
                    if v.shape != (G, U):
                        raise ValueError(f"array {layer}/{s} has shape {v.shape}, expected {(G, U)}")
                for s, v in r.errors[layer].items():
                    if v.shape != (G,):
                        raise ValueError(f"array {layer}/{s} has shape {v.shape}, expected {(G,)}")
            results[r.measure] = r
    except (KeyError, TypeError, ValueError) as exc:
        raise _unreadable(path, f"inconsistent content: {type(exc).__name__}: {exc}") from None
    return results, meta


def write_results(path: str, results: Sequence[AggregateResult], extra: Optional[dict] = None) -> None:
    """Write several results (one per measure) to one file, atomically, as :meth:`AggregateResult.save`
    does for one.

    Parameters
    ----------
    path : str
        The file (safetensors arrays and JSON metadata with a checksum).
    results : sequence of AggregateResult
        One per measure.
    extra : dict, optional
        Top-level JSON metadata (a checkpoint's position, for instance).
    """
    _write_results(path, results, dict(extra or {}))


def read_results(path: str) -> tuple[dict[str, AggregateResult], dict]:
    """Read a file written by :func:`write_results`, :meth:`AggregateResult.save` or a checkpoint.

    Parameters
    ----------
    path : str

    Returns
    -------
    results : dict str -> AggregateResult
        By measure name.
    meta : dict
        The file's JSON metadata (checksum verified).
    """
    return _read_results(path)
