"""`CfftTrainer`: a `transformers.Trainer` whose loss adds distillation on counterfactual images.

    L = CE(g(f(x)), y) + beta * MSE(f_hat(x_cf), f(x_cf))

f is the model being fine-tuned, f_hat a frozen copy of the pre-trained model (the teacher). The teacher lives
outside ``self.model``: accelerate places it on the device (and under mixed precision) but it is never optimised,
never wrapped for DDP and never written into a checkpoint. Everything that is not the objective (the run folder,
data preparation, step seeding, the optimisation switches, logging, release) is `hf_cfft.training.RobustTrainer`'s.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from transformers.utils import logging

from . import adapters
from ._forward import call_as_forward
from .cam import CamRecorder, compute_cam
from .classifier_loading import load_classifier
from .config import CfftConfig
from .data import CounterfactualCollator, prepare_train_dataset
from .losses import counterfactual_loss
from .masking import cam_patch_mask, make_counterfactuals
from .methods import VIEWS as DISTILL_VIEWS
from .methods import method_of
from .modeling import ClipCfftForImageClassification
from .training.base import LostProcessError, RobustTrainer
from .training.run_manifest import weights_fingerprint

logger = logging.get_logger(__name__)

# The batch keys the collator's masks and refill donors travel under, replaced by the counterfactual images.
_COLLATED_COUNTERFACTUAL_KEYS = ("cf_mask", "cf_donors", "cf_pixel_values", "cf_patch_keep", "cf_skipped")


def distill_view(args: CfftConfig) -> str:
    """What the distillation term sees, fixed from the config (the method's `hf_cfft.methods.Method.view`).

    'counterfactual' (CFFT and its masks), 'clean' (FT+FD, FT+KD: mask_kind='none') or 'none' (vanilla FT, LP, FLYP).
    """
    return method_of(args).view


class CfftTrainer(RobustTrainer):
    """Counterfactual fine-tuning (Xiao et al., CVPR 2023) on top of `transformers.Trainer`.

    Args:
        model: the `ClipCfftForImageClassification` to fine-tune (its head usually the zero-shot classifier).
        args: a `CfftConfig`.
        teacher: the frozen pre-trained model f_hat. Defaults to a copy of ``model`` taken before training, which
            is the paper's choice; pass e.g. a WiSE-FT model to distil from something else.
        train_dataset: a raw image dataset (``image_column`` + ``label_column``), which the trainer prepares (see
            `_prepare_dataset`); a dataset that already yields ``pixel_values`` (a transform set, a list of dicts, a
            torch dataset) is used as given.
        processing_class: the checkpoint's image processor; needed to prepare a raw train dataset.
        data_collator: defaults to a `CounterfactualCollator` configured from ``args``.
        image_column / label_column: the raw train dataset's columns.
        Other keyword arguments go to `transformers.Trainer`.
    """

    shows_counterfactual_images = True

    def __init__(
        self,
        model: ClipCfftForImageClassification,
        args: CfftConfig,
        teacher: ClipCfftForImageClassification | None = None,
        data_collator=None,
        train_dataset=None,
        processing_class=None,
        *,
        image_column: str = "image",
        label_column: str = "label",
        **kwargs,
    ):
        if not isinstance(args, CfftConfig):
            raise TypeError(f"args must be a CfftConfig, got {type(args).__name__}")
        if args.linear_probe:
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(name.startswith("classifier."))
        if args.lora_rank > 0:  # the adapter in the tower, the head in full; the teacher: adapters off
            model = adapters.add_lora(
                model, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                target_modules=args.lora_target_modules,
            )  # fmt: skip
            if teacher is None and args.distill_weight > 0:
                teacher = adapters.AdapterFreeTeacher(model)
            if args.gradient_checkpointing and not args.gradient_checkpointing_kwargs:
                # Re-entrant checkpointing drops the gradients of a layer whose inputs do not require grad, which
                # is every adapter layer of a frozen tower; the non-re-entrant kind does not. (transformers 5 reads
                # the new name, activation_checkpointing_kwargs; both are set.)
                args.gradient_checkpointing_kwargs = {"use_reentrant": False}
                if hasattr(args, "activation_checkpointing_kwargs"):
                    args.activation_checkpointing_kwargs = {"use_reentrant": False}
        if teacher is None and args.distill_weight > 0:
            teacher = copy.deepcopy(model)
            if args.teacher_dtype != "float32":  # a lighter frozen copy for big towers
                teacher = teacher.to(getattr(torch, args.teacher_dtype))
        self.distill_view = distill_view(args)
        # The student's own CAM picks the masks: counterfactuals are made inside its forward, not by the collator.
        self.student_cams = self.distill_view == "counterfactual" and args.needs_student_cams
        if data_collator is None:
            data_collator = CounterfactualCollator(
                mask_kind=args.mask_kind if args.uses_counterfactuals else "none",
                fill_kind=args.fill_kind,
                mask_ratio=args.mask_ratio,
                patch_size=model.config.vision_config.patch_size,
                seed=args.seed,
                refill_on_device=True,
            )
        self._teacher_to_place = teacher
        self._skipped_counterfactual_batches = 0
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            processing_class=processing_class,
            image_column=image_column,
            label_column=label_column,
            **kwargs,
        )

    @classmethod
    def _load_models(cls, model_name_or_path, *, class_names, templates, teacher_name_or_path, show_progress):
        """The classifier to fine-tune (CLIP's zero-shot classifier, or a saved one) and the teacher, if named."""
        model = load_classifier(
            model_name_or_path, class_names=class_names, templates=templates, show_progress=show_progress
        )
        teacher = None
        if teacher_name_or_path:  # a saved classifier (e.g. WiSE-FT's), or a pre-trained one: its zero-shot head
            teacher = load_classifier(
                teacher_name_or_path, class_names=class_names, templates=templates, show_progress=show_progress
            )
        return {"model": model, "teacher": teacher}

    def _start_fingerprints(self) -> dict[str, str]:
        """The student's start and the teacher's (adapters off, a copy of the start, or a named teacher)."""
        fingerprints = super()._start_fingerprints()
        if isinstance(self.teacher, adapters.AdapterFreeTeacher):
            fingerprints["teacher"] = "the student with its adapters off"
        elif self.teacher is not None:
            fingerprints["teacher"] = weights_fingerprint(self.teacher)
        return fingerprints

    def _place_frozen_models(self) -> None:
        """The teacher on the run's device (under its mixed precision), never optimised, wrapped or saved."""
        teacher, self._teacher_to_place = self._teacher_to_place, None
        self.teacher = None
        if isinstance(teacher, adapters.AdapterFreeTeacher):
            self.teacher = teacher  # the student's own weights: placed and wrapped with the student
        elif teacher is not None:
            teacher.requires_grad_(False).eval()
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)

    # ---- the data pipeline: teacher CAMs when the config needs them ----

    def _prepare_raw_dataset(self, dataset, processor):
        """`hf_cfft.data.prepare_train_dataset`: image checks, the teacher's CAMs (each process its shard), the
        transform with the configured masks."""
        args = self.args
        with adapters.teacher_context(self.teacher):
            return prepare_train_dataset(
                dataset,
                processor,
                grid=self._patch_grid(),
                num_labels=self._num_labels(),
                cam_teacher=self.accelerator.unwrap_model(self.teacher) if args.needs_teacher_cams else None,
                mask_kind=args.mask_kind if args.uses_counterfactuals else "none",
                mask_threshold=args.mask_threshold,
                mask_top_fraction=args.mask_top_fraction,
                augment=args.augment,
                cam_method=args.cam_method,
                cam_batch_size=args.cam_batch_size,
                cam_num_workers=args.dataloader_num_workers,
                cam_dtype=getattr(torch, args.cam_dtype),
                image_check=args.image_check,
                skip_corrupt_images=args.skip_corrupt_images,
                image_column=self.image_column,
                label_column=self.label_column,
                device=args.device,
            )

    def _check_streaming(self) -> None:
        if self.args.needs_teacher_cams:
            raise ValueError(
                "cam_source='teacher' pre-computes the teacher's CAMs over the whole train set, which a streamed "
                "(IterableDataset) train set cannot give; use cam_source='teacher_online' (the teacher's CAM per "
                "batch, on the device) or cam_source='student', or load the dataset without streaming=True"
            )

    # ---- the step: the counterfactual batch first, then one student pass, one teacher pass, one loss ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        """`Trainer.training_step`, with the batch's counterfactual images built first (`counterfactual_inputs`).

        As TRL's GKD trainer rewrites its batch before the loss, the counterfactuals of the collator's masks, of the
        online teacher's CAMs or of random masks are made here, on the training device; only the student's own CAM
        makes them inside its (wrapped) forward.
        """
        self._count_micro_step()
        if self.distill_view == "counterfactual" and not self.student_cams:
            inputs = self.counterfactual_inputs(self._prepare_inputs(inputs))
        return super().training_step(model, inputs, num_items_in_batch)

    def counterfactual_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with its counterfactual images in place of the collator's masks and refill donors.

        Returns the batch with ``cf_pixel_values`` [B, C, H, W] (and ``cf_patch_keep`` [B, h * w] when patches are
        dropped rather than refilled), or with ``cf_skipped=True`` for a batch of one image that has no partner to
        refill from (`counterfactual_batch`). With ``cam_source='teacher_online'`` the frozen teacher's CAM of the
        batch cuts the masks.
        """
        cam = None
        if self.args.needs_online_teacher_cams:  # the frozen teacher's CAM of this batch, on the device
            teacher = self.accelerator.unwrap_model(self.teacher)
            with adapters.teacher_context(teacher):
                cam = compute_cam(teacher, inputs["pixel_values"], inputs["labels"], self.args.cam_method)
        made = self.counterfactual_batch(inputs, cam=cam)
        batch = {key: value for key, value in inputs.items() if key not in _COLLATED_COUNTERFACTUAL_KEYS}
        if made is None:
            return batch | {"cf_skipped": True}
        cf_pixel_values, cf_patch_keep = made
        batch["cf_pixel_values"] = cf_pixel_values
        if cf_patch_keep is not None:
            batch["cf_patch_keep"] = cf_patch_keep
        return batch

    def _student_cam_from_training_forward(self, unwrapped) -> bool:
        """Whether the student's CAM can be read off its training forward (`CamRecorder`) instead of an extra pass.

        Only when that forward computes what `compute_cam`'s eval-mode pass does: no attention dropout, and no
        gradient checkpointing or compilation, under which the recording hooks would not see the live graph.
        """
        args = self.args
        dropout = getattr(unwrapped.config.vision_config, "attention_dropout", 0.0)
        return not (dropout or args.gradient_checkpointing or args.torch_compile)

    def counterfactual_batch(
        self, inputs: dict[str, torch.Tensor], cam: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The batch's counterfactual images ``(cf_pixel_values [B, C, H, W], cf_patch_keep [B, h * w] or None)``.

        They are refilled here, on the training device, from the collator's masks (cut from cached teacher CAMs, or
        random) and refill donors (or taken as they are when a collator built them: ``cf_pixel_values``). Given a
        ``cam`` [B, h, w] (the student's, or the online teacher's), they are cut and refilled here, seeded by
        (seed, step, process, micro-step) so that a resumed run draws the same refills. Returns None, counted in
        ``train/skipped_counterfactual_batches``, only for a batch of one image that has no partner to refill from;
        any other batch without counterfactuals raises.
        """
        args, pixel_values = self.args, inputs["pixel_values"]
        if cam is None and "cf_pixel_values" in inputs:
            return inputs["cf_pixel_values"], inputs.get("cf_patch_keep")
        if cam is None and "cf_mask" in inputs:  # the collator's masks and donors: the patches move on this device
            patch_size = self.accelerator.unwrap_model(self.model).config.vision_config.patch_size
            mask, donors = inputs["cf_mask"], inputs.get("cf_donors")
            return make_counterfactuals(pixel_values, mask, args.fill_kind, patch_size, donors=donors)
        if args.fill_kind != "none" and pixel_values.shape[0] < 2:
            self._skipped_counterfactual_batches += 1
            if self._skipped_counterfactual_batches == 1:
                logger.warning(
                    "A batch of one image has no partner to refill its %s-fill counterfactual from: it is trained "
                    "without the distillation term, and counted in skipped_counterfactual_batches. Keep "
                    "dataloader_drop_last=True to avoid such batches",
                    args.fill_kind,
                )
            return None
        if cam is None:
            source = (
                "the transform found no 'cam' column: pass the raw dataset (the trainer computes the teacher CAMs) or "
                "run hf_cfft.precompute_cams on it first"
                if args.needs_teacher_cams
                else "use hf_cfft's CounterfactualCollator (the trainer's default data_collator)"
            )
            raise ValueError(
                f"mask_kind={args.mask_kind!r} with cam_source={args.cam_source!r} distils on counterfactual images, "
                f"but the batch has none (keys: {sorted(inputs)}): {source}. Training on without them would be "
                "vanilla fine-tuning"
            )
        patch_size = self.accelerator.unwrap_model(self.model).config.vision_config.patch_size
        mask = cam_patch_mask(cam, args.mask_kind, args.mask_threshold, args.mask_top_fraction).cpu()
        generator = self.step_generator()
        return make_counterfactuals(pixel_values, mask.to(pixel_values.device), args.fill_kind, patch_size, generator)

    def _distilled_images(self, inputs: dict[str, torch.Tensor], view: str):
        """The images the distillation term sees, as (pixels, keep), read off the batch; None distils nothing.

        FT+FD/FT+KD distil on the clean images, CFFT on the batch's counterfactuals (`counterfactual_inputs`).
        """
        if view == "clean":
            return inputs["pixel_values"], None
        if view != "counterfactual" or inputs.get("cf_skipped"):
            return None
        if "cf_pixel_values" not in inputs:
            # A direct call with the collator's batch: build what training_step builds.
            return self._distilled_images(self.counterfactual_inputs(inputs), view)
        return inputs["cf_pixel_values"], inputs.get("cf_patch_keep")

    def _student_pass_with_own_cam(self, model, inputs: dict[str, torch.Tensor]):
        """The student's CAM -> counterfactuals -> their embeddings, in one call of the wrapped model's forward.

        When possible the CAM is read off the training forward on the clean images (`CamRecorder`), which saves the
        separate eager forward `compute_cam` needs (docs/performance.md). Returns (outputs, counterfactuals or None).
        """
        unwrapped = self.accelerator.unwrap_model(model)
        own_cam_pass = functools.partial(self._own_cam_forward, unwrapped)
        return call_as_forward(model, unwrapped, own_cam_pass, inputs["pixel_values"], inputs["labels"])

    def _own_cam_forward(self, unwrapped, pixel_values: torch.Tensor, labels: torch.Tensor):
        inputs = {"pixel_values": pixel_values, "labels": labels}
        if self._student_cam_from_training_forward(unwrapped):
            with CamRecorder(unwrapped, self.args.cam_method) as recorder:
                outputs = unwrapped(pixel_values=pixel_values)
            counterfactuals = self.counterfactual_batch(inputs, cam=recorder.cam(outputs.logits, labels))
            if counterfactuals is not None:
                # The counterfactual pass only embeds, under the training forward's autocast.
                with self.accelerator.autocast():
                    outputs.cf_image_embeds = unwrapped.get_image_features(*counterfactuals)
                    outputs.cf_logits = unwrapped.logits_from_features(outputs.cf_image_embeds)
            return outputs, counterfactuals
        cam = compute_cam(unwrapped, pixel_values, labels, self.args.cam_method)
        counterfactuals = self.counterfactual_batch(inputs, cam=cam)
        cf_inputs = {} if counterfactuals is None else dict(zip(("cf_pixel_values", "cf_patch_keep"), counterfactuals))
        return unwrapped(pixel_values=pixel_values, **cf_inputs), counterfactuals

    def _student_pass(self, model, pixel_values: torch.Tensor, view: str, distilled):
        """One forward of the (wrapped) student; ``outputs.cf_image_embeds`` / ``cf_logits`` are its embeddings /
        logits of the distilled images (the clean pass itself for FT+FD / FT+KD: no second forward)."""
        if view == "counterfactual" and distilled is not None:
            cf_pixel_values, cf_keep = distilled
            return model(pixel_values=pixel_values, cf_pixel_values=cf_pixel_values, cf_patch_keep=cf_keep)
        outputs = model(pixel_values=pixel_values)
        if view == "clean":
            outputs.cf_image_embeds, outputs.cf_logits = outputs.image_embeds, outputs.logits
        return outputs

    def _teacher_pass(self, pixel_values: torch.Tensor, patch_keep: torch.Tensor | None) -> torch.Tensor:
        """f_hat(x): the frozen teacher's embeddings [B, D] (or logits [B, K] when distilling logits)."""
        # accelerate's autocast wraps only ``forward``; get_image_features needs it explicitly, or a bf16 run would
        # run its teacher in fp32. Inference mode: a frozen model needs no autograd bookkeeping at all.
        dtype = getattr(torch, self.args.teacher_dtype)
        if dtype != torch.float32:  # a teacher kept in bf16/fp16 reads its inputs in that precision
            pixel_values = pixel_values.to(dtype)
        with self.accelerator.autocast(), torch.inference_mode(), adapters.teacher_context(self.teacher):
            out = self.teacher.get_image_features(pixel_values, patch_keep)
            if self.args.distill_target == "logits":
                out = self.teacher.logits_from_features(out)
        if dtype != torch.float32:  # the target in float32, as the student's features outside autocast
            return out.float()
        return out.clone()  # an inference tensor cannot be saved for the loss's backward

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """CE on clean images + beta * distillation on the distilled view; logs both parts separately.

        One student forward, one teacher pass, one loss call. The teacher runs first when its images are known
        (its short-lived activations then reuse memory the student's pass needs next, docs/performance.md); the
        student's own CAM makes them inside its forward, so the teacher follows it. ``num_items_in_batch`` is
        accepted for the Trainer's signature; both terms are per-batch means.
        """
        args, training = self.args, model.training
        view = self.distill_view if training else "none"
        if view == "counterfactual" and self.student_cams:
            outputs, distilled = self._student_pass_with_own_cam(model, inputs)
            teacher_out = self._teacher_pass(*distilled) if distilled is not None else None
        else:
            distilled = self._distilled_images(inputs, view)
            teacher_out = self._teacher_pass(*distilled) if distilled is not None else None
            outputs = self._student_pass(model, inputs["pixel_values"], view, distilled)
        student_out = None
        if distilled is not None:
            student_out = outputs.cf_logits if args.distill_target == "logits" else outputs.cf_image_embeds
        parts = counterfactual_loss(
            outputs.logits, inputs["labels"], student_out, teacher_out, distill_weight=args.distill_weight,
            distill_target=args.distill_target, temperature=args.kd_temperature,
            label_smoothing=args.label_smoothing_factor,
        )  # fmt: skip
        if training and not torch.isfinite(parts["loss"]):
            self._stop_on_non_finite_loss(
                f"task loss {parts['task_loss'].item()}, distillation loss {parts['distill_loss'].item()}",
                "lower --learning_rate or --distill_weight, or use bf16 instead of fp16",
            )
        self._record(training, "task_loss", parts["task_loss"])
        if distilled is not None:
            self._record(training, "distill_loss", parts["distill_loss"])
        return (parts["loss"], outputs) if return_outputs else parts["loss"]

    # ---- release: an adapter run's folder holds the adapter and the merged classifier ----

    def _save_weights(self, folder: str, output_dir: str | None, _internal_call: bool) -> None:
        """The Trainer's save; for an adapter run's own folder (not a checkpoint, which keeps the adapter alone for
        resuming), the adapter in ``adapter/`` and the merged classifier beside it (``merge_adapter``)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        own_folder = Path(folder).resolve() == Path(self.args.output_dir).resolve()
        if not (adapters.is_adapter_model(unwrapped) and own_folder):
            return super()._save_weights(folder, output_dir, _internal_call)
        if self.args.should_save:
            Path(folder).mkdir(parents=True, exist_ok=True)
            adapters.save_adapter_and_merged(
                unwrapped, folder, merge=self.args.merge_adapter, base_model=self.base_model, safe_serialization=True
            )
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)
        return None

    def _extra_train_logs(self) -> dict[str, float]:
        # Reported as train/skipped_counterfactual_batches by the logging integrations: a running total.
        if self._skipped_counterfactual_batches:
            return {"skipped_counterfactual_batches": self._skipped_counterfactual_batches}
        return {}


__all__ = ["DISTILL_VIEWS", "CfftTrainer", "LostProcessError", "distill_view"]
