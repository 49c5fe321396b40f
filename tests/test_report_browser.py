"""The HTML report as a reader sees it: opened in real headless Chromium (Debian's chromium and
chromedriver, driven by selenium 4), every picture loads, the tables and section titles are there,
and the browser console has no errors. A full-page screenshot is kept in tests/artifacts/.

The browser is never downloaded: selenium is pointed at /usr/bin/chromedriver and /usr/bin/chromium
and SE_OFFLINE=true stops selenium-manager from fetching anything. Without them the tests skip
(CI installs them).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).parent / "artifacts"
EXPERIMENT_MODULES = ("image", "text", "transformer")
#: Photos bundled with scikit-image (no download).
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "immunohistochemistry", "colorwheel", "hubble_deep_field",
          "cat")


def _skip_without_browser() -> None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            pytest.skip(f"{path} is missing (apt-get install chromium chromium-driver)")
    if importlib.util.find_spec("selenium") is None:
        pytest.skip("selenium is not installed (pip install 'conductance[report]')")
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (pip install 'conductance[plots]')")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium for the module, with the console log captured."""
    _skip_without_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # selenium-manager must not try to download a driver or a browser
    previous = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1200,900",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
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


def _finite_numbers(value, where="results.json"):
    """Yield (path, number) for every number in a parsed JSON value that is not finite."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _finite_numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _finite_numbers(v, f"{where}[{i}]")


def _count_numbers(value) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, (int, float)):
        return 1
    if isinstance(value, dict):
        return sum(_count_numbers(v) for v in value.values())
    if isinstance(value, list):
        return sum(_count_numbers(v) for v in value)
    return 0


def open_and_check(driver, html_path: str, screenshot: Path) -> dict:
    """Open the report, check what every report must satisfy, save a full-page screenshot.

    Returns what the page shows: ``titles`` (h2 texts), ``images`` (alt, naturalWidth,
    naturalHeight), ``tables`` (caption, rows), ``toc`` (link texts) and ``h1``.
    """
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")                                    # drop entries of earlier pages
    driver.get(Path(html_path).resolve().as_uri())
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
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
        return Array.from(document.querySelectorAll('section')).map(s => ({
          id: s.id, title: (s.querySelector('h2') || {}).textContent || '', text: s.innerText,
          images: Array.from(s.querySelectorAll('img')).map(i => [i.alt, i.naturalWidth, i.naturalHeight])}));""")
    page["text"] = driver.execute_script("return document.body.innerText")
    broken = [alt for alt, w, h in page["images"] if not (w > 0 and h > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert page["titles"] and all(page["titles"]), f"missing or empty section titles: {page['titles']}"
    assert page["toc"] == page["titles"], "the table of contents must list every section"
    assert all(rows > 0 for _, rows in page["tables"]), f"a table has no rows: {page['tables']}"
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, f"browser console errors: {severe}"
    # A full-page screenshot: Chromium's DevTools call can capture beyond the window.
    size = driver.execute_script("return [document.documentElement.scrollWidth, "
                                 "document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}})
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return page


NAN_TEXT = re.compile(r"(?<![A-Za-z])nan(?![A-Za-z])", re.IGNORECASE)


def check_sections(driver, page: dict, shots: Path) -> None:
    """Each section on its own: its pictures loaded, no "nan" in its text; a screenshot of each is kept."""
    from selenium.webdriver.common.by import By

    for sec in page["sections"]:
        broken = [alt for alt, w, h in sec["images"] if not (w > 0 and h > 0)]
        assert not broken, f"section {sec['title']!r}: images that did not load: {broken}"
        found = [m.group(0) for m in NAN_TEXT.finditer(sec["text"])]
        assert not found, f"section {sec['title']!r} shows {found[:3]}: " + \
            sec["text"][max(0, NAN_TEXT.search(sec["text"]).start() - 80):][:160]
        element = driver.find_element(By.ID, sec["id"])
        shots.mkdir(parents=True, exist_ok=True)
        assert element.screenshot(str(shots / f"{sec['id']}.png"))


def check_results_json(json_path: str) -> dict:
    """results.json parses (strict JSON) and every number in it is finite."""
    with open(json_path, encoding="utf-8") as f:
        data = json.load(f, parse_constant=lambda name: pytest.fail(f"results.json contains {name}"))
    bad = list(_finite_numbers(data))
    assert not bad, f"non-finite numbers in results.json: {bad[:10]}"
    return data


# --------------------------------------------------------------------------------------------
# a small real report, built here: runs today


def _photo_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 5, padding=2), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def build_small_report(out_dir: Path):
    """A report with real results on a seeded CNN and a real photo: top units, completeness error
    against path points, a pixel map of one filter, a sign heat map and two tables."""
    import matplotlib
    matplotlib.use("Agg")
    import skimage.data
    import skimage.transform

    import conductance as cd
    from conductance import plots
    from conductance.experiments.report import Report

    model = _photo_cnn(0)
    photos = [skimage.transform.resize(getattr(skimage.data, name)(), (60, 90), anti_aliasing=True)
              for name in PHOTOS]                                        # real photos in [0, 1]
    batch = torch.tensor(np.stack(photos), dtype=torch.float32).permute(0, 3, 1, 2)
    x = batch[:1]

    report = Report("conductance: a small real report", {"model": "seeded 2-layer CNN", "photos": ", ".join(PHOTOS),
                                                          "examples": batch.shape[0]})
    result = cd.layer_conductance(model, batch, ["1", "3"], units="channel", n_steps=64)
    sec = report.section("Filter conductance of a small CNN", key="cnn")
    sec.text("Conductance of the filters of two layers of a seeded CNN on eight real photos.")
    sec.figure(result.plot("3", k=8), "Top filters of layer 3 for the photo", name="top-filters")
    sec.table([(layer, result[layer].shape[1], float(result.relative_error[layer].max()), result.is_cut[layer])
               for layer in result], ["layer", "filters", "max relative completeness error", "cut"],
              caption="Completeness per layer")
    sec.numbers(max_relative_error={layer: result.relative_error[layer].max() for layer in result},
                output_diff=result.output_diff)
    from conductance.experiments.report import percent
    shares = [float((result[layer] > 0).float().mean()) for layer in result] + [float("nan")]
    sec.table([[name, percent(v, 1, "no layer under this name in the run")]
               for name, v in zip(list(result) + ["5"], shares)], ["layer", "positive share"],
              caption="Share of positive filter conductances")

    # layer 1 (a ReLU under another ReLU): the path integral is not exact, so the rules differ
    steps = [2, 4, 8, 16, 32]
    errors = {}
    for method in ("gausslegendre", "uniform"):
        with warnings.catch_warnings():   # few steps are the point here: do not warn about their error
            warnings.simplefilter("ignore", cd.ConductanceWarning)
            per = [cd.layer_conductance(model, batch[:3], "1", units="channel", n_steps=n, method=method)
                   .relative_error["1"].numpy() for n in steps]
        errors[method] = ([n + 1 for n in steps], np.stack(per, axis=1))
    acc = report.section("Completeness error against path points", key="steps")
    acc.figure(plots.error_vs_steps(errors, tolerance=0.01), "Relative completeness error, layer 1",
               name="error-vs-steps")
    acc.table([(m, n, float(e[:, i].max())) for m, (pts, e) in errors.items() for i, n in enumerate(pts)],
              ["rule", "points", "max relative error"], caption="Error per rule")
    acc.numbers(errors={m: e for m, (_, e) in errors.items()})

    top = result.top(1, "3")[0].unit
    pixels = cd.neuron_conductance(model, x, "3", [top], units="channel", n_steps=32)   # (1, 1, 3, H, W)
    pix = report.section("Pixels through the top filter", key="pixels")
    pix.figure(plots.pixel_maps(x[0], {f"filter {top} (overlay)": pixels[0, 0]}, mode="overlay"),
               "Conductance of the top filter per pixel", name="pixels-overlay")
    pix.figure(plots.pixel_map(x[0], pixels[0, 0], mode="scale", title=f"filter {top}"),
               "The photo scaled by |conductance| (the paper's Figure 1 style)", name="pixels-scale")

    signs = report.section("Signs of conductance", key="signs")
    signs.figure(plots.sign_heatmap(result["3"], threshold=1e-3, ylabel="photos", xlabel="filters",
                                     row_labels=PHOTOS),
                 "Sign of filter conductance, layer 3",
                 name="signs")
    html_path, json_path = report.write(str(out_dir))
    return report, html_path, json_path


def test_small_real_report_renders_in_chromium(browser, tmp_path):
    report, html_path, json_path = build_small_report(tmp_path / "report")
    page = open_and_check(browser, html_path, ARTIFACTS / "report-small.png")
    assert page["h1"] == report.title
    assert page["titles"] == [s.title for s in report.sections]
    n_figures = sum(block["kind"] == "figure" for s in report.sections for block in s.blocks)
    assert n_figures == 5 and len(page["images"]) == n_figures
    # a figure is a real picture, not a sliver: at least 200 px wide at the report's 110 dpi
    assert all(w >= 200 and h >= 100 for _, w, h in page["images"])
    captions = [c for c, _ in page["tables"]]
    assert captions == ["Settings", "Completeness per layer", "Share of positive filter conductances",
                        "Error per rule"]
    rows = dict(page["tables"])
    assert rows["Completeness per layer"] == 2 and rows["Error per rule"] == 10
    # a value that does not exist reads "n/a" with its reason, never "nan"
    assert "n/a: no layer under this name in the run." in page["text"]
    check_sections(browser, page, ARTIFACTS / "report-small-sections")
    data = check_results_json(json_path)
    assert set(data) >= {"title", "settings", "cnn", "steps"}
    # the numbers in the JSON are the ones computed: completeness holds at 64 Gauss-Legendre points
    assert max(data["cnn"]["max_relative_error"].values()) < 0.01
    # the PNGs beside the page are the embedded ones
    assert sorted(os.listdir(Path(html_path).parent / "figures")) == sorted(report.files)


def test_the_checks_catch_a_broken_page(browser, tmp_path):
    """The browser checks are not vacuous: a picture that does not decode and a script error fail them."""
    from conductance.experiments.report import Report

    report = Report("broken", {"seed": 0})
    report.section("Only section").html('<figure><img alt="bad" src="data:image/png;base64,AAAA"></figure>')
    html_path, _ = report.write(str(tmp_path))
    with pytest.raises(AssertionError, match="images that did not load: \\['bad'\\]"):
        open_and_check(browser, html_path, tmp_path / "shot.png")
    report.sections[0].blocks[:] = ["<p>no picture</p><script>undefinedCall()</script>"]
    html_path, _ = report.write(str(tmp_path))
    with pytest.raises(AssertionError, match="browser console errors.*undefinedCall"):
        open_and_check(browser, html_path, tmp_path / "shot.png")


# --------------------------------------------------------------------------------------------
# the full `conductance reproduce all --quick` report


def _missing_experiments() -> list[str]:
    return [name for name in EXPERIMENT_MODULES
            if importlib.util.find_spec(f"conductance.experiments.{name}") is None]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> Path:
    """Runs ``conductance reproduce all --quick`` once and returns its output folder."""
    missing = _missing_experiments()
    if missing:
        pytest.skip(f"experiment modules not written yet: {', '.join('conductance.experiments.' + m for m in missing)}")
    out = tmp_path_factory.mktemp("quick-report")
    run = subprocess.run([sys.executable, "-m", "conductance.cli", "reproduce", "all", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=3000)
    assert run.returncode == 0, f"reproduce failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_quick_reproduction_report_renders_in_chromium(quick_report, browser):
    html_path = quick_report / "report.html"
    json_path = quick_report / "results.json"
    assert html_path.is_file() and json_path.is_file()
    page = open_and_check(browser, str(html_path), ARTIFACTS / "report.png")
    assert not [t for t in page["titles"] if t.endswith("not run")], f"experiments did not run: {page['titles']}"
    check_sections(browser, page, ARTIFACTS / "report-quick-sections")
    assert "ASSETS.md" not in page["text"], "the report points at a file that is not in the repository"
    assert len(page["images"]) >= 3, "each experiment should show at least one figure"
    assert len(page["tables"]) >= 1 + len(EXPERIMENT_MODULES), f"too few tables: {page['tables']}"
    data = check_results_json(str(json_path))
    sections = {k: v for k, v in data.items() if k not in ("title", "settings")}
    assert sections, "results.json holds no experiment numbers"
    assert _count_numbers(sections) > 0
    for name in EXPERIMENT_MODULES:
        assert f"{name} seconds" in data["settings"], f"experiment {name} did not report its run time"
    figures = sorted(os.listdir(quick_report / "figures"))
    assert len(figures) == len(page["images"])
