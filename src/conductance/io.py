"""Result files: arrays plus JSON metadata, a content checksum, atomic writes; and ``load``.

Every result type writes one file: ``.safetensors`` (needs the safetensors package) when the path
ends so, else an ``.npz`` archive read with ``allow_pickle=False``. Neither format can run code
when read. The JSON metadata holds a ``"format"`` field naming the type and its version (for
example ``"conductance.layer_result/1"``) and a sha256 checksum of the metadata and of every
array, checked before anything is built from the file. Files are written through a temporary
file in the same folder and renamed over the target, with the usual permissions (umask).

:func:`encode` / :func:`decode` turn a nested value (dicts, lists, tuples, numbers, strings,
tensors, numpy arrays, nested results) into JSON plus named arrays and back, keeping dtypes,
dict key types and tuple-versus-list, so that a loaded result equals the saved one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import torch

from .errors import ConductanceError

#: Key of the content checksum in a file's JSON metadata (sha256 of the metadata and every array).
CHECKSUM = "sha256"
#: Key of the JSON metadata inside a safetensors file.
META_KEY = "conductance"

__all__ = ["atomic_write", "checksum", "write", "read", "verify", "encode", "decode", "save", "load",
           "file_format", "CHECKSUM"]


# ----------------------------------------------------------------------------------------------
# bytes on disk
# ----------------------------------------------------------------------------------------------

def atomic_write(path: str, write_to: Callable[[str], None]) -> None:
    """Call ``write_to(tmp)`` on a temporary file in ``path``'s folder, fsync it, then rename it over ``path``.

    A reader never sees a half-written file; on error the temporary file is removed and ``path``
    is left as it was. The file gets the permissions the umask allows (not mkstemp's 0600).

    Parameters
    ----------
    path : str
        The file to write; its folder is created when missing.
    write_to : callable str -> None
        Writes the whole content to the path it is given.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write_to(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def checksum(meta_json: str, arrays: dict[str, np.ndarray]) -> str:
    """sha256 (hex) of ``meta_json`` and of every array's name, dtype, shape and bytes, in name order.

    Parameters
    ----------
    meta_json : str
        The metadata, serialised with sorted keys.
    arrays : dict str -> ndarray
        Any shapes and dtypes.

    Returns
    -------
    str
        64 hex digits.
    """
    h = hashlib.sha256(meta_json.encode())
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"\0{k}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write(path: str, content: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` and the JSON-able ``content`` (which should hold a ``"format"``) to ``path``.

    Parameters
    ----------
    path : str
        ``*.safetensors`` (needs the safetensors package) or any other name for an npz archive.
    content : dict
        JSON-able metadata; the checksum is added under :data:`CHECKSUM`.
    arrays : dict str -> ndarray
        Any shapes; numeric or bool dtypes.
    """
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    content = dict(content)
    content[CHECKSUM] = checksum(json.dumps(content, sort_keys=True), arrays)
    meta = json.dumps(content, sort_keys=True)
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.numpy import save_file
        except ImportError as exc:
            raise ModuleNotFoundError(f"writing {path} needs the safetensors package (pip install safetensors); "
                                      "or use a .npz path") from exc
        atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata={META_KEY: meta}))
    else:
        def to_npz(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, __meta__=np.frombuffer(meta.encode(), dtype=np.uint8), **arrays)  # type: ignore[arg-type]
        atomic_write(path, to_npz)


def _unreadable(path: str, kind: str, why: Any) -> ConductanceError:
    return ConductanceError(f"{path} is not a readable conductance {kind} file ({why}); it may be truncated "
                            "or corrupted. It was left as it is: move or delete it to start over")


def read(path: str, kind: str = "result") -> tuple[Any, dict[str, np.ndarray]]:
    """The JSON metadata and the arrays of a file written by :func:`write`, *not yet checked*.

    Call :func:`verify` on them before use. ``kind`` names the expected content in error
    messages. Raises FileNotFoundError, or ConductanceError for a file that is not one of ours.

    Parameters
    ----------
    path : str
    kind : str
        What the file should hold, for the messages (``"result"``, ``"aggregate"``).

    Returns
    -------
    meta : Any
        The decoded JSON metadata (a dict for our files).
    arrays : dict str -> ndarray
        Writable copies of every stored array.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK"):
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            if "__meta__" not in arrays:
                raise KeyError("no conductance metadata in the archive")
            meta = json.loads(arrays.pop("__meta__").tobytes().decode())
        else:
            try:
                from safetensors import safe_open
            except ImportError:
                raise _unreadable(path, kind, "not an npz file, and the safetensors package is not installed "
                                              "to try it as safetensors") from None
            with safe_open(path, framework="np") as f:
                meta = json.loads((f.metadata() or {})[META_KEY])
                arrays = {k: np.array(f.get_tensor(k)) for k in f.keys()}   # writable copies  # noqa: SIM118
    except ConductanceError:
        raise
    except Exception as exc:     # zipfile.BadZipFile (including bad CRCs), ValueError, KeyError, EOFError, ...
        raise _unreadable(path, kind, f"{type(exc).__name__}: {exc}") from None
    return meta, arrays


def verify(path: str, meta: Any, arrays: dict[str, np.ndarray], formats: tuple[str, ...], kind: str = "result"
           ) -> dict:
    """Check the format and the checksum of what :func:`read` returned; the metadata without the checksum.

    Parameters
    ----------
    path : str
        For the messages.
    meta, arrays
        What :func:`read` returned.
    formats : tuple of str
        The ``"format"`` values accepted.
    kind : str
        What the file should hold, for the messages.

    Returns
    -------
    dict
        The metadata without its checksum entry.

    Raises
    ------
    ConductanceError
        A format not in ``formats``, a missing checksum, or content that does not match it.
    """
    if not isinstance(meta, dict) or meta.get("format") not in formats:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise _unreadable(path, kind, f"format {got!r}, expected " + " or ".join(repr(f) for f in formats))
    meta = dict(meta)
    stored = meta.pop(CHECKSUM, None)
    if stored != checksum(json.dumps(meta, sort_keys=True), arrays):
        raise _unreadable(path, kind, "its content does not match the checksum stored in it" if stored else
                          "no checksum in its metadata")
    return meta


def file_format(path: str) -> Optional[str]:
    """The ``"format"`` field of a conductance file (unchecked), or None if it has none.

    Parameters
    ----------
    path : str

    Returns
    -------
    str or None
    """
    meta, _ = read(path)
    return meta.get("format") if isinstance(meta, dict) else None


# ----------------------------------------------------------------------------------------------
# nested values <-> JSON + arrays
# ----------------------------------------------------------------------------------------------

# Every JSON object in an encoded tree is one of these tagged forms, so user strings never clash.
_TENSOR, _ARRAY, _TUPLE, _DICT, _RESULT, _FLOAT = "tensor", "array", "tuple", "dict", "result", "float"


def encode(value: Any, arrays: dict[str, np.ndarray], fallback: Optional[Callable[[Any], Any]] = None,
           where: str = "value", _seen: Optional[dict[int, tuple[Any, str]]] = None) -> Any:
    """``value`` as JSON-able data; its tensors and arrays go into ``arrays`` (named ``a0``, ``a1``, ...).

    Handles None, bool, int, float (NaN and infinities too), str, lists, tuples, dicts (any
    hashable encodable keys), ``torch.Tensor`` (dtype kept; bfloat16 / float16 through float32,
    exactly), numpy arrays and scalars, and result objects (:class:`conductance.result.ResultProtocol`).
    Anything else raises a ConductanceError naming ``where``, unless ``fallback`` maps it to an
    encodable value. A tensor met twice (a TransformerResult holds its values and its engine
    result's, the same objects) is stored once.

    Parameters
    ----------
    value : Any
        What to store.
    arrays : dict str -> ndarray
        Filled in place with the tensors and arrays met.
    fallback : callable, optional
        Maps an otherwise unsupported object to an encodable value.
    where : str
        Name of ``value`` in error messages.

    Returns
    -------
    Any
        JSON-able data (strict JSON: non-finite floats are tagged) that :func:`decode` reads.
    """
    from .result import ResultProtocol

    seen: dict[int, tuple[Any, str]] = {} if _seen is None else _seen

    def sub(v: Any, w: str) -> Any:
        return encode(v, arrays, fallback, w, seen)

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        # json writes NaN / Infinity, which strict readers refuse; a tag keeps the file portable
        return value if np.isfinite(value) else {_FLOAT: repr(value)}
    if isinstance(value, torch.Tensor):
        if id(value) in seen and seen[id(value)][0] is value:
            key = seen[id(value)][1]
        else:
            t = value.detach().cpu()
            stored = t.float() if t.dtype in (torch.bfloat16, torch.float16) else t
            key = f"a{len(arrays)}"
            arrays[key] = np.ascontiguousarray(stored.numpy())
            seen[id(value)] = (value, key)      # holding the tensor keeps its id unique while encoding
        return {_TENSOR: key, "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc":
            raise ConductanceError(f"cannot save {where}: a numpy array of dtype {value.dtype} (only numbers "
                                   "and booleans are stored)")
        key = f"a{len(arrays)}"
        arrays[key] = np.ascontiguousarray(value)
        return {_ARRAY: key}
    if isinstance(value, np.generic):
        return sub(value.item(), where)
    if isinstance(value, tuple):
        return {_TUPLE: [sub(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [sub(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {_DICT: [[sub(k, f"a key of {where}"), sub(v, f"{where}[{k!r}]")] for k, v in value.items()]}
    if isinstance(value, ResultProtocol):
        return {_RESULT: value.FORMAT, "fields": sub(value._fields(), where)}
    if fallback is not None:
        return encode(fallback(value), arrays, None, where, seen)
    raise ConductanceError(f"cannot save {where}: a {type(value).__name__} is not a number, string, list, dict, "
                           "tensor or array")


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def decode(data: Any, arrays: dict[str, np.ndarray], _made: Optional[dict[str, torch.Tensor]] = None) -> Any:
    """Inverse of :func:`encode`: tensors come back on the CPU with their saved dtype (a tensor stored
    once for several places is one tensor again).

    Parameters
    ----------
    data : Any
        What :func:`encode` returned (after a JSON round trip).
    arrays : dict str -> ndarray
        The arrays :func:`encode` filled.

    Returns
    -------
    Any
        The original value: tuples, dict key types, tensor dtypes and results as they were.
    """
    made: dict[str, torch.Tensor] = {} if _made is None else _made
    if isinstance(data, list):
        return [decode(v, arrays, made) for v in data]
    if not isinstance(data, dict):
        return data
    if _TENSOR in data:
        key, dtype = data[_TENSOR], getattr(torch, data["dtype"])
        if key not in made or made[key].dtype != dtype:
            made[key] = torch.from_numpy(np.array(arrays[key])).to(dtype)
        return made[key]
    if _ARRAY in data:
        return np.array(arrays[data[_ARRAY]])
    if _FLOAT in data:
        return float(data[_FLOAT])
    if _TUPLE in data:
        return tuple(decode(v, arrays, made) for v in data[_TUPLE])
    if _DICT in data:
        return {_hashable(decode(k, arrays, made)): decode(v, arrays, made) for k, v in data[_DICT]}
    if _RESULT in data:
        return _registry()[data[_RESULT]]._from_fields(decode(data["fields"], arrays, made))
    raise ValueError(f"unknown tagged value with keys {sorted(data)}")


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------

def _registry() -> dict[str, Any]:
    """Format name -> result class, for every result type (imported here, when a file is read)."""
    from .ablation import AblationCurve, AblationSummary
    from .hf import TransformerResult
    from .result import LayerResult
    from .selection import FeatureSelectionResult

    return {cls.FORMAT: cls for cls in (LayerResult, TransformerResult, AblationCurve, AblationSummary,
                                        FeatureSelectionResult)}


def save(path: str, result: Any) -> None:
    """Write ``result`` (any result type) to ``path``; :func:`load` reads it back as an equal object.

    Parameters
    ----------
    path : str
        ``*.safetensors``, or any other name for an npz archive.
    result : LayerResult, TransformerResult, AggregateResult, AblationCurve, AblationSummary or FeatureSelectionResult
    """
    from .aggregate import AggregateResult

    if isinstance(result, AggregateResult):
        result.save(path)
        return
    arrays: dict[str, np.ndarray] = {}
    fields = encode(result._fields(), arrays, result._fallback(), type(result).__name__)
    write(path, {"format": result.FORMAT, "type": type(result).__name__, "fields": fields}, arrays)


def load(path: str, measure: Optional[str] = None) -> Any:
    """Read any result file written by ``result.save(path)`` (or by ``conductance aggregate``).

    Parameters
    ----------
    path : str
    measure : str, optional
        For an aggregate file holding several measures, which one to return.

    Returns
    -------
    The saved object: LayerResult, TransformerResult, AggregateResult, AblationCurve,
    AblationSummary or FeatureSelectionResult, equal (``==``) to the one saved; tensors on the CPU.

    Raises
    ------
    ConductanceError
        A damaged file (checksum mismatch, truncation), a file of another program, or a format
        this version does not read.
    """
    from .aggregate import FORMAT as AGGREGATE_FORMAT
    from .aggregate import AggregateResult

    meta, arrays = read(path)
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if isinstance(fmt, str) and fmt.startswith("conductance.aggregate/"):
        return AggregateResult.load(path, measure=measure)
    registry = _registry()
    known = tuple(registry) + (AGGREGATE_FORMAT,)
    if isinstance(fmt, str) and fmt.startswith("conductance.") and fmt not in registry:
        raise ConductanceError(f"{path} has format {fmt!r}, which this version of conductance does not read "
                               f"(it reads {', '.join(known)}); it was written by another version")
    meta = verify(path, meta, arrays, tuple(registry))
    if measure is not None:
        raise ConductanceError(f"measure= selects a measure of an aggregate file; {path} holds a "
                               f"{meta.get('type')}")
    try:
        return registry[meta["format"]]._from_fields(decode(meta["fields"], arrays))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _unreadable(path, "result", f"inconsistent content: {type(exc).__name__}: {exc}") from None
