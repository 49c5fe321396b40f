"""Browser checks of an HTML report written by `conductance reproduce` (or any Report), for any folder.

A real headless Chromium (Debian's chromium and chromedriver, driven by selenium 4) opens the page:
every picture loads, every section has a title listed in the contents, no table is empty, the
console has no errors, no section shows "nan"; a full-page screenshot and one per section are kept.
:func:`check_reproduction` adds what a reproduction report must contain, derived from the settings
recorded in its results.json (quick or full sizes, which experiments, GoogLeNet weights given or not).

The browser is never downloaded: selenium is pointed at /usr/bin/chromedriver and /usr/bin/chromium
and SE_OFFLINE=true stops selenium-manager from fetching anything.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Sections every run of an experiment writes, in order (warnings sections come and go with the warnings).
SECTIONS = {
    "image": ["image-settings", "image-effnet-photos", "image-effnet-pixels", "image-effnet-ablation",
              "image-fashion-model", "image-fashion-ablation", "image-fashion-selection"],
    "text": ["text-model", "text-signs", "text-negation", "text-completeness", "text-settings"],
    "transformer": ["transformer-model", "transformer-top", "transformer-completeness", "transformer-tokens",
                    "transformer-ablation"],
}
#: Written only when GoogLeNet weights are given (``--weights``), after the EfficientNet ones.
GOOGLENET_SECTIONS = ["image-googlenet-photos", "image-googlenet-pixels", "image-googlenet-ablation"]
OPTIONAL_SECTIONS = {"image-warnings"}
NAN_TEXT = re.compile(r"(?<![A-Za-z])nan(?![A-Za-z])", re.IGNORECASE)


def browser_missing() -> str:
    """Why the browser checks cannot run here ("" when they can)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install 'conductance[report]')"
    return ""


@contextlib.contextmanager
def chromium(profile_dir: Path) -> Iterator[Any]:
    """A headless Chromium with the console log captured; selenium-manager kept offline."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    previous = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1200,900", f"--user-data-dir={profile_dir}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        if previous is None:
            os.environ.pop("SE_OFFLINE", None)
        else:
            os.environ["SE_OFFLINE"] = previous


def _non_finite(value, where="results.json"):
    """Yield (path, number) for every number in a parsed JSON value that is not finite."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _non_finite(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _non_finite(v, f"{where}[{i}]")


