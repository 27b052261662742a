"""The world localisation benchmark's own logic: the rule that picks the world's masking (fixed before any OOD result).

The world's frontier is a configuration of recipes/compare.py: tests/test_compare.py."""

import pathlib

import pytest
from _builders import load_script

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    return load_script(BENCHMARKS / f"{name}.py", f"bench_{name}")


@pytest.fixture(scope="module")
def localization():
    return _load("world_localization")


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
