"""Images in, pixel values out: decoding (naming a broken file), the checkpoint's preprocessing, label checks.

`load_image` is the one decode path of training, evaluation, the CAM pass and the pictures: an image is turned
upright by its EXIF orientation tag (as ``datasets`` and the transformers pipeline do when they decode one) and
converted to 8-bit RGB, a 16-bit image scaled to 0..255 rather than clipped (PIL's own ``convert("RGB")`` turns every
value above 255 into 255).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

_ORIENTATION = 0x0112  # the EXIF tag
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


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
                f"cannot read image {name}: {error}. Remove or replace the file (in fine-tuning, "
                "--skip_corrupt_images true with --image_check decode finds and drops such images before training "
                "and evaluation)"
            ) from error
    else:
        image = item
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` upright (its EXIF orientation applied) as 8-bit RGB; 16-bit grey levels are scaled, not clipped.

    CLIP expects 3 channels; grayscale, palette, CMYK, RGBA and 16-bit images are common in user folders. A 32-bit
    integer image ("I") whose values exceed 255 is read as 16-bit (values above 65535 clip).
    """
    if image.getexif().get(_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        if image.mode in _SIXTEEN_BIT or values.max(initial=0) > 255:
            values = values.clip(0, 65535) / 257.0
        image = Image.fromarray(values.clip(0, 255).round().astype(np.uint8))
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
