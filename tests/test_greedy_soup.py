"""Greedy soups (Wortsman et al., 2022): ingredients by held-out score, each kept only if the soup is no worse."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from _builders import load_script, write_imagefolder

from hf_cfft import ClipCfftForImageClassification
from hf_cfft.baselines import check_held_out_split, greedy_soup, uniform_soup

ROOT = Path(__file__).resolve().parents[1]


def _shifted(model: ClipCfftForImageClassification, x: float) -> ClipCfftForImageClassification:
    """A copy of ``model`` whose head weights sit ``x`` away from the original along one fixed direction."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.classifier.weight.add_(x)
    return other


def _score(reference: ClipCfftForImageClassification):
    # A held-out "accuracy" with a known optimum: minus the head's distance from the reference model's head. The
    # soup's head is the mean of the ingredients' heads, so every greedy step can be worked out by hand.
    def score(model) -> float:
        return -abs(float((model.classifier.weight - reference.classifier.weight).mean()))

    return score


@pytest.fixture
def ingredients(tiny_classifier):
    # Offsets 2.0, -3.0, -0.6, 0.5 given in this order; held-out scores -2.0, -3.0, -0.6, -0.5.
    return [_shifted(tiny_classifier, x) for x in (2.0, -3.0, -0.6, 0.5)], ["far+", "farther-", "near-", "nearest+"]


def test_greedy_soup_keeps_exactly_the_ingredients_that_help(tiny_classifier, ingredients):
    models, names = ingredients
    result = greedy_soup(models, _score(tiny_classifier), names=names)
    # Sorted: nearest+ (0.5), near- (-0.6), far+ (2.0), farther- (-3.0). Soup {0.5} -> -0.5; + -0.6: mean -0.05,
    # better, kept; + 2.0: mean 0.633, worse, dropped; + -3.0: mean -1.033, worse, dropped.
    assert result.chosen == ["nearest+", "near-"]
    assert [(name, kept) for name, _, kept in result.tried] == [("near-", True), ("far+", False), ("farther-", False)]
    assert result.soup_score == pytest.approx(-0.05, abs=1e-6)
    expected = uniform_soup([models[3], models[2]]).state_dict()
    assert all(torch.equal(result.model.state_dict()[k], v) for k, v in expected.items())
    # The uniform soup of everything is worse than the greedy one here (mean -0.275).
    assert _score(tiny_classifier)(uniform_soup(models)) == pytest.approx(-0.275, abs=1e-6)


def test_greedy_soup_keeps_an_ingredient_that_leaves_the_score_unchanged(tiny_classifier, ingredients):
    models, names = ingredients
    assert greedy_soup(models, lambda model: 50.0, names=names).chosen == names  # ties keep the given order


def test_greedy_soup_of_one_model_is_that_model(tiny_classifier):
    result = greedy_soup([tiny_classifier], _score(tiny_classifier))
    assert result.chosen == ["model 0"] and not result.tried
    assert all(torch.equal(result.model.state_dict()[k], v) for k, v in tiny_classifier.state_dict().items())


def test_held_out_split_must_be_neither_ood_nor_reported():
    assert check_held_out_split("val", ["sketch"], ["test", "sketch"]) == "val"
    with pytest.raises(ValueError, match="'sketch' is one of the OOD splits"):
        check_held_out_split("sketch", ["sketch"], ["test", "sketch"])
    with pytest.raises(ValueError, match="'test' is also an evaluated split"):
        check_held_out_split("test", ["sketch"], ["test", "sketch"])
    with pytest.raises(ValueError, match="needs --held_out_split"):
        check_held_out_split(None, ["sketch"])


def _soup_recipe():
    return load_script(ROOT / "recipes" / "soup.py", "soup_recipe")


def test_soup_recipe_greedy_writes_its_choice(tiny_classifier, tiny_image_processor, tmp_path):
    images = write_imagefolder(tmp_path / "images", splits=("val", "test", "ood"), per_class=2)
    dirs = []
    for i, x in enumerate((0.0, 0.3)):
        _shifted(tiny_classifier, x).save_pretrained(tmp_path / f"run{i}")
        tiny_image_processor.save_pretrained(tmp_path / f"run{i}")
        dirs.append(str(tmp_path / f"run{i}"))
    out = tmp_path / "soup"
    common = ["--models", *dirs, "--output_dir", str(out), "--dataset_name", str(images), "--eval_splits", "test",
              "ood", "--ood_splits", "ood", "--device", "cpu", "--greedy"]  # fmt: skip
    results = _soup_recipe().main([*common, "--held_out_split", "val", "--save_model"])
    assert list(results) == [*dirs, "greedy soup"]
    record = json.loads((out / "greedy_soup.json").read_text())
    assert record["held_out_split"] == "val" and record["chosen"][0] in dirs and set(record["chosen"]) <= set(dirs)
    assert (out / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="'ood' is one of the OOD splits"):
        _soup_recipe().main([*common, "--held_out_split", "ood"])
