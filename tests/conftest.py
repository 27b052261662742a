"""Shared fixtures: tiny models and processors built in code (no downloads), with fixed seeds."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig

from hf_cfft.modeling import ClipCfftConfig, ClipCfftForImageClassification

TINY_ID2LABEL = {0: "cat", 1: "dog", 2: "fox"}


def _tiny_config() -> ClipCfftConfig:
    # 32x32 images, 8x8 patches: a 4x4 patch grid, 16 patch tokens + CLS.
    return ClipCfftConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
        num_labels=len(TINY_ID2LABEL),
        id2label=dict(TINY_ID2LABEL),
        label2id={name: i for i, name in TINY_ID2LABEL.items()},
    )


@pytest.fixture
def tiny_config() -> ClipCfftConfig:
    """A fresh `ClipCfftConfig` for a 2-layer, 32-wide CLIP ViT on 32x32 images with 3 classes."""
    return _tiny_config()


@pytest.fixture
def tiny_classifier() -> ClipCfftForImageClassification:
    """A fresh, randomly initialised (seed 0) `ClipCfftForImageClassification` in eval mode."""
    torch.manual_seed(0)
    return ClipCfftForImageClassification(_tiny_config()).eval()


@pytest.fixture
def tiny_image_processor() -> CLIPImageProcessor:
    """CLIP preprocessing (resize shortest edge + centre crop + normalise) to 32x32."""
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
