"""Paired-by-seed differences at matched ID (hf_cfft.evaluation.paired) on hand-made rows with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from hf_cfft.evaluation.frontier import write_frontier_report
from hf_cfft.evaluation.paired import (
    Difference,
    matched_differences,
    range_difference,
    seeds_needed,
    t_quantile_975,
    values_at_id,
)

OOD = ("ood_a", "ood_b")


def _row(method, strength, seed, test, ood_a, ood_b, *, name="beta"):
    results = {"test": test, "ood_a": ood_a, "ood_b": ood_b, "ood_avg": (ood_a + ood_b) / 2}
    row = {"method": method, "strength": strength, "strength_name": name, "epochs": 1, "seed": seed}
    return row | {"results": results}


# The reference's curve per seed: ID 90 -> 94 over its three strengths, OOD falling 80 -> 70 (split a) and 60 -> 50
# (split b), plus a large seed effect (seed s moves every OOD number of every method by 3 * (s - 1)).
SHIFT = {0: -3.0, 1: 0.0, 2: 3.0}


def _reference(seed):
    s = SHIFT[seed]
    return [
        _row("REF", 1.0, seed, 90.0, 80 + s, 60 + s),
        _row("REF", 3.0, seed, 92.0, 75 + s, 55 + s),
        _row("REF", 10.0, seed, 94.0, 70 + s, 50 + s),
    ]


def _method(name, offsets, ids=(91.0, 93.0)):
    """Two points at ``ids``, each ``offsets[seed]`` above the reference at that ID on split a (split b: equal)."""
    rows = []
    for seed, offset in offsets.items():
        s = SHIFT[seed]
        for strength, x in zip((1.0, 3.0), ids):
            ref_a, ref_b = 80 - 2.5 * (x - 90) + s, 60 - 2.5 * (x - 90) + s
            rows.append(_row(name, strength, seed, x, ref_a + offset, ref_b))
    return rows


def test_rows_written_with_the_old_beta_key_read_as_the_new_strength_key():
    """Rows before 2026-12-03 kept every strength (WiSE-FT's alpha too) under "beta"; the shipped rows are such."""
    from hf_cfft.evaluation.frontier import row_key, strength_label

    new = [*(r for seed in SHIFT for r in _reference(seed)), *_method("M", {0: 2.0, 1: 1.0, 2: 3.0})]
    new.append(_row("WiSE-FT", 0.25, 0, 91.0, 70.0, 50.0, name="alpha"))
    old = [{("beta" if key == "strength" else key): value for key, value in row.items()} for row in new]
    old[-1]["alpha"] = 0.25
    del old[-1]["strength_name"]  # the first harness's WiSE-FT rows: "alpha" beside "beta", no strength_name
    assert [row_key(r) for r in old] == [row_key(r) for r in new]
    assert strength_label(old[-1]) == strength_label(new[-1]) == "alpha 0.25"
    cols = ["ood_a", "ood_b", "ood_avg"]
    found = {
        name: matched_differences(rows, ("M", 1), ("REF", 1), id_split="test", columns=cols)
        for name, rows in (("old", old), ("new", new))
    }
    assert found["old"] == found["new"] and found["new"][0].differences["ood_a"].mean == pytest.approx(2.0)


def test_t_quantiles_and_seeds_needed_match_the_tables():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(2) == 4.303 and t_quantile_975(30) == 2.042
    assert t_quantile_975(60) == pytest.approx(2.000, abs=1e-3)  # tables: 2.000
    assert t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)  # tables: 1.980
    # mean 0.5, sd 1: n = 18 gives t(17) * 1 / sqrt(18) = 2.110 / 4.243 = 0.497 < 0.5; n = 17: 2.120 / 4.123 > 0.5.
    assert seeds_needed(0.5, 1.0) == 18
    assert seeds_needed(0.0, 1.0) is None and seeds_needed(0.3, 0.0) == 2


def test_a_constant_offset_under_a_large_seed_spread_is_resolved_only_when_paired():
    offsets = {0: 0.4, 1: 0.5, 2: 0.6}  # split a: +0.5 +- 0.1 over seeds, while seeds move OOD by +-3 points
    rows = [r for seed in SHIFT for r in _reference(seed)] + _method("M", offsets)
    found = matched_differences(rows, ("M", 1), ("REF", 1), id_split="test", columns=["ood_a", "ood_b", "ood_avg"])
    assert [m.strength for m in found] == [1.0, 3.0] and [m.id_mean for m in found] == [91.0, 93.0]
    d = found[0].differences["ood_a"]
    half = 4.303 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n), by hand
    assert d.mean == pytest.approx(0.5) and d.sd == pytest.approx(0.1)
    assert (d.low, d.high) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    assert d.verdict() == "better" and d.same_sign == 3 and d.seeds == 3 and d.needed() == "-"
    assert found[0].differences["ood_b"].mean == pytest.approx(0.0)
    assert found[0].differences["ood_avg"].mean == pytest.approx(0.25)
    # Unpaired, the same rows are a tie: each method's mean at a strength has a seed std of 3 points.
    seeds_std = Difference.of([80 - 2.5 + s + 0.5 for s in SHIFT.values()]).sd
    assert seeds_std == pytest.approx(3.0, abs=0.01)


