"""CfftTrainer as a specification: what each config switch does to a real (tiny) run; the README's code runs."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _builders import load_script, save_tiny_clip, write_imagefolder
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from safetensors.torch import load_file
from torch.optim.lr_scheduler import OneCycleLR
from transformers import default_data_collator

from hf_cfft import CfftConfig, CfftTrainer, cam_patch_mask

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, **overrides) -> CfftConfig:
    args = dict(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, seed=0, save_strategy="no",
        report_to="none", learning_rate=1e-2, max_steps=2, logging_steps=1,
    )  # fmt: skip
    return CfftConfig(**{**args, **overrides})


def _examples(count: int = 8) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": i % 3} for i in range(count)]


def _batch(size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(size, 3, 32, 32, generator=generator), "labels": torch.arange(size) % 3}


# ---- the README ----


def _readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## In Python") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_in_python_block_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_python_block(), "README.md", "exec"), {"__name__": "readme"})
    assert "ood_swapped" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ---- the data pipeline belongs to the trainer ----


def _raw_dataset(count: int = 8) -> Dataset:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray((torch.rand(36, 40, 3, generator=generator) * 255).to(torch.uint8).numpy())
        for _ in range(count)
    ]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["cat", "dog", "fox"])})
    return Dataset.from_dict({"image": images, "label": [i % 3 for i in range(count)]}, features=features)


def test_trainer_prepares_a_raw_dataset_with_teacher_cams_and_masks(tiny_classifier, tiny_image_processor, tmp_path):
    train, processor = _raw_dataset(), tiny_image_processor
    args = _config(tmp_path)
    trainer = CfftTrainer(model=tiny_classifier, args=args, train_dataset=train, processing_class=processor)
    example = trainer.train_dataset[0]
    assert set(example) >= {"pixel_values", "labels", "cf_mask"}
    assert "cam" in trainer.train_dataset.column_names and example["cf_mask"].shape == (4, 4)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    # The worker draws masks and donors only; the trainer refills on the training device.
    assert "cf_pixel_values" not in batch and batch["cf_mask"].shape == (4, 4, 4) and batch["cf_donors"].shape == (4,)
    cf_pixel_values, keep = trainer.counterfactual_batch(batch)
    assert cf_pixel_values.shape == (4, 3, 32, 32) and keep is None
    # Values, not only shapes: each mask is the object of its stored teacher CAM at the default threshold (0.3),
    # and the counterfactual is the image with those patches taken from its drawn donor ("single": one donor each).
    stored = trainer.train_dataset.with_format(None)  # the rows as stored, before the masking transform
    cams = torch.stack([torch.as_tensor(stored[i]["cam"]).view(4, 4) for i in range(4)])  # stored flat, h * w
    assert torch.equal(batch["cf_mask"], cam_patch_mask(cams, "object", args.mask_threshold))
    assert batch["cf_mask"].any() and not batch["cf_mask"].all()
    patch = 8  # 32 px / the 4x4 grid
    pixels, donors = batch["pixel_values"], batch["cf_donors"]
    assert (donors != torch.arange(4)).all()  # never its own donor
    for b in range(4):
        for i, j in zip(*torch.nonzero(~batch["cf_mask"][b], as_tuple=True)):
            window = (slice(None), slice(i * patch, (i + 1) * patch), slice(j * patch, (j + 1) * patch))
            assert torch.equal(cf_pixel_values[b][window], pixels[b][window])
        for i, j in zip(*torch.nonzero(batch["cf_mask"][b], as_tuple=True)):
            window = (slice(None), slice(i * patch, (i + 1) * patch), slice(j * patch, (j + 1) * patch))
            assert torch.equal(cf_pixel_values[b][window], pixels[donors[b]][window])


def test_trainer_leaves_a_prepared_dataset_alone(tiny_classifier, tmp_path):
    examples = _examples()
    trainer = CfftTrainer(model=tiny_classifier, args=_config(tmp_path, mask_kind="random"), train_dataset=examples)
    assert trainer.train_dataset is examples


def test_raw_dataset_without_an_image_processor_is_refused_with_the_fix(tiny_classifier, tmp_path):
    with pytest.raises(ValueError, match="processing_class=<the checkpoint's image processor>"):
        CfftTrainer(model=tiny_classifier, args=_config(tmp_path), train_dataset=_raw_dataset())


# ---- a straight-line step: the distillation view is fixed, never silently dropped ----


# (what each method's distillation term sees: tests/test_methods.py)


def test_user_collator_without_counterfactuals_raises_instead_of_vanilla_fine_tuning(tiny_classifier, tmp_path):
    trainer = CfftTrainer(
        model=tiny_classifier,
        args=_config(tmp_path, mask_kind="random"),
        train_dataset=_examples(),
        data_collator=default_data_collator,
    )
    with pytest.raises(ValueError, match="mask_kind='random' .* has none .*CounterfactualCollator.*vanilla"):
        trainer.train()


def test_batch_of_one_is_counted_and_logged_as_a_skipped_counterfactual_batch(tiny_classifier, tmp_path):
    args = _config(tmp_path, mask_kind="random", dataloader_drop_last=False, max_steps=-1, num_train_epochs=1)
    trainer = CfftTrainer(model=tiny_classifier, args=args, train_dataset=_examples(5))  # batches of 4 and 1
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "task_loss" in entry]
    assert "distill_loss" in logged[0] and "skipped_counterfactual_batches" not in logged[0]
    assert logged[1]["skipped_counterfactual_batches"] == 1 and "distill_loss" not in logged[1]


def test_student_cam_counterfactual_pass_runs_inside_the_wrapped_forward(tiny_classifier, tmp_path):
    """The student's whole step (CAM, refill, counterfactual embedding) happens in one call of the wrapper."""
    trainer = CfftTrainer(model=tiny_classifier, args=_config(tmp_path, cam_source="student"))
    calls = []

    class Wrapper(torch.nn.Module):  # what DDP does: call the inner module's forward, and count the calls
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            calls.append("wrapper")
            return self.module(*args, **kwargs)

    embeds = []
    handle = tiny_classifier.visual_projection.register_forward_hook(lambda m, a, out: embeds.append(len(calls)))
    trainer.accelerator.unwrap_model = lambda model, **_: model.module if isinstance(model, Wrapper) else model
    loss = trainer.compute_loss(Wrapper(tiny_classifier.train()), _batch())
    handle.remove()
    assert calls == ["wrapper"] and embeds == [1, 1]  # clean and counterfactual embeddings, both inside that call
    assert "train/distill_loss" in trainer._metrics and torch.isfinite(loss)
    assert "forward" not in tiny_classifier.__dict__, "the redirection is undone"


