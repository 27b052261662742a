"""The run manifest (data fingerprint, world size, global batch) recorded in every checkpoint and checked on resume."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import datasets
import pytest
from _builders import load_script, save_tiny_clip, write_imagefolder

from hf_cfft.training.run_manifest import manifest_changes, rows_fingerprint

ROOT = Path(__file__).resolve().parents[1]


def _finetune():
    return load_script(ROOT / "recipes" / "finetune.py", "finetune_recipe_manifest")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    return save_tiny_clip(root / "clip"), write_imagefolder(root / "images", per_class=4)


def _args(clip, images, out, *extra):
    return [
        "--model_name_or_path", str(clip), "--dataset_name", str(images), "--eval_splits", "test",
        "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_steps", "1",
        "--templates", "simple", "--use_cpu", "--distill_weight", "0", "--mask_kind", "none", "--fill_kind", "none",
        "--learning_rate", "1e-3", *extra,
    ]  # fmt: skip


def _train_split(folder: Path) -> datasets.Dataset:
    return datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")


def test_the_fingerprint_follows_the_rows_not_where_the_folder_lies(tmp_path):
    images = write_imagefolder(tmp_path / "images", splits=("train",), per_class=4)
    train = _train_split(images)
    first = rows_fingerprint(train)
    assert first["rows"] == 12 and len(first["fingerprint"]) == 64
    moved = tmp_path / "elsewhere"
    shutil.copytree(images, moved)
    assert rows_fingerprint(_train_split(moved)) == first
    assert rows_fingerprint(train.select(range(6)))["fingerprint"] != first["fingerprint"]
    assert rows_fingerprint(train.shuffle(seed=0))["fingerprint"] != first["fingerprint"]
    # the same labels in the same order, one image's pixels changed: another data set
    changed = moved / "train" / sorted(p.name for p in (moved / "train").iterdir())[0]
    picture = sorted(changed.iterdir())[0]
    from PIL import Image

    Image.new("RGB", (16, 16), (1, 2, 3)).save(picture)
    assert rows_fingerprint(_train_split(moved))["fingerprint"] != first["fingerprint"]
    assert rows_fingerprint(train.to_iterable_dataset()) is None  # a stream is named by its source alone


def test_every_checkpoint_records_the_data_the_world_size_and_the_global_batch(workspace, tmp_path):
    clip, images = workspace
    _finetune().main(_args(clip, images, tmp_path / "run", "--gradient_accumulation_steps", "2"))
    for folder in (tmp_path / "run" / "checkpoint-1", tmp_path / "run"):
        manifest = json.loads((folder / "training_args.json").read_text())["run_manifest"]
        assert manifest["world_size"] == 1 and manifest["global_batch"] == 8
        assert manifest["data"]["rows"] == 12
        assert manifest["data"]["fingerprint"] == rows_fingerprint(_train_split(images))["fingerprint"]
        assert manifest["data"]["source"] == {"dataset_name": str(images), "train_split": "train"}


def test_a_resume_on_other_rows_is_refused_and_keeps_the_run(workspace, tmp_path):
    clip, images = workspace
    finetune = _finetune()
    finetune.main(_args(clip, images, tmp_path / "run"))
    weights = tmp_path / "run" / "model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    resume = ["--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-1")]
    with pytest.raises(ValueError) as refused:
        finetune.main(_args(clip, images, tmp_path / "run", "--max_train_samples", "8", *resume))
    message = str(refused.value)
    assert "data.rows: 12 -> 8" in message and "data.fingerprint" in message
    assert "--max_train_samples" in message and "--allow_changed_args_on_resume true" in message
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before


def _as_if_two_processes(checkpoint: Path) -> None:
    """Rewrite a checkpoint's manifest as a 2-process run at 4 images per process would have written it."""
    path = checkpoint / "training_args.json"
    saved = json.loads(path.read_text())
    saved["run_manifest"] |= {"world_size": 2, "global_batch": 8}
    path.write_text(json.dumps(saved))