def count_numbers(value) -> int:
    """How many numbers a parsed JSON value holds (booleans excluded)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, (int, float)):
        return 1
    if isinstance(value, dict):
        return sum(count_numbers(v) for v in value.values())
    if isinstance(value, list):
        return sum(count_numbers(v) for v in value)
    return 0


def open_and_check(driver, html_path: str, screenshot: Path) -> dict:
    """Open the report, check what every report must satisfy, save a full-page screenshot.

    Returns what the page shows: ``titles`` (h2 texts), ``images`` (alt, naturalWidth,
    naturalHeight), ``tables`` (caption, rows), ``toc`` (link texts), ``h1``, ``text`` and
    ``sections`` (id, title, text, images, tables of each section).
    """
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")                                    # drop entries of earlier pages
    driver.get(Path(html_path).resolve().as_uri())
    WebDriverWait(driver, 120).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))
    page = driver.execute_script("""
        const text = e => (e ? e.textContent.trim() : '');
        return {
          h1: text(document.querySelector('h1')),
          titles: Array.from(document.querySelectorAll('section > h2')).map(text),
          toc: Array.from(document.querySelectorAll('nav a')).map(text),
          images: Array.from(document.images).map(i => [i.alt, i.naturalWidth, i.naturalHeight]),
          tables: Array.from(document.querySelectorAll('table')).map(t => [
              text(t.querySelector('caption')), t.querySelectorAll('tbody tr').length]),
        };""")
    page["sections"] = driver.execute_script("""
        const text = e => (e ? e.textContent.trim() : '');
        return Array.from(document.querySelectorAll('section')).map(s => ({
          id: s.id, title: (s.querySelector('h2') || {}).textContent || '', text: s.innerText,
          images: Array.from(s.querySelectorAll('img')).map(i => [i.alt, i.naturalWidth, i.naturalHeight]),
          tables: Array.from(s.querySelectorAll('table')).map(t => [
              text(t.querySelector('caption')), t.querySelectorAll('tbody tr').length,
              t.querySelectorAll('thead th').length])}));""")
    page["text"] = driver.execute_script("return document.body.innerText")
    broken = [alt for alt, w, h in page["images"] if not (w > 0 and h > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert page["titles"] and all(page["titles"]), f"missing or empty section titles: {page['titles']}"
    assert page["toc"] == page["titles"], "the table of contents must list every section"
    assert all(rows > 0 for _, rows in page["tables"]), f"a table has no rows: {page['tables']}"
    # a table wider than the page has its last columns cut off or scrolled out of sight
    wide = driver.execute_script("""
        const page = document.body.getBoundingClientRect().right;
        return Array.from(document.querySelectorAll('table'))
          .filter(t => t.getBoundingClientRect().right > page + 1 || t.scrollWidth > t.clientWidth + 1)
          .map(t => [(t.querySelector('caption') || {}).textContent || '',
                     Math.round(t.getBoundingClientRect().width), Math.round(page)]);""")
    assert not wide, f"tables wider than the page (caption, width, page right edge): {wide}"
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, f"browser console errors: {severe}"
    # A full-page screenshot: Chromium's DevTools call can capture beyond the window.
    size = driver.execute_script("return [document.documentElement.scrollWidth, "
                                 "document.documentElement.scrollHeight]")
    _capture(driver, {"x": 0, "y": 0, "width": size[0], "height": size[1]}, screenshot)
    return page


def _capture(driver, clip: dict, path: Path) -> None:
    """A PNG of the page region ``clip`` (x, y, width, height in CSS pixels), beyond the window if need be."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True, "clip": {**clip, "scale": 1}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_sections(driver, page: dict, shots: Path) -> None:
    """Each section on its own: its pictures loaded, no "nan" in its text; a screenshot of each, whole
    (a long section is not cut at the window's height), is kept in ``shots``."""
    for sec in page["sections"]:
        broken = [alt for alt, w, h in sec["images"] if not (w > 0 and h > 0)]
        assert not broken, f"section {sec['title']!r}: images that did not load: {broken}"
        found = [m.group(0) for m in NAN_TEXT.finditer(sec["text"])]
        assert not found, f"section {sec['title']!r} shows {found[:3]}: " + \
            sec["text"][max(0, NAN_TEXT.search(sec["text"]).start() - 80):][:160]
        box = driver.execute_script("""
            const r = document.getElementById(arguments[0]).getBoundingClientRect();
            return {x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height};""",
                                    sec["id"])
        assert box["width"] > 0 and box["height"] > 0, f"section {sec['title']!r} is not displayed"
        _capture(driver, box, shots / f"{sec['id']}.png")


def check_results_json(json_path: str) -> dict:
    """results.json parses (strict JSON) and every number in it is finite."""
    with open(json_path, encoding="utf-8") as f:
        data = json.load(f, parse_constant=lambda name: pytest.fail(f"results.json contains {name}"))
    bad = list(_non_finite(data))
    assert not bad, f"non-finite numbers in results.json: {bad[:10]}"
    return data


def expected_sections(settings: dict) -> list[str]:
    """The section keys a reproduction with these recorded settings writes, in order (optional ones left out)."""
    keys: list[str] = []
    for name in [n.strip() for n in str(settings.get("experiments", "")).split(",") if n.strip()]:
        if name not in SECTIONS:
            continue                         # pruning, knowledge_neurons: checked by their own tests
        part = list(SECTIONS[name])
        if name == "image" and settings.get("googlenet weights"):
            at = part.index("image-effnet-ablation") + 1
            part[at:at] = GOOGLENET_SECTIONS
        keys += part
    return keys


def _section(page: dict, key: str) -> dict:
    found = [s for s in page["sections"] if s["id"] == key]
    assert len(found) == 1, f"section {key!r}: found {len(found)} times"
    return found[0]


