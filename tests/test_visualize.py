"""Pictures of the method: the counterfactual grid, its recipe, and the TensorBoard callback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _builders import load_script, save_tiny_clip, write_imagefolder
from PIL import Image
from transformers.integrations import TensorBoardCallback

from hf_cfft import CfftConfig, CfftTrainer
from hf_cfft.callbacks import CounterfactualImagesCallback
from hf_cfft.visualize import PAD, counterfactual_grid, grid_layout

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _images(batch: int = 3) -> torch.Tensor:
    """Flat-coloured 32x32 images, distinct per image, in processor-normalised units."""
    colours = torch.rand(batch, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    rgb = colours.expand(-1, -1, 32, 32)
    return (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _cams(batch: int = 3) -> torch.Tensor:
    """A 4x4 CAM (8 px patches) whose top-left 2x2 block is the object."""
    cam = torch.full((batch, 4, 4), 0.1)
    cam[:, :2, :2] = 1.0
    return cam


def _crop(picture: Image.Image, layout, row: int, col: int) -> np.ndarray:
    return np.asarray(picture.crop(layout.cell_box(row, col))).astype(int)


def test_grid_has_one_row_per_image_and_a_column_per_mask_and_fill():
    picture = counterfactual_grid(_images(), _cams(), MEAN, STD, patch_size=8, generator=torch.Generator())
    layout = grid_layout(3, (32, 32))
    # input, CAM, then 3 mask kinds x (mask + 3 fills)
    assert len(layout.columns) == 2 + 3 * 4
    assert picture.size == layout.size == (PAD + 14 * (128 + PAD), layout.header_height + 3 * (128 + PAD) + PAD)
    small = counterfactual_grid(
        _images(2), _cams(2), MEAN, STD, 8, mask_kinds=("object",), fill_kinds=("single",), row_titles=["a", "b"]
    )
    assert small.size == grid_layout(2, (32, 32), ("object",), ("single",), with_row_titles=True).size


def test_grid_cells_show_unnormalised_pixels_and_masks_where_they_differ():
    images = _images()
    picture = counterfactual_grid(images, _cams(), MEAN, STD, 8, fill_kinds=("single",), generator=torch.Generator())
    layout = grid_layout(3, (32, 32), fill_kinds=("single",))
    titles = [" ".join(t).strip() for t in layout.columns]
    object_cf, context_cf = titles.index("object single-fill"), titles.index("context single-fill")
    for row in range(3):
        original = _crop(picture, layout, row, 0)
        expected = (images[row, :, 0, 0] * torch.tensor(STD) + torch.tensor(MEAN)) * 255
        assert np.abs(original[0, 0] - expected.numpy()).max() <= 1  # mean/std undone
        obj, ctx = _crop(picture, layout, row, object_cf), _crop(picture, layout, row, context_cf)
        assert not np.array_equal(obj, ctx)
        # 32 px images are enlarged 4x: the object (top-left 2x2 patches) is the top-left 64x64 pixels.
        assert not np.array_equal(obj[:64, :64], original[:64, :64]) and np.array_equal(obj[64:], original[64:])
        assert np.array_equal(ctx[:64, :64], original[:64, :64]) and not np.array_equal(ctx[64:], original[64:])


def test_no_fill_marks_removed_patches_and_one_image_cannot_be_refilled():
    picture = counterfactual_grid(_images(1), _cams(1), MEAN, STD, 8, mask_kinds=("object",), fill_kinds=("none",))
    layout = grid_layout(1, (32, 32), ("object",), ("none",))
    removed = _crop(picture, layout, 0, 3)
    assert len(np.unique(removed[:64, :64].reshape(-1, 3), axis=0)) == 2  # the two-tone hatching
    assert np.array_equal(removed[64:], _crop(picture, layout, 0, 0)[64:])
    with pytest.raises(ValueError, match="at least 2 images"):
        counterfactual_grid(_images(1), _cams(1), MEAN, STD, 8, fill_kinds=("single",))
    with pytest.raises(ValueError, match="patch grid"):
        counterfactual_grid(_images(2), torch.zeros(2, 2, 2), MEAN, STD, 8)


def _recipe(name: str):
    return load_script(ROOT / "recipes" / f"{name}.py", f"{name}_recipe")


def test_visualize_recipe_writes_the_grid_png(tmp_path):
    clip = save_tiny_clip(tmp_path / "clip")
    images = write_imagefolder(tmp_path / "images", splits=("train",), per_class=2)
    out = tmp_path / "pictures" / "grid.png"
    _recipe("visualize").main([
        "--model_name_or_path", str(clip), "--templates", "simple", "--dataset_name", str(images),
        "--split", "train", "--num_images", "3", "--output_file", str(out), "--device", "cpu",
    ])  # fmt: skip

    picture = Image.open(out)
    layout = grid_layout(3, (32, 32), with_row_titles=True)
    assert picture.size == layout.size
    titles = [" ".join(t).strip() for t in layout.columns]
    for row in range(3):
        obj = _crop(picture, layout, row, titles.index("object single-fill"))
        assert not np.array_equal(obj, _crop(picture, layout, row, titles.index("context single-fill")))


@pytest.mark.parametrize(
    ("flag", "value"), [("--mask_threshold", "2.0"), ("--mask_threshold", "nan"), ("--mask_ratio", "0.0")]
)
def test_a_mask_setting_outside_0_1_is_refused_before_any_picture(tmp_path, flag, value):
    """Before: --mask_threshold 2 wrote a picture whose object masks were all empty, rc 0."""
    out = tmp_path / "grid.png"
    with pytest.raises(ValueError, match=rf"{flag}={value} must lie in \(0, 1\)"):
        _recipe("visualize").main(["--model_name_or_path", "unused", "--output_file", str(out), flag, value])
    assert not out.exists()
    with pytest.raises(ValueError, match=r"threshold=2 and ratio=0.5 must lie in \(0, 1\)"):
        counterfactual_grid(_images(2), _cams(2), MEAN, STD, 8, threshold=2)


class _Writer:
    def __init__(self):
        self.images = []

    def add_image(self, tag, image, step, dataformats):
        self.images.append((tag, image, step, dataformats))

    def add_text(self, *args, **kwargs):
        pass

    def add_scalar(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class _FakeTensorBoard(TensorBoardCallback):
    """TensorBoard's callback with an in-memory writer: no tensorboard install needed."""

    def __init__(self):
        self.tb_writer, self.logging_dir, self._SummaryWriter = _Writer(), "unused", None