def test_another_global_batch_is_refused_and_another_split_of_the_same_one_goes_on(workspace, tmp_path, caplog):
    clip, images = workspace
    finetune = _finetune()
    finetune.main(_args(clip, images, tmp_path / "run"))
    checkpoint = tmp_path / "run" / "checkpoint-1"
    _as_if_two_processes(checkpoint)
    resume = ["--resume_from_checkpoint", str(checkpoint)]
    with pytest.raises(ValueError) as refused:
        finetune.main(_args(clip, images, tmp_path / "run", *resume))
    message = str(refused.value)
    assert "global_batch: 8 -> 4" in message and "Keep the global batch at 8" in message
    assert "--gradient_accumulation_steps" in message
    # One process accumulating two batches of 4: the same global batch, so the same steps; said, and it goes on.
    with caplog.at_level(logging.WARNING, logger="hf_cfft.training.run_folder"):
        finetune.main(_args(clip, images, tmp_path / "run", "--gradient_accumulation_steps", "2", *resume))
    notes = [r.getMessage() for r in caplog.records if "process(es)" in r.getMessage()]
    assert len(notes) == 1 and "trained with 2 process(es), this run has 1 at the same global batch (8)" in notes[0]
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_a_renamed_source_with_the_same_rows_goes_on_and_a_stream_is_compared_by_name():
    rows = {"rows": 12, "fingerprint": "ab" * 32}
    saved = {"data": {"source": {"dataset_name": "/old/images"}, **rows}, "world_size": 1, "global_batch": 4}
    moved = {"data": {"source": {"dataset_name": "/new/images"}, **rows}, "world_size": 1, "global_batch": 4}
    refused, notes = manifest_changes(saved, moved)
    assert refused == {} and "named differently" in notes[0] and "its rows are the same" in notes[0]
    stream = {"data": {"source": {"dataset_name": "user/other"}}, "world_size": 1, "global_batch": 4}
    old_stream = {"data": {"source": {"dataset_name": "user/data"}}, "world_size": 1, "global_batch": 4}
    refused, _ = manifest_changes(old_stream, stream)
    assert refused == {"data.source": ({"dataset_name": "user/data"}, {"dataset_name": "user/other"})}
    assert manifest_changes(None, stream) == ({}, [])  # a checkpoint from before manifests: nothing to compare


@pytest.mark.parametrize(
    ("changed", "refused"),
    [
        (["--model_name_or_path", "CLIP_B"], "model.start"),  # another pre-trained tower
        (["--templates", "openai_imagenet"], "model.start"),  # another zero-shot head
        (["--teacher_name_or_path", "CLIP_B"], "model.teacher"),  # another teacher
    ],
    ids=["model", "templates", "teacher"],
)
def test_a_resume_from_another_starting_model_is_refused_before_the_data_is_prepared(
    workspace, tmp_path, monkeypatch, changed, refused
):
    """Before: accepted, rc 0: the checkpoint's student trained on, distilled towards another model's features."""
    clip, images = workspace
    clip_b = save_tiny_clip(tmp_path / "clip_b", seed=1)
    finetune = _finetune()
    cfft = ["--distill_weight", "1", "--mask_kind", "object", "--fill_kind", "single", "--mask_threshold", "0.3"]
    finetune.main(_args(clip, images, tmp_path / "run", *cfft))
    manifest = json.loads((tmp_path / "run" / "checkpoint-1" / "training_args.json").read_text())["run_manifest"]
    assert manifest["model"]["start"] == manifest["model"]["teacher"]  # the teacher: a frozen copy of the start
    (tmp_path / "run" / "model.safetensors").unlink()  # as if stopped after its last checkpoint
    before = {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()}

    from hf_cfft.trainer import CfftTrainer

    prepared = []
    monkeypatch.setattr(CfftTrainer, "_prepare_dataset", lambda self, data: prepared.append(1) or data)
    flags = [str(clip_b) if flag == "CLIP_B" else flag for flag in changed]
    with pytest.raises(ValueError, match=rf"resuming .*checkpoint-2 on a different run \({refused}: .*--templates"):
        finetune.main(_args(clip, images, tmp_path / "run", *cfft, "--resume_from_checkpoint", "auto", *flags))
    assert not prepared  # refused before the CAM pass
    assert {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()} == before


def test_the_fingerprint_sees_the_head_and_the_tower_through_an_adapter(tiny_classifier):
    import copy

    from hf_cfft import adapters
    from hf_cfft.training.run_manifest import weights_fingerprint

    plain = weights_fingerprint(tiny_classifier)
    wrapped = adapters.add_lora(copy.deepcopy(tiny_classifier), rank=4, alpha=8, dropout=0.0, target_modules=None)
    assert weights_fingerprint(wrapped) == plain  # the same start, whatever wraps it
    other_head = copy.deepcopy(tiny_classifier)
    other_head.classifier.weight.data[0, 0] += 1
    wrapped_other = adapters.add_lora(other_head, rank=4, alpha=8, dropout=0.0, target_modules=None)
    assert weights_fingerprint(wrapped_other) != plain  # the head is hashed through peft's copy of it
