"""Trainer callbacks: pictures of the counterfactuals the model being trained would induce, in TensorBoard."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import datasets
import numpy as np
import torch
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from .data import preprocess_images
from .masking import FILL_KINDS
from .visualize import VIS_MASK_KINDS, model_counterfactual_grid

logger = logging.getLogger(__name__)


class CounterfactualImagesCallback(TrainerCallback):
    """Every ``every_n_steps`` steps, log the `hf_cfft.visualize` grid of a fixed batch to TensorBoard.

    The CAMs come from the current model (the student), so the pictures show how its evidence moves during
    fine-tuning; random masks and refill donors are seeded by ``args.seed`` and stay the same from step to step.
    The threshold, ratio and CAM method follow the `CfftConfig` being trained. Nothing happens unless TensorBoard
    is one of the ``report_to`` backends: the image goes to the writer of the trainer's `TensorBoardCallback`, so
    register with `attach` (which keeps a reference to the trainer's callbacks), not ``trainer.add_callback``.

    Args:
        images: [N, C, H, W] pixel values as the trainer's image processor returns them (N >= 2 for refilling).
        labels: [N] class indices.
        every_n_steps: log period in optimisation steps; the start and the last step are logged too.
        image_mean / image_std: the processor's normalisation; default: read from the trainer's processing class.
        tag: TensorBoard image tag.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        every_n_steps: int,
        *,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        mask_kinds: Sequence[str] = VIS_MASK_KINDS,
        fill_kinds: Sequence[str] = FILL_KINDS,
        tag: str = "counterfactuals",
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1")
        self.images = torch.as_tensor(images)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        if self.images.dim() != 4 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"images must be [N, C, H, W] and labels [N]; got {tuple(self.images.shape)} and "
                f"{tuple(self.labels.shape)}"
            )
        self.every_n_steps = every_n_steps
        self.image_mean, self.image_std = image_mean, image_std
        self.mask_kinds, self.fill_kinds = tuple(mask_kinds), tuple(fill_kinds)
        self.tag = tag
        self._callbacks: list[TrainerCallback] | None = None
        self._last_logged_step: int | None = None

    @classmethod
    def from_dataset(
        cls,
        dataset,
        image_processor: Callable,
        *,
        num_images: int = 8,
        every_n_steps: int = 100,
        image_column: str = "image",
        label_column: str = "label",
        **kwargs,
    ) -> CounterfactualImagesCallback:
        """The first ``num_images`` examples of a raw (image, label) `datasets.Dataset`, preprocessed once.

        An image column stored undecoded (``Image(decode=False)``, as recipes/finetune.py keeps its train set) is
        decoded for these few rows.
        """
        rows = dataset.select(range(min(num_images, len(dataset))))
        feature = rows.features.get(image_column)
        if isinstance(feature, datasets.Image) and not feature.decode:
            rows = rows.cast_column(image_column, datasets.Image(decode=True))
        images = preprocess_images(image_processor, rows[image_column])
        kwargs.setdefault("image_mean", image_processor.image_mean)
        kwargs.setdefault("image_std", image_processor.image_std)
        return cls(images, [int(y) for y in rows[label_column]], every_n_steps, **kwargs)

    def attach(self, trainer) -> CounterfactualImagesCallback:
        """Add this callback to ``trainer`` and remember its callback list, where TensorBoard's writer lives."""
        trainer.add_callback(self)
        self._callbacks = trainer.callback_handler.callbacks
        return self

    def _writer(self):
        if self._callbacks is None:
            return None
        for callback in self._callbacks:
            if isinstance(callback, TensorBoardCallback) and getattr(callback, "tb_writer", None) is not None:
                return callback.tb_writer
        return None

    def _log(self, args, state, model, processing_class) -> None:
        if not state.is_world_process_zero or model is None or self._last_logged_step == state.global_step:
            return
        writer = self._writer()
        if writer is None:
            return  # TensorBoard is not reporting (or was not set up on this process)
        mean = self.image_mean if self.image_mean is not None else getattr(processing_class, "image_mean", None)
        std = self.image_std if self.image_std is not None else getattr(processing_class, "image_std", None)
        if mean is None or std is None:
            logger.warning("CounterfactualImagesCallback: no image_mean/image_std given or found; not logging")
            return
        picture = model_counterfactual_grid(
            model,
            self.images,
            self.labels,
            mean,
            std,
            cam_method=getattr(args, "cam_method", "rollout"),
            mask_kinds=self.mask_kinds,
            fill_kinds=self.fill_kinds,
            threshold=getattr(args, "mask_threshold", 0.3),
            ratio=getattr(args, "mask_ratio", 0.5),
            generator=torch.Generator().manual_seed(args.seed),
        )
        writer.add_image(self.tag, np.asarray(picture), state.global_step, dataformats="HWC")
        writer.flush()
        self._last_logged_step = state.global_step

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        # Runs after TensorBoardCallback.on_train_begin (callbacks run in order of registration): the writer exists.
        self._log(args, state, model, processing_class)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.global_step % self.every_n_steps == 0 or state.global_step == state.max_steps:
            self._log(args, state, model, processing_class)
