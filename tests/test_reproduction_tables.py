"""scripts/reproduction_tables.py: the markdown tables of docs/REPRODUCTION.md from a results.json."""
import json
import re

import pytest

from markdown_tables import load_script
from markdown_tables import tables as _tables

rt = load_script("reproduction_tables")


def _check_shape(table):
    assert all(re.fullmatch(r"-+", c) for c in table[1]), table[1]
    assert {len(r) for r in table} == {len(table[0])}, "rows with a different number of cells than the header"


def _photo(rel, unit, points, diff=2.0):
    return {"label": 1, "label_name": "tiger cat", "logit": 9.21, "output_diff": diff, "n_points": points,
            "blocks": {b: {"relative_error": r, "unit_error": u, "top_filters": [0], "top_conductance": [1.0],
                           "sum": diff} for b, r, u in zip(("_blocks.2", "_blocks.15"), rel, unit)}}


def _row(examples, mean, more, mx, top, never=0):
    return {"examples": examples, "flipped": examples - never, "mean_flips": mean, "median_flips": mean,
            "more_than_k": more, "never": never, "max_flips": mx, "top_k_flipped": top, "top_k_share": 0.5,
            "top_k_exact": True}


def _results():
    photos = {"chelsea": _photo([0.0022, 0.0011], [0.0144, 0.0053], 195),
              "coffee": _photo([0.0193, 1e-7], [0.0131, 0.0199], 93, diff=10.93)}
    zero = {"inception3a": {"rows": {"conductance": _row(100, 7.65, 19, 22.0, 77),
                                     "internal_influence": _row(100, 4.92, 2, 13.0, 98),
                                     "random": _row(200, 19.7, 161, 47.0, 28, never=4)}, "flip_counts": {}}}
    base = {"inception3a": {"rows": {"conductance": _row(100, 6.82, 17, 20.0, 82),
                                     "internal_influence": _row(100, 15.55, 63, 44.0, 28, never=1),
                                     "random": _row(200, 22.04, 164, 47.0, 25, never=11)}, "flip_counts": {}}}
    return {
        "settings": {"experiments": "image", "quick": False, "seed": 0},
        "image-effnet-photos": {"rule": {"tolerance": 0.02, "max_steps": 256}, "photos": photos,
                                "max_relative_error": 0.0193, "mean_relative_error": 0.0057,
                                "max_unit_error": 0.0199, "mean_unit_error": 0.0132, "mean_points": 144.0,
                                "warnings": []},
        "image-fashion-ablation": {
            "modes": {"zero": zero, "baseline": base},
            "paper": {"conductance": {"mean_flips": 3.7, "more_than_10": 3, "max_flips": 16, "examples": 100},
                      "internal_influence": {"top_10_flipped": 5, "examples": 100}},
            "relative_error": {"inception3a": {"max": 0.0178, "mean": 0.0053}},
            "relative_error_max": 0.0178, "relative_error_mean": 0.0053, "unit_error_max": 0.0199,
            "unit_error_mean": 0.0095, "mean_points": 59.56},
    }


def test_photo_table_has_one_row_per_photo_with_both_errors_of_every_block():
    d = _results()
    lines = rt.render(d, ["photos"])["photos"]
    (table,) = _tables(lines)
    _check_shape(table)
    assert table[0] == ["photo", "top label (logit)", "F(x) − F(x′)", "path points", "_blocks.2", "_blocks.15",
                        "max per-unit"]
    body = {r[0]: r for r in table[2:]}
    assert list(body) == ["chelsea", "coffee"]
    assert body["chelsea"][1:4] == ["tiger cat (9.2)", "2.00", "195"]
    # completeness · per-unit, in percent
    assert body["chelsea"][4:6] == ["0.22% · 1.44%", "0.11% · 0.53%"]
    # a completeness error that would round to 0.00% keeps two significant digits
    assert body["coffee"][5] == "1e-05% · 1.99%"
    assert body["coffee"][6] == "1.99%" and body["chelsea"][6] == "1.44%"  # the largest of the photo's blocks
    summary = " ".join(lines)
    assert "largest 1.93%, mean 0.57%" in summary and "largest 1.99%, mean 1.32%" in summary
    assert "144 on average" in summary


def test_fashion_tables_carry_the_paper_column_and_the_counts_out_of_their_examples():
    d = _results()
    out = rt.render(d, ["fashion-zero", "fashion-baseline", "fashion-errors"])
    (zero,) = _tables(out["fashion-zero"])
    _check_shape(zero)
    rows = zero[2:]
    assert rows[0] == ["inception3a (48)", "conductance", "7.7", "3.7", "19/100", "3/100", "22", "16", "77/100", ""]
    assert rows[1][1] == "internal influence" and rows[1][-2:] == ["98/100", "5/100"]
    assert rows[2][1] == "random" and rows[2][4] == "161/200" and rows[2][8] == "28/200"
    (base,) = _tables(out["fashion-baseline"])
    _check_shape(base)
    assert base[2] == ["inception3a", "**6.8** · 17 · 20 · 82", "15.6 · 63 · 44 · 28", "22.0 · 164/200 · 47 · 25/200"]
    # images that never flip, over the ranked measures only (random excluded)
    assert "inception3a 0-1" in " ".join(out["fashion-baseline"])
    (err,) = _tables(out["fashion-errors"])
    assert err[2] == ["inception3a", "1.78%", "0.530%"]
    assert "max 1.99%, mean 0.95%" in " ".join(out["fashion-errors"])


def test_missing_sections_are_skipped_and_unknown_names_rejected(tmp_path, capsys):
    d = _results()
    assert set(rt.render(d)) == {"photos", "fashion-zero", "fashion-baseline", "fashion-errors"}
    with pytest.raises(KeyError, match="unknown table 'nope'"):
        rt.render(d, ["nope"])
    path = tmp_path / "results.json"
    path.write_text(json.dumps(d))
    assert rt.main([str(path), "photos", "text-signs"]) == 0
    captured = capsys.readouterr()
    assert "<!-- table: photos -->" in captured.out and "<!-- table: text-signs -->" not in captured.out
    assert "skipped text-signs" in captured.err


def test_a_row_with_the_wrong_number_of_cells_is_an_error():
    with pytest.raises(ValueError, match="2 cells, the header 3"):
        rt.table(["a", "b", "c"], [[1, 2]])
