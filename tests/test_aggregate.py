"""Dataset-level statistics: streaming, merging, files, checkpoints (kill -9), torchrun, CLI."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import agg_entry
import conductance as cd
from conductance.aggregate import AggregateResult, checkpoint_info, read_results, write_results
from conductance.datasets import fashion_mnist_available, load_fashion_mnist, read_idx

HERE = os.path.dirname(os.path.abspath(__file__))
LAYERS = ["0", "2"]
FIXED = dict(n_steps=8)          # a fixed rule: the same work for every example, fast


@pytest.fixture(autouse=True)
def _quiet():
    # the tiny random CNN misses completeness at 8 steps; the warnings are tested in test_attribute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.ConductanceWarning)
        yield


def _batches(n=45, batch=8, seed=0):
    ds = agg_entry.SlowTensors(n, seed=seed)
    return [(ds.x[i:i + batch], ds.y[i:i + batch]) for i in range(0, n, batch)]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _cli(*args):
    return [sys.executable, "-m", "conductance.cli", *args]


def _whole(model=None, **kw):
    """The uninterrupted in-process run on agg_entry.data()."""
    return cd.aggregate(model or agg_entry.model(), agg_entry.data(), LAYERS, **{**FIXED, **kw})


# ---- streaming and merging --------------------------------------------------------------------

def test_streaming_equals_one_big_batch_and_the_literal_statistics():
    model = agg_entry.model()
    batches = _batches()
    streamed = cd.aggregate(model, batches, LAYERS, **FIXED)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    one = cd.aggregate(model, [(x, y)], LAYERS, **FIXED)
    assert streamed.n_batches == 6 and one.n_batches == 1
    # float32 sums over the path depend on how points are grouped into chunks: equal to rounding
    assert streamed.equals(one, rtol=1e-5, atol=1e-6)
    assert np.array_equal(streamed.counts, np.bincount(y.numpy(), minlength=3))
    # literal: per-example conductance of the whole set, then per-class statistics by hand
    ref = cd.layer_importance(model, x, LAYERS, "conductance", target=y, units="channel", **FIXED)
    for layer in LAYERS:
        v = ref[layer].double().numpy()
        for g in range(3):
            rows = v[y.numpy() == g]
            np.testing.assert_allclose(streamed.mean(layer, g), rows.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(streamed.std(layer, g), rows.std(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(streamed.std(layer, g, ddof=1), rows.std(0, ddof=1), rtol=1e-5, atol=1e-6)
            shares = streamed.sign_shares(layer, g)
            np.testing.assert_array_equal(shares["positive"], (rows > 0.01).mean(0))
            np.testing.assert_array_equal(shares["negative"], (rows < -0.01).mean(0))
            np.testing.assert_array_equal(shares["near_zero"], (np.abs(rows) <= 0.01).mean(0))
            err = ref.relative_error[layer].double().numpy()[y.numpy() == g]
            c = streamed.completeness(g)[layer]
            assert c["count"] == len(rows) and c["is_cut"]
            assert c["mean"] == pytest.approx(err.mean(), rel=1e-4)
            assert c["max"] == pytest.approx(err.max(), rel=1e-4)
            assert c["above"] == int((err > 0.05).sum()) and c["threshold"] == 0.05
        np.testing.assert_allclose(streamed.mean(layer), v.mean(0), rtol=1e-5, atol=1e-6)
    assert streamed.mean_output_diff() == pytest.approx(float(ref.output_diff.double().mean()), rel=1e-4)
    top = streamed.top(2, "2", group=1)
    best = np.argsort(-streamed.mean("2", 1))[:2]
    assert [t.unit for t in top] == list(best) and top[0].n_examples == streamed.count(1)
    assert top[0].count == top[0].n_examples  # the field's old name still reads it


def test_dataloader_and_plain_iterable_give_identical_results():
    model = agg_entry.model()
    from_loader = cd.aggregate(model, agg_entry.data(), LAYERS, **FIXED)
    from_generator = cd.aggregate(model, agg_entry.generic_data(), LAYERS, **FIXED)
    from_list = cd.aggregate(model, _batches(), LAYERS, **FIXED)
    assert from_loader.equals(from_generator) and from_loader.equals(from_list)     # bit for bit


def test_merge_of_two_parts_equals_the_whole():
    model = agg_entry.model()
    batches = _batches()
    whole = cd.aggregate(model, batches, LAYERS, **FIXED)
    first = cd.aggregate(model, batches[:2], LAYERS, **FIXED)
    second = cd.aggregate(model, batches[2:], LAYERS, **FIXED)
    merged = first.merge(second)
    assert merged.equals(whole, rtol=1e-12)
    for k, v in whole._arrays().items():
        if v.dtype.kind == "i":
            assert np.array_equal(merged._arrays()[k], v), k       # counts are exact
    assert merged.n_batches == whole.n_batches == 6
    # parts with different groups present (class 2 missing from one part) still merge
    only01 = [(x[y < 2], y[y < 2]) for x, y in batches]
    only2 = [(x[y == 2], y[y == 2]) for x, y in batches]
    a = cd.aggregate(model, [b for b in only01 if len(b[1])], LAYERS, **FIXED)
    b = cd.aggregate(model, [b for b in only2 if len(b[1])], LAYERS, **FIXED)
    assert a.groups == [0, 1] and b.groups == [2] and b.n_groups == 3
    m = a.merge(b)
    assert m.groups == [0, 1, 2] and np.array_equal(m.counts, whole.counts)
    np.testing.assert_allclose(m.mean("0", 2), whole.mean("0", 2), rtol=1e-6)
    with pytest.raises(cd.ConductanceError, match="computed differently"):
        whole.merge(cd.aggregate(model, batches[:1], LAYERS, n_steps=4))


# ---- grouping, targets, measures --------------------------------------------------------------

def test_grouping_without_labels_uses_the_predicted_class_and_says_so():
    model = agg_entry.model()
    xs = [b[0] for b in _batches()]
    r = cd.aggregate(model, xs, LAYERS, **FIXED)
    assert r.grouping == "predicted" and r.target == "predicted"
    with torch.no_grad():
        pred = model(torch.cat(xs)).argmax(1).numpy()
    assert np.array_equal(r.counts, np.bincount(pred, minlength=r.n_groups))
    # dict batches and one-item tuples are accepted too
    same = cd.aggregate(model, [{"inputs": x} for x in xs], LAYERS, **FIXED)
    assert same.equals(r)
    pooled = cd.aggregate(model, [(x,) for x in xs], LAYERS, by=None, **FIXED)
    assert pooled.groups == ["all"] and pooled.grouping == "all" and pooled.count() == 45
    np.testing.assert_allclose(pooled.mean("2", "all"), r.mean("2"), rtol=1e-9)
    # labels present, grouped by prediction, explaining class 1 for everyone
    by_pred = cd.aggregate(model, _batches(), LAYERS, by="predicted", target=1, **FIXED)
    assert by_pred.grouping == "predicted" and by_pred.target == "class 1"
    assert np.array_equal(by_pred.counts, r.counts)
    with pytest.raises(cd.ConductanceError, match="no labels"):
        cd.aggregate(model, xs, LAYERS, by="label", **FIXED)
    mixed = [_batches()[0], xs[1]]
    with pytest.raises(cd.ConductanceError, match="every batch must have labels, or none"):
        cd.aggregate(model, mixed, LAYERS, **FIXED)


def test_several_measures_from_one_pass():
    model = agg_entry.model()
    both = cd.aggregate(model, _batches(), LAYERS, measure=["conductance", "activation"], **FIXED)
    alone = cd.aggregate(model, _batches(), LAYERS, measure="activation", **FIXED)
    assert set(both) == {"conductance", "activation"}
    assert both["activation"].equals(alone)
    assert both["conductance"].equals(cd.aggregate(model, _batches(), LAYERS, **FIXED))


def test_bad_requests_are_refused_clearly():
    model = agg_entry.model()
    b = _batches()
    with pytest.raises(cd.ConductanceError, match="measure"):
        cd.aggregate(model, b, LAYERS, measure="saliency")
    with pytest.raises(cd.ConductanceError, match="by must be"):
        cd.aggregate(model, b, LAYERS, by="cluster")
    with pytest.raises(cd.ConductanceError, match="target must be"):
        cd.aggregate(model, b, LAYERS, target="logit")
    with pytest.raises(cd.ConductanceError, match="near_zero"):
        cd.aggregate(model, b, LAYERS, near_zero=-1)
    with pytest.raises(TypeError, match="iterable of batches"):
        cd.aggregate(model, b[0][0], LAYERS)
    with pytest.raises(TypeError, match="unexpected keyword"):
        cd.aggregate(model, b, LAYERS, n_step=8)
    with pytest.raises(TypeError, match="integer class indices"):
        cd.aggregate(model, [(b[0][0], b[0][1].float())], LAYERS)
    with pytest.raises(cd.ConductanceError, match="yielded no batches"):
        cd.aggregate(model, [], LAYERS)
    with pytest.raises(cd.ConductanceError, match="batch 0: target"):
        cd.aggregate(model, [(b[0][0], b[0][1] + 5)], LAYERS, **FIXED)


def test_padded_distributed_sampler_is_refused():
    ds = TensorDataset(torch.randn(5, 2, 6, 6), torch.zeros(5, dtype=torch.long))
    padded = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, num_replicas=2, rank=0, shuffle=False))
    with pytest.raises(cd.ConductanceError, match="count twice"):
        cd.aggregate(agg_entry.model(), padded, LAYERS, **FIXED)
    even = TensorDataset(torch.randn(4, 2, 6, 6), torch.zeros(4, dtype=torch.long))
    split = DataLoader(even, batch_size=2, sampler=DistributedSampler(even, num_replicas=2, rank=0))
    with pytest.raises(cd.ConductanceError, match="without torch.distributed"):
        cd.aggregate(agg_entry.model(), split, LAYERS, **FIXED)


# ---- files ------------------------------------------------------------------------------------

def test_save_load_roundtrip(tmp_path):
    r = cd.aggregate(agg_entry.model(), _batches(), LAYERS, class_names=["a", "b", "c"], **FIXED)
    path = str(tmp_path / "r.npz")
    r.save(path)
    back = AggregateResult.load(path)
    assert back.equals(r) and back.n_batches == r.n_batches
    assert back.model == "Sequential" and back.layers == LAYERS and back.measure == "conductance"
    assert back.settings["n_steps"] == 8 and back.settings["method"] == "gausslegendre"
    assert back.unit_shapes == {"0": (4,), "2": (5,)} and back.class_names == ["a", "b", "c"]
    assert back.is_cut == r.is_cut and back.group_name(1) == "class 1 (b)"
    assert back.top(3, group=0) == r.top(3, group=0)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]        # no temporary left behind
    with pytest.raises(cd.ConductanceError, match="several measures"):
        both = cd.aggregate(agg_entry.model(), _batches()[:1], LAYERS, measure=["conductance", "gradient"], **FIXED)
        write_results(path, list(both.values()))
        AggregateResult.load(path)
    assert AggregateResult.load(path, measure="gradient").measure == "gradient"


def test_public_write_and_read_results(tmp_path):
    # the public pair the CLI uses: several measures in one file plus extra metadata, checksum checked
    both = cd.aggregate(agg_entry.model(), _batches()[:2], LAYERS, measure=["conductance", "gradient"], **FIXED)
    path = str(tmp_path / "two.npz")
    write_results(path, list(both.values()), {"note": "two measures"})
    back, meta = read_results(path)
    assert sorted(back) == ["conductance", "gradient"] and meta["note"] == "two measures"
    assert all(back[m].equals(both[m]) and back[m].n_examples == 16 for m in both)
    with pytest.raises(cd.ConductanceError, match="saved result, not a checkpoint"):
        checkpoint_info(path)
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    with pytest.raises(cd.ConductanceError, match="two.npz"):
        read_results(path)


def test_safetensors_roundtrip(tmp_path):
    pytest.importorskip("safetensors")
    r = cd.aggregate(agg_entry.model(), _batches(), LAYERS, **FIXED)
    r.save(str(tmp_path / "r.safetensors"))
    assert AggregateResult.load(str(tmp_path / "r.safetensors")).equals(r)


def test_to_dataframe():
    pd = pytest.importorskip("pandas")
    r = cd.aggregate(agg_entry.model(), _batches(), LAYERS, **FIXED)
    df = r.to_dataframe()
    assert len(df) == 3 * (4 + 5)
    row = df[(df.group == 2) & (df.layer == "2") & (df.unit == 3)].iloc[0]
    assert row["mean"] == pytest.approx(r.mean("2", 2)[3]) and row["count"] == r.count(2)
    assert isinstance(df, pd.DataFrame)


# ---- checkpoints ------------------------------------------------------------------------------

class _Interrupt(Exception):
    pass


def _interrupted(batches, after):
    for i, b in enumerate(batches):
        if i == after:
            raise _Interrupt()
        yield b


def test_resume_after_an_interruption_equals_the_uninterrupted_run(tmp_path):
    model = agg_entry.model()
    whole = cd.aggregate(model, _batches(), LAYERS, **FIXED)
    ck = str(tmp_path / "ck.npz")
    with pytest.raises(_Interrupt):
        cd.aggregate(model, _interrupted(_batches(), 4), LAYERS, checkpoint=ck, checkpoint_every=2, **FIXED)
    info = checkpoint_info(ck)
    assert info["position"] == 4 and not info["exhausted"] and info["examples"] == 32
    resumed = cd.aggregate(model, _batches(), LAYERS, checkpoint=ck, checkpoint_every=2, **FIXED)
    assert resumed.equals(whole)                                   # bit for bit
    assert checkpoint_info(ck)["exhausted"] and checkpoint_info(ck)["position"] == 6
    # a finished checkpoint answers at once (see also the next test)
    again = cd.aggregate(model, _batches(), LAYERS, checkpoint=ck, **FIXED)
    assert again.equals(whole)
    # a limited run extended later: the same result
    ck2 = str(tmp_path / "ck2.npz")
    part = cd.aggregate(model, agg_entry.data(), LAYERS, checkpoint=ck2, limit_batches=2, **FIXED)
    assert part.n_batches == 2 and checkpoint_info(ck2)["position"] == 2
    assert cd.aggregate(model, agg_entry.data(), LAYERS, checkpoint=ck2, **FIXED).equals(whole)
    with pytest.raises(cd.ConductanceError, match="already covers 6 batches"):
        cd.aggregate(model, agg_entry.data(), LAYERS, checkpoint=ck2, limit_batches=3, **FIXED)


def test_finished_checkpoint_skips_every_computation(tmp_path, monkeypatch):
    model = agg_entry.model()
    ck = str(tmp_path / "ck.npz")
    whole = cd.aggregate(model, agg_entry.data(), LAYERS, checkpoint=ck, **FIXED)
    calls = []
    monkeypatch.setattr(cd.attribute, "layer_importance", lambda *a, **k: calls.append(1))
    assert cd.aggregate(model, agg_entry.data(), LAYERS, checkpoint=ck, **FIXED).equals(whole)
    assert calls == []


@pytest.mark.parametrize("change, message", [
    (dict(n_steps=4), "layer_importance settings"),
    (dict(measure="gradient"), "measure"),
    (dict(units="neuron"), "units"),
    (dict(data_seed=1), "content of the first batch"),
    (dict(examples=50), "number of batches in the data"),
    (dict(weights=True), "model"),
])
def test_mismatched_checkpoint_is_refused_and_left_unchanged(tmp_path, change, message):
    ck = str(tmp_path / "ck.npz")
    model = agg_entry.model()
    cd.aggregate(model, agg_entry.data(), LAYERS, checkpoint=ck, limit_batches=3, **FIXED)
    good = Path(ck).read_bytes()
    kwargs = dict(FIXED, checkpoint=ck)
    data = agg_entry.data()
    if "data_seed" in change:
        data = DataLoader(agg_entry.SlowTensors(45, seed=1), batch_size=8)
    elif "examples" in change:
        data = DataLoader(agg_entry.SlowTensors(50), batch_size=8)
    elif "weights" in change:
        with torch.no_grad():
            model[0].bias.add_(1e-3)
    else:
        kwargs.update(change)
    with pytest.raises(cd.ConductanceError, match=message) as info:
        cd.aggregate(model, data, LAYERS, **kwargs)
    assert "left unchanged" in str(info.value)
    assert Path(ck).read_bytes() == good


def _last_data_byte(archive: bytes, member: str) -> int:
    """Offset of the last byte of ``member``'s stored data inside a (stored, uncompressed) npz file."""
    import io
    import struct
    import zipfile
    info = zipfile.ZipFile(io.BytesIO(archive)).getinfo(member)
    name_len, extra_len = struct.unpack("<HH", archive[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len + info.compress_size - 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "empty", "result"])
