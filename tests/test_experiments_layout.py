"""Layout of ``conductance.experiments``: one package per experiment, modules of one concept each.

A source scan (no model runs): every experiment is a package with ``config`` (settings), ``compute``
(measurements) and ``sections`` (report prose, tables and figures), its ``__init__`` holds a short
``run`` that only orders them, and no module grows back into a file mixing all of that.
"""

import ast
import importlib
from pathlib import Path

import pytest

import conductance.experiments as experiments

ROOT = Path(experiments.__file__).parent
PACKAGES = ("image", "text", "transformer", "knowledge_neurons", "pruning")
MAX_LINES = 450
MAX_ORCHESTRATION_LINES = 80


def test_every_module_of_the_experiments_is_at_most_450_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in ROOT.rglob("*.py")}
    assert len(sizes) >= 4 * len(PACKAGES)
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


@pytest.mark.parametrize("name", PACKAGES)
def test_each_experiment_is_a_package_of_config_compute_sections_and_a_short_run(name):
    folder = ROOT / name
    assert not (ROOT / f"{name}.py").exists(), f"experiments/{name}.py beside the package experiments/{name}/"
    assert {"__init__.py", "config.py", "compute.py", "sections.py"} <= {p.name for p in folder.glob("*.py")}
    tree = ast.parse((folder / "__init__.py").read_text(encoding="utf-8"))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "run" in functions
    args = functions["run"].args
    assert [a.arg for a in args.args] == ["report"] and "quick" in [a.arg for a in args.kwonlyargs]
    long = {f: n.end_lineno - n.lineno + 1 for f, n in functions.items()
            if n.end_lineno - n.lineno + 1 > MAX_ORCHESTRATION_LINES}
    assert long == {}, f"{name}/__init__.py should only order compute and sections calls"
    # `conductance reproduce NAME` imports the package and calls its run; the public names stay importable
    module = importlib.import_module(f"conductance.experiments.{name}")
    assert callable(module.run)
    for public in getattr(module, "__all__", []):
        assert hasattr(module, public), f"conductance.experiments.{name}.{public}"


def test_the_sections_modules_do_not_run_networks():
    # the measurements live in compute (and the network modules): a section that calls the library's
    # attribution or ablation functions would be a measurement hidden among prose
    calls = ("layer_conductance", "neuron_conductance", "compare_rankings", "ablate", "aggregate")
    found = {}
    modules = [p for name in PACKAGES for p in (ROOT / name).glob("sections*.py")]
    assert len(modules) >= len(PACKAGES)
    for path in modules:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in calls:
                found.setdefault(str(path.relative_to(ROOT)), []).append(node.func.attr)
    assert found == {}
