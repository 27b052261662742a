"""Images in, pixel values out: decoding (naming a broken file), the checkpoint's preprocessing, label checks."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image


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


def check_labels(labels: Sequence[int], num_labels: int | None) -> None:
    """Raise, naming the label, if one lies outside the model's ``num_labels`` classes (None: no check)."""
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
