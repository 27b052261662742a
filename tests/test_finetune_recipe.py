"""End to end: a CLIP checkpoint folder + an ImageFolder on disk -> recipes/finetune.py -> a loadable classifier."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _builders import CLASSES, save_tiny_clip, write_imagefolder
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from hf_cfft import ClipCfftForImageClassification

ROOT = Path(__file__).resolve().parents[1]


def _recipe():
    spec = importlib.util.spec_from_file_location("finetune_recipe", ROOT / "recipes" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve field types through the module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    return save_tiny_clip(root / "clip"), write_imagefolder(root / "images")


def _args(clip, images, out, *extra):
    return [
        "--model_name_or_path", str(clip), "--dataset_name", str(images), "--eval_splits", "test",
        "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "3", "--templates", "simple",
        "--use_cpu", "--save_strategy", "no", "--logging_steps", "1", *extra,
    ]  # fmt: skip


def test_recipe_trains_saves_and_reloads_identically(workspace, tmp_path):
    clip, images = workspace
    out = tmp_path / "run"
    results = _recipe().main(_args(clip, images, out))

    assert set(results) == {"zero-shot", "fine-tuned"}
    assert 0.0 <= results["fine-tuned"]["test"] <= 100.0
    assert json.loads((out / "eval_results.json").read_text()) == results
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    saved = load_file(str(out / "model.safetensors"))
    assert not any(key.startswith("teacher") for key in saved), "the teacher must never be written"

    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert isinstance(model, ClipCfftForImageClassification)
    assert [model.config.id2label[i] for i in range(3)] == list(CLASSES)
    again = AutoModelForImageClassification.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(pixels).logits, again(pixels).logits)

    classify = pipeline(
        "image-classification", model=str(out), image_processor=AutoImageProcessor.from_pretrained(out)
    )
    predictions = classify(str(images / "test" / "dog" / "1.png"), top_k=3)
    assert sorted(p["label"] for p in predictions) == sorted(CLASSES)


def test_recipe_fine_tuning_moves_weights_but_not_the_teacher(workspace, tmp_path):
    clip, images = workspace
    recipe = _recipe()
    model_args, data_args, args, _ = recipe.parse_args(_args(clip, images, tmp_path / "run"))
    assert args.mask_kind == "object" and args.fill_kind == "single" and args.distill_weight == 30.0
    recipe.main(_args(clip, images, tmp_path / "run"))
    tuned = load_file(str(tmp_path / "run" / "model.safetensors"))
    original = load_file(str(clip / "model.safetensors"))
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(tuned[key], original[key]), "fine-tuning must change the encoder"


def test_yaml_config_with_cli_override(workspace, tmp_path):
    clip, images = workspace
    config = tmp_path / "c.yaml"
    config.write_text("mask_kind: random\nfill_kind: multi\nmask_ratio: 0.25\nlearning_rate: 1.0e-4\n")
    _, _, args, _ = _recipe().parse_args(["--config", str(config), "--learning_rate", "2e-4", "--output_dir", "x"])
    assert (args.mask_kind, args.fill_kind, args.mask_ratio, args.learning_rate) == ("random", "multi", 0.25, 2e-4)


def test_missing_dataset_folder_is_named(workspace, tmp_path):
    clip, _ = workspace
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        _recipe().main(_args(clip, tmp_path / "does_not_exist" / "x", tmp_path / "run"))


@pytest.mark.xdist_group("two_processes")  # one port (29500): launches of two processes run one at a time
@pytest.mark.skipif(sys.platform != "linux", reason="two CPU processes via accelerate launch")
@pytest.mark.parametrize("cam_source", ["teacher", "student"])
def test_accelerate_launch_two_processes(workspace, tmp_path, cam_source):
    # accelerate 1.x's `--cpu` starts ONE process (several CPU processes need mpirun); `--multi_gpu` + `--use_cpu`
    # starts two gloo processes through torchrun.
    clip, images = workspace
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "recipes" / "finetune.py"),
        *_args(clip, images, out), "--evaluate_zero_shot", "false", "--cam_source", cam_source,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "with 2 process(es) on cpu" in done.stdout
    # Every student forward goes through DDP, so DDP needs (and warns about) no unused-parameter search.
    assert "find_unused_parameters" not in done.stdout + done.stderr
    assert (out / "model.safetensors").is_file()
    assert "fine-tuned" in json.loads((out / "eval_results.json").read_text())


@pytest.mark.parametrize("name", ["imagenet_vit_b32.yaml", "imagenet_vit_b16.yaml"])
def test_paper_configs_train_what_their_header_says(name):
    """Each paper config's header states the paper's settings in words; the values it parses to must be those (a
    changed value or a changed header fails), and the run must be the paper's method with the reference's switches."""
    import re

    path = ROOT / "recipes" / "configs" / name
    header = " ".join(line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#"))

    def stated(pattern: str) -> float:
        found = re.search(pattern, header)
        assert found, f"{name}'s header no longer states {pattern!r}"
        return float(found.group(1))

    # bf16 needs a GPU when the arguments are validated; everything else is checked as written.
    _, data_args, args, _ = _recipe().parse_args(["--config", str(path), "--bf16", "false"])
    assert args.mask_threshold == stated(r"CAM threshold ([0-9.]+)")
    assert args.distill_weight == stated(r"beta = ([0-9.]+)")
    assert args.learning_rate == stated(r"lr ([0-9.e-]+)")
    assert args.weight_decay == stated(r"weight decay ([0-9.]+) on every parameter") and args.decay_all_parameters
    assert args.num_train_epochs == stated(r"([0-9]+) epochs")
    assert args.max_grad_norm == stated(r"gradient clipping ([0-9.]+)")
    assert args.one_cycle_schedule and args.warmup_steps == stated(r"([0-9]+)% warm-up") / 100
    gpus = stated(r"assume\s+([0-9]+) GPUs")
    assert args.per_device_train_batch_size * gpus * args.gradient_accumulation_steps == stated(
        r"global batch ([0-9]+)"
    )
    assert "single-fill" in header and "object-mask" in header and "no augmentation" in header
    assert (args.mask_kind, args.fill_kind, args.augment) == ("object", "single", "none")
    assert "recomputed by the model being trained" in header and args.cam_source == "student"
    assert data_args.train_split == "train"
