"""A streamed train set (`datasets.IterableDataset`, e.g. ``load_dataset(..., streaming=True)``) for `CfftTrainer`.

    IterableDataset (image, label) --map(CounterfactualTransform, batched)--> pixel_values, labels
        --CounterfactualCollator--> random masks and donors; CAM masks come from a model inside the step

A stream has no random access and no length, so teacher CAMs cannot be pre-computed and cached: object and context
masks come from ``cam_source='student'`` (the reference's online CAM) or ``cam_source='teacher_online'`` (the frozen
teacher's CAM, computed per batch on the training device: the masks of the cached teacher CAMs, at the price of the
CAM pass every step). Images are decoded and checked as they stream: a broken file fails with its name.
"""

from __future__ import annotations

from collections.abc import Callable

from datasets import IterableDataset

from .data import CounterfactualTransform


def prepare_streaming_train_dataset(
    dataset: IterableDataset,
    image_processor: Callable,
    *,
    grid: tuple[int, int],
    num_labels: int,
    augment: str = "none",
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 64,
) -> IterableDataset:
    """A raw streamed (image, label) dataset -> a stream of ``pixel_values`` [C, H, W] and ``labels`` examples.

    Preprocessing runs lazily, ``batch_size`` examples at a time, in the DataLoader's workers
    (`CounterfactualTransform` for the image tower's patch ``grid`` (h, w) and ``num_labels`` classes). The raw columns
    are dropped when the stream knows its features.
    """
    transform = CounterfactualTransform(
        image_processor,
        grid=grid,
        augment=augment,
        num_labels=num_labels,
        image_column=image_column,
        label_column=label_column,
    )
    columns = list(dataset.features) if dataset.features is not None else None
    return dataset.map(transform, batched=True, batch_size=batch_size, remove_columns=columns)
