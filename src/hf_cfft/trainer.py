"""`CfftTrainer`: a `transformers.Trainer` whose loss adds distillation on counterfactual images.

    L = CE(g(f(x)), y) + beta * MSE(f_hat(x_cf), f(x_cf))

f is the model being fine-tuned, f_hat a frozen copy of the pre-trained model (the teacher). The teacher lives
outside ``self.model``: accelerate places it on the device (and under mixed precision) but it is never optimised,
never wrapped for DDP and never written into a checkpoint.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import datasets
import torch
from torch.optim.lr_scheduler import OneCycleLR
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import HubStrategy
from transformers.utils import PushInProgress, hf_api, logging

from . import adapters
from ._forward import call_as_forward
from .cam import CamRecorder, compute_cam
from .config import CfftConfig
from .data import CounterfactualCollator, prepare_train_dataset
from .fast_images import FastImageProcessor
from .losses import counterfactual_loss
from .masking import cam_patch_mask, make_counterfactuals
from .modeling import ClipCfftForImageClassification
from .output_folder import OutputFolder
from .release.checkpoints import (
    check_output_dir,
    check_run_folder,
    latest_complete_checkpoint,
    resolve_resume_checkpoint,
)
from .release.hub import EXCLUDED_FILES, files_to_upload
from .release.model_card import TRAINING_ARGS_JSON, write_model_card
from .streaming import prepare_streaming_train_dataset

logger = logging.get_logger(__name__)

# What the distillation term sees, fixed from the config when the trainer is built.
DISTILL_VIEWS = ("counterfactual", "clean", "none")


def distill_view(args: CfftConfig) -> str:
    """'counterfactual' (CFFT, random-mask), 'clean' (FT+FD, FT+KD: mask_kind='none') or 'none' (vanilla FT)."""
    if args.distill_weight == 0:
        return "none"
    return "counterfactual" if args.uses_counterfactuals else "clean"


class CfftTrainer(Trainer):
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

    _tag_names = ["hf_cfft", "clip", "robust-fine-tuning"]  # + the method's own tag (model_card.method_info)
    # compute_loss returns per-micro-batch means (equal-sized batches: dataloader_drop_last), so the Trainer divides
    # by the accumulation steps itself.
    loss_is_scaled_for_ga = False

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
                # is every adapter layer of a frozen tower; the non-re-entrant kind does not.
                args.gradient_checkpointing_kwargs = {"use_reentrant": False}
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
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.teacher = None
        if isinstance(teacher, adapters.AdapterFreeTeacher):
            self.teacher = teacher  # the student's own weights: placed and wrapped with the student
        elif teacher is not None:
            teacher.requires_grad_(False).eval()
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self.image_column, self.label_column = image_column, label_column
        self.skipped_images = 0
        if train_dataset is not None:
            self.train_dataset = self._prepare_dataset(train_dataset)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._skipped_counterfactual_batches = 0
        # What the model card reports beyond the args; recipes set them (eval_results before the final save).
        self.base_model: str | None = None
        self.dataset_name: str | None = None
        self.eval_results: dict[str, dict[str, float]] | None = None
        self.ood_splits: list[str] | None = None
        # {"kind": "trained", "from_classifier": True} when training starts from a saved classifier (LP-FT stage 2).
        self.card_origin: dict | None = None
        self._micro_step, self._micro_step_of = 0, -1
        # [{"checkpoint", "step", "changed": {field: [old, new]}}]: resumes that changed settings (card, JSON).
        self.resumed_with_changes: list[dict] = []

    # ---- the run folder: a fresh run never lands on another run; a resume never mixes two configs ----

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`Trainer.train`, guarding the run folder first.

        ``resume_from_checkpoint``: a checkpoint path, or True / "auto" for the newest *complete* checkpoint of
        ``output_dir`` (a fresh start when there is none). A fresh run into an ``output_dir`` that holds another run
        is refused unless ``args.overwrite_output_dir`` (which removes that run first); a resume whose method or
        optimisation settings differ from the checkpoint's ``training_args.json`` is refused unless
        ``args.allow_changed_args_on_resume`` (the change is then recorded in the card and the JSON).
        """
        args = self.args
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, args.output_dir)
        # Marked and locked for the whole run (hf_cfft.output_folder): a second run into it is refused meanwhile.
        with OutputFolder(
            args.output_dir, "finetune", overwrite=args.overwrite_output_dir, resuming=checkpoint is not None,
            write=args.should_save,
        ):  # fmt: skip
            return self._train_in_folder(checkpoint, trial, **kwargs)

    def _train_in_folder(self, checkpoint: str | None, trial, **kwargs):
        args = self.args
        changed = check_run_folder(args, checkpoint)
        if checkpoint is None and args.overwrite_output_dir:
            if args.should_save:
                check_output_dir(args.output_dir, resuming=False, overwrite=True)
            self.accelerator.wait_for_everyone()
        if checkpoint is not None:
            self.resumed_with_changes = _earlier_changes(checkpoint)
            if changed:
                logger.warning("Resuming %s with changed settings: %s", checkpoint, changed)
                step = json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("global_step")
                changes = {key: list(values) for key, values in changed.items()}
                entry = {"checkpoint": Path(checkpoint).name, "step": step, "changed": changes}
                self.resumed_with_changes.append(entry)
        try:
            return super().train(resume_from_checkpoint=checkpoint, trial=trial, **kwargs)
        except RuntimeError as error:
            if args.world_size > 1 and _lost_a_peer(error):
                raise LostProcessError(self._lost_peer_message(error)) from error
            raise

    def _lost_peer_message(self, error: BaseException) -> str:
        args = self.args
        last = latest_complete_checkpoint(args.output_dir)
        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        return (
            f"process {args.process_index} of {args.world_size} stopped at step {self.state.global_step + 1}: "
            f"another process died or hung (waited at most ddp_timeout={args.ddp_timeout} s; "
            f"{type(error).__name__}: {first_line}). "
            + (f"The newest complete checkpoint is {last}: " if last else "No checkpoint was saved yet: ")
            + "find why the other process stopped (its log, memory, the node), then resume with "
            "--resume_from_checkpoint auto; a lower --ddp_timeout fails faster"
        )

    # ---- the data pipeline ----

    def _prepare_dataset(self, dataset):
        """Raw images -> the method's train set (`hf_cfft.data.prepare_train_dataset`), as configured by ``args``.

        Unreadable images fail with their names, or are dropped and counted in ``self.skipped_images``
        (``args.skip_corrupt_images``). The teacher's CAMs are computed when the config needs them, each process
        computing its shard on its device. A dataset that already yields ``pixel_values`` (a format or transform
        set, or not a `datasets.Dataset`) is returned unchanged.
        """
        if isinstance(dataset, datasets.IterableDataset):
            return self._prepare_streaming_dataset(dataset)
        if not isinstance(dataset, datasets.Dataset):
            return dataset
        if dataset.format["type"] is not None or "pixel_values" in dataset.column_names:
            return dataset
        if self.processing_class is None:
            raise ValueError(
                "CfftTrainer needs processing_class=<the checkpoint's image processor> to prepare a raw image "
                "dataset (e.g. AutoImageProcessor.from_pretrained(model_name_or_path)), or a train_dataset that "
                "already yields pixel_values"
            )
        args = self.args
        # Every process calls it: the teacher-CAM pass is sharded over them (hf_cfft.distributed_cams).
        processor = FastImageProcessor(self.processing_class) if args.fast_image_processing else self.processing_class
        with adapters.teacher_context(self.teacher):
            dataset, self.skipped_images = self._prepare_raw_dataset(dataset, processor)
        return dataset

    def _prepare_raw_dataset(self, dataset, processor):
        args = self.args
        return prepare_train_dataset(
            dataset,
            processor,
            model=self.accelerator.unwrap_model(self.model),
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

    def _prepare_streaming_dataset(self, dataset: datasets.IterableDataset) -> datasets.IterableDataset:
        """A streamed raw train set -> preprocessed examples (`hf_cfft.streaming`); teacher CAMs cannot be cached."""
        args = self.args
        if args.needs_teacher_cams:
            raise ValueError(
                "cam_source='teacher' pre-computes the teacher's CAMs over the whole train set, which a streamed "
                "(IterableDataset) train set cannot give; use cam_source='teacher_online' (the teacher's CAM per "
                "batch, on the device) or cam_source='student', or load the dataset without streaming=True"
            )
        if self.processing_class is None:
            raise ValueError("CfftTrainer needs processing_class=<the checkpoint's image processor> for a raw stream")
        processor = FastImageProcessor(self.processing_class) if args.fast_image_processing else self.processing_class
        return prepare_streaming_train_dataset(
            dataset,
            processor,
            model=self.accelerator.unwrap_model(self.model),
            augment=args.augment,
            image_column=self.image_column,
            label_column=self.label_column,
            batch_size=args.per_device_train_batch_size,
        )

    # ---- optimisation switches for the paper's exact setting ----

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        """All parameters when ``decay_all_parameters`` (the reference code), else the Trainer's default."""
        if self.args.decay_all_parameters:
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """torch's OneCycleLR (cosine) when ``one_cycle_schedule``, else the configured transformers schedule."""
        if not self.args.one_cycle_schedule or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer if optimizer is not None else self.optimizer
        warmup = self.args.warmup_steps
        pct_start = warmup if 0 < warmup < 1 else (warmup / num_training_steps if warmup >= 1 else 0.02)
        self.lr_scheduler = OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=max(num_training_steps, 2),
            pct_start=min(max(pct_start, 1e-6), 0.999),
            anneal_strategy="cos",
            # torch's default, kept as the reference keeps it: Adam's beta1 goes 0.95 -> 0.85 -> 0.95 against the
            # learning rate.
            cycle_momentum=True,
        )
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ---- the objective: one student pass, one teacher pass, one loss call ----

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
        random) and refill donors (or taken as they are when a collator built them: ``cf_pixel_values``). Given the
        student's ``cam`` [B, h, w], they are cut and refilled here, seeded by (seed, step, process, micro-step) so
        that a resumed run draws the same refills. Returns None, counted in ``train/skipped_counterfactual_batches``,
        only for a batch of one image that has no partner to refill from; any other batch without counterfactuals
        raises.
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
        key = f"{args.seed}/{self.state.global_step}/{args.process_index}/{self._micro_step}"
        seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)
        generator = torch.Generator().manual_seed(seed)
        return make_counterfactuals(pixel_values, mask.to(pixel_values.device), args.fill_kind, patch_size, generator)

    def _student_pass_with_own_cam(self, unwrapped, pixel_values: torch.Tensor, labels: torch.Tensor):
        """The student's CAM -> counterfactuals -> their embeddings; runs as the wrapped model's forward.

        When possible the CAM is read off the training forward on the clean images (`CamRecorder`), which saves the
        separate eager forward `compute_cam` needs (docs/performance.md). Returns (outputs, counterfactuals or None).
        """
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

    def _distilled_images(self, inputs: dict[str, torch.Tensor], view: str):
        """The images the distillation term sees, as (pixels, keep), when known before the student runs; else None.

        FT+FD/FT+KD distil on the clean images, CFFT on the collator's counterfactuals. With the student's own CAM
        the counterfactuals are made inside its pass; a skipped batch and vanilla fine-tuning distil on nothing.
        """
        if view == "clean":
            return inputs["pixel_values"], None
        if view == "counterfactual" and not self.student_cams:
            cam = None
            if self.args.needs_online_teacher_cams:  # the frozen teacher's CAM of this batch, on the device
                teacher = self.accelerator.unwrap_model(self.teacher)
                with adapters.teacher_context(teacher):
                    cam = compute_cam(teacher, inputs["pixel_values"], inputs["labels"], self.args.cam_method)
            return self.counterfactual_batch(inputs, cam=cam)
        return None

    def _student_pass(self, model, inputs: dict[str, torch.Tensor], view: str, distilled):
        """One forward of the (wrapped) student -> (outputs, the images distilled on as (pixels, keep) or None).

        ``outputs.cf_image_embeds`` / ``cf_logits`` are the student's embeddings / logits of the distilled images.
        """
        pixel_values = inputs["pixel_values"]
        if view == "counterfactual" and self.student_cams:
            unwrapped = self.accelerator.unwrap_model(model)
            own_cam_pass = functools.partial(self._student_pass_with_own_cam, unwrapped)
            return call_as_forward(model, unwrapped, own_cam_pass, pixel_values, inputs["labels"])
        if view == "counterfactual" and distilled is not None:
            cf_pixel_values, cf_keep = distilled
            outputs = model(pixel_values=pixel_values, cf_pixel_values=cf_pixel_values, cf_patch_keep=cf_keep)
            return outputs, distilled
        outputs = model(pixel_values=pixel_values)
        if view == "clean":  # the clean pass is the distilled one: no second forward
            outputs.cf_image_embeds, outputs.cf_logits = outputs.image_embeds, outputs.logits
        return outputs, distilled

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

        ``num_items_in_batch`` is accepted for the Trainer's signature; both terms are per-batch means.
        """
        args, labels = self.args, inputs["labels"]
        view = self.distill_view if model.training else "none"
        if model.training:
            if self._micro_step_of != self.state.global_step:
                self._micro_step_of, self._micro_step = self.state.global_step, 0
            self._micro_step += 1
        distilled = self._distilled_images(inputs, view)
        # The teacher first when its images are known: its short-lived activations then reuse memory that the
        # student's pass needs next (docs/performance.md). The student's own CAM makes them inside its pass.
        teacher_out = self._teacher_pass(*distilled) if distilled is not None else None
        outputs, distilled = self._student_pass(model, inputs, view, distilled)
        student_out = None
        if distilled is not None:
            teacher_out = teacher_out if teacher_out is not None else self._teacher_pass(*distilled)
            student_out = outputs.cf_logits if args.distill_target == "logits" else outputs.cf_image_embeds
        parts = counterfactual_loss(
            outputs.logits,
            labels,
            student_out,
            teacher_out,
            distill_weight=args.distill_weight,
            distill_target=args.distill_target,
            temperature=args.kd_temperature,
        )
        mode = "train" if model.training else "eval"
        if model.training and not torch.isfinite(parts["loss"]):
            self._stop_on_non_finite_loss(parts)
        self._metrics[f"{mode}/task_loss"].append(parts["task_loss"].item())
        if distilled is not None:
            self._metrics[f"{mode}/distill_loss"].append(parts["distill_loss"].item())
        return (parts["loss"], outputs) if return_outputs else parts["loss"]

    def _stop_on_non_finite_loss(self, parts: dict[str, torch.Tensor]) -> None:
        last = latest_complete_checkpoint(self.args.output_dir)
        raise FloatingPointError(
            f"non-finite loss at step {self.state.global_step + 1} (task loss {parts['task_loss'].item()}, "
            f"distillation loss {parts['distill_loss'].item()}); training stopped before this update was applied. "
            + (f"The last good checkpoint is {last}: " if last else "No checkpoint was saved yet: ")
            + "lower --learning_rate or --distill_weight, or use bf16 instead of fp16, then resume or restart"
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Merge the buffered task and distillation losses (means since the last log) into the Trainer's logs."""
        mode = "train" if any(not key.startswith("eval_") for key in logs) and "loss" in logs else "eval"
        prefix = "" if mode == "train" else "eval_"
        for key in [k for k in self._metrics if k.startswith(mode + "/")]:
            values = self._metrics.pop(key)
            logs[prefix + key.split("/", 1)[1]] = sum(values) / len(values)
        if mode == "train" and self._skipped_counterfactual_batches:
            # Reported as train/skipped_counterfactual_batches by the logging integrations: a running total.
            logs["skipped_counterfactual_batches"] = self._skipped_counterfactual_batches
        super().log(logs, start_time)

    # ---- release: a model card next to every saved model and checkpoint ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, plus the model card (README.md) and ``training_args.json`` beside the weights.

        The Trainer saves every ``checkpoint-N`` through this method too, so checkpoints get their card as well.
        Only processes that write the model (``args.should_save``) write them.
        """
        folder = output_dir if output_dir is not None else self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model)
        if adapters.is_adapter_model(unwrapped) and Path(folder).resolve() == Path(self.args.output_dir).resolve():
            # The run's own folder (not a checkpoint, which keeps the adapter alone for resuming): the adapter in
            # adapter/, the merged classifier beside it.
            if self.args.should_save:
                Path(folder).mkdir(parents=True, exist_ok=True)
                adapters.save_adapter_and_merged(
                    unwrapped, folder, merge=self.args.merge_adapter, base_model=self.base_model,
                    safe_serialization=True,
                )  # fmt: skip
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(folder)
        else:
            super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            # transformers pickles the args beside every model; hf_cfft keeps them as training_args.json only, so
            # no folder (and no push of one) ever holds a pickle.
            Path(folder, TRAINING_ARGS_NAME).unlink(missing_ok=True)
            self._write_release_files(folder)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The push of every save (``hub_strategy='every_save'``), without transformers' pickled training args.

        transformers' own version writes ``training_args.bin`` into ``output_dir`` just before uploading it; this
        one copies the checkpoint's model files (`files_to_upload`: no pickles) and uploads exactly those.
        """
        args = self.args
        if not self.is_world_process_zero() or args.hub_strategy == HubStrategy.END:
            return
        if not args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(args, self.state, self.control)
        for name in files_to_upload(checkpoint_folder):
            target = Path(args.output_dir, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(checkpoint_folder, name), target)
        job = hf_api().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=args.output_dir,
            commit_message=f"Training in progress, step {self.state.global_step}",
            token=args.hub_token,
            run_as_future=True,
            allow_patterns=files_to_upload(args.output_dir),
            ignore_patterns=list(EXCLUDED_FILES),
            revision=args.hub_revision,
        )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress([job])
        else:
            self.push_in_progress.jobs.append(job)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write hf_cfft's model card to ``args.output_dir/README.md``: `push_to_hub` calls this before uploading.

        The card shows the method's hyper-parameters from ``args``, and reads these trainer attributes when set:
        ``base_model`` (the CLIP checkpoint fine-tuned from; ``finetuned_from`` overrides it), ``dataset_name``
        (``dataset`` overrides it), ``eval_results`` (``{"zero-shot": {split: acc}, "fine-tuned": {...}}``, top-1 in
        %, as in ``eval_results.json``) and ``ood_splits``. ``language``, ``tasks``, ``dataset_tags`` and
        ``dataset_args`` belong to the Trainer's signature and are not used: the task is image classification.
        """
        if not self.is_world_process_zero():
            return
        if isinstance(dataset, (list, tuple)):
            dataset = dataset[0] if dataset else None
        self._write_release_files(
            self.args.output_dir,
            model_name=model_name,
            license=license,
            tags=[tags] if isinstance(tags, str) else tags,
            base_model=finetuned_from,
            dataset_name=dataset,
        )

    def _write_release_files(self, output_dir: str, **overrides) -> None:
        """Write README.md (the model card) and ``training_args.json`` (the args as JSON, no pickle) to output_dir."""
        repo_id = self.hub_model_id or self.args.hub_model_id
        extra_tags = overrides.pop("tags", None) or []
        card_kwargs = dict(
            model_config=self.accelerator.unwrap_model(self.model).config,
            training_args=self.args,
            base_model=self.base_model,
            dataset_name=self.dataset_name,
            results=self.eval_results,
            ood_splits=self.ood_splits,
            repo_id=repo_id,
            model_name=repo_id.split("/")[-1] if repo_id else Path(self.args.output_dir).resolve().name,
            tags=[*self._tag_names, *extra_tags],
            global_step=self.state.global_step,
            origin=self.card_origin,
        )
        card_kwargs.update({key: value for key, value in overrides.items() if value is not None})
        values = self.args.to_dict()
        if self.resumed_with_changes:
            values["resumed_with_changes"] = self.resumed_with_changes
        card_kwargs["training_args"] = values | {"world_size": self.args.world_size}
        write_model_card(output_dir, **card_kwargs)
        (Path(output_dir) / TRAINING_ARGS_JSON).write_text(json.dumps(values, indent=2) + "\n")


class LostProcessError(RuntimeError):
    """Another process of a multi-process run died or hung; the message says where to resume from."""


_PEER_LOST = ("timed out", "timeout", "connection closed by peer", "connection reset", "broken pipe", "nccl")


def _lost_a_peer(error: BaseException) -> bool:
    """Whether a collective failed because another process is gone or stuck (gloo/NCCL wording)."""
    text = str(error).lower()
    return isinstance(error, torch.distributed.DistBackendError) or any(word in text for word in _PEER_LOST)


def _earlier_changes(checkpoint: str) -> list[dict]:
    """The changed-settings resumes a checkpoint's ``training_args.json`` records (carried into the next saves)."""
    path = Path(checkpoint) / TRAINING_ARGS_JSON
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8")).get("resumed_with_changes", []))
