"""Accuracy of a classifier on several splits (in-distribution and shifted), through the `evaluate` library."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import evaluate
import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from .data import preprocess_images

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
) -> tuple[np.ndarray, np.ndarray]:
    """Logits [N, K] and labels [N] of ``model`` on ``dataset`` (images preprocessed by ``image_processor``).

    ``image_transform``: applied to each PIL image before ``image_processor`` (e.g. ObjectNet's border crop).
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
    for pixels, batch_labels in loader:
        logits.append(model(pixel_values=pixels.to(device)).logits.float().cpu())
        labels.append(batch_labels)
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
    splits: Mapping[str, Dataset],
    image_processor: Callable,
    *,
    ood_splits: Sequence[str] = (),
    **predict_kwargs,
) -> dict[str, float]:
    """Top-1 accuracy (in %) per split, plus ``ood_avg`` over ``ood_splits`` when given."""
    metric = load_accuracy()
    results = {}
    for name, dataset in splits.items():
        logits, labels = predict_logits(model, dataset, image_processor, **predict_kwargs)
        results[name] = top1_accuracy(logits.argmax(axis=1), labels, metric)
    present = [name for name in ood_splits if name in results]
    if present:
        results["ood_avg"] = sum(results[name] for name in present) / len(present)
    return results


def results_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str]) -> str:
    """A markdown table: one row per run (e.g. zero-shot, fine-tuned), one column per split, accuracies in %."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, values in rows.items():
        cells = [f"{values[c]:.1f}" if c in values else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