def test_a_true_tie_one_seed_and_curves_that_do_not_overlap():
    rows = [r for seed in SHIFT for r in _reference(seed)]
    tie = rows + _method("TIE", {0: 0.3, 1: -0.3, 2: 0.0})
    d = matched_differences(tie, ("TIE", 1), ("REF", 1), id_split="test", columns=["ood_a"])[0].differences["ood_a"]
    half = 4.303 * 0.3 / math.sqrt(3)
    assert d.mean == pytest.approx(0.0, abs=1e-12) and d.high == pytest.approx(half) and d.low == pytest.approx(-half)
    assert d.verdict().startswith("tie (interval [") and not d.resolved
    one = _reference(1) + _method("ONE", {1: 5.0})
    d = matched_differences(one, ("ONE", 1), ("REF", 1), id_split="test", columns=["ood_a"])[0].differences["ood_a"]
    assert d.seeds == 1 and d.low is None and d.verdict() == "one seed: not resolved"
    assert d.needed() == "unknown (one seed has no spread)"
    apart = rows + _method("FAR", {0: 1.0, 1: 1.0, 2: 1.0}, ids=(96.0, 98.0))
    assert matched_differences(apart, ("FAR", 1), ("REF", 1), id_split="test", columns=["ood_a"]) == []
    assert range_difference(apart, ("FAR", 1), ("REF", 1), id_split="test", columns=["ood_a"]) is None


def test_a_single_point_reference_is_matched_on_the_methods_curve_and_two_points_are_not():
    rows = [_row("VAN", 0.0, s, 92.0, 75 + SHIFT[s] - 1.0, 55, name="") for s in SHIFT]
    rows += [r for seed in SHIFT for r in _reference(seed)]
    found = matched_differences(rows, ("REF", 1), ("VAN", 1), id_split="test", columns=["ood_a"])
    assert len(found) == 1 and found[0].strength is None and found[0].id_mean == 92.0
    assert found[0].differences["ood_a"].mean == pytest.approx(1.0) and found[0].differences["ood_a"].sd == 0
    rows += [_row("LP", 0.0, s, 93.0, 70, 50, name="") for s in SHIFT]
    assert matched_differences(rows, ("LP", 1), ("VAN", 1), id_split="test", columns=["ood_a"]) == []


def test_a_curve_that_turns_back_in_id_is_read_on_its_upper_envelope():
    # strengths in order: ID 90 -> 94 -> 92 (the last strength loses ID); at ID 93 the path crosses twice.
    points = [(0.0, {"test": 90.0, "ood_avg": 80.0}), (1.0, {"test": 94.0, "ood_avg": 70.0}),
              (2.0, {"test": 92.0, "ood_avg": 60.0})]  # fmt: skip
    assert values_at_id(points, "test", 93.0, ["ood_avg"]) == {"ood_avg": 72.5}  # not (70 + 60) / 2 = 65
    assert values_at_id(points, "test", 95.0, ["ood_avg"]) is None


def test_the_common_range_average_pairs_each_seeds_mean_difference():
    rows = [r for seed in SHIFT for r in _reference(seed)] + _method("M", {0: 0.4, 1: 0.5, 2: 0.6})
    span = range_difference(rows, ("M", 1), ("REF", 1), id_split="test", columns=["ood_a", "ood_avg"])
    assert (span.id_low, span.id_high) == (91.0, 93.0)
    assert span.differences["ood_a"].mean == pytest.approx(0.5) and span.differences["ood_a"].resolved


def test_the_report_names_what_is_resolved_and_writes_both_plots(tmp_path):
    rows = [r for seed in SHIFT for r in _reference(seed)]
    rows += _method("M", {0: 0.4, 1: 0.5, 2: 0.6}) + _method("TIE", {0: 0.3, 1: -0.3, 2: 0.0})
    rows += [_row("zero-shot", 0.0, s, 88.0, 82 + SHIFT[s], 62 + SHIFT[s], name="") for s in SHIFT]
    paths = write_frontier_report(tmp_path, rows, id_split="test", ood_splits=OOD, references=["REF"])
    summary = Path(paths["summary"]).read_text()
    better = "M vs REF, OOD average: over the common ID range 91.0-93.0, better (+0.25 [+0.13, +0.37], 3 of 3 seeds)"
    assert better in summary
    assert "M vs REF, resolved on single splits: ood_a at the common ID range +0.50 [+0.25, +0.75]" in summary
    assert "TIE vs REF, OOD average: over the common ID range 91.0-93.0, tie (+0.00 [-0.37, +0.37], 0 of 3" in summary
    assert "No split's spread is 1.5x every other's." in summary
    assert "TIE vs REF, resolved" not in summary
    report = Path(paths["report"]).read_text()
    for needle in ("## Paired by seed against REF, at matched ID", "### OOD average", "### ood_a", "### ood_b",
                   "| M | beta 1 | 91.0 | 3 | +0.50 | [+0.25, +0.75] | 3/3 | better | - |",
                   "## Change over zero-shot, paired by seed (not matched in ID)"):  # fmt: skip
        assert needle in report, needle
    paired = json.loads(Path(paths["json"]).read_text())["paired"]["REF"]
    assert {c["method"] for c in paired} == {"M", "TIE"}
    # Both plots: the frontier (full + zoom side by side) and the paired plot (OOD average, 2 splits, the legend).
    with Image.open(paths["plot"]) as plot:
        assert plot.size == (1600, 700)
    with Image.open(paths["paired_plot"]) as plot:
        assert plot.size == (1560, 840)  # 3 panels and the legend, 5.2 x 4.2 inches each at 100 dpi: 2 rows of 3
    assert Path(paths["paired_plot"]).stat().st_size > 20_000


def test_one_seed_resolves_nothing_in_the_report(tmp_path):
    rows = _reference(1) + _method("M", {1: 5.0})
    paths = write_frontier_report(tmp_path, rows, id_split="test", ood_splits=OOD, references=["REF"])
    summary = Path(paths["summary"]).read_text()
    assert "One seed per run: no difference between methods can be resolved" in summary
    assert "| M | beta 1 | 91.0 | 1 | +2.50 | - | 1/1 | one seed: not resolved |" in Path(paths["report"]).read_text()
