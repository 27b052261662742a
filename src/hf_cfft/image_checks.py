"""Find unreadable images before training starts, instead of crashing on one of them an hour in."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping

from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

logger = logging.getLogger(__name__)

CHECKS = ("none", "verify", "decode")


def _problem(item: dict, decode: bool) -> str | None:
    try:
        with Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as image:
            if decode:
                image.load()
            else:
                image.verify()
    except Exception as error:  # PIL raises many types for broken files; every one means "unreadable"
        return f"{type(error).__name__}: {error}"
    return None


def undecoded(dataset: Dataset, image_column: str) -> Dataset:
    """The dataset with its image column left as ``{"path", "bytes"}`` dicts, decoded later by `load_image`."""
    feature = dataset.features.get(image_column)
    if isinstance(feature, ImageFeature) and feature.decode:
        return dataset.cast_column(image_column, ImageFeature(decode=False))
    return dataset


def find_unreadable_images(
    dataset: Dataset, image_column: str = "image", *, check: str = "verify", num_proc: int | None = None
) -> list[tuple[int, str, str]]:
    """(row index, file name, error) of each image that cannot be read.

    ``check='verify'`` parses each file's structure (fast: the whole of ImageNet in minutes); ``'decode'`` decodes
    every pixel (catches truncated JPEG bodies too, about as slow as one epoch of data loading); ``'none'`` skips.
    """
    if check not in CHECKS:
        raise ValueError(f"image check {check!r} is not one of {CHECKS}")
    if check == "none" or not isinstance(dataset.features.get(image_column), ImageFeature):
        return []
    raw = undecoded(dataset, image_column)

    def scan(batch: dict, indices: list[int]) -> dict:
        found = {"index": [], "name": [], "error": []}
        for index, item in zip(indices, batch[image_column]):
            problem = _problem(item, decode=check == "decode")
            if problem:
                found["index"].append(index)
                found["name"].append(item.get("path") or f"row {index}")
                found["error"].append(problem)
        return found

    found = Features({"index": Value("int64"), "name": Value("string"), "error": Value("string")})
    bad = raw.map(
        scan, batched=True, with_indices=True, remove_columns=raw.column_names, features=found, num_proc=num_proc,
        desc=f"checking images ({check})",
    )  # fmt: skip
    return list(zip(bad["index"], bad["name"], bad["error"]))


def drop_unreadable_images(
    dataset: Dataset,
    image_column: str = "image",
    *,
    skip: bool = False,
    check: str = "verify",
    num_proc=None,
    where: str = "the dataset",
    skip_hint: str | None = "--skip_corrupt_images true to train without them",
) -> tuple[Dataset, int]:
    """Fail on unreadable images with their names (default), or drop them and return how many were dropped.

    ``where`` names the images' set in the message; ``skip_hint`` is the flag that drops them (None: the recipe has
    none, and the message says only to remove or replace them).
    """
    bad = find_unreadable_images(dataset, image_column, check=check, num_proc=num_proc)
    if not bad:
        return dataset, 0
    listing = "; ".join(f"{name} ({error})" for _, name, error in bad[:5]) + (" ..." if len(bad) > 5 else "")
    if not skip:
        fix = f"Remove or replace them, or pass {skip_hint}" if skip_hint else "Remove or replace them"
        raise ValueError(f"{len(bad)} unreadable image(s) in {where}: {listing}. {fix}")
    dropped = {index for index, _, _ in bad}
    logger.warning("Skipping %d unreadable image(s): %s", len(bad), listing)
    return dataset.select([i for i in range(len(dataset)) if i not in dropped]), len(bad)


def check_eval_images(
    splits: Mapping[str, Dataset],
    image_column: str = "image",
    *,
    check: str = "verify",
    skip: bool = False,
    skip_hint: str | None = None,
) -> dict[str, Dataset]:
    """Each eval split with its unreadable images refused by name (before any model is scored or trained), or, with
    ``skip``, left out of its accuracy with a warning. ``skip_hint``: the flag that skips them, for the message."""
    kept = {}
    for name, split in splits.items():
        kept[name], dropped = drop_unreadable_images(
            split, image_column, skip=skip, check=check, where=f"eval split {name!r}", skip_hint=skip_hint
        )
        if dropped:
            logger.warning("Left %d unreadable image(s) of eval split %r out of its accuracy", dropped, name)
    return kept
