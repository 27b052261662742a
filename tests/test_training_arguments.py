"""Every TrainingArguments field is applied or refused: the walk over the installed transformers' fields."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _builders import CLASSES, tiny_clip, tiny_image_processor, tiny_tokenizer

from hf_cfft import CfftConfig, CfftTrainer
from hf_cfft.baselines.flyp import FlypTrainer
from hf_cfft.training import arguments


def test_every_field_of_the_installed_training_arguments_is_placed_once():
    table = arguments.classified_fields()
    installed = set(arguments.training_argument_names())
    assert installed - set(table) == set(), "new TrainingArguments fields: place them in hf_cfft.training.arguments"
    assert set(table) - installed == set(), "fields named in hf_cfft.training.arguments that transformers lacks"


def _config(tmp_path, **overrides) -> CfftConfig:
    return CfftConfig(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", **overrides)


# One value per refused field that a user could pass (set after the config is built: some, e.g. deepspeed, would
# need their library installed for TrainingArguments to accept them at all).
REFUSED_VALUES = {
    "use_liger_kernel": True,
    "liger_kernel_config": {"rope": True},
    "neftune_noise_alpha": 5.0,
    "auto_find_batch_size": True,
    "label_names": ["target"],
    "do_predict": True,
    "deepspeed": "ds_config.json",
    "parallelism_config": object(),
}


def test_the_refused_list_is_the_one_the_walk_covers():
    assert set(REFUSED_VALUES) == set(arguments.REFUSED)


@pytest.mark.parametrize("name", sorted(REFUSED_VALUES))
def test_each_refused_field_is_refused_by_the_trainer_before_any_work(tmp_path, tiny_classifier, name):
    args = _config(tmp_path)
    setattr(args, name, REFUSED_VALUES[name])
    with pytest.raises(ValueError, match=f"--{name} .*: {arguments.REFUSED[name][1][:30]}"):
        CfftTrainer(model=tiny_classifier, args=args)
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("strategy", ["group_by_length", "batch_rebalance"])
def test_a_length_based_sampler_is_refused(tmp_path, tiny_classifier, strategy):
    with pytest.raises(ValueError, match=f"--train_sampling_strategy {strategy}: .*use 'random'"):
        CfftTrainer(model=tiny_classifier, args=_config(tmp_path, train_sampling_strategy=strategy))


def test_a_scheduler_type_beside_the_one_cycle_schedule_is_refused(tmp_path, tiny_classifier):
    args = _config(tmp_path, one_cycle_schedule=True, lr_scheduler_type="cosine")
    with pytest.raises(ValueError, match="--lr_scheduler_type cosine with --one_cycle_schedule true"):
        CfftTrainer(model=tiny_classifier, args=args)
    CfftTrainer(model=tiny_classifier, args=_config(tmp_path, one_cycle_schedule=True))  # the default is let be


def test_label_smoothing_is_applied_to_the_classification_loss(tmp_path, tiny_classifier):
    """0.9 is not 0: the loss is (1 - e) * NLL + e * mean over classes of -log p, written out here."""
    g = torch.Generator().manual_seed(0)
    inputs = {"pixel_values": torch.randn(4, 3, 32, 32, generator=g), "labels": torch.tensor([0, 1, 2, 0])}
    losses = {}
    for smoothing in (0.0, 0.9):
        args = _config(
            tmp_path, distill_weight=0.0, mask_kind="none", fill_kind="none", label_smoothing_factor=smoothing
        )
        trainer = CfftTrainer(model=tiny_classifier, args=args)
        tiny_classifier.eval()
        with torch.no_grad():
            losses[smoothing] = float(trainer.compute_loss(tiny_classifier, inputs))
            log_p = F.log_softmax(tiny_classifier(pixel_values=inputs["pixel_values"]).logits.float(), dim=-1)
    nll = float(-log_p.gather(1, inputs["labels"][:, None]).mean())
    uniform = float(-log_p.mean())
    assert losses[0.0] == pytest.approx(nll, rel=1e-5)
    assert losses[0.9] == pytest.approx(0.1 * nll + 0.9 * uniform, rel=1e-5)
    assert abs(losses[0.9] - losses[0.0]) > 1e-3


def test_flyp_refuses_label_smoothing_it_has_no_targets_for(tmp_path):
    args = _config(tmp_path, method="flyp", distill_weight=0.0, mask_kind="none", fill_kind="none")
    args.label_smoothing_factor = 0.1
    with pytest.raises(ValueError, match="--label_smoothing_factor 0.1: FLYP's contrastive loss has no class targets"):
        FlypTrainer(
            model=tiny_clip(), args=args, tokenizer=tiny_tokenizer(), class_names=CLASSES, templates=["a {}."],
            processing_class=tiny_image_processor(),
        )  # fmt: skip


def test_a_train_set_smaller_than_one_batch_is_refused_before_the_cam_pass(tmp_path, tiny_classifier):
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(3)]
    train = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2]})
    args = _config(tmp_path, per_device_train_batch_size=4, max_steps=5)
    with pytest.raises(ValueError, match=r"has 3 image\(s\), fewer than one batch of 4 .*at most 3"):
        CfftTrainer(model=tiny_classifier, args=args, train_dataset=train, processing_class=tiny_image_processor())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--per_device_train_batch_size", "4", "--max_train_samples", "3"], "fewer than one batch of 4"),
        (["--auto_find_batch_size", "true"], "--auto_find_batch_size True: after an out-of-memory error"),
        (["--label_smoothing_factor", "0.1", "--method", "flyp", "--distill_weight", "0", "--mask_kind", "none",
          "--fill_kind", "none"], "FLYP's contrastive loss has no class targets"),
        # Before: 0 steps, rc 0 and "Saved the fine-tuned model" holding the zero-shot classifier.
        (["--max_steps", "-1", "--num_train_epochs", "0"],
         "num_train_epochs=0.0 with max_steps=-1 (unset) would train no step"),
        (["--distill_weight", "nan"], "distill_weight=nan must be a finite number >= 0"),
    ],
)  # fmt: skip
def test_the_recipe_refuses_them_in_one_line_as_a_user_runs_it(tmp_path, flags, message):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from _builders import save_tiny_clip, write_imagefolder

    root = Path(__file__).resolve().parents[1]
    clip, images = save_tiny_clip(tmp_path / "clip"), write_imagefolder(tmp_path / "images", per_class=2)
    command = [
        sys.executable, str(root / "recipes" / "finetune.py"), "--model_name_or_path", str(clip), "--dataset_name",
        str(images), "--eval_splits", "test", "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
        "--templates", "simple", "--use_cpu", "true", *flags,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.count("error: ") == 1 and message in done.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()