# ---- optimisation switches ----


def test_linear_probe_leaves_the_encoder_bitwise_unchanged_and_trains_the_head(tiny_classifier, tmp_path):
    before = copy.deepcopy(tiny_classifier.state_dict())
    args = _config(tmp_path, linear_probe=True, distill_weight=0.0, mask_kind="none", fill_kind="none")
    CfftTrainer(model=tiny_classifier, args=args, train_dataset=_examples()).train()
    after = tiny_classifier.state_dict()
    for name, tensor in before.items():
        if name.startswith("classifier."):
            assert not torch.equal(after[name], tensor), name
        else:
            assert torch.equal(after[name], tensor), name


@pytest.mark.parametrize("decay_all", [True, False])
def test_decay_all_parameters_puts_biases_and_norms_in_the_decayed_group(tiny_classifier, tmp_path, decay_all):
    trainer = CfftTrainer(
        model=tiny_classifier, args=_config(tmp_path, weight_decay=0.1, decay_all_parameters=decay_all)
    )
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in tiny_classifier.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    biases_and_norms = {n for n in names.values() if n.endswith("bias") or "norm" in n}
    assert biases_and_norms and "vision_model.post_layernorm.weight" in biases_and_norms
    if decay_all:
        assert decayed == set(names.values())
    else:
        assert decayed.isdisjoint(biases_and_norms) and "classifier.weight" in decayed


