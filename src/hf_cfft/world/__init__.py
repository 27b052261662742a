"""The embedded world (docs/world.md, docs/adaptation_world.md): the one place the rest of `hf_cfft` reaches it by.

A small seeded image world in which the context (a background) may correlate with the class (a digit), so that
fine-tuning can take the shortcut and lose robustness. Its three parts:

- `hf_cfft.world.render`: the images, their splits and ground-truth object patches (numpy; datasets and PIL for the
  ``datasets.Dataset`` forms);
- `hf_cfft.world.pretrain`: the contrastive pre-training of the tiny CLIP that ships in ``resources/world_clip``;
- `hf_cfft.world.localization`: how well a CAM mask covers the true object patches (the masking rule's criterion).

The rest of the package imports from ``hf_cfft.world`` only: `world_splits` is what the recipes' ``--dataset_name
world`` loads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .localization import mask_scores
from .pretrain import FAMILY_PROBS, evaluate_world_zeroshot, images_to_pixel_values, pretrain_world_clip
from .render import (
    CONTEXT_NAMES,
    DEFAULT_SIZES,
    ID_CONTEXTS,
    NOVEL_CONTEXTS,
    NUM_ID_CONTEXTS,
    OBJECT_CONTRAST,
    OOD_SPLITS,
    SPLITS,
    STYLE_NAMES,
    TRAIN_CONTEXT_CORRELATION,
    WORLD_CLASS_NAMES,
    WORLD_PATCH_SIZE,
    WORLD_TEMPLATES,
    WorldArrays,
    caption_for,
    make_world,
    make_world_split,
    object_patch_mask,
    plot_world_examples,
    render_world,
    stream_world,
    world_clip_path,
)

if TYPE_CHECKING:
    import datasets


def world_splits(
    splits: Sequence[str],
    *,
    seed: int = 0,
    train_correlation: float | None = None,
    object_contrast: float | None = None,
    eval_size: int | None = None,
) -> dict[str, datasets.Dataset]:
    """The world's ``splits`` as ``datasets.Dataset`` s, as ``--dataset_name world`` and the ``--world_*`` flags ask.

    ``train_correlation``: the ``train`` split only, the share of images on their class's own context (default
    0.9; 0.1 = context independent of the class, the oracle of docs/world.md). ``object_contrast``: every split but
    ``pretrain``, how faint the object is (default 1; the adaptation world's value in docs/adaptation_world.md).
    ``eval_size``: images in each split other than ``train`` and ``pretrain`` (default 1,000; the first n of a larger
    split are the n of the smaller one). ``None`` keeps a default.
    """
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"the world has no split(s) {unknown}; its splits are {', '.join(SPLITS)}")
    if eval_size is not None and eval_size < 1:
        raise ValueError(f"--world_eval_size {eval_size} must be >= 1 (images per evaluation split)")
    look = {} if object_contrast is None else {"object_contrast": object_contrast}

    def options(split: str) -> dict:
        if split == "train":
            return {} if train_correlation is None else {"correlation": train_correlation}
        return {"size": eval_size} if eval_size and split != "pretrain" else {}

    return {split: make_world_split(split, seed=seed, **look, **options(split)) for split in splits}


__all__ = [
    "CONTEXT_NAMES",
    "DEFAULT_SIZES",
    "FAMILY_PROBS",
    "ID_CONTEXTS",
    "NOVEL_CONTEXTS",
    "NUM_ID_CONTEXTS",
    "OBJECT_CONTRAST",
    "OOD_SPLITS",
    "SPLITS",
    "STYLE_NAMES",
    "TRAIN_CONTEXT_CORRELATION",
    "WORLD_CLASS_NAMES",
    "WORLD_PATCH_SIZE",
    "WORLD_TEMPLATES",
    "WorldArrays",
    "caption_for",
    "evaluate_world_zeroshot",
    "images_to_pixel_values",
    "make_world",
    "make_world_split",
    "mask_scores",
    "object_patch_mask",
    "plot_world_examples",
    "pretrain_world_clip",
    "render_world",
    "stream_world",
    "world_clip_path",
    "world_splits",
]
