"""The command line: version, help, layers of any model, show's formats, output files and errors.

Commands run through ``cli.main(argv)`` in this process (one torch import) and, where the
interpreter's behaviour matters (``python -m conductance``, no traceback), in a subprocess.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import conductance as cd
from conductance import cli
from conductance.aggregate import AggregateResult

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
LAYERS = ["1", "3"]

pytestmark = pytest.mark.filterwarnings("ignore::conductance.ConductanceWarning")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, HERE, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def run(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr); argparse's own errors exit with SystemExit."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def result_file(tmp_path_factory):
    """An aggregate file with class names, written by the library (the CLI cannot name classes)."""
    import agg_entry

    path = str(tmp_path_factory.mktemp("agg") / "named.npz")
    r = cd.aggregate(agg_entry.model(), agg_entry.data(), LAYERS, n_steps=4, limit_batches=3, progress=False,
                     class_names=["ant", "bee", "cat"])
    r.save(path)
    return path, r


# ---- version, python -m, help --------------------------------------------------------------

def test_version_from_python_m():
    done = subprocess.run([sys.executable, "-m", "conductance", "--version"], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"conductance {cd.__version__}"


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for a, where in _all_actions(sub):
                    yield a, f"{name} {where}"
        else:
            yield action, parser.prog


def test_every_option_has_help():
    missing = [f"{where}: {a.option_strings or a.dest}" for a, where in _all_actions(cli.build_parser())
               if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, missing


def test_paper_cited_the_same_way_everywhere():
    root = os.path.dirname(HERE)
    cite = "(arXiv:1805.12233, 2018; ICLR 2019)"
    assert cite in cli.PAPER and cite in cli.build_parser().description
    for rel in ("README.md", "docs/REPRODUCTION.md", "src/conductance/__init__.py"):
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            text = f.read()
        assert cite in text, rel
        assert "(ICLR 2019)" not in text.replace(cite, ""), rel


# ---- layers --model --------------------------------------------------------------------------

def test_layers_of_any_model(capsys):
    import agg_entry

    code, out, err = run(["layers", "--model", "agg_entry:model", "--depth", "0"], capsys)
    assert code == 0, err
    rows = [line.split() for line in out.strip().splitlines()]
    expected = [(n, type(m).__name__) for n, m in agg_entry.model().named_modules() if n]
    assert [tuple(r) for r in rows] == expected


def test_model_of_the_wrong_kind(tmp_path, capsys):
    (tmp_path / "entries.py").write_text("def seven():\n    return 7\n")
    spec = f"{tmp_path / 'entries.py'}:seven"
    code, _, err = run(["layers", "--model", spec], capsys)
    assert code == 2
    assert "returned int 7; it must return a torch.nn.Module" in err and "Traceback" not in err
    code, _, err = run(["aggregate", "--model", spec, "--data", "agg_entry:data", "--layers", "1", "--out",
                        str(tmp_path / "r.npz"), "--device", "cpu"], capsys)
    assert code == 2 and "returned int 7" in err


def test_entry_points_resolve_dotted_names(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text("import torch\nclass Zoo:\n    @staticmethod\n    def small():\n"
                                   "        return torch.nn.Linear(2, 3)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        model = cli.load_entry_point("mypkg.models:Zoo.small", "model", torch.nn.Module)
    finally:
        sys.path.remove(str(tmp_path))
    assert isinstance(model, torch.nn.Linear) and model.out_features == 3
    with pytest.raises(cd.ConductanceError, match="has no attribute 'nothing'"):
        cli.load_entry_point("agg_entry:nothing", "model")
    with pytest.raises(ModuleNotFoundError, match="no module 'no_such_module'"):
        cli.load_entry_point("no_such_module:build", "model")


# ---- aggregate: --out, --device, permissions --------------------------------------------------

AGG = ["aggregate", "--model", "agg_entry:model", "--data", "agg_entry:data", "--layers", *LAYERS,
       "--n-steps", "4", "--limit-batches", "2", "--no-progress"]


@pytest.mark.parametrize("out, message", [("r.csv", "writes .npz or .safetensors"),
                                          ("r", "writes .npz or .safetensors")])
def test_aggregate_refuses_an_extension_it_cannot_write(tmp_path, capsys, out, message):
    code, _, err = run(AGG + ["--out", str(tmp_path / out), "--device", "cpu"], capsys)
    assert code == 2 and message in err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("device, message", [
    ("banana", "is not a device name"),
    ("cuda:7", "CUDA device"),
    ("xla", "only cpu, cuda[:N] and mps"),
])
def test_aggregate_refuses_a_device_that_does_not_exist(tmp_path, capsys, device, message):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    code, _, err = run(AGG + ["--out", str(tmp_path / "r.npz"), "--device", device], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_aggregate_file_has_the_usual_permissions(tmp_path, capsys):
    out = tmp_path / "r.npz"
    old = os.umask(0o022)
    try:
        code, stdout, err = run(AGG + ["--out", str(out), "--device", "cpu"], capsys)
        assert code == 0, err
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
        os.umask(0o077)
        code, _, err = run(AGG + ["--out", str(out), "--device", "cpu"], capsys)
        assert code == 0, err
        assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    finally:
        os.umask(old)
    assert AggregateResult.load(str(out)).n_examples == 16


# ---- show --------------------------------------------------------------------------------------

def _expected_rows(r: AggregateResult, top: int) -> list[tuple]:
    return [(g, layer, u.unit, u.mean, u.std, u.positive, u.negative) for g in r.groups for layer in r.layers
            for u in r.top(top, layer, group=g)]


def test_show_json_and_csv_hold_the_result(result_file, capsys):
    path, r = result_file
    code, out, err = run(["show", path, "--top", "3", "--format", "json"], capsys)
    assert code == 0, err
    rows = json.loads(out)
    got = [(x["group"], x["layer"], x["unit"], x["mean"], x["std"], x["positive"], x["negative"]) for x in rows]
    assert got == _expected_rows(r, 3)
    assert {x["group_name"] for x in rows} == {r.group_name(g) for g in r.groups}
    assert len({x["mean"] for x in rows}) > 3          # real, varied values
    code, out, err = run(["show", path, "--top", "3", "--format", "csv"], capsys)
    assert code == 0, err
    table = list(csv.DictReader(io.StringIO(out)))
    assert [(int(x["group"]), x["layer"], int(x["unit"]), float(x["mean"]), float(x["std"]), float(x["positive"]),
             float(x["negative"])) for x in table] == _expected_rows(r, 3)


def test_show_text_by_class_name(result_file, capsys):
    path, r = result_file
    group = r.groups[1]
    name = r.class_names[group]
    code, out, err = run(["show", path, "--group", name, "--top", "1"], capsys)
    assert code == 0, err
    assert f"class {group} ({name}): {r.count(group)} examples" in out
    best = r.top(1, LAYERS[0], group=group)[0]
    assert f"unit {best.unit:>5}  mean {best.mean:+.4g}" in out
    code, out2, _ = run(["show", path, "--group", str(group), "--top", "1"], capsys)
    assert out2 == out
    code, _, err = run(["show", path, "--group", "zebra"], capsys)
    assert code == 2 and "'zebra' is not a class index" in err and "ant, bee, cat" in err


def test_show_out_follows_its_extension(result_file, tmp_path, capsys):
    path, r = result_file
    code, _, err = run(["show", path, "--out", str(tmp_path / "top.csv"), "--top", "2"], capsys)
    assert code == 0, err
    with open(tmp_path / "top.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(_expected_rows(r, 2))
    code, _, err = run(["show", path, "--out", str(tmp_path / "top.json")], capsys)
    assert code == 0 and isinstance(json.loads(Path(tmp_path / "top.json").read_text()), list)
    code, _, err = run(["show", path, "--out", str(tmp_path / "top.xlsx")], capsys)
    assert code == 2 and ".txt, .json, .csv" in err
    code, _, err = run(["show", path, "--out", str(tmp_path / "top.csv"), "--format", "json"], capsys)
    assert code == 2 and "make them agree" in err


def test_negative_top_is_refused_without_a_traceback(result_file):
    path, _ = result_file
    done = subprocess.run([sys.executable, "-m", "conductance", "show", path, "--top", "-1"], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--top: must be >= 0, got -1" in done.stderr and "Traceback" not in done.stderr


def test_reproduce_out_must_be_a_folder(tmp_path, capsys):
    code, _, err = run(["reproduce", "text", "--quick", "--out", str(tmp_path / "report.html")], capsys)
    assert code == 2 and "writes a folder" in err


# ---- demo progress -----------------------------------------------------------------------------

def test_demo_prints_progress(capsys):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("PIL")
    code, out, err = run(["demo", "--photo", "chelsea", "coffee", "--layers", "_blocks.4", "--n-steps", "2",
                          "--threads", "1"], capsys)
    assert code == 0, err
    assert "[demo] photo 1/2 (chelsea): conductance of 1 layers" in err
    assert "[demo] photo 2/2 (coffee): 3 path points in" in err
    assert "photo 'chelsea': top label" in out and "photo 'coffee': top label" in out


# ---- progress bars -----------------------------------------------------------------------------

def test_neuron_conductance_progress_counts_points_as_integers(capsys):
    pytest.importorskip("tqdm")
    import agg_entry

    model = agg_entry.model()
    x = agg_entry.dataset().x[:3]
    quiet = cd.neuron_conductance(model, x, "2", [0, 3], units="channel", n_steps=9, internal_batch_size=7,
                                  progress=False)
    assert capsys.readouterr().err == ""
    shown = cd.neuron_conductance(model, x, "2", [0, 3], units="channel", n_steps=9, internal_batch_size=7,
                                  progress=True)
    err = capsys.readouterr().err
    assert torch.equal(quiet, shown)
    assert "neuron conductance (2 units)" in err and "30/30" in err and "30.0" not in err
    with pytest.raises(cd.ConductanceError, match="progress must be True, False or None"):
        cd.neuron_conductance(model, x, "2", [0], n_steps=4, progress="yes")


def test_feature_selection_progress_counts_selection_examples(capsys):
    pytest.importorskip("tqdm")
    pytest.importorskip("sklearn")
    import agg_entry

    data = agg_entry.dataset()
    x, y = data.x[:30], data.y[:30]
    kwargs = dict(measures=["conductance"], ks=[1, 2], random_seeds=1, batch_size=8,
                  importance_kwargs={"n_steps": 4})
    quiet = cd.feature_selection(agg_entry.model(), x, y, "3", progress=False, **kwargs)
    assert capsys.readouterr().err == ""
    shown = cd.feature_selection(agg_entry.model(), x, y, "3", progress=True, **kwargs)
    err = capsys.readouterr().err
    n_select = int(quiet.select_index.numel())
    assert n_select > 8                               # several batches
    assert "feature selection: conductance" in err and f"{n_select}/{n_select}" in err
    assert list(quiet.rows) == list(shown.rows)
    with pytest.raises(cd.ConductanceError, match="progress must be True"):
        cd.feature_selection(agg_entry.model(), x, y, "3", progress=1, **kwargs)
