"""Data steps: teacher-CAM pre-computation (``Dataset.map``), the ``with_transform`` step and the collator.

    train Dataset --drop_unreadable_images, undecoded--precompute_cams (map, cached)--> + "cam" column
        --with_transform(CounterfactualTransform)--> pixel_values, labels, cf_mask (object/context masks)
        --CounterfactualCollator--> pixel_values, labels, cf_pixel_values [, cf_patch_keep]

The transform cuts the CAM masks per image; the collator draws random masks and refills, because refilling takes
patches from other images of the same batch. Randomness in the collator is seeded from the batch's content, so a
batch gets the same counterfactuals whichever worker builds it and after a resume.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from datasets.fingerprint import Hasher
from PIL import Image

from .cam import compute_cam
from .image_checks import drop_unreadable_images, undecoded
from .masking import cam_patch_mask, make_counterfactuals, random_patch_mask


def load_image(item: Any) -> Image.Image:
    """A PIL RGB image from a decoded image or an undecoded ``{"path", "bytes"}`` dict (``Image(decode=False)``).

    Decoding here rather than inside ``datasets`` lets a broken file be reported by its name.
    """
    if isinstance(item, dict):
        name = item.get("path") or "<in-memory bytes>"
        try:
            image = Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])
            image.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(
                f"cannot read image {name}: {error}. Remove or replace the file, or train with "
                "--skip_corrupt_images true to drop unreadable images before training"
            ) from error
    else:
        image = item
    # CLIP expects 3 channels; grayscale, palette, CMYK and RGBA images are common in user folders.
    return image.convert("RGB") if image.mode != "RGB" else image


def _check_labels(labels: Sequence[int], num_labels: int | None) -> None:
    if num_labels is None:
        return
    for label in labels:
        if not 0 <= int(label) < num_labels:
            raise ValueError(
                f"label {label} is outside the model's classes 0..{num_labels - 1}; check that the dataset's label "
                "column matches the class names the head was built from"
            )


def preprocess_images(image_processor: Callable, images: Sequence[Any]) -> torch.Tensor:
    """PIL images -> [B, C, H, W] float pixel values with the checkpoint's own resize, crop and normalisation."""
    return image_processor(images=[load_image(image) for image in images], return_tensors="pt")["pixel_values"]


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
        _check_labels(labels, self.num_labels)
        pixels = preprocess_images(self.image_processor, batch[self.image_column])
        cams = batch.get(self.cam_column)
        out: dict[str, list] = {"pixel_values": [], "labels": labels}
        cut_masks = cams is not None and self.mask_kind in ("object", "context")
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


def batch_generator(seed: int, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Generator:
    """A generator seeded by ``seed`` and a cheap fingerprint of the batch's content ([B, C, H, W], [B])."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(str(seed).encode())
    digest.update(labels.cpu().numpy().tobytes())
    digest.update(pixel_values.flatten(1).sum(dim=1).cpu().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") & (2**63 - 1))


class CounterfactualCollator:
    """Stack examples and build counterfactual images for the batch.

    Output: ``pixel_values`` [B, C, H, W], ``labels`` [B], and when masks exist (``cf_mask`` from the transform, or
    ``mask_kind='random'``) and the batch has a refill partner: ``cf_pixel_values`` [B, C, H, W], plus
    ``cf_patch_keep`` [B, h * w] for no-fill.
    """

    def __init__(self, *, mask_kind: str, fill_kind: str, mask_ratio: float, patch_size: int, seed: int = 0):
        self.mask_kind = mask_kind
        self.fill_kind = fill_kind
        self.mask_ratio = mask_ratio
        self.patch_size = patch_size
        self.seed = seed

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])
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
        cf_pixel_values, keep = make_counterfactuals(pixel_values, mask, self.fill_kind, self.patch_size, generator)
        batch["cf_pixel_values"] = cf_pixel_values
        if keep is not None:
            batch["cf_patch_keep"] = keep
        return batch


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def precompute_cams(
    dataset: Dataset,
    model: torch.nn.Module,
    image_processor: Callable,
    *,
    method: str = "rollout",
    batch_size: int = 64,
    image_column: str = "image",
    label_column: str = "label",
    cam_column: str = "cam",
    device: torch.device | str | None = None,
) -> Dataset:
    """Add a ``cam`` column ([h * w] floats per image, max-normalised) computed by the frozen ``model``.

    Runs once through ``Dataset.map``. The fingerprint covers the dataset, the teacher's weights, the method and the
    preprocessing, so a file-backed dataset reuses its cached result on the next run instead of recomputing.
    """
    if cam_column in dataset.column_names:
        return dataset
    device = torch.device(device) if device is not None else next(model.parameters()).device
    num_labels = model.config.num_labels
    fingerprint = Hasher.hash(
        [dataset._fingerprint, _weights_digest(model), method, image_processor.to_dict(), image_column, label_column]
    )

    def add_cams(batch: dict[str, list]) -> dict[str, list]:
        _check_labels(batch[label_column], num_labels)
        pixels = preprocess_images(image_processor, batch[image_column]).to(device)
        labels = torch.as_tensor(batch[label_column], device=device)
        cams = compute_cam(model, pixels, labels, method)
        return {cam_column: cams.flatten(1).float().cpu().numpy()}

    return dataset.map(
        add_cams, batched=True, batch_size=batch_size, new_fingerprint=fingerprint, desc=f"teacher CAMs ({method})"
    )


def prepare_train_dataset(
    dataset: Dataset,
    image_processor: Callable,
    *,
    model: torch.nn.Module,
    cam_teacher: torch.nn.Module | None = None,
    mask_kind: str = "none",
    mask_threshold: float = 0.3,
    mask_top_fraction: float | None = None,
    augment: str = "none",
    cam_method: str = "rollout",
    cam_batch_size: int = 64,
    image_check: str = "verify",
    skip_corrupt_images: bool = False,
    image_column: str = "image",
    label_column: str = "label",
    device: torch.device | str | None = None,
) -> tuple[Dataset, int]:
    """A raw (image, label) dataset -> the train set of the method, and how many unreadable images were dropped.

    Checks the images (``image_check``; unreadable ones raise, or are dropped with ``skip_corrupt_images``), leaves
    them undecoded (the transform decodes them, naming a broken file), adds ``cam_teacher``'s CAMs (``Dataset.map``,
    cached) when one is given, and sets the `CounterfactualTransform` for ``model``'s patch grid and classes.
    """
    columns = {"image_column": image_column, "label_column": label_column}
    dataset, skipped = drop_unreadable_images(dataset, image_column, skip=skip_corrupt_images, check=image_check)
    dataset = undecoded(dataset, image_column)
    if cam_teacher is not None:
        dataset = precompute_cams(
            dataset, cam_teacher, image_processor, method=cam_method, batch_size=cam_batch_size, device=device,
            **columns,
        )  # fmt: skip
    transform = CounterfactualTransform(
        image_processor,
        grid=model.patch_grid,
        mask_kind=mask_kind,
        mask_threshold=mask_threshold,
        mask_top_fraction=mask_top_fraction,
        augment=augment,
        num_labels=model.config.num_labels,
        **columns,
    )
    return dataset.with_transform(transform), skipped
