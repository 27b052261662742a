"""End to end per family: a tiny SigLIP / SigLIP 2 / MetaCLIP 2 checkpoint folder + an ImageFolder ->
recipes/finetune.py (a few steps) -> a classifier that reloads to identical logits and runs in a pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _builders import CLASSES, load_script, write_imagefolder
from _family_builders import save_tiny_family
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from hf_cfft import CfftImageClassifier

ROOT = Path(__file__).resolve().parents[1]


def _recipe():
    return load_script(ROOT / "recipes" / "finetune.py", "finetune_recipe_families")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("images"))


# Each family with a different method setting, so together they cover the CAM sources and fills.
CASES = {
    "siglip": ["--cam_source", "student", "--templates", "siglip"],  # CAM read off the training forward
    "siglip2": ["--fill_kind", "none", "--cam_method", "gradcam", "--templates", "siglip"],  # teacher CAMs, no-fill
    "metaclip_2": ["--mask_kind", "random", "--fill_kind", "multi", "--templates", "simple"],
}
FAMILY = {"siglip": "siglip", "siglip2": "siglip", "metaclip_2": "metaclip_2"}
CARD_NAME = {"siglip": "SigLIP", "siglip2": "SigLIP", "metaclip_2": "MetaCLIP 2"}


@pytest.mark.parametrize("family", list(CASES))
def test_recipe_fine_tunes_each_family_and_the_result_reloads_identically(images, tmp_path, family):
    checkpoint = save_tiny_family(tmp_path / family, family)
    out = tmp_path / "run"
    argv = [
        "--model_name_or_path", str(checkpoint), "--dataset_name", str(images), "--eval_splits", "test",
        "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "3", "--use_cpu",
        "--save_strategy", "no", "--logging_steps", "1", "--learning_rate", "1e-3", *CASES[family],
    ]  # fmt: skip
    results = _recipe().main(argv)

    assert set(results) == {"zero-shot", "fine-tuned"}
    saved = load_file(str(out / "model.safetensors"))
    assert not any(key.startswith("teacher") for key in saved)
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(model) is CfftImageClassifier and model.config.family == FAMILY[family]
    again = AutoModelForImageClassification.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(pixels).logits, again(pixels).logits)
    card = (out / "README.md").read_text()
    assert f"A {CARD_NAME[family]} ViT image classifier" in card

    processor = AutoImageProcessor.from_pretrained(out)
    classify = pipeline("image-classification", model=str(out), image_processor=processor)
    predictions = classify(str(images / "test" / "dog" / "1.png"), top_k=3)
    assert sorted(p["label"] for p in predictions) == sorted(CLASSES)
    assert json.loads((out / "eval_results.json").read_text()) == results


def test_siglip_config_holds_the_papers_method_settings_and_siglips_prompt():
    path = str(ROOT / "recipes" / "configs" / "imagenet_siglip_b16.yaml")
    recipe = _recipe()
    model_args, data_args, args, _ = recipe.parse_args(["--config", path, "--bf16", "false"])
    assert model_args.model_name_or_path == "google/siglip-base-patch16-224" and model_args.templates == "siglip"
    method = (args.mask_kind, args.fill_kind, args.mask_threshold, args.distill_weight, args.cam_source)
    assert method == ("object", "single", 0.3, 30.0, "student")
    assert (args.learning_rate, args.weight_decay, args.num_train_epochs, args.max_grad_norm) == (3e-5, 0.1, 10, 1.0)
    assert args.decay_all_parameters and args.one_cycle_schedule and args.warmup_steps == 0.02
    assert args.per_device_train_batch_size * 8 * args.gradient_accumulation_steps == 512
    assert args.augment == "none" and data_args.train_split == "train"


@pytest.mark.parametrize("family", list(CASES))
def test_flyp_on_each_family_trains_both_towers_and_lr_zero_keeps_the_zero_shot_head(images, tmp_path, family):
    from hf_cfft import load_classifier, load_templates

    checkpoint = save_tiny_family(tmp_path / family, family)
    templates = "siglip" if FAMILY[family] == "siglip" else "simple"
    base = [
        "--model_name_or_path", str(checkpoint), "--dataset_name", str(images), "--eval_splits", "test",
        "--per_device_train_batch_size", "4", "--max_steps", "2", "--use_cpu", "--save_strategy", "no",
        "--templates", templates, "--method", "flyp", "--distill_weight", "0", "--mask_kind", "none",
        "--fill_kind", "none",
    ]  # fmt: skip
    zero_shot = load_classifier(str(checkpoint), class_names=CLASSES, templates=load_templates(templates))

    results = _recipe().main([*base, "--output_dir", str(tmp_path / "lr0"), "--learning_rate", "0"])
    frozen = load_classifier(str(tmp_path / "lr0"))
    assert frozen.config.family == FAMILY[family]
    for key, tensor in zero_shot.state_dict().items():
        assert torch.equal(frozen.state_dict()[key], tensor), key
    assert results["fine-tuned"] == results["zero-shot"]

    _recipe().main([*base, "--output_dir", str(tmp_path / "tuned"), "--learning_rate", "1e-3"])
    tuned = load_classifier(str(tmp_path / "tuned"))
    assert not torch.equal(tuned.classifier.weight, zero_shot.classifier.weight), "head rebuilt from the new text"
    changed = [k for k, v in zero_shot.state_dict().items() if not torch.equal(tuned.state_dict()[k], v)]
    assert any(k.startswith("vision_model.") for k in changed), "the image tower was trained"
    if FAMILY[family] == "siglip":  # the sigmoid loss's logit_bias is trained, and the head carries it
        assert "classifier.bias" in changed
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(tuned(pixel_values=pixels).logits).all()
