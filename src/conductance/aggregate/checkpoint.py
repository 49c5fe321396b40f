"""Checkpoints of :func:`conductance.aggregate`: fingerprints that must match to resume, and checks of the path."""

from __future__ import annotations

import functools
import hashlib
import json
import numbers
import os
import tempfile
import types
from typing import Any, Optional, SupportsFloat, cast

import numpy as np
import torch
from torch import nn

from ..errors import ConductanceError
from .files import _read_results

#: Settings that do not change the values, so a checkpoint may be resumed with another value.
_NOT_FINGERPRINTED = ("internal_batch_size",)


def checkpoint_info(path: str) -> dict:
    """What a checkpoint of :func:`aggregate` holds.

    Parameters
    ----------
    path : str
        A checkpoint file written by :func:`aggregate` (``checkpoint=path``).

    Returns
    -------
    dict
        ``position`` (batches of the data consumed), ``exhausted`` (the data ran out),
        ``examples``, ``fingerprint``, ``rank`` and ``world_size``.
    """
    results, meta = _read_results(path)
    if "checkpoint" not in meta:
        raise ConductanceError(f"{path} is a saved result, not a checkpoint")
    info = dict(meta["checkpoint"])
    info["examples"] = next(iter(results.values())).n_examples if results else 0
    return info


# ----------------------------------------------------------------------------------------------
# Fingerprints: what must match for a checkpoint to be resumed
# ----------------------------------------------------------------------------------------------

