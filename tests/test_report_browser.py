"""The HTML report as a reader sees it: opened in real headless Chromium (Debian's chromium and
chromedriver, driven by selenium 4), every picture loads, the tables and section titles are there,
and the browser console has no errors. A full-page screenshot is kept in tests/artifacts/.
The checks live in tests/report_checks.py (usable on any report folder). The quick reproduction
report is built and checked here; the full one when CONDUCTANCE_FULL_REPORT names its folder
(scripts/check_full_report.sh runs the full reproduction, then that test).

The browser is never downloaded: selenium is pointed at /usr/bin/chromedriver and /usr/bin/chromium
and SE_OFFLINE=true stops selenium-manager from fetching anything. Without them the tests skip
(CI installs them).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from report_checks import (
    browser_missing,
    check_reproduction,
    check_results_json,
    check_sections,
    chromium,
    open_and_check,
)

ARTIFACTS = Path(__file__).parent / "artifacts"
EXPERIMENT_MODULES = ("image", "text", "transformer")
#: Photos bundled with scikit-image (no download).
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "immunohistochemistry", "colorwheel", "hubble_deep_field",
          "cat")
#: A folder written by `conductance reproduce all --out DIR` (the full run: 25-60 min) to check in the browser.
FULL_REPORT_ENV = "CONDUCTANCE_FULL_REPORT"


def _skip_without_browser() -> None:
    why = browser_missing()
    if why:
        pytest.skip(why)
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (pip install 'conductance[plots]')")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium for the module, with the console log captured."""
    _skip_without_browser()
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


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


def test_a_table_with_every_measure_fits_the_page(browser, tmp_path):
    """The full run's flip-count summary (block, mode, six measures and random: nine columns) was wider
    than the page, its last column cut off; measure names now break after an underscore."""
    from conductance.experiments.image import MEASURES
    from conductance.experiments.report import Report

    names = list(MEASURES) + ["random"]
    rows = [[f"_blocks.{b}", mode] + [f"{10 + 3.7 * j:.1f} (8/8)" for j in range(len(names))]
            for mode in ("zero", "baseline") for b in (2, 4, 7, 10, 14, 15)]
    report = Report("wide", {"seed": 0})
    report.section("Flip counts", key="flips").table(rows, ["block", "mode"] + names,
                                                     caption="mean filters removed until the label changes")
    html_path, _ = report.write(str(tmp_path))
    page = open_and_check(browser, html_path, tmp_path / "shot.png")
    assert page["tables"][1:] == [["mean filters removed until the label changes", 12]]   # after the settings
    # the header text is unchanged (the break opportunity is an empty <wbr> element)
    headers = browser.execute_script("return Array.from(document.querySelectorAll('thead th')).map(h => h.textContent)")
    assert headers == ["block", "mode"] + names


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
def test_quick_reproduction_report_renders_in_chromium(quick_report, browser, tmp_path):
    page, data = check_reproduction(browser, quick_report, ARTIFACTS / "report-quick-sections")
    shutil.copy(ARTIFACTS / "report-quick-sections" / "report.png", ARTIFACTS / "report.png")
    assert data["settings"]["quick"] is True
    assert len(page["images"]) >= 3, "each experiment should show at least one figure"
    assert len(page["tables"]) >= 1 + len(EXPERIMENT_MODULES), f"too few tables: {page['tables']}"
    # the section list comes from the recorded settings: a run that claims GoogLeNet weights and
    # shows no GoogLeNet section fails
    claimed = tmp_path / "claimed"
    shutil.copytree(quick_report, claimed)
    (claimed / "results.json").write_text(json.dumps({**data, "settings": {**data["settings"],
                                                                           "googlenet weights": "g.pth"}}))
    with pytest.raises(AssertionError, match="expected .*image-googlenet-photos"):
        check_reproduction(browser, claimed, tmp_path / "shots")


def _full_report() -> Path:
    folder = os.environ.get(FULL_REPORT_ENV)
    if not folder:
        pytest.skip(f"set {FULL_REPORT_ENV}=DIR to a folder written by `conductance reproduce all --out DIR` "
                    "(the full run takes 25-60 min; scripts/check_full_report.sh runs it and this test)")
    path = Path(folder)
    assert (path / "report.html").is_file(), f"{FULL_REPORT_ENV}={folder}: no report.html there"
    return path


def test_full_reproduction_report_renders_in_chromium(browser):
    """The full report (`reproduce all` without --quick), section by section, at its full sizes:
    eight photos and six blocks, four Fashion-MNIST layers, every test review, three values of k,
    and GoogLeNet when the run was given its weights."""
    folder = _full_report()
    settings = check_results_json(str(folder / "results.json"))["settings"]
    assert settings["quick"] is False, f"{folder} is a quick report (--quick); give a full one"
    assert set(settings["experiments"].split(", ")) >= set(EXPERIMENT_MODULES), \
        f"{folder} has only {settings['experiments']}: the full report is `conductance reproduce all`"
    page, data = check_reproduction(browser, folder, ARTIFACTS / "report-full-sections")
    # eight photos: the per-pixel section adds the one filter shown across every photo
    assert any("on every photo" in alt or "across the photos" in alt
               for alt, _, _ in next(s for s in page["sections"] if s["id"] == "image-effnet-pixels")["images"])
