"""The checkpoint's preprocessing as batched torch ops on uint8 images: about 3x the PIL image processor per worker.

    PIL decode -> uint8 [C, h, w] -> antialiased bicubic resize (torch's uint8 kernel) -> centre crop -> stack
        -> one float32 rescale + normalise over the batch

What it computes is the checkpoint processor's resize (shortest edge or fixed size, bicubic), centre crop, rescale
and normalisation, read from the processor itself; only the rounding differs. torch's uint8 antialiased bicubic
resize follows PIL's filter and lands within 1 grey level of PIL's result when it shrinks an image, 2 when it
enlarges one (docs/performance.md compares pixels and accuracy on the embedded world against the processor), and the
rescale and normalisation run in float32 where the processor rescales in float64 (at most 1 float32 ulp apart).
Needs no torchvision. A processor with any other step (padding, a longest edge, another filter) is refused, naming
the setting.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_utils import PILImageResampling

from .images import load_image


class FastImageProcessor:
    """Drop-in for a CLIP/SigLIP-style image processor in hf_cfft's pipeline: ``processor(images=...)``.

    Args:
        image_processor: the checkpoint's own processor; its size, crop, rescale factor, mean and std are used.
    """

    def __init__(self, image_processor: Any):
        config = image_processor.to_dict()
        problems = []
        resample = config.get("resample", PILImageResampling.BICUBIC)
        if config.get("do_resize", True) and int(resample) != int(PILImageResampling.BICUBIC):
            problems.append(f"resample={resample!r} (only bicubic)")
        if config.get("do_pad"):
            problems.append("do_pad=True")
        size = dict(config.get("size") or {})
        if config.get("do_resize", True) and not (set(size) == {"shortest_edge"} or set(size) == {"height", "width"}):
            problems.append(f"size={size!r} (only shortest_edge, or height and width)")
        if problems:
            raise ValueError(
                f"{type(image_processor).__name__} has {', '.join(problems)}, which FastImageProcessor does not "
                "reproduce; use the processor itself (fast_image_processing=False)"
            )
        self.image_processor = image_processor
        self.do_resize = config.get("do_resize", True)
        self.size = size
        self.do_center_crop = bool(config.get("do_center_crop", False))
        crop = config.get("crop_size") or {}
        self.crop = (crop["height"], crop["width"]) if self.do_center_crop else None
        scale = config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else 1.0
        mean = config.get("image_mean") if config.get("do_normalize", True) else [0.0, 0.0, 0.0]
        std = config.get("image_std") if config.get("do_normalize", True) else [1.0, 1.0, 1.0]
        self.scale = torch.tensor(scale, dtype=torch.float32)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.image_mean, self.image_std = list(mean), list(std)

    def to_dict(self) -> dict[str, Any]:
        """The wrapped processor's settings, marked as this path (so caches keyed on them tell the two apart)."""
        return {**self.image_processor.to_dict(), "hf_cfft_fast_image_processor": True}

    def _target_size(self, height: int, width: int) -> tuple[int, int]:
        if not self.do_resize:
            return height, width
        if "shortest_edge" in self.size:  # as transformers' get_resize_output_image_size(default_to_square=False)
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.size["shortest_edge"], int(self.size["shortest_edge"] * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        return self.size["height"], self.size["width"]

    def resized_uint8(self, image: Image.Image) -> torch.Tensor:
        """One RGB PIL image -> resized and centre-cropped uint8 [C, H, W]."""
        with warnings.catch_warnings():  # PIL's array is read-only; nothing below writes to it
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)  # a channels-last view, no copy
        height, width = pixels.shape[-2:]
        target = self._target_size(height, width)
        if target != (height, width):
            pixels = F.interpolate(pixels[None], size=target, mode="bicubic", antialias=True, align_corners=False)[0]
        if self.crop is not None:
            crop_h, crop_w = self.crop
            if crop_h > pixels.shape[-2] or crop_w > pixels.shape[-1]:
                raise ValueError(f"crop {self.crop} is larger than the resized image {tuple(pixels.shape[-2:])}")
            top, left = (pixels.shape[-2] - crop_h) // 2, (pixels.shape[-1] - crop_w) // 2
            pixels = pixels[:, top : top + crop_h, left : left + crop_w]
        return pixels

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float32 [B, C, H, W], rescaled and normalised."""
        # The default layout: stacking permuted (channels-last) views would otherwise carry their strides along.
        pixels = pixels.to(torch.float32, memory_format=torch.contiguous_format)
        return pixels.mul_(self.scale).sub_(self.mean).div_(self.std)

    def __call__(self, images: Sequence[Any], return_tensors: str = "pt", **kwargs) -> dict[str, torch.Tensor]:
        """Images (PIL, or undecoded ``{"path", "bytes"}`` dicts) -> ``{"pixel_values": [B, C, H, W] float32}``."""
        if return_tensors != "pt":
            raise ValueError(f"FastImageProcessor returns torch tensors (return_tensors='pt'), not {return_tensors!r}")
        batch = torch.stack([self.resized_uint8(load_image(image)) for image in images])
        return {"pixel_values": self.normalize(batch)}
