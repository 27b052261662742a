"""Data steps: teacher-CAM pre-computation (a batched inference pass, sharded over the run's processes and cached as a
``cam`` column), the ``with_transform`` step and the collator.

    train Dataset --drop_unreadable_images, undecoded--precompute_cams (sharded, cached)--> + "cam" column
        --with_transform(CounterfactualTransform)--> pixel_values, labels, cf_mask (object/context masks)
        --CounterfactualCollator--> pixel_values, labels, cf_mask, cf_donors (the trainer's: refilled on the device)
                                  or pixel_values, labels, cf_pixel_values [, cf_patch_keep] (refilled here)

The transform cuts the CAM masks per image; the collator draws random masks and the refill donors, because refilling
takes patches from other images of the same batch. Randomness in the collator is seeded from the batch's content, so a
batch gets the same counterfactuals whichever worker builds it and after a resume.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset

from ._distributed import local_main_process_first
from .distributed_cams import precompute_cams
from .image_checks import drop_unreadable_images, undecoded
from .images import check_labels, load_image, preprocess_images
from .masking import cam_patch_mask, draw_donors, make_counterfactuals, random_patch_mask


def _random_resized_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    # Same ranges as the common RandomResizedCrop: scale in [0.35, 1], aspect ratio in [3/4, 4/3].
    for _ in range(10):
        area = height * width * (0.35 + 0.65 * torch.rand(()).item())
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(()).item())
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()))
            left = int(torch.randint(0, width - w + 1, ()))
            return top, left, h, w
    return 0, 0, height, width


def augment_with_cam(
    pixels: torch.Tensor, cam: torch.Tensor | None, augment: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random geometric augmentation of one image, applied identically to its CAM.

    pixels: [C, H, W]; cam: [h, w] or None. ``augment`` is 'none', 'flip' or 'crop_flip'.
    """
    if augment == "none":
        return pixels, cam
    height, width = pixels.shape[-2:]
    if augment == "crop_flip":
        top, left, h, w = _random_resized_crop_box(height, width)
        crop = pixels[:, top : top + h, left : left + w].unsqueeze(0)
        pixels = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0]
        if cam is not None:
            # Crop the CAM in pixel space, then average it back onto the patch grid.
            full = F.interpolate(cam[None, None], size=(height, width), mode="nearest")
            full = full[:, :, top : top + h, left : left + w]
            full = F.interpolate(full, size=(height, width), mode="bilinear", align_corners=False)
            cam = F.adaptive_avg_pool2d(full, cam.shape)[0, 0]
    if torch.rand(()).item() < 0.5:
        pixels = pixels.flip(-1)
        cam = cam.flip(-1) if cam is not None else None
    return pixels, cam


class CounterfactualTransform:
    """``Dataset.with_transform`` step: decode and preprocess images, follow augmentations with the CAM, cut masks.

    Returns per example ``pixel_values`` [C, H, W], ``labels`` and, when a ``cam`` column is present and
    ``mask_kind`` is 'object' or 'context', ``cf_mask`` [h, w] bool (True = masked).
    """

    def __init__(
        self,
        image_processor: Callable,
        *,
        grid: tuple[int, int],
        mask_kind: str = "none",
        mask_threshold: float = 0.3,
        mask_top_fraction: float | None = None,
        augment: str = "none",
        image_column: str = "image",
        label_column: str = "label",
        cam_column: str = "cam",
        num_labels: int | None = None,
    ):
        self.image_processor = image_processor
        self.grid = tuple(grid)
        self.mask_kind = mask_kind
        self.mask_threshold = mask_threshold
        self.mask_top_fraction = mask_top_fraction
        self.augment = augment
        self.image_column = image_column
        self.label_column = label_column
        self.cam_column = cam_column
        self.num_labels = num_labels

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        for column in (self.image_column, self.label_column):
            if column not in batch:
                raise KeyError(f"column {column!r} not found; the dataset has {sorted(batch)}. Set the column name.")
        labels = [int(label) for label in batch[self.label_column]]
        check_labels(labels, self.num_labels)
        pixels = preprocess_images(self.image_processor, batch[self.image_column])
        cams = batch.get(self.cam_column)
        out: dict[str, list] = {"pixel_values": [], "labels": labels}
        cut_masks = cams is not None and self.mask_kind in ("object", "context")
        if self.augment == "none":  # the paper's setting: one batched mask cut, the images as they are
            out["pixel_values"] = list(pixels)
            if cut_masks:
                cam = torch.as_tensor(np.asarray(cams, dtype=np.float32)).view(len(labels), *self.grid)
                out["cf_mask"] = list(cam_patch_mask(cam, self.mask_kind, self.mask_threshold, self.mask_top_fraction))
            return out
        if cut_masks:
            out["cf_mask"] = []
        for i in range(len(labels)):
            cam = torch.as_tensor(cams[i], dtype=torch.float32).view(self.grid) if cams is not None else None
            image, cam = augment_with_cam(pixels[i], cam, self.augment)
            out["pixel_values"].append(image)
            if cut_masks:
                out["cf_mask"].append(
                    cam_patch_mask(cam[None], self.mask_kind, self.mask_threshold, self.mask_top_fraction)[0]
                )
        return out


def stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(rows)``, without the copy when the rows are, in order, the rows of one contiguous batch.

    `CounterfactualTransform` preprocesses a DataLoader batch at once and hands out its rows as views; stacking them
    again would copy every image once more (about 15% of a worker's time at 224 px).
    """
    base = rows[0]._base if rows else None
    if (
        base is not None
        and base.is_contiguous()
        and base.shape == (len(rows), *rows[0].shape)
        and all(row._base is base and row.data_ptr() == base[i].data_ptr() for i, row in enumerate(rows))
        and all(row.is_contiguous() for row in rows)
    ):
        return base
    return torch.stack(rows)


def batch_generator(seed: int, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Generator:
    """A generator seeded by ``seed`` and a cheap fingerprint of the batch's content ([B, C, H, W], [B])."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(str(seed).encode())
    digest.update(labels.cpu().numpy().tobytes())
    digest.update(pixel_values.flatten(1).sum(dim=1).cpu().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") & (2**63 - 1))


class CounterfactualCollator:
    """Stack examples and draw the batch's counterfactuals: masks and refill donors, and by default the images too.

    Output: ``pixel_values`` [B, C, H, W], ``labels`` [B], and when masks exist (``cf_mask`` from the transform, or
    ``mask_kind='random'``) and the batch has a refill partner:

    - ``refill_on_device=False``: ``cf_pixel_values`` [B, C, H, W], plus ``cf_patch_keep`` [B, h * w] for no-fill;
    - ``refill_on_device=True`` (what `CfftTrainer` uses): ``cf_mask`` [B, h, w] bool and, for single-/multi-fill,
      ``cf_donors`` ([B] or [B, h, w] long, `hf_cfft.masking.draw_donors`). The trainer moves the patches on the
      training device (`hf_cfft.masking.make_counterfactuals` with ``donors``), so a worker no longer copies the
      batch; the draws are the same, so the counterfactuals are bit-identical.
    """

    def __init__(
        self,
        *,
        mask_kind: str,
        fill_kind: str,
        mask_ratio: float,
        patch_size: int,
        seed: int = 0,
        refill_on_device: bool = False,
    ):
        self.mask_kind = mask_kind
        self.fill_kind = fill_kind
        self.mask_ratio = mask_ratio
        self.patch_size = patch_size
        self.seed = seed
        self.refill_on_device = refill_on_device

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values = stack_rows([torch.as_tensor(e["pixel_values"]) for e in examples])
        labels = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
        batch = {"pixel_values": pixel_values, "labels": labels}
        size = len(examples)
        if self.fill_kind != "none" and size < 2:
            return batch  # nothing to refill from; the trainer skips distillation for this batch
        generator = batch_generator(self.seed, pixel_values, labels)
        grid = (pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size)
        if self.mask_kind == "random":
            mask = random_patch_mask(size, grid, self.mask_ratio, generator)
        elif "cf_mask" in examples[0]:
            mask = torch.stack([torch.as_tensor(e["cf_mask"], dtype=torch.bool) for e in examples])
        else:
            return batch
        if self.refill_on_device:
            batch["cf_mask"] = mask
            donors = draw_donors(self.fill_kind, size, grid, generator)
            if donors is not None:
                batch["cf_donors"] = donors
            return batch
        cf_pixel_values, keep = make_counterfactuals(pixel_values, mask, self.fill_kind, self.patch_size, generator)
        batch["cf_pixel_values"] = cf_pixel_values
        if keep is not None:
            batch["cf_patch_keep"] = keep
        return batch


def prepare_train_dataset(
    dataset: Dataset,
    image_processor: Callable,
    *,
    grid: tuple[int, int],
    num_labels: int,
    cam_teacher: torch.nn.Module | None = None,
    mask_kind: str = "none",
    mask_threshold: float = 0.3,
    mask_top_fraction: float | None = None,
    augment: str = "none",
    cam_method: str = "rollout",
    cam_batch_size: int = 64,
    cam_num_workers: int = 0,
    cam_dtype: torch.dtype = torch.float32,
    image_check: str = "verify",
    skip_corrupt_images: bool = False,
    image_column: str = "image",
    label_column: str = "label",
    device: torch.device | str | None = None,
) -> tuple[Dataset, int]:
    """A raw (image, label) dataset -> the train set of the method, and how many unreadable images were dropped.

    Checks the images (``image_check``; unreadable ones raise, or are dropped with ``skip_corrupt_images``; each
    machine's first process checks, the others read its cached result), leaves them undecoded (the transform decodes
    them, naming a broken file), adds ``cam_teacher``'s CAMs when one is given (`precompute_cams`: sharded over the
    run's processes, every one of which calls this, each on its ``device``; cached), and sets the
    `CounterfactualTransform` for the image tower's patch ``grid`` (h, w) and ``num_labels`` classes.
    """
    columns = {"image_column": image_column, "label_column": label_column}
    with local_main_process_first():
        dataset, skipped = drop_unreadable_images(dataset, image_column, skip=skip_corrupt_images, check=image_check)
    dataset = undecoded(dataset, image_column)
    if cam_teacher is not None:
        dataset = precompute_cams(
            dataset, cam_teacher, image_processor, method=cam_method, batch_size=cam_batch_size,
            num_workers=cam_num_workers, dtype=cam_dtype, device=device, **columns,
        )  # fmt: skip
    transform = CounterfactualTransform(
        image_processor,
        grid=grid,
        mask_kind=mask_kind,
        mask_threshold=mask_threshold,
        mask_top_fraction=mask_top_fraction,
        augment=augment,
        num_labels=num_labels,
        **columns,
    )
    return dataset.with_transform(transform), skipped


__all__ = [
    "CounterfactualCollator",
    "CounterfactualTransform",
    "augment_with_cam",
    "batch_generator",
    "stack_rows",
    "load_image",
    "precompute_cams",
    "prepare_train_dataset",
    "preprocess_images",
]