def test_corrupted_checkpoint_gives_a_clear_error_and_is_left_unchanged(tmp_path, damage):
    ck = str(tmp_path / "ck.npz")
    model = agg_entry.model()
    cd.aggregate(model, agg_entry.data(), LAYERS, checkpoint=ck, limit_batches=2, **FIXED)
    good = Path(ck).read_bytes()
    if damage == "truncate":
        bad = good[: len(good) // 2]
    elif damage == "garbage":
        bad = os.urandom(300)
    elif damage == "flip":                     # one byte inside the stored arrays
        i = _last_data_byte(good, "0.0.sum.npy")
        bad = good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1:]
    elif damage == "empty":
        bad = b""
    else:                                      # a saved result where a checkpoint should be
        AggregateResult.load(ck).save(str(tmp_path / "r.npz"))
        bad = (tmp_path / "r.npz").read_bytes()
    with open(ck, "wb") as f:
        f.write(bad)
    match = "saved result, not a checkpoint" if damage == "result" else "not a readable conductance"
    with pytest.raises(cd.ConductanceError, match=match):
        cd.aggregate(model, agg_entry.data(), LAYERS, checkpoint=ck, **FIXED)
    assert Path(ck).read_bytes() == bad


def test_kill_9_during_a_run_then_resume_equals_the_uninterrupted_run(tmp_path):
    ck, out = str(tmp_path / "ck.npz"), str(tmp_path / "out.npz")
    args = _cli("aggregate", "--model", "agg_entry:model", "--data", "agg_entry:data", "--layers", *LAYERS,
                "--n-steps", "8", "--out", out, "--checkpoint", ck, "--checkpoint-every", "1", "--threads", "1",
                "--device", "cpu", "--no-progress")
    env = _env(AGG_EXAMPLES=120, AGG_SLEEP=0.01)          # 15 batches, >= 0.08 s each
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(ck):
                try:
                    position = checkpoint_info(ck)["position"]
                except cd.ConductanceError:       # cannot happen with atomic writes; fail below if it does
                    raise
                if position >= 3:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = position
                    break
            time.sleep(0.02)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert killed_at is not None, "the run ended before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    info = checkpoint_info(ck)
    assert 3 <= info["position"] < 15 and not info["exhausted"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    os.environ["AGG_EXAMPLES"] = "120"
    try:
        whole = _whole()
    finally:
        del os.environ["AGG_EXAMPLES"]
    assert whole.n_examples == 120
    assert AggregateResult.load(out).equals(whole)              # bit for bit
    assert checkpoint_info(ck)["exhausted"]


# ---- torch.distributed ------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_equals_the_single_process_run(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    out, ck = str(tmp_path / "out.npz"), str(tmp_path / "ck.npz")
    cmd = [torchrun, "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "conductance.cli", "aggregate", "--model", "agg_entry:model", "--data", "agg_entry:data",
           "--layers", *LAYERS, "--n-steps", "8", "--out", out, "--checkpoint", ck, "--threads", "1",
           "--device", "cpu", "--no-progress"]
    env = _env(AGG_EXAMPLES=37)            # 5 batches (the last of 5 examples): rank 0 takes 3, rank 1 takes 2
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    os.environ["AGG_EXAMPLES"] = "37"
    try:
        single = _whole()
    finally:
        del os.environ["AGG_EXAMPLES"]
    both = AggregateResult.load(out)
    assert both.equals(single, rtol=1e-12, atol=1e-15)
    for k, v in single._arrays().items():
        if v.dtype.kind == "i":
            assert np.array_equal(both._arrays()[k], v), k          # no example counted twice or lost
    assert both.n_batches == 5 and both.n_examples == 37
    ranks = [checkpoint_info(f"{ck}.rank{r}") for r in (0, 1)]
    assert [r["examples"] for r in ranks] == [8 + 8 + 5, 8 + 8]
    assert all(r["exhausted"] and r["world_size"] == 2 for r in ranks)


# ---- progress ---------------------------------------------------------------------------------

def test_progress_is_off_when_not_a_terminal_and_shows_examples_per_second_when_asked(capfd):
    pytest.importorskip("tqdm")
    model = agg_entry.model()
    cd.aggregate(model, agg_entry.data(), LAYERS, **FIXED)
    assert capfd.readouterr().err == ""
    cd.aggregate(model, agg_entry.data(), LAYERS, progress=True, **FIXED)
    err = capfd.readouterr().err
    assert "ex/s" in err and "45" in err


# ---- command line -----------------------------------------------------------------------------

def test_cli_aggregate_then_show(tmp_path):
    out = str(tmp_path / "out.npz")
    aggregate = ["aggregate", "--model", "agg_entry:model", "--data", "agg_entry:data", "--layers", *LAYERS,
                 "--n-steps", "8", "--out", out, "--threads", "1", "--device", "cpu"]
    show = ["show", out, "--top", "2"]
    # both commands in one fresh interpreter (one torch import instead of two), through cli.main(argv)
    script = ("import sys; from conductance.cli import main\n"
              f"code = main({aggregate!r})\nprint('=== show', flush=True)\n"
              f"sys.exit(code or main({show!r}))")
    done = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    wrote, shown = done.stdout.split("=== show")
    assert "45 examples" in wrote and "wrote" in wrote
    r = AggregateResult.load(out)
    assert r.equals(_whole())
    for g in r.groups:
        assert f"class {g}: {r.count(g)} examples" in shown
    best = r.top(1, "2", group=2)[0]
    assert f"unit {best.unit:>5}  mean {best.mean:+.4g}" in shown
    from conductance.cli import main

    assert main(["show", str(tmp_path / "missing.npz")]) == 2


def test_cli_entry_point_errors():
    from conductance.cli import load_entry_point

    with pytest.raises(ValueError, match="module:function"):
        load_entry_point("agg_entry", "model")
    with pytest.raises(ValueError, match="no attribute"):
        load_entry_point("agg_entry:nothing", "model")
    assert isinstance(load_entry_point(os.path.join(HERE, "agg_entry.py") + ":model", "model"), torch.nn.Module)


# ---- datasets ---------------------------------------------------------------------------------

def test_read_idx(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + b"".join(int(d).to_bytes(4, "big") for d in data.shape) + data.tobytes()
    with gzip.open(tmp_path / "x.gz", "wb") as f:
        f.write(raw)
    assert np.array_equal(read_idx(str(tmp_path / "x.gz")), data)
    (tmp_path / "bad").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(tmp_path / "bad"))


def test_fashion_mnist_loader():
    if not fashion_mnist_available():
        with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
            load_fashion_mnist("test")
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.array_equal(np.bincount(y), np.full(10, 1000))


def test_saved_results_get_the_usual_permissions_and_progress_counts_whole_examples(tmp_path):
    import stat
    model = agg_entry.model()
    old = os.umask(0o022)
    try:
        path = str(tmp_path / "r.npz")
        result = cd.aggregate(model, agg_entry.data(), LAYERS, limit_batches=1, **FIXED)
        result.save(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    finally:
        os.umask(old)
    pytest.importorskip("tqdm")
    from conductance.aggregate import _Progress
    bar = _Progress(True, 64, 0, "test")
    bar.update(8)
    shown = str(bar.bar)
    bar.bar.close()
    assert "8/64" in shown and "8.00" not in shown