def check_reproduction(driver, folder: Path, shots: Path) -> tuple[dict, dict]:
    """Every check of a `conductance reproduce` folder, the sizes taken from its own recorded settings.

    Opens ``folder/report.html`` (screenshot ``shots/report.png``, one per section under ``shots``),
    then checks that the sections are those the run writes (:func:`expected_sections`), that none
    says an experiment did not run, and that each shows the photos, blocks, layers, snippets and
    rows its size setting asks for (quick or full; GoogLeNet when weights were given).

    Returns
    -------
    page : dict, as from :func:`open_and_check`
    data : dict, results.json
    """
    from conductance.experiments import image
    from conductance.experiments import text as tx
    from conductance.experiments import transformer as tf

    html_path, json_path = folder / "report.html", folder / "results.json"
    assert html_path.is_file() and json_path.is_file(), f"{folder} has no report.html and results.json"
    data = check_results_json(str(json_path))
    settings = data["settings"]
    quick = bool(settings["quick"])
    names = [n.strip() for n in settings["experiments"].split(",")]
    # the report is rewritten after each experiment: one without its run time has not finished
    unfinished = [name for name in names if f"{name} seconds" not in settings]
    assert not unfinished, (f"{folder}: experiment(s) {', '.join(unfinished)} did not finish (no run time in the "
                            "settings): the run is still going or was interrupted")
    page = open_and_check(driver, str(html_path), shots / "report.png")
    check_sections(driver, page, shots)
    assert "ASSETS.md" not in page["text"], "the report points at a file that is not in the repository"
    ids = [s["id"] for s in page["sections"]]
    assert not [i for i in ids if i.endswith("-not-run")], f"experiments did not run: {ids}"
    want = expected_sections(settings)
    assert [i for i in ids if i not in OPTIONAL_SECTIONS] == want, f"sections {ids}, expected {want}"
    assert set(data) - {"title", "settings"} == set(ids), "results.json and the page list other sections"
    assert count_numbers({k: v for k, v in data.items() if k not in ("title", "settings")}) > 0
    figures = sorted(os.listdir(folder / "figures"))
    assert len(figures) == len(page["images"]), "figures/ and the page's pictures differ"

    if "image" in names:
        s = image.settings_for(quick)
        assert data["image-settings"]["photos"] == s.photos
        nets = [("image-effnet", s.effnet_blocks)]
        if settings.get("googlenet weights"):
            nets.append(("image-googlenet", s.googlenet_blocks))
        for key, blocks in nets:
            photos = _section(page, f"{key}-photos")
            assert [rows for _, rows, _ in photos["tables"]] == [len(s.photos) * len(blocks)]
            assert sorted(data[f"{key}-photos"]["photos"]) == sorted(s.photos)
            # one map per photo, plus one filter across every photo when there are three or more
            pixels = _section(page, f"{key}-pixels")
            assert len(pixels["images"]) == len(s.photos) + (len(s.photos) >= 3), pixels["images"]
            assert all(w >= 200 for _, w, _ in pixels["images"])
            # each map's per-unit error: a row per photo, one estimate per map in the numbers
            assert [rows for _, rows, _ in pixels["tables"]] == [len(s.photos)]
            map_errors = data[f"{key}-pixels"]["pixel_unit_error"]
            assert sorted(map_errors) == sorted(s.photos)
            assert all(len(v) == len(data[f"{key}-pixels"]["filters"][n]) for n, v in map_errors.items())
            ablation = _section(page, f"{key}-ablation")
            # per block: a row per photo, the mean and the top-10 row; then one summary row per block and mode
            assert [rows for _, rows, _ in ablation["tables"]] == [len(s.photos) + 2] * len(blocks) + [2 * len(blocks)]
            assert list(data[f"{key}-ablation"]["blocks"]) == blocks
        fashion = _section(page, "image-fashion-ablation")
        per_mode = len(s.ablation_layers) * (len(s.measures) + 1)          # + random
        assert [rows for _, rows, _ in fashion["tables"]] == [per_mode, per_mode]
        assert len(fashion["images"]) == 2
        assert list(data["image-fashion-ablation"]["relative_error"]) == s.ablation_layers
        selection = _section(page, "image-fashion-selection")
        assert [rows for _, rows, _ in selection["tables"]] == [len(s.ks) * len(s.measures)] * len(s.selection_layers)
        assert list(data["image-fashion-selection"]["layers"]) == s.selection_layers

    if "text" in names:
        t = tx.QUICK if quick else tx.FULL
        n_test = data["text-model"]["n_test"]
        heat = n_test if t["heat_examples"] is None else min(t["heat_examples"], n_test)
        assert data["text-signs"]["n_examples"] == heat
        assert data["text-negation"]["top_reviews"] == t["top_reviews"]
        assert data["text-model"]["epochs"] == t["epochs"]
        assert len(_section(page, "text-signs")["images"]) == 2      # predicted logit, sentiment score

    if "transformer" in names:
        c = tf.SETTINGS[quick]
        model = data["transformer-model"]
        assert (model["n_train"], model["n_attr"], model["n_steps"]) == (c["n_train"], c["n_attr"], c["n_steps"])
        assert model["n_eval"] == c["n_eval"]
        ablation = _section(page, "transformer-ablation")
        # one table per ablation mode: a row per ranking and random, a column per k
        assert [(rows, cols) for _, rows, cols in ablation["tables"]] == \
            [(len(tf.RANK_MEASURES) + 1, 1 + len(c["ks"]))] * len(tf.ABLATION_MODES)
        assert len(_section(page, "transformer-tokens")["images"]) == 2 * c["token_examples"]
    return page, data
