"""LoRA in the image tower: the teacher is the student's own weights with the adapters off; saves reload as trained."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from hf_cfft import CfftConfig, CfftTrainer
from hf_cfft.modeling import ClipCfftForImageClassification

peft = pytest.importorskip("peft")

from hf_cfft import adapters  # noqa: E402  (after the skip: the module itself imports without peft)


def _config(tmp_path, **overrides) -> CfftConfig:
    args = dict(
        output_dir=str(tmp_path / "run"), use_cpu=True, per_device_train_batch_size=4, seed=0, save_strategy="no",
        report_to="none", learning_rate=5e-2, max_steps=3, logging_steps=1, lora_rank=4, lora_alpha=8,
        mask_kind="random", fill_kind="single", distill_weight=1.0,
    )  # fmt: skip
    return CfftConfig(**{**args, **overrides})


def _examples(count: int = 8) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": i % 3} for i in range(count)]


def _pixels(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def trained(tiny_classifier, tmp_path):
    """A LoRA CFFT run of 3 steps, and an untouched copy of the classifier it started from."""
    before = copy.deepcopy(tiny_classifier)
    trainer = CfftTrainer(model=tiny_classifier, args=_config(tmp_path), train_dataset=_examples())
    trainer.train()
    return trainer, before


def test_lora_trains_the_adapter_and_the_head_and_nothing_else(trained):
    trainer, before = trained
    model = trainer.model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "classifier" in name for name in trainable)
    assert any("q_proj.lora_A" in name for name in trainable) and any("out_proj.lora_B" in name for name in trainable)
    # The pre-trained tower's own weights did not move; the adapter did (LoRA's B starts at zero).
    base = model.get_base_model()
    original = dict(before.named_parameters())
    for name, parameter in base.vision_model.named_parameters():
        if "lora_" in name:
            continue
        key = "vision_model." + name.replace(".base_layer", "")
        assert torch.equal(parameter, original[key]), name
    assert any(p.abs().sum() > 0 for n, p in base.named_parameters() if "lora_B" in n)
    # And the head learnt (trained in full, through modules_to_save).
    head = next(p for n, p in model.named_parameters() if "classifier" in n and "modules_to_save" in n and p.ndim == 2)
    assert not torch.equal(head, before.classifier.weight)


def test_the_teacher_is_the_base_with_adapters_off_bit_for_bit_and_no_second_tower(trained):
    trainer, before = trained
    assert isinstance(trainer.teacher, adapters.AdapterFreeTeacher)
    # No parameter of the teacher is a tensor the student does not own: no second copy of the tower.
    student_storage = {p.data_ptr() for p in trainer.model.parameters()}
    assert all(p.data_ptr() in student_storage for p in trainer.teacher.parameters())
    pixels = _pixels()
    target = trainer._teacher_pass(pixels, None)
    with torch.no_grad():
        with trainer.model.disable_adapter():
            disabled = trainer.model.get_base_model().eval().get_image_features(pixels)
        frozen_copy = before.eval().get_image_features(pixels)
        student = trainer.model.get_base_model().get_image_features(pixels)
    assert torch.equal(target, disabled)
    assert torch.equal(target, frozen_copy)
    assert not torch.allclose(student, target)  # the adapters are back on after the teacher's pass


def test_teacher_cams_run_with_the_adapters_off(trained):
    trainer, before = trained
    from hf_cfft.cam import compute_cam

    pixels, labels = _pixels(), torch.tensor([0, 1, 2, 0])
    with adapters.teacher_context(trainer.teacher):
        cam = compute_cam(trainer.teacher, pixels, labels, "rollout")
    assert torch.equal(cam, compute_cam(before, pixels, labels, "rollout"))


def test_adapter_and_merged_saves_reload_with_from_pretrained_and_give_the_same_logits(trained, tmp_path):
    trainer, before = trained
    base_dir = tmp_path / "base"
    before.save_pretrained(base_dir)  # the classifier the run started from, as its base model
    trainer.base_model = str(base_dir)
    trainer.save_model()
    run = tmp_path / "run"
    assert (run / "model.safetensors").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "training_args.bin").exists() and not (run / "adapter" / "README.md").exists()
    pixels = _pixels(2)
    with torch.no_grad():
        trained_logits = trainer.model.eval()(pixel_values=pixels).logits
        merged = ClipCfftForImageClassification.from_pretrained(run).eval()
        assert not any("lora" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(pixel_values=pixels).logits, trained_logits, rtol=1e-5, atol=1e-5)
        reloaded = adapters.load_adapter_classifier(run / "adapter").eval()  # base model from its record
        assert isinstance(reloaded, peft.PeftModel)
        assert torch.equal(reloaded(pixel_values=pixels).logits, trained_logits)
        folded = adapters.load_adapter_classifier(run / "adapter", merge=True).eval()
        torch.testing.assert_close(folded(pixel_values=pixels).logits, trained_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before.eval()(pixel_values=pixels).logits, trained_logits)


def test_under_gradient_checkpointing_the_adapter_still_learns(tiny_classifier, tmp_path):
    args = _config(tmp_path, gradient_checkpointing=True, mask_kind="none", fill_kind="none")
    trainer = CfftTrainer(model=tiny_classifier, args=args, train_dataset=_examples())
    trainer.train()
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)


def test_merge_adapter_false_keeps_the_adapter_alone(tiny_classifier, tmp_path):
    args = _config(tmp_path, merge_adapter=False)
    trainer = CfftTrainer(model=tiny_classifier, args=args, train_dataset=_examples())
    trainer.train()
    trainer.save_model()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_without_peft_the_message_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install 'hf_cfft\[peft\]'"):
        adapters.require_peft()


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"linear_probe": True}, "linear_probe trains the head alone"),
        ({"teacher_dtype": "bfloat16"}, "no copy to keep in lower precision"),
        ({"lora_rank": -1}, "lora_rank=-1 must be >= 0"),
        ({"lora_alpha": 0}, "lora_alpha=0 must be > 0"),
    ],
)
def test_settings_an_adapter_cannot_honour_are_refused(tmp_path, knobs, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **knobs)


def test_float16_teacher_on_the_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="teacher_dtype='float16' needs a GPU"):
        _config(tmp_path, lora_rank=0, teacher_dtype="float16")


def test_bfloat16_teacher_is_a_bf16_copy_whose_target_stays_close_to_float32(tiny_classifier, tmp_path):
    reference = copy.deepcopy(tiny_classifier).eval()
    args = _config(tmp_path, lora_rank=0, teacher_dtype="bfloat16", max_steps=1)
    trainer = CfftTrainer(model=tiny_classifier, args=args, train_dataset=_examples())
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    pixels = _pixels()
    target = trainer._teacher_pass(pixels, None)
    with torch.no_grad():
        exact = reference.get_image_features(pixels)
    assert target.dtype == torch.float32
    difference = (target - exact).abs()
    assert 0 < difference.max() < 0.05 * exact.abs().max()  # bf16 rounding: near, not equal
    trainer.train()  # the step runs with the bf16 target
    assert trainer.state.global_step == 1


def test_an_adapter_trained_from_a_pretrained_clip_reloads_and_an_adapter_alone_is_named(tmp_path, capsys):
    """The recipe's case: the base is a pre-trained CLIP folder, not a saved classifier. Before, reloading the adapter
    failed ("class_names and templates are needed"), and WiSE-FT read an adapter-only run as a pre-trained model."""
    import json

    from _builders import save_tiny_clip, write_imagefolder
    from test_error_path import _recipe, _refused

    clip, images = save_tiny_clip(tmp_path / "clip"), write_imagefolder(tmp_path / "images", per_class=2)
    run = tmp_path / "lora"
    _recipe().main([
        "--model_name_or_path", str(clip), "--dataset_name", str(images), "--eval_splits", "test", "--templates",
        "simple", "--output_dir", str(run), "--max_steps", "2", "--per_device_train_batch_size", "2", "--use_cpu",
        "true", "--report_to", "none", "--save_strategy", "no", "--lora_rank", "4", "--learning_rate", "1e-2",
        "--merge_adapter", "false",
    ])  # fmt: skip
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and not (run / "config.json").exists()
    merged = adapters.load_adapter_classifier(run / "adapter", merge=True).eval()
    tuned = json.loads((run / "eval_results.json").read_text())["fine-tuned"]["test"]
    from transformers import AutoImageProcessor

    from hf_cfft.cli.script_args import DataArguments, load_eval_splits
    from hf_cfft.evaluation import evaluate_splits

    splits = load_eval_splits(DataArguments(dataset_name=str(images), eval_splits=["test"]), seed=0)
    scored = evaluate_splits(merged, splits, AutoImageProcessor.from_pretrained(run))
    assert scored["test"] == tuned  # the reloaded adapter is the model the run evaluated
    capsys.readouterr()
    zero_shot = tmp_path / "zs"
    merged.save_pretrained(zero_shot)
    argv = ["--zero_shot_model", str(zero_shot), "--fine_tuned_model", str(run), "--dataset_name", str(images),
            "--eval_splits", "test", "--alphas", "0.5", "--output_dir", str(tmp_path / "wise")]  # fmt: skip
    message = _refused(capsys, argv, "wise_ft")
    assert "holds a LoRA adapter" in message and "--merge_adapter false" in message
    assert "load_adapter_classifier(" in message
