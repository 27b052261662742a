"""Score a classifier on named splits, each with its protocol, through the `evaluate` library: the one scoring path.

splits (datasets, or `EvalSet`s with a protocol: the ImageNet shifts) -> `evaluate_splits`:
    logits (`predict_logits`) -> the split's protocol -> predictions -> top-1 accuracy (%) -> [+ ood_avg]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import evaluate
import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import preprocess_images
from .protocols import EvalSet, dataset_eval_sets

ACCURACY_METRIC = os.path.join(os.path.dirname(__file__), "metrics", "accuracy.py")
OOD_AVG = "ood_avg"


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
    description: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, K] and labels [N] of ``model`` on ``dataset`` (images preprocessed by ``image_processor``).

    ``image_transform``: applied to each PIL image before ``image_processor`` (e.g. ObjectNet's border crop).
    ``description``: the progress bar's label (tqdm; silenced like transformers' bars, e.g. ``TQDM_DISABLE=1``).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device

    def collate(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [row[image_column] for row in rows]
        if image_transform is not None:
            images = [image_transform(image) for image in images]
        pixels = preprocess_images(image_processor, images)
        return pixels, torch.tensor([int(row[label_column]) for row in rows])

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    total = len(dataset) if hasattr(dataset, "__len__") else None
    bar = tqdm(total=total, desc=description or "evaluating", unit="image", leave=False)
    for pixels, batch_labels in loader:
        bar.update(len(batch_labels))
        logits.append(model(pixel_values=pixels.to(device)).logits.float().cpu())
        labels.append(batch_labels)
    bar.close()
    model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def top1_accuracy(
    predictions: Sequence[int] | np.ndarray,
    references: Sequence[int] | np.ndarray,
    metric: evaluate.EvaluationModule | None = None,
) -> float:
    """Top-1 accuracy in % of ``predictions`` [N] against ``references`` [N], through the bundled metric."""
    metric = metric if metric is not None else load_accuracy()
    score = metric.compute(predictions=np.asarray(predictions).tolist(), references=np.asarray(references).tolist())
    return 100.0 * score["accuracy"]


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
    num_workers.
    """
    if isinstance(splits, Mapping):
        splits = dataset_eval_sets(splits, image_column=image_column, label_column=label_column)
    width = getattr(getattr(model, "config", None), "num_labels", None)
    for eval_set in splits:  # before any forward pass: a wrong head should fail fast, not after the first 50000 images
        eval_set.protocol.check_width(width)
    metric = load_accuracy()
    results = {}
    for eval_set in splits:
        logits, labels = predict_logits(
            model,
            eval_set.dataset,
            image_processor,
            image_transform=eval_set.image_transform,
            description=f"evaluating {eval_set.name}",
            **predict_kwargs,
        )
        results[eval_set.name] = top1_accuracy(eval_set.protocol.predict(logits, restrict=restrict), labels, metric)
    present = [name for name in ood_splits if name in results]
    if present:
        results[OOD_AVG] = sum(results[name] for name in present) / len(present)
    return results
