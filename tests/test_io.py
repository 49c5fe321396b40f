"""conductance.io as a module, for what tests/test_result.py (save/load of every result type) leaves out:
the atomic write when writing fails, the checksum of the low-level files, and encode/decode of values."""

import json
import os

import numpy as np
import pytest
import torch

from conductance import io
from conductance.errors import ConductanceError


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = str(tmp_path / "r.npz")
    with open(path, "wb") as f:
        f.write(b"old content")

    def fails(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(path, fails)
    assert os.listdir(tmp_path) == ["r.npz"]
    with open(path, "rb") as f:
        assert f.read() == b"old content"


def test_a_successful_write_replaces_the_file_with_umask_permissions(tmp_path):
    path = str(tmp_path / "sub" / "r.bin")          # the folder is made on the way
    io.atomic_write(path, lambda tmp: open(tmp, "wb").close())
    assert os.listdir(tmp_path / "sub") == ["r.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_write_read_verify_round_trip_and_tampering(tmp_path, suffix):
    path = str(tmp_path / f"f{suffix}")
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "m": np.array([True, False])}
    io.write(path, {"format": "test/1", "note": "x"}, arrays)
    meta, got = io.read(path)
    assert io.verify(path, meta, got, ("test/1",)) == {"format": "test/1", "note": "x"}
    np.testing.assert_array_equal(got["w"], arrays["w"])
    assert io.file_format(path) == "test/1"
    with pytest.raises(ConductanceError, match="format 'test/1', expected 'other/1'"):
        io.verify(path, meta, got, ("other/1",))
    changed = dict(got, w=got["w"] + 1)
    with pytest.raises(ConductanceError, match="does not match the checksum"):
        io.verify(path, meta, changed, ("test/1",))
    edited = dict(meta, note="y")                   # metadata is covered too, not only the arrays
    with pytest.raises(ConductanceError, match="does not match the checksum"):
        io.verify(path, edited, got, ("test/1",))
    unsigned = {k: v for k, v in meta.items() if k != io.CHECKSUM}
    with pytest.raises(ConductanceError, match="no checksum in its metadata"):
        io.verify(path, unsigned, got, ("test/1",))


def test_checksum_sees_dtype_shape_and_names_not_only_bytes():
    a = np.zeros(4, dtype=np.float32)
    base = io.checksum("{}", {"a": a})
    assert io.checksum("{}", {"a": a.view(np.int32)}) != base          # same bytes, other dtype
    assert io.checksum("{}", {"a": a.reshape(2, 2)}) != base           # same bytes, other shape
    assert io.checksum("{}", {"b": a}) != base
    assert io.checksum("{}", {"a": a.copy()}) == base


def test_foreign_bytes_are_refused_with_the_path(tmp_path):
    path = str(tmp_path / "notes.txt")
    with open(path, "w") as f:
        f.write("just text")
    with pytest.raises(ConductanceError, match="notes.txt is not a readable conductance result file"):
        io.read(path)
    with pytest.raises(FileNotFoundError):
        io.read(str(tmp_path / "absent.npz"))


def test_encode_decode_keeps_types_dtypes_and_key_types():
    t = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    value = {"t": t, 3: (1, "a", None), (1, 2): [True, float("nan"), float("inf")],
             "arr": np.array([[1, 2]], dtype=np.int16), "i": torch.arange(3), "again": t, "np": np.float32(0.5)}
    arrays: dict = {}
    data = io.encode(value, arrays)
    json.dumps(data, allow_nan=False)                # strict JSON: NaN and Inf are tagged
    assert len(arrays) == 3                          # the tensor met twice is stored once
    back = io.decode(data, arrays)
    assert back["t"].dtype == torch.bfloat16 and torch.equal(back["t"], t)
    assert back["again"] is back["t"]
    assert back[3] == (1, "a", None)
    flags = back[(1, 2)]
    assert flags[0] is True and np.isnan(flags[1]) and flags[2] == float("inf")
    assert back["arr"].dtype == np.int16 and back["arr"].tolist() == [[1, 2]]
    assert back["i"].dtype == torch.int64 and back["np"] == 0.5


def test_encode_refuses_what_it_cannot_store_and_names_where():
    with pytest.raises(ConductanceError, match=r"cannot save cfg\['f'\]: a function"):
        io.encode({"f": lambda: 0}, {}, where="cfg")
    with pytest.raises(ConductanceError, match="dtype <U1"):
        io.encode(np.array(["a"]), {})
    assert io.encode({1, 2}, {}, fallback=sorted) == [1, 2]