def test_one_cycle_schedule_gives_one_cycle_learning_rates_at_chosen_steps(tiny_classifier, tmp_path):
    args = _config(tmp_path, one_cycle_schedule=True, learning_rate=1e-3, warmup_steps=0.1)
    trainer = CfftTrainer(model=tiny_classifier, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=50)
    reference = OneCycleLR(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3),
        max_lr=1e-3,
        total_steps=50,
        pct_start=0.1,
        anneal_strategy="cos",
        cycle_momentum=False,
    )
    seen, expected = {}, {}
    for step in range(50):
        seen[step], expected[step] = trainer.lr_scheduler.get_last_lr()[0], reference.get_last_lr()[0]
        trainer.optimizer.step(), trainer.lr_scheduler.step(), reference.step()
    for step in (0, 2, 4, 5, 20, 49):
        assert seen[step] == pytest.approx(expected[step], rel=1e-12), step
    assert seen[0] == pytest.approx(1e-3 / 25) and max(seen.values()) == pytest.approx(1e-3)


# ---- the baselines' objectives, written out ----


@pytest.mark.parametrize(("target", "temperature"), [("features", 1.0), ("logits", 2.0)], ids=["FT+FD", "FT+KD"])
def test_clean_view_losses_equal_the_written_out_objective(tiny_classifier, tmp_path, target, temperature):
    batch = _batch()
    reference, teacher = copy.deepcopy(tiny_classifier).train(), copy.deepcopy(tiny_classifier).eval()
    args = _config(tmp_path, mask_kind="none", fill_kind="none", distill_target=target, kd_temperature=temperature)
    trainer = CfftTrainer(model=tiny_classifier, args=args)
    loss = trainer.compute_loss(trainer.model.train(), dict(batch))

    images, labels = batch["pixel_values"], batch["labels"]
    student = reference.get_image_features(images)
    with torch.no_grad():
        frozen = teacher.get_image_features(images)
    if target == "features":
        distill = ((student - frozen) ** 2).mean()
    else:
        log_p = F.log_softmax(reference.logits_from_features(student) / temperature, -1)
        q = F.softmax(teacher.logits_from_features(frozen) / temperature, -1)
        distill = temperature**2 * (q * (q.log() - log_p)).sum(-1).mean()
    expected = F.cross_entropy(reference.logits_from_features(student), labels) + 30.0 * distill
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)


# ---- LP-FT ----


def _finetune_recipe():
    return load_script(ROOT / "recipes" / "finetune.py", "finetune_recipe_lpft")


def test_lp_ft_stage_two_starts_from_the_stage_one_head(tmp_path):
    clip, images = save_tiny_clip(tmp_path / "clip"), write_imagefolder(tmp_path / "images", per_class=4)
    common = [
        "--dataset_name", str(images), "--eval_splits", "test", "--per_device_train_batch_size", "4",
        "--max_steps", "2", "--templates", "simple", "--use_cpu", "--save_strategy", "no", "--distill_weight", "0",
        "--mask_kind", "none", "--fill_kind", "none",
    ]  # fmt: skip
    recipe, stage1, stage2 = _finetune_recipe(), tmp_path / "stage1", tmp_path / "stage2"
    first = recipe.main(
        [*common, "--model_name_or_path", str(clip), "--output_dir", str(stage1), "--linear_probe", "true"]
    )
    # learning rate 0: stage 2's weights stay where they start, so its final head is its starting head.
    second = recipe.main(
        [*common, "--model_name_or_path", str(stage1), "--output_dir", str(stage2), "--learning_rate", "0"]
    )
    head1, head2 = load_file(str(stage1 / "model.safetensors")), load_file(str(stage2 / "model.safetensors"))
    zero_shot = load_file(str(clip / "model.safetensors"))
    assert torch.equal(head2["classifier.weight"], head1["classifier.weight"])
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(head1[key], zero_shot[key]) and torch.equal(head2[key], zero_shot[key])
    assert second["before fine-tuning"] == first["fine-tuned"]


def test_forward_redirection_restores_an_instance_forward_even_after_an_error():
    from hf_cfft._forward import call_as_forward

    inner = torch.nn.Linear(2, 2)
    patched = inner.forward  # accelerate's autocast wrapper is such an instance attribute
    inner.forward = patched
    wrapper = torch.nn.Sequential(inner)
    assert call_as_forward(wrapper, inner, lambda x: x * 3, torch.ones(1)).tolist() == [3.0]
    assert inner.__dict__["forward"] is patched

    def fail(x):
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        call_as_forward(wrapper, inner, fail, torch.ones(1))
    assert inner.__dict__["forward"] is patched
