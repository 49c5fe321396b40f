"""Issue 15: no silent wrong result, checked files, bounded waits.

NaN/Inf made inside the model is an error naming the layer and the path position; aggregate's
standard deviation is exact for a small spread around a large mean (Chan et al. merge); every
file aggregate writes carries a checksum and damaged files are refused and left unchanged; a
callable target is fingerprinted by what it computes; a checkpoint written by another number of
processes is refused; an unwritable checkpoint path is found before any batch is computed and
finished work is never lost to an output error.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import agg_entry
import conductance as cd
from conductance.aggregate import AggregateResult, checkpoint_info, read_results, write_results
from models import Chain, Lambda

LAYERS = ["0", "2"]
FIXED = dict(n_steps=8)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.ConductanceWarning)
        yield


def _no_hooks(model: nn.Module) -> None:
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks, type(m).__name__


# ---- NaN / Inf inside the model -----------------------------------------------------------------

def _sqrt_head():
    """hidden = x (identity), F = sum(sqrt(hidden - 0.5)): NaN on the part of the path where x < 0.5."""
    return Chain(nn.Identity(), Lambda(lambda h: torch.sqrt(h - 0.5).sum(1))).double().eval()


@pytest.mark.parametrize("kw", [dict(n_steps=8), dict(tolerance=0.01), dict(n_steps=8, method="captum")])
def test_nan_above_the_layer_is_an_error_naming_the_output_and_alpha(kw):
    model = _sqrt_head()
    x = torch.full((2, 3), 2.0, dtype=torch.float64)
    with pytest.raises(cd.ConductanceError, match=r"NaN or Inf in the explained output F .*alpha=0\b") as info:
        cd.layer_conductance(model, x, "hidden", **kw)
    assert "['hidden'] are finite" in str(info.value)
    _no_hooks(model)


def test_nan_in_a_layer_names_the_first_layer_in_forward_order():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Lambda(lambda x: torch.log(x))        # NaN for x < 0, -Inf at 0 (the baseline)
            self.b = nn.Linear(3, 3)
            self.head = nn.Linear(3, 1)

        def forward(self, x):
            return self.head(self.b(self.a(x)))

    model = Two().eval()
    x = torch.rand(3, 3) + 0.5
    with pytest.raises(cd.ConductanceError, match=r"layer 'a' is the first recorded layer with non-finite values "
                                                  r"\(at example 0 at alpha=0"):
        # asked for in the reverse order: the message follows the forward pass, not the list
        cd.layer_conductance(model, x, ["b", "a"], n_steps=4)
    # a baseline where log stays finite: the same call works, and completeness holds on the cut
    r = cd.layer_conductance(model, x, ["b", "a"], baselines=0.25, n_steps=64)
    assert torch.isfinite(r["a"]).all() and float(r.relative_error["b"].max()) < 1e-3
    _no_hooks(model)


def test_infinite_gradient_is_an_error_naming_the_layer():
    # F = sum(sqrt(hidden)), hidden = x: the baseline 0 has an infinite derivative
    model = Chain(nn.Identity(), Lambda(lambda h: torch.sqrt(h).sum(1))).double().eval()
    x = torch.full((2, 3), 4.0, dtype=torch.float64)
    with pytest.raises(cd.ConductanceError, match=r"gradient of the output with respect to layer 'hidden' is "
                                                  r"NaN or Inf \(at example 0 at alpha=0\b"):
        cd.layer_conductance(model, x, "hidden", n_steps=4)
    # the captum rule never evaluates alpha=0: finite, and the literal answer sqrt(4) per unit
    r = cd.layer_conductance(model, x, "hidden", n_steps=200, method="captum")
    torch.testing.assert_close(r["hidden"], torch.full((2, 3), 2.0, dtype=torch.float64), rtol=0.02, atol=0)


def test_aggregate_over_a_model_that_makes_nan_fails_instead_of_reporting_nan_means():
    model = _sqrt_head()
    batches = [(torch.full((2, 3), 2.0, dtype=torch.float64), torch.tensor([0, 0]))]
    with pytest.raises(cd.ConductanceError, match=r"batch 0: .*NaN or Inf"):
        cd.aggregate(model, batches, ["hidden"], target=None, n_steps=8, units="neuron")
    _no_hooks(model)


# ---- exact standard deviation (Chan et al.) -----------------------------------------------------

def _linear_identity():
    """F = sum(hidden), hidden = x: the conductance of hidden unit i is exactly x_i (baseline 0)."""
    return Chain(nn.Identity(), Lambda(lambda h: h.sum(1))).double().eval()


def test_std_of_a_small_spread_around_a_large_mean_is_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = 1e4 + 1e-4 * torch.randn(60, 2, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1] * 30)
    model = _linear_identity()
    batches = [(x[i:i + 7], y[i:i + 7]) for i in range(0, 60, 7)]
    kw = dict(target=None, units="neuron", n_steps=1, method="uniform")
    r = cd.aggregate(model, batches, ["hidden"], **kw)
    v = x.numpy()
    for group, rows in ((0, v[0::2]), (1, v[1::2]), (None, v)):
        np.testing.assert_allclose(r.mean("hidden", group), rows.mean(0), rtol=1e-15)
        np.testing.assert_allclose(r.std("hidden", group), rows.std(0), rtol=1e-6)     # was 0.0
        np.testing.assert_allclose(r.std("hidden", group, ddof=1), rows.std(0, ddof=1), rtol=1e-6)
    # the same after a merge of two parts and a round trip through both file formats
    a = cd.aggregate(model, batches[:3], ["hidden"], **kw)
    b = cd.aggregate(model, batches[3:], ["hidden"], **kw)
    merged = a.merge(b)
    np.testing.assert_allclose(merged.std("hidden"), v.std(0), rtol=1e-6)
    np.testing.assert_allclose(merged.std("hidden", 1), v[1::2].std(0), rtol=1e-6)
    for ext in ("npz", "safetensors"):
        path = str(tmp_path / f"r.{ext}")
        merged.save(path)
        np.testing.assert_allclose(AggregateResult.load(path).std("hidden", 0), v[0::2].std(0), rtol=1e-6)


# ---- checksums: every format, every kind of damage ----------------------------------------------

def _damage(good: bytes, how: str, ext: str) -> bytes:
    if how == "truncate":
        return good[: len(good) * 2 // 3]
    if how == "random":
        return np.random.default_rng(0).integers(0, 256, len(good), dtype=np.uint8).tobytes()
    if how == "flip_meta":
        # a digit of the stored batch count changed into another digit: the JSON stays valid
        i = good.index(b"n_batches") + len(b"n_batches")
        while not chr(good[i]).isdigit():
            i += 1
        return good[:i] + bytes([ord("7") if good[i] != ord("7") else ord("8")]) + good[i + 1:]
    if ext == "safetensors":
        header = int.from_bytes(good[:8], "little")       # the tensor data follows the JSON header
        i = 8 + header + (len(good) - 8 - header) // 2
    else:
        import io
        import zipfile
        info = zipfile.ZipFile(io.BytesIO(good)).getinfo("0.0.sum.npy")
        name_len, extra_len = (int.from_bytes(good[info.header_offset + k:info.header_offset + k + 2], "little")
                               for k in (26, 28))
        i = info.header_offset + 30 + name_len + extra_len + info.compress_size - 1   # inside a stored array
    return good[:i] + bytes([good[i] ^ 0x01]) + good[i + 1:]


@pytest.mark.parametrize("ext", ["npz", "safetensors"])
@pytest.mark.parametrize("how", ["truncate", "random", "flip_data", "flip_meta"])
def test_damaged_checkpoint_is_refused_and_left_unchanged(tmp_path, ext, how):
    ck = str(tmp_path / f"ck.{ext}")
    model = agg_entry.model()
    cd.aggregate(model, agg_entry.data(), LAYERS, checkpoint=ck, limit_batches=2, **FIXED)
    good = Path(ck).read_bytes()
    bad = _damage(good, how, ext)
    assert bad != good
    with open(ck, "wb") as f:
        f.write(bad)
    with pytest.raises(cd.ConductanceError, match="not a readable conductance aggregate file") as info:
        cd.aggregate(model, agg_entry.data(), LAYERS, checkpoint=ck, **FIXED)
    assert "left as it is" in str(info.value)
    assert Path(ck).read_bytes() == bad
    with pytest.raises(cd.ConductanceError, match="not a readable"):
        AggregateResult.load(ck)


def test_one_flipped_bit_in_a_safetensors_value_is_caught_by_the_checksum(tmp_path):
    # the failure of the issue: a flipped byte in the data used to be resumed from (a mean of 3e76)
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    path = str(tmp_path / "r.safetensors")
    r = cd.aggregate(agg_entry.model(), agg_entry.data(), LAYERS, limit_batches=2, **FIXED)
    r.save(path)
    with safe_open(path, framework="np") as f:
        meta = f.metadata()
    arrays = load_file(path)
    arrays["0.0.sum"][0, 0] = np.frombuffer(arrays["0.0.sum"][0, 0].tobytes()[:7] + b"\x7f", np.float64)[0]
    save_file(arrays, path, metadata=meta)         # a well-formed file whose content no longer matches
    with pytest.raises(cd.ConductanceError, match="does not match the checksum"):
        AggregateResult.load(path)


def test_old_format_is_refused_with_the_reason(tmp_path):
    import json

    path = str(tmp_path / "old.npz")
    meta = json.dumps({"format": "conductance.aggregate/1", "results": []})
    np.savez(path, __meta__=np.frombuffer(meta.encode(), dtype=np.uint8))
    with pytest.raises(cd.ConductanceError, match="older version .* Recompute"):
        AggregateResult.load(path)


# ---- fingerprint of a callable target -----------------------------------------------------------

def _target_of(k):
    return lambda o: o[:, k]


def test_resume_with_a_different_callable_target_is_refused(tmp_path):
    ck = str(tmp_path / "ck.npz")
    model = agg_entry.model()
    kw = dict(checkpoint=ck, by=None, **FIXED)
    cd.aggregate(model, agg_entry.data(), LAYERS, target=lambda o: o[:, 0], limit_batches=2, **kw)
    good = Path(ck).read_bytes()
    for other in (lambda o: o[:, 2], _target_of(0), lambda o: o[:, 0] * 2):
        with pytest.raises(cd.ConductanceError, match="target: 'callable:.*in the checkpoint"):
            cd.aggregate(model, agg_entry.data(), LAYERS, target=other, **kw)
        assert Path(ck).read_bytes() == good
    # the same computation, written again (another lambda object): resumes and equals the whole run
    resumed = cd.aggregate(model, agg_entry.data(), LAYERS, target=lambda o: o[:, 0], **kw)
    whole = cd.aggregate(model, agg_entry.data(), LAYERS, target=lambda o: o[:, 0], by=None, **FIXED)
    assert resumed.equals(whole, rtol=1e-6) and resumed.n_batches == whole.n_batches == 6
    # values closed over are part of the fingerprint
    ck2 = str(tmp_path / "ck2.npz")
    cd.aggregate(model, agg_entry.data(), LAYERS, target=_target_of(1), limit_batches=1, by=None, checkpoint=ck2,
                 **FIXED)
    with pytest.raises(cd.ConductanceError, match="target"):
        cd.aggregate(model, agg_entry.data(), LAYERS, target=_target_of(2), by=None, checkpoint=ck2, **FIXED)


# ---- number of processes ------------------------------------------------------------------------

def test_one_process_on_a_checkpoint_written_by_two_is_refused(tmp_path):
    ck = str(tmp_path / "ck.npz")
    model = agg_entry.model()
    cd.aggregate(model, agg_entry.data(), LAYERS, checkpoint=ck, limit_batches=1, **FIXED)
    results, meta = read_results(ck)
    for rank in (0, 1):                         # what two processes leave: one file per rank
        info = dict(meta["checkpoint"], rank=rank, world_size=2)
        write_results(f"{ck}.rank{rank}", list(results.values()), {"checkpoint": info})
    os.unlink(ck)
    files = {p: Path(p).read_bytes() for p in (f"{ck}.rank0", f"{ck}.rank1")}
    with pytest.raises(cd.ConductanceError, match=r"written by 2 process\(es\).*this run has 1"):
        cd.aggregate(model, agg_entry.data(), LAYERS, checkpoint=ck, **FIXED)
    assert not os.path.exists(ck) and all(Path(p).read_bytes() == b for p, b in files.items())
    assert checkpoint_info(f"{ck}.rank1")["world_size"] == 2


# ---- output paths -------------------------------------------------------------------------------

class _Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_unwritable_checkpoint_path_is_found_before_any_batch_is_computed(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    model = _Counting(agg_entry.model()).eval()
    for bad, message in ((str(blocker / "ck.npz"), "is a file, not a folder"),
                         (str(blocker / "sub" / "ck.npz"), "is a file, not a folder"),
                         (str(tmp_path), "is a folder")):
        with pytest.raises(cd.ConductanceError, match=message):
            cd.aggregate(model, agg_entry.data(), ["inner.0"], checkpoint=bad, **FIXED)
    assert model.calls == 0
    assert blocker.read_text() == "not a folder"


def test_finished_work_is_not_lost_when_the_checkpoint_cannot_be_written_at_the_end(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    ck = str(folder / "ck.npz")
    model = agg_entry.model()

    def data():
        yield from agg_entry.data()
        shutil.rmtree(folder)               # the folder goes away while the last batch is computed
        folder.write_text("now a file")

    with pytest.warns(cd.ConductanceWarning, match=r"could not write the checkpoint .*wrote it to (\S+) instead"
                      ) as record:
        result = cd.aggregate(model, data(), LAYERS, checkpoint=ck, checkpoint_every=100, **FIXED)
    message = next(str(w.message) for w in record if "could not write" in str(w.message))
    rescue = message.split("wrote it to ")[1].split(" instead")[0]
    try:
        assert rescue.startswith(tempfile.gettempdir())
        info = checkpoint_info(rescue)
        assert info["exhausted"] and info["examples"] == 45
        assert AggregateResult.load(rescue).equals(result)
        assert result.equals(cd.aggregate(model, agg_entry.data(), LAYERS, **FIXED))
    finally:
        os.unlink(rescue)


def test_timeout_must_be_positive_minutes():
    for bad in (0, -1, float("nan"), "5", True):
        with pytest.raises(cd.ConductanceError, match="timeout must be a positive number of minutes"):
            cd.aggregate(agg_entry.model(), agg_entry.data(), LAYERS, timeout=bad, **FIXED)


def test_a_frozen_peer_makes_the_other_rank_fail_with_its_name_after_the_timeout():
    import socket
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", FROZEN_SECONDS="60",
               PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [torchrun, "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port}",
           os.path.join(here, "dist_entry.py"), "0.05"]             # 3 seconds
    # rank 1 sleeps 60 s: without the timeout rank 0 would wait for it (30 minutes by default)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "RANK0-ERROR: rank 0 of 2: the collective" in out, out
    assert "RANK1-WOKE" not in out, out       # rank 0 gave up while its peer was still frozen


def test_aggregate_checks_the_path_settings_before_any_batch():
    model = _Counting(agg_entry.model()).eval()
    for kw, message in ((dict(tolerance=2.0), "tolerance must be"), (dict(n_steps=8, max_steps=40), "max_steps=40"),
                        (dict(n_steps=0), "n_steps must be")):
        with pytest.raises(cd.ConductanceError, match=message):
            cd.aggregate(model, agg_entry.data(), ["inner.0"], **kw)
    assert model.calls == 0
