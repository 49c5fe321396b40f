"""The report page from its Jinja2 templates: escaping, missing values with their reason, titles
cut at word boundaries, and the templates shipped with the package."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytest.importorskip("jinja2")

from conductance.experiments import report as rp  # noqa: E402


def test_page_is_rendered_from_the_templates_and_escapes_text(tmp_path):
    r = rp.Report("A <title> & more", {"seed": 3, "missing": float("nan")})
    sec = r.section("Results <1>", key="res")
    sec.text("first <b>bold</b>\n\nsecond")
    sec.html("<p class='trusted'>kept</p>")
    sec.table([["a", 0.5], ["b", float("nan")]], ["name", "value"], caption="T", missing="b was not run")
    page = r.to_html()
    assert "<title>A &lt;title&gt; &amp; more</title>" in page
    assert "<p>first &lt;b&gt;bold&lt;/b&gt;</p><p>second</p>" in page
    assert "<p class='trusted'>kept</p>" in page
    assert '<td class="missing" title="b was not run">n/a</td>' in page
    assert '<p class="note">n/a: b was not run.</p>' in page
    assert not re.search(r"(?<![a-z])nan(?![a-z])", page, re.IGNORECASE)
    assert '<section id="res"><h2>Results &lt;1&gt;</h2>' in page
    assert '<li><a href="#res">Results &lt;1&gt;</a></li>' in page
    # the CSS comes from the template folder
    with open(os.path.join(rp.TEMPLATES, "report.css")) as f:
        assert f.read().splitlines()[0] in page
    html_path, json_path = r.write(str(tmp_path))
    assert Path(html_path).read_text(encoding="utf-8") == page


def test_percent_and_nan_strings_become_n_a_with_the_reason():
    assert rp.percent(0.1234) == "12.3%" and rp.percent(0.5, 0) == "50%"
    cell = rp.percent(float("nan"), why="no reviews")
    assert isinstance(cell, rp.Missing) and str(cell) == "n/a" and cell.why == "no reviews"
    r = rp.Report("t")
    sec = r.section("s")
    sec.table([["x", "nan%", cell, "banana", "Nan Goldin"]], ["a", "b", "c", "d", "e"])
    block = sec.blocks[-1]
    assert [str(c) for c in block["rows"][0]] == ["x", "n/a", "n/a", "banana", "Nan Goldin"]
    assert block["notes"] == ["n/a: no value for this row (see results.json).", "n/a: no reviews."]


@pytest.mark.parametrize("text, n, expected", [
    ("short text", 70, "short text"),
    ("the quick brown fox jumps over the lazy dog", 20, "the quick brown fox…"),
    ("the quick brown fox jumps", 16, "the quick brown…"),
    ("averyveryverylongwordwithoutspaces", 10, "averyvery…"),
    ("it was, frankly, dull", 16, "it was, frankly…"),
])
def test_shorten_cuts_at_a_word_boundary(text, n, expected):
    out = rp.shorten(text, n)
    assert out == expected and len(out) <= n


def test_templates_are_package_data():
    names = sorted(os.listdir(rp.TEMPLATES))
    assert names == ["blocks.html.j2", "report.css", "report.html.j2"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml")) as f:
        assert '"conductance.experiments" = ["templates/*"]' in f.read()
