"""FastImageProcessor: the checkpoint processor's preprocessing as batched torch ops, equal up to rounding."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage
from transformers import CLIPImageProcessor, SiglipImageProcessorPil

from hf_cfft import CfftConfig, CfftTrainer
from hf_cfft.data import CounterfactualTransform, preprocess_images, stack_rows
from hf_cfft.fast_images import FastImageProcessor

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _jpeg(width: int, height: int, seed: int, mode: str = "RGB") -> dict:
    rng = np.random.default_rng(seed)
    pixels = rng.random((height, width, 3)) * 60 + np.linspace(0, 190, width)[None, :, None]
    image = PILImage.fromarray(pixels.astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG" if mode != "RGBA" else "PNG", quality=90)
    return {"path": f"{seed}.jpg", "bytes": buffer.getvalue()}


PROCESSORS = {
    "clip-224": CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
    "clip-32": CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    "siglip-224": SiglipImageProcessorPil(size={"height": 224, "width": 224}),
}


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_fast_processor_matches_the_checkpoint_processor_up_to_rounding(name):
    processor = PROCESSORS[name]
    images = [_jpeg(500, 375, 0), _jpeg(375, 500, 1), _jpeg(300, 224, 2, "L"), _jpeg(47, 33, 3, "RGBA")]
    expected = preprocess_images(processor, images)
    got = preprocess_images(FastImageProcessor(processor), images)
    assert got.shape == expected.shape and got.dtype == torch.float32 and got.is_contiguous()
    grey_levels = ((got - expected) * torch.tensor(processor.image_std).view(1, 3, 1, 1) * 255).abs()
    assert grey_levels[:3].max() <= 1.0001  # shrinking: within 1 grey level of PIL's bicubic filter
    assert grey_levels.max() <= 2.0001  # enlarging a 47x33 image
    assert (grey_levels.round() > 0).float().mean() < 0.05  # almost every pixel equal


def test_fast_processor_refuses_steps_it_does_not_reproduce():
    with pytest.raises(ValueError, match="resample=.*only bicubic"):
        FastImageProcessor(CLIPImageProcessor(resample=PILImageResampling_bilinear()))
    with pytest.raises(ValueError, match="size=.*longest_edge"):
        FastImageProcessor(CLIPImageProcessor(size={"shortest_edge": 224, "longest_edge": 300}))


def PILImageResampling_bilinear():  # noqa: N802
    from transformers.image_utils import PILImageResampling

    return PILImageResampling.BILINEAR


def test_stack_rows_reuses_a_batch_handed_out_as_rows_and_copies_anything_else():
    batch = torch.randn(4, 3, 8, 8)
    rows = list(batch)
    assert stack_rows(rows) is batch
    assert torch.equal(stack_rows(rows[::-1]), torch.stack(rows[::-1]))
    assert stack_rows(rows[:3]) is not batch and torch.equal(stack_rows(rows[:3]), batch[:3])
    separate = [torch.randn(3, 8, 8) for _ in range(2)]
    assert torch.equal(stack_rows(separate), torch.stack(separate))


def test_batched_mask_cut_equals_the_per_image_cut(tiny_image_processor):
    rng = np.random.default_rng(0)
    cams = rng.random((6, 16), dtype=np.float32).tolist()
    batch = {"image": [_jpeg(40, 36, i) for i in range(6)], "label": [0, 1, 2, 0, 1, 2], "cam": cams}
    transform = CounterfactualTransform(tiny_image_processor, grid=(4, 4), mask_kind="object", num_labels=3)
    out = transform(dict(batch))
    for i in range(6):
        alone = transform({key: [value[i]] for key, value in batch.items()})
        assert torch.equal(out["cf_mask"][i], alone["cf_mask"][0])
        assert torch.equal(out["pixel_values"][i], alone["pixel_values"][0])


def test_trainer_preprocesses_the_train_set_with_the_fast_path_when_asked(
    tiny_classifier, tiny_image_processor, tmp_path
):
    images = [PILImage.open(io.BytesIO(_jpeg(40, 36, i)["bytes"])) for i in range(4)]
    features = Features({"image": Image(), "label": Value("int64")})
    train = Dataset.from_dict({"image": images, "label": [0, 1, 2, 0]}, features)
    args = CfftConfig(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, fast_image_processing=True
    )
    trainer = CfftTrainer(model=tiny_classifier, args=args, train_dataset=train, processing_class=tiny_image_processor)
    example = trainer.train_dataset[0]
    assert isinstance(trainer.train_dataset.format["format_kwargs"]["transform"].image_processor, FastImageProcessor)
    expected = preprocess_images(tiny_image_processor, [train[0]["image"]])[0]
    assert example["pixel_values"].shape == expected.shape
    assert (example["pixel_values"] - expected).abs().max() < 0.03  # 2 grey levels: the image is enlarged


def test_image_pipeline_benchmark_runs_at_a_small_size(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("_bench_image_pipeline", BENCHMARKS / "image_pipeline.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(BENCHMARKS))
    report = bench.main(["--batch_size", "4", "--repeats", "1", "--warmup", "0", "--source", "80x60", "--image_size",
                         "32", "--patch_size", "8", "--output", str(tmp_path / "r.md")])  # fmt: skip
    for name in ("decode_processor", "decode_fast", "before", "after", "device_refill"):
        assert f"(`{name}`)" in report
    assert "after >= 2x before" in report and (tmp_path / "r.md").read_text() == report
