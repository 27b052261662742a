"""How well a CAM-derived patch mask covers the object: scores against a ground-truth object mask.

Used to choose the masking rule of a dataset whose object positions are known (the embedded world's
``object_patches``) before any accuracy is looked at: ``benchmarks/world_localization.py``.
"""

from __future__ import annotations

import torch


def mask_scores(predicted: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Scores of predicted object masks against true ones, both [B, h, w] (or [B, N]) bool, True = object patch.

    Counts are pooled over all images before dividing (an image whose mask is empty still counts), so every score is
    defined unless the whole batch has no object (recall) or no masked patch (precision), which give 0:

    - ``recall``: share of the true object patches that are masked;
    - ``precision``: share of the masked patches that are object patches;
    - ``iou``: intersection over union of the two masks;
    - ``masked_fraction``: share of all patches that are masked; ``object_fraction``: share that are object.
    """
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted mask {tuple(predicted.shape)} and true mask {tuple(truth.shape)} differ in shape")
    predicted, truth = predicted.bool(), truth.bool()
    hit = (predicted & truth).sum().item()
    masked, objects = predicted.sum().item(), truth.sum().item()
    union = (predicted | truth).sum().item()
    total = predicted.numel()
    return {
        "recall": hit / objects if objects else 0.0,
        "precision": hit / masked if masked else 0.0,
        "iou": hit / union if union else 0.0,
        "masked_fraction": masked / total if total else 0.0,
        "object_fraction": objects / total if total else 0.0,
    }
