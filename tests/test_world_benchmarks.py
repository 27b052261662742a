"""The world benchmarks' own logic: the localisation rule that picks the world's masking, the frontier's summary."""

import importlib.util
import json
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def localization():
    return _load("world_localization")


@pytest.fixture(scope="module")
def frontier():
    return _load("world_frontier")


def _s(recall, precision, iou):
    return {"recall": recall, "precision": precision, "iou": iou, "masked_fraction": 0.0, "object_fraction": 0.0}


def test_rule_takes_the_best_iou_threshold_that_reaches_recall_and_precision(localization):
    scores = {
        "threshold 0.02": _s(0.7, 0.61, 0.45),
        "threshold 0.05": _s(0.6, 0.7, 0.50),
        "threshold 0.3": _s(0.2, 0.9, 0.19),
        "top 0.4": _s(0.8, 0.7, 0.60),  # better IoU, but a threshold passes: thresholds come first
    }
    assert localization.choose_rule(scores) == "threshold 0.05"


def test_rule_falls_back_to_rank_based_masks_when_no_threshold_passes(localization):
    scores = {
        "threshold 0.02": _s(0.5, 0.7, 0.40),
        "threshold 0.3": _s(0.2, 0.9, 0.19),
        "top 0.3": _s(0.62, 0.7, 0.50),
        "top 0.5": _s(0.9, 0.55, 0.52),  # higher IoU but fails precision
    }
    assert localization.choose_rule(scores) == "top 0.3"
    # No rule passes at all: the rank-based mask of highest IoU.
    scores["top 0.3"] = _s(0.5, 0.5, 0.40)
    assert localization.choose_rule(scores) == "top 0.5"


def test_every_rule_label_maps_to_mask_arguments(localization):
    rules = dict(localization.rules())
    assert rules["threshold 0.3"] == {"threshold": 0.3}
    assert rules["top 0.4"] == {"threshold": 0.0, "top_fraction": 0.4}


def test_ood_at_matched_id_interpolates_inside_the_curve_only(frontier):
    points = [(90.0, 80.0), (94.0, 84.0), (92.0, 82.0)]  # unsorted on purpose
    assert frontier.ood_at_id(points, 93.0) == pytest.approx(83.0)
    assert frontier.ood_at_id(points, 89.0) is None and frontier.ood_at_id(points, 95.0) is None


def _row(method, beta, seed, test_id, ood, epochs=1, **extra):
    splits = {"test_id": test_id, "ood_shuffled": ood, "ood_swapped": ood, "ood_novel": ood, "ood_style": ood}
    return {
        "method": method,
        "beta": beta,
        "epochs": epochs,
        "seed": seed,
        "results": {**splits, "ood_avg": ood},
        **extra,
    }


def test_summary_gives_means_stds_matched_id_and_oracle_share(frontier, tmp_path):
    rows = []
    for seed, shift in ((0, 0.0), (1, 2.0)):
        rows += [_row("zero-shot", 0.0, seed, 90 + shift, 80 + shift)]
        rows += [_row("vanilla FT", 0.0, seed, 98 + shift, 76 + shift)]
        rows += [_row("FT+FD", b, seed, 96 - b + shift, 80 + b + shift) for b in (1.0, 3.0)]
        rows += [_row("CFFT object/single", b, seed, 96 - b + shift, 81 + b + shift) for b in (1.0, 3.0)]
        rows += [_row("WiSE-FT", a, seed, 90 + 8 * a + shift, 80 + shift, alpha=a) for a in (0.0, 1.0)]
        rows += [_row("oracle FT (context independent of class)", 0.0, seed, 95 + shift, 84 + shift)]
    text, means = frontier.summarize(rows, 2)
    # Mean and sample std over the two seeds (values 95 and 97 for FT+FD at beta 1).
    assert "| FT+FD | 1 | beta 1 | 2 | 96.0 ± 1.4 |" in text
    # CFFT lies 1 point above FT+FD at every matched ID (FT+FD's mean IDs 94 and 96), so the table says +1.0.
    assert "| CFFT object/single | 1 | 94.0 | 85.0 | +1.0 |" in text
    assert "| CFFT object/single | 1 | 96.0 | 83.0 | +1.0 |" in text
    # Oracle gain over zero-shot: 85 - 81 = 4; CFFT at beta 3 keeps (85 - 81) / 4 = 1.00 of it.
    assert "the oracle's OOD gain over zero-shot is +4.0 points" in text
    assert "| CFFT object/single | 1 | 3 | +4.0 | +1.00 |" in text
    frontier.plot(means, tmp_path / "frontier.png", "test")
    assert (tmp_path / "frontier.png").stat().st_size > 10_000


def test_frontier_grid_runs_in_the_issue_order_and_resumes_by_key(frontier, tmp_path):
    cells = frontier.cells([0, 1])
    assert [c["method"] for c in cells[:2]] == ["vanilla FT", "vanilla FT"]
    assert cells[2] == {"method": "FT+FD", "beta": 1.0, "epochs": 1, "seed": 0}
    assert cells[-1]["epochs"] == 5
    (tmp_path / "rows-0of2.jsonl").write_text(json.dumps({**cells[0], "results": {}}) + "\n")
    assert {frontier.key(r) for r in frontier.read_rows(tmp_path)} == {frontier.key(cells[0])}