def _trainer(tiny_classifier, tmp_path, report_to="none"):
    args = CfftConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, distill_weight=0.0, mask_kind="none",
        fill_kind="none", use_cpu=True, save_strategy="no", report_to=report_to, seed=3, learning_rate=1e-2,
    )  # fmt: skip
    data = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 3} for i in range(4)]
    return CfftTrainer(model=tiny_classifier, args=args, train_dataset=data)


def test_callback_logs_the_grid_of_the_current_model_to_tensorboard(tiny_classifier, tmp_path):
    trainer = _trainer(tiny_classifier, tmp_path)
    board = _FakeTensorBoard()
    trainer.callback_handler.callbacks.insert(0, board)  # where report_to="tensorboard" would put it
    CounterfactualImagesCallback(_images(), [0, 1, 2], every_n_steps=1, image_mean=MEAN, image_std=STD).attach(trainer)
    writer = board.tb_writer
    trainer.train()

    assert [step for _, _, step, _ in writer.images] == [0, 1, 2]
    tag, image, _, dataformats = writer.images[-1]
    width, height = grid_layout(3, (32, 32), with_row_titles=True).size
    assert tag == "counterfactuals" and dataformats == "HWC" and image.shape == (height, width, 3)
    assert not np.array_equal(writer.images[0][1], image), "the CAM follows the model as it trains"


def test_callback_is_silent_without_tensorboard(tiny_classifier, tmp_path):
    trainer = _trainer(tiny_classifier, tmp_path)
    callback = CounterfactualImagesCallback(_images(), [0, 1, 2], every_n_steps=1).attach(trainer)
    trainer.train()
    assert callback._last_logged_step is None


def test_callback_writes_images_into_a_real_tensorboard_run(tiny_classifier, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    trainer = _trainer(tiny_classifier, tmp_path, report_to="tensorboard")
    CounterfactualImagesCallback(_images(), [0, 1, 2], every_n_steps=2, image_mean=MEAN, image_std=STD).attach(trainer)
    trainer.train()

    (log_dir,) = {path.parent for path in tmp_path.rglob("events.out.tfevents.*")}
    events = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    logged = events.Images("counterfactuals")
    width, height = grid_layout(3, (32, 32), with_row_titles=True).size
    assert [e.step for e in logged] == [0, 2] and (logged[0].width, logged[0].height) == (width, height)


def test_callback_from_dataset_decodes_an_undecoded_image_column(tiny_image_processor, tmp_path):
    from datasets import Image as ImageFeature

    from hf_cfft.cli.sources import load_image_splits

    train = load_image_splits(str(write_imagefolder(tmp_path, splits=("train",), per_class=2)), ["train"])["train"]
    train = train.cast_column("image", ImageFeature(decode=False))  # as recipes/finetune.py keeps it
    callback = CounterfactualImagesCallback.from_dataset(train, tiny_image_processor, num_images=4, every_n_steps=5)
    assert callback.images.shape == (4, 3, 32, 32) and callback.labels.tolist() == train["label"][:4]
    assert callback.image_mean == tiny_image_processor.image_mean