def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _describe(value: Any) -> Any:
    """A JSON-able, stable description of a setting (tensors by shape and content hash)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        h = hashlib.blake2b(digest_size=12)
        _hash_tensor(h, value)
        return f"tensor{tuple(value.shape)}:{h.hexdigest()}"
    if isinstance(value, numbers.Number):
        return float(cast(SupportsFloat, value))  # numpy scalars, Fraction; a complex raises TypeError, as always
    from ..forward_args import Shared
    if isinstance(value, Shared):
        return {"shared": _describe(value.value)}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in value.items()}
    if callable(value):
        name = getattr(value, "__qualname__", type(value).__qualname__)
        h = hashlib.blake2b(digest_size=12)
        _hash_callable(h, value, 0)
        return f"callable:{getattr(value, '__module__', '')}.{name}:{h.hexdigest()}"
    return f"{type(value).__name__}"


def _hash_value(h: Any, value: Any, depth: int) -> None:
    """Feed what a value a callable uses would change in its result into ``h``."""
    if depth > 6:
        h.update(b"<deep>")
    elif isinstance(value, nn.Module):
        h.update(f"module:{type(value).__qualname__}:{_model_hash(value)}".encode())
    elif isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
        _hash_callable(h, value, depth + 1)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}[{len(value)}]".encode())
        for v in value:
            _hash_value(h, v, depth + 1)
    elif isinstance(value, dict):
        h.update(f"dict[{len(value)}]".encode())
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            _hash_value(h, value[k], depth + 1)
    elif isinstance(value, (set, frozenset)):
        h.update(repr(sorted(repr(v) for v in value)).encode())
    elif isinstance(value, np.ndarray):
        h.update(f"ndarray{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, types.ModuleType):
        h.update(f"module {value.__name__}".encode())
    else:
        h.update(json.dumps(_describe(value), sort_keys=True, default=str).encode() if not callable(value)
                 else f"callable {getattr(value, '__module__', '')}."
                      f"{getattr(value, '__qualname__', type(value).__qualname__)}".encode())


def _hash_code(h: Any, code: types.CodeType) -> None:
    # the bytecode, constants and names, not the line numbers: moving a function does not change it
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _hash_code(h, c)
        elif isinstance(c, frozenset):
            h.update(repr(sorted(repr(v) for v in c)).encode())
        else:
            h.update(repr(c).encode())


def _hash_callable(h: Any, fn: Any, depth: int) -> None:
    """What a callable computes: its code, defaults, the values it closes over and the plain
    global values it names (numbers, strings, tensors); for other callables their type and state."""
    if isinstance(fn, functools.partial):
        h.update(b"partial")
        _hash_callable(h, fn.func, depth + 1)
        _hash_value(h, fn.args, depth + 1)
        _hash_value(h, fn.keywords, depth + 1)
    elif isinstance(fn, types.MethodType):
        h.update(b"method")
        _hash_callable(h, fn.__func__, depth + 1)
        _hash_value(h, fn.__self__, depth + 1) if isinstance(fn.__self__, nn.Module) else \
            h.update(type(fn.__self__).__qualname__.encode())
    elif isinstance(fn, types.FunctionType):
        _hash_code(h, fn.__code__)
        _hash_value(h, fn.__defaults__ or (), depth + 1)
        _hash_value(h, fn.__kwdefaults__ or {}, depth + 1)
        for cell in fn.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:          # a cell not filled yet
                contents = None
            if contents is fn:
                continue
            _hash_value(h, contents, depth + 1)
        g = fn.__globals__
        for name in fn.__code__.co_names:
            v = g.get(name)
            if isinstance(v, (bool, int, float, str, complex, torch.Tensor)) or \
                    (isinstance(v, (list, tuple, dict)) and depth < 3):
                h.update(name.encode())
                _hash_value(h, v, depth + 1)
    elif isinstance(fn, nn.Module):
        h.update(f"module:{type(fn).__qualname__}:{_model_hash(fn)}".encode())
    else:
        h.update(f"object:{type(fn).__module__}.{type(fn).__qualname__}".encode())
        call = getattr(type(fn), "__call__", None)  # noqa: B004 (the method itself is hashed, not a callable test)
        if isinstance(call, types.FunctionType):
            _hash_code(h, call.__code__)
        state = getattr(fn, "__dict__", None)
        if isinstance(state, dict):
            _hash_value(h, {k: v for k, v in state.items() if not k.startswith("__")}, depth + 1)


def _model_hash(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=12)
    for name, t in model.state_dict().items():
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            _hash_tensor(h, t)
    return h.hexdigest()


def _batch_hash(inputs: torch.Tensor, labels: Optional[torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=12)
    _hash_tensor(h, inputs)
    if labels is not None:
        _hash_tensor(h, labels)
    return h.hexdigest()


def _length(obj: Any) -> Optional[int]:
    try:
        return int(len(obj))
    except Exception:
        return None


_FINGERPRINT_NAMES = {"model": "model (class and weights)", "layers": "layers", "measures": "measure",
                      "units": "units", "by": "by", "target": "target", "near_zero": "near_zero",
                      "settings": "layer_importance settings", "world_size": "world size (processes)",
                      "rank": "rank", "data_batches": "number of batches in the data",
                      "data_examples": "number of examples in the data (len(data.dataset))",
                      "first_batch": "content of the first batch (data order or data changed)",
                      "sharding": "sharding of the data between processes"}


def _mismatch(saved: dict, now: dict) -> list[str]:
    out = []
    for key in _FINGERPRINT_NAMES:
        if key in ("data_batches", "data_examples") and (saved.get(key) is None or now.get(key) is None):
            continue                   # a length that one of the two runs could not know
        if key in saved and key in now and saved[key] != now[key]:
            out.append(f"{_FINGERPRINT_NAMES[key]}: {saved[key]!r} in the checkpoint, {now[key]!r} now")
    return out


def _check_writable(path: str) -> Optional[str]:
    """Why ``path`` cannot be written (its folder is missing and cannot be made, is a file, or is
    read-only), or None; found before any batch is computed."""
    if os.path.isdir(path):
        return f"checkpoint {path!r} is a folder; give a file path ending in .npz or .safetensors"
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return (f"checkpoint {path!r} cannot be written: {existing!r} is a file, not a folder; give a path in a "
                "writable folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".conductance-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return (f"checkpoint {path!r} cannot be written: the folder {existing!r} is not writable "
                f"({type(exc).__name__}: {exc}); give a path in a writable folder")
    return None


def _other_world(base: str, path: str, world: int) -> Optional[str]:
    """A checkpoint written by a different number of processes than this run has, described, or None."""
    import glob

    if os.path.exists(path):
        return None
    if world == 1:
        found = sorted(p for p in glob.glob(glob.escape(base) + ".rank*") if p[len(base) + 5:].isdigit())
    else:
        found = [base] if os.path.exists(base) else []
    if not found:
        return None
    try:
        written = checkpoint_info(found[0]).get("world_size")
    except (ConductanceError, OSError) as exc:
        written = f"an unknown number of ({exc})"
    return (f"checkpoint {base!r} was written by {written} process(es) (found {found[:4]}), and this run has "
            f"{world}: resume with {written} processes (torchrun --nproc-per-node {written}), or give another "
            "checkpoint path (the files were left unchanged)")
