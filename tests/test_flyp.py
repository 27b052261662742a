"""FLYP (Goyal et al., CVPR 2023): both towers fine-tuned with the contrastive loss; the head rebuilt from the text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _builders import (
    CLASSES,
    load_script,
    recording_hub,
    save_tiny_clip,
    tiny_clip,
    tiny_image_processor,
    tiny_tokenizer,
    write_imagefolder,
)

from hf_cfft import CfftConfig, ClipCfftForImageClassification, load_classifier, load_templates, wise_ft
from hf_cfft.baselines.flyp import FlypTrainer, contrastive_loss, load_contrastive_model
from hf_cfft.classifier_loading import recorded_base_model

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ["a photo of a {}.", "a cropped photo of the {}."]


def _finetune():
    return load_script(ROOT / "recipes" / "finetune.py", "finetune_recipe")


def _hand_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """Symmetric InfoNCE written out one row at a time."""
    image = [v / v.norm() for v in image]
    text = [v / v.norm() for v in text]
    n, total = len(image), 0.0
    for i in range(n):
        row = [scale * float(image[i] @ text[j]) for j in range(n)]
        column = [scale * float(text[i] @ image[j]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        total += -(column[i] - math.log(sum(math.exp(v) for v in column)))
    return total / (2 * n)


def test_contrastive_loss_matches_the_written_out_formulas():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    assert float(contrastive_loss(image, text, torch.tensor(7.0))) == pytest.approx(
        _hand_clip_loss(image, text, 7.0), rel=1e-5
    )
    # SigLIP: -sum_ij log sigmoid(z_ij (scale cos_ij + bias)) / n, z = +1 on the diagonal.
    cos = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    hand = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            hand -= math.log(1 / (1 + math.exp(-z * (10.0 * float(cos[i, j]) - 2.0))))
    assert float(contrastive_loss(image, text, torch.tensor(10.0), torch.tensor(-2.0))) == pytest.approx(
        hand / 5, 1e-5
    )


def _trainer(tmp_path, **overrides) -> FlypTrainer:
    args = CfftConfig(
        output_dir=str(tmp_path / "run"), method="flyp", distill_weight=0.0, mask_kind="none", fill_kind="none",
        use_cpu=True, report_to="none", **overrides,
    )  # fmt: skip
    return FlypTrainer(
        model=tiny_clip(), args=args, tokenizer=tiny_tokenizer(), class_names=CLASSES, templates=TEMPLATES,
        processing_class=tiny_image_processor(),
    )  # fmt: skip


def test_trainer_loss_is_the_contrastive_loss_of_images_and_their_class_prompts(tmp_path):
    trainer = _trainer(tmp_path)
    model = trainer.model.train()
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, 1, 2])
    chosen = torch.tensor([1, 0, 0, 1])
    trainer.draw_templates = lambda batch_size: chosen
    loss = trainer.compute_loss(model, {"pixel_values": pixels, "labels": labels})

    tokenizer = tiny_tokenizer()
    prompts = [TEMPLATES[t].replace("{}", CLASSES[c]) for c, t in zip(labels.tolist(), chosen.tolist())]
    # The trainer pads over every prompt of every class; the attention mask makes the padding irrelevant.
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(**encoded).pooler_output)
    expected = _hand_clip_loss(image, text, float(model.logit_scale.exp()))
    assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_templates_are_drawn_per_image_and_step_reproducibly(tmp_path):
    trainer = _trainer(tmp_path, seed=3)
    first = trainer.draw_templates(64)
    assert set(first.tolist()) == {0, 1}, "every image draws its own template"
    again = _trainer(tmp_path, seed=3)
    assert torch.equal(again.draw_templates(64), first)
    assert torch.equal(trainer.draw_templates(64), first), "within one micro-step (evaluation too) the draw holds"
    trainer._count_micro_step()  # what each training forward does
    assert not torch.equal(trainer.draw_templates(64), first), "the next micro-step draws again"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("flyp")
    return save_tiny_clip(root / "clip"), write_imagefolder(root / "images", per_class=4)


def _args(clip, images, out, *extra):
    return [
        "--model_name_or_path", str(clip), "--dataset_name", str(images), "--eval_splits", "test",
        "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "2", "--templates", "simple",
        "--use_cpu", "--method", "flyp", "--distill_weight", "0", "--mask_kind", "none", "--fill_kind", "none",
        *extra,
    ]  # fmt: skip


def test_flyp_with_learning_rate_zero_saves_the_zero_shot_classifier(workspace, tmp_path):
    clip, images = workspace
    results = _finetune().main(_args(clip, images, tmp_path / "run", "--learning_rate", "0"))
    saved = load_classifier(str(tmp_path / "run"))
    assert isinstance(saved, ClipCfftForImageClassification)
    zero_shot = load_classifier(str(clip), class_names=CLASSES, templates=load_templates("simple"))
    for key, tensor in zero_shot.state_dict().items():
        assert torch.equal(saved.state_dict()[key], tensor), key
    assert results["fine-tuned"] == results["zero-shot"]
    # It records the pre-trained checkpoint it came from, as every classifier does (WiSE-FT and soups check it).
    assert (
        recorded_base_model(saved)
        == recorded_base_model(zero_shot)
        == {"name_or_path": str(clip), "fingerprint": recorded_base_model(zero_shot)["fingerprint"]}
    )


def test_flyp_trains_both_towers_and_its_classifier_works_with_wise_ft(workspace, tmp_path):
    clip, images = workspace
    _finetune().main(_args(clip, images, tmp_path / "run", "--learning_rate", "1e-3"))
    tuned = load_classifier(str(tmp_path / "run"))
    zero_shot = load_classifier(str(clip), class_names=CLASSES, templates=load_templates("simple"))
    assert not torch.equal(tuned.classifier.weight, zero_shot.classifier.weight), "head rebuilt from the new text"
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(tuned.state_dict()[key], zero_shot.state_dict()[key])
    # The head's rows are the class prompt embeddings of the fine-tuned text tower, scaled by its logit scale.
    assert torch.allclose(tuned.classifier.weight.norm(dim=-1), tuned.classifier.weight.norm(dim=-1)[0])
    halfway = wise_ft(zero_shot, tuned, 0.5)
    assert torch.allclose(halfway.classifier.weight, (zero_shot.classifier.weight + tuned.classifier.weight) / 2)


def test_flyp_refuses_distillation_and_saved_classifiers(workspace, tmp_path):
    with pytest.raises(ValueError, match="distill_weight=3.0"):
        CfftConfig(output_dir=str(tmp_path), method="flyp", distill_weight=3.0)
    clip, _ = workspace
    saved = tmp_path / "saved"
    load_classifier(str(clip), class_names=CLASSES, templates=TEMPLATES).save_pretrained(saved)
    with pytest.raises(ValueError, match="holds no text tower"):
        load_contrastive_model(str(saved))


# ---- what FLYP inherits from the shared base trainer (hf_cfft.training.RobustTrainer) ----


def _raw_images(n: int = 8):
    import numpy as np
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)) for _ in range(n)]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(CLASSES))})
    return Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)


def _training(tmp_path, dataset=None, templates=TEMPLATES, **overrides) -> FlypTrainer:
    kwargs = dict(
        output_dir=str(tmp_path / "run"), method="flyp", distill_weight=0.0, mask_kind="none", fill_kind="none",
        use_cpu=True, report_to="none", max_steps=2, per_device_train_batch_size=4, logging_steps=1,
        save_strategy="no", learning_rate=1e-3,
    )  # fmt: skip
    return FlypTrainer(
        model=tiny_clip(), args=CfftConfig(**{**kwargs, **overrides}), tokenizer=tiny_tokenizer(),
        class_names=CLASSES, templates=templates, processing_class=tiny_image_processor(),
        train_dataset=_raw_images() if dataset is None else dataset,
    )  # fmt: skip


def test_flyp_push_writes_and_uploads_no_pickle(tmp_path, monkeypatch):
    from unittest import mock

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the Hub is mocked; offline, --push_to_hub is refused up front
    hub, uploads = recording_hub("me/flyp")
    with (
        mock.patch("transformers.trainer.hf_api", return_value=hub),
        mock.patch("hf_cfft.training.base.hf_api", return_value=hub),
    ):
        trainer = _training(tmp_path, save_strategy="steps", save_steps=1, push_to_hub=True, hub_model_id="me/flyp")
        trainer.train()
        trainer.push_to_hub()
    out = tmp_path / "run"
    assert not list(out.rglob("*.bin")), "training_args.bin (a pickle) must not be written"
    # Checkpoints hold the whole contrastive model and the args as JSON, so that a resume is checked.
    assert (out / "checkpoint-1" / "training_args.json").is_file()
    assert "text_config" in json.loads((out / "checkpoint-1" / "config.json").read_text())
    assert len(uploads) >= 3  # every save, then the final push
    assert all(not any(f.endswith((".bin", ".pt", ".pth")) for f in files) for files in uploads)
    # The final upload is the classifier with its FLYP card.
    assert {"model.safetensors", "README.md", "training_args.json"} <= set(uploads[-1])
    assert "flyp" in (out / "README.md").read_text().lower()
    assert isinstance(load_classifier(str(out)), ClipCfftForImageClassification)


def test_flyp_refuses_a_fresh_run_into_another_runs_folder_and_keeps_it(workspace, tmp_path):
    import hashlib

    clip, images = workspace
    finetune = _finetune()
    finetune.main(_args(clip, images, tmp_path / "run", "--learning_rate", "1e-3"))
    weights = tmp_path / "run" / "model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    with pytest.raises(FileExistsError, match="already holds a finished model.*--overwrite_output_dir"):
        finetune.main(_args(clip, images, tmp_path / "run", "--learning_rate", "1e-3"))
    # The trainer guards the folder itself, for users who build it without the recipe.
    with pytest.raises(FileExistsError, match="already holds a finished model"):
        _training(tmp_path).train()
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before


def test_flyp_resume_with_another_learning_rate_is_refused_naming_it(workspace, tmp_path):
    clip, images = workspace
    finetune = _finetune()
    extra = ("--learning_rate", "1e-3", "--save_steps", "1")
    finetune.main(_args(clip, images, tmp_path / "run", *extra))
    with pytest.raises(ValueError, match="learning_rate"):
        finetune.main(
            _args(clip, images, tmp_path / "run", "--learning_rate", "5e-3", "--save_steps", "1")
            + ["--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-1")]
        )


def test_flyp_gradient_accumulation_averages_the_micro_batches(tmp_path):
    # Learning rate 0 and one template: every micro-batch's loss is fixed, so the logged step loss of 2 micro-batches
    # accumulated equals the mean of the losses of the same 2 batches taken as 2 steps (not their sum).
    one = _training(tmp_path / "a", templates=TEMPLATES[:1], learning_rate=0.0, per_device_train_batch_size=2,
                    max_steps=2)  # fmt: skip
    two = _training(tmp_path / "b", templates=TEMPLATES[:1], learning_rate=0.0, per_device_train_batch_size=2,
                    max_steps=1, gradient_accumulation_steps=2)  # fmt: skip
    assert two.train().training_loss == pytest.approx(one.train().training_loss, rel=1e-5)


def test_flyp_honours_the_papers_optimisation_switches(tmp_path):
    from torch.optim.lr_scheduler import OneCycleLR

    trainer = _training(tmp_path, one_cycle_schedule=True, decay_all_parameters=True, weight_decay=0.1, max_steps=4)
    trainer.train()
    assert isinstance(trainer.lr_scheduler, OneCycleLR)
    decayed = {id(p) for group in trainer.optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    assert decayed == {id(p) for p in trainer.model.parameters() if p.requires_grad}, "biases and norms decay too"


def test_flyp_trains_on_a_streamed_train_set(tmp_path):
    stream = _raw_images().to_iterable_dataset()
    trainer = _training(tmp_path, dataset=stream)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all("contrastive_loss" in log for log in trainer.state.log_history if "loss" in log)
