"""Score a classifier on named splits, each with its protocol, through the `evaluate` library: the one scoring path.

splits (datasets, or `EvalSet`s with a protocol: the ImageNet shifts) -> `evaluate_splits`:
    logits (`predict_logits`) -> the split's protocol -> predictions -> top-1 accuracy (%) -> [+ ood_avg]
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence

import evaluate
import numpy as np
import torch
from datasets import Dataset

from .._distributed import sharded_pass
from ..image_checks import undecoded
from ..images import load_image, preprocess_images
from .protocols import EvalSet, dataset_eval_sets
from .report import ACCURACY_DECIMALS, OOD_AVG, ood_average

ACCURACY_METRIC = os.path.join(os.path.dirname(__file__), "metrics", "accuracy.py")


def load_accuracy() -> evaluate.EvaluationModule:
    """The bundled top-1 accuracy metric (a local `evaluate` module: works offline)."""
    return evaluate.load(ACCURACY_METRIC)


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    dataset: Dataset,
    image_processor: Callable,
    *,
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    image_transform: Callable | None = None,
    distributed: bool = False,
    autocast_dtype: torch.dtype | None = None,
    show_progress: bool = False,
    desc: str = "predict",
) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, K] and labels [N] of ``model`` on ``dataset`` (images preprocessed by ``image_processor``).

    ``image_transform``: applied to each PIL image before ``image_processor`` (e.g. ObjectNet's border crop).
    ``distributed``: every process of the initialised ``torch.distributed`` group calls this; each scores its
    contiguous share of the rows and every process gets all N rows back, in order. ``autocast_dtype``: run the
    forward under autocast (e.g. ``torch.bfloat16``, the training precision); logits are returned as float32.
    ``show_progress``: a progress bar on the first process.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # Decoded here (`load_image`: EXIF, 16-bit, RGB) rather than by `datasets`, so a broken file is named.
    dataset = undecoded(dataset, image_column) if isinstance(dataset, Dataset) else dataset

    def collate(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [load_image(row[image_column]) for row in rows]
        if image_transform is not None:
            images = [image_transform(image) for image in images]
        pixels = preprocess_images(image_processor, images)
        return pixels, torch.tensor([int(row[label_column]) for row in rows])

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, batch_labels = batch
        return model(pixel_values=pixels.to(device)).logits.float().cpu(), batch_labels

    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    was_training = model.training
    model.eval()
    width = getattr(getattr(model, "config", None), "num_labels", 0)
    empty = (torch.zeros(0, width), torch.zeros(0, dtype=torch.long))
    with autocast:
        logits, labels = sharded_pass(
            dataset, collate, step, empty, batch_size=batch_size, num_workers=num_workers, distributed=distributed,
            device=device, even_steps=True, desc=desc, show_progress=show_progress,
        )  # fmt: skip
    model.train(was_training)
    return logits.numpy(), labels.numpy()


def top1_accuracy(
    predictions: Sequence[int] | np.ndarray,
    references: Sequence[int] | np.ndarray,
    metric: evaluate.EvaluationModule | None = None,
) -> float:
    """Top-1 accuracy in % of ``predictions`` [N] against ``references`` [N], through the bundled metric."""
    metric = metric if metric is not None else load_accuracy()
    score = metric.compute(predictions=np.asarray(predictions).tolist(), references=np.asarray(references).tolist())
    return round(100.0 * score["accuracy"], ACCURACY_DECIMALS)


def check_eval_labels(eval_set: EvalSet, count: int | None) -> None:
    """Raise, naming the split and the label, when a label of ``eval_set`` is not one of ``count`` classes.

    A label of -1 (the hidden labels of a Hub test split) or one past the head would otherwise count as a wrong
    prediction, and the accuracy would be silently low. Sets without a ``label`` column of their own are let be.
    """
    dataset = eval_set.dataset
    if count is None or not isinstance(dataset, Dataset) or "label" not in dataset.column_names or not len(dataset):
        return
    values = np.asarray(dataset.unique("label"))
    bad = values[(values < 0) | (values >= count)]
    if bad.size:
        hint = (
            "-1 marks an image without a label (e.g. a Hub test split whose labels are hidden): evaluate on a split "
            "with labels"
            if (bad < 0).any()
            else "check that the split's label column matches the class names the head was built from"
        )
        raise ValueError(
            f"split {eval_set.name!r} has label(s) {', '.join(map(str, sorted(bad.tolist())[:5]))} outside the "
            f"model's classes 0..{count - 1}, so its accuracy would be wrong; {hint}"
        )


def evaluate_splits(
    model: torch.nn.Module,
    splits: Mapping[str, Dataset] | Sequence[EvalSet],
    image_processor: Callable,
    *,
    ood_splits: Sequence[str] = (),
    restrict: bool = True,
    image_column: str = "image",
    label_column: str = "label",
    **predict_kwargs,
) -> dict[str, float]:
    """Top-1 accuracy (%) of ``model`` per split, by name, plus ``ood_avg`` over ``ood_splits`` when given.

    ``splits``: named datasets, scored by the model's own argmax, or `EvalSet`s, each with its protocol (e.g.
    `imagenet_eval_sets`); ``restrict`` is passed to the protocols. ``predict_kwargs``: batch_size, device,
    num_workers, distributed (every process calls this and gets the same results; each scores its share of every
    split), autocast_dtype, show_progress (see `predict_logits`).
    """
    if isinstance(splits, Mapping):
        splits = dataset_eval_sets(splits, image_column=image_column, label_column=label_column)
    width = getattr(getattr(model, "config", None), "num_labels", None)
    for eval_set in splits:  # before any forward pass: a wrong head should fail fast, not after the first 50000 images
        eval_set.protocol.check_width(width)
        check_eval_labels(eval_set, eval_set.protocol.label_count(width))
    metric = load_accuracy()
    results = {}
    for eval_set in splits:
        logits, labels = predict_logits(
            model,
            eval_set.dataset,
            image_processor,
            image_transform=eval_set.image_transform,
            desc=f"evaluate {eval_set.name}",
            **predict_kwargs,
        )
        results[eval_set.name] = top1_accuracy(eval_set.protocol.predict(logits, restrict=restrict), labels, metric)
    average = ood_average(results, ood_splits)
    if average is not None:
        results[OOD_AVG] = average
    return results
