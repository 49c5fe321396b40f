"""scripts/pruning_tables.py: docs/pruning.md's study tables from results.json files."""
import json

from markdown_tables import load_script
from markdown_tables import tables as _tables

pt = load_script("pruning_tables")


def _network():
    # two ratios; random has three draws whose mean, min and max all differ
    crit = {"pruned": [[0.61, 0.2]], "pruned_mean_fill": [[0.7, 0.3]], "fine_tuned": [[0.88, 0.85]],
            "global50": [0.35], "score_seconds": 12.345,
            "completeness": {"stem.conv": {"mean": 0.05, "max": 1.6, "above": 60, "unit_mean": 0.23,
                                           "unit_max": 0.9, "unit_above": 200},
                             "block.conv": {"unit_mean": 0.1, "unit_max": 0.4, "unit_above": 7}}}
    rand = {"pruned": [[0.2, 0.1], [0.3, 0.1], [0.4, 0.1]], "pruned_mean_fill": [[0.0985] * 2] * 3,
            "fine_tuned": [[0.8, 0.7]] * 3, "global50": [0.0985, 0.0985, 0.0985], "score_seconds": None}
    return {"base_accuracy": 0.9151, "ratios": [0.1, 0.2], "seconds": 601.4,
            "criteria": {"conductance": crit, "random": rand}}


def test_network_table_rows_and_cells():
    lines = pt.render([{"pruning-inception": _network()}])
    acc, errors = _tables(lines)
    assert acc[0] == ["criterion", "10%", "20%", "global 50%", "scores (s)"]
    assert {len(r) for r in acc} == {5}
    rows = {(i, r[0]): r for i, r in enumerate(acc)}
    conductance = next(r for (i, name), r in rows.items() if name == "conductance")
    assert conductance == ["conductance", "0.610", "0.200", "0.350", "12.35"]
    random_rows = [r for r in acc if r[0] == "random"]
    assert random_rows[0][1] == "0.300 (0.200-0.400)"       # mean (min-max) of the three draws
    assert random_rows[0][2] == "0.100"                      # equal draws: one value
    # the mean of three equal 0.0985 is 0.0984999...; it must print as the draws do
    assert random_rows[1][1] == f"{0.0985:.3f}" and random_rows[0][3] == f"{0.0985:.3f}"
    assert [r[0] for r in acc if r[0].startswith("*")] == ["*pruned*", "*pruned + mean fill*", "*fine-tuned 1 epoch*"]
    assert errors[2] == ["stem.conv", "5.0%", "160.0%", "60", "23.0%", "90.0%", "200"]
    assert errors[3] == ["block.conv", "–", "–", "–", "10.0%", "40.0%", "7"]


def test_parts_from_several_files_in_study_order(tmp_path):
    eff = {"ratios": [0.05], "views": 24, "base_mean_margin": 1.07, "seconds": 172.0,
           "criteria": {"l1": {"agreement": [[0.5]], "agreement_mean_fill": [[0.75]], "margin_change": [[-3.17]],
                               "score_seconds": None}}}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"pruning-resnet": _network(), "pruning-efficientnet": eff}))
    b.write_text(json.dumps({"pruning-inception": _network()}))
    lines = pt.render([json.loads(a.read_text()), json.loads(b.read_text())])
    titles = [line.split("**")[1] for line in lines if line.startswith("**")]
    assert titles == ["inception", "resnet", "EfficientNet-Lite0"]
    assert _tables(lines)[-1][2] == ["l1", "0.500", "0.750", "-3.17", ""]
    assert pt.main([str(a), str(b)]) == 0
