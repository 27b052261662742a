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


def test_every_rule_masks_what_its_label_says(localization):
    """Each scored rule, applied as the benchmark applies it, gives the mask its label names on a CAM of distinct
    values: "threshold t" masks the patches above t, "top f" the round(f * 64) patches of highest CAM."""
    import torch

    from hf_cfft.masking import cam_patch_mask

    cam = torch.randperm(64, generator=torch.Generator().manual_seed(0)).float().div(63).view(1, 8, 8)
    labels = [label for label, _ in localization.rules()]
    assert "threshold 0.3" in labels and any(label.startswith("top ") for label in labels)
    for label, kwargs in localization.rules():
        mask = cam_patch_mask(cam, "object", **kwargs)
        kind, value = label.split()
        if kind == "threshold":
            assert torch.equal(mask, cam > float(value)), label
        else:
            count = round(float(value) * 64)
            assert int(mask.sum()) == count and cam[mask].min() > cam[~mask].max(), label
