"""A streamed train set (load_dataset(..., streaming=True) on a local imagefolder) trains without pre-computed CAMs."""

from __future__ import annotations

import pytest
import torch
from _builders import tiny_image_processor, write_imagefolder
from datasets import IterableDataset, load_dataset

from hf_cfft import CfftConfig, CfftTrainer
from hf_cfft.cam import compute_cam


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("stream") / "images", splits=("train",), per_class=4)


def _stream(images) -> IterableDataset:
    return load_dataset("imagefolder", data_dir=str(images), split="train", streaming=True)


def _trainer(tiny_classifier, tmp_path, train, **overrides) -> CfftTrainer:
    args = CfftConfig(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, max_steps=2, save_strategy="no",
        learning_rate=1e-3, seed=0, logging_steps=1, **overrides,
    )  # fmt: skip
    return CfftTrainer(model=tiny_classifier, args=args, train_dataset=train, processing_class=tiny_image_processor())


@pytest.mark.parametrize("cam_source", ["student", "teacher_online"])
def test_a_streamed_local_imagefolder_trains_with_online_cams(tiny_classifier, tmp_path, images, cam_source):
    trainer = _trainer(tiny_classifier, tmp_path, _stream(images), cam_source=cam_source)
    assert isinstance(trainer.train_dataset, IterableDataset)
    example = next(iter(trainer.train_dataset))
    assert set(example) == {"pixel_values", "labels"} and example["pixel_values"].shape == (3, 32, 32)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
    distill = [log["distill_loss"] for log in trainer.state.log_history if "distill_loss" in log]
    # Every step distilled on counterfactuals (0 at the first: the student still equals its teacher).
    assert len(distill) == 2 and distill[0] == pytest.approx(0.0, abs=1e-6) and distill[-1] > 1e-6


def test_online_teacher_cams_cut_the_masks_the_cached_teacher_cams_cut(tiny_classifier, tmp_path):
    trainer = _trainer(tiny_classifier, tmp_path, None, cam_source="teacher_online", fill_kind="none")
    pixels, labels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0])
    cf, keep = trainer._distilled_images({"pixel_values": pixels, "labels": labels}, "counterfactual")
    cam = compute_cam(trainer.teacher, pixels, labels)
    assert torch.equal(keep, ~(cam > 0.3).flatten(1))


def test_a_stream_cannot_take_precomputed_teacher_cams(tiny_classifier, tmp_path, images):
    with pytest.raises(ValueError, match="cam_source='teacher_online'"):
        _trainer(tiny_classifier, tmp_path, _stream(images), cam_source="teacher")
