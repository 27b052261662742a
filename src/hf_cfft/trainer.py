"""`CfftTrainer`: a `transformers.Trainer` whose loss adds distillation on counterfactual images.

    L = CE(g(f(x)), y) + beta * MSE(f_hat(x_cf), f(x_cf))

f is the model being fine-tuned, f_hat a frozen copy of the pre-trained model (the teacher). The teacher lives
outside ``self.model``: accelerate places it on the device (and under mixed precision) but it is never optimised,
never wrapped for DDP and never written into a checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
from collections import defaultdict
from pathlib import Path

import torch
from torch.optim.lr_scheduler import OneCycleLR
from transformers import Trainer

from .cam import CamRecorder, compute_cam
from .config import CfftConfig
from .data import CounterfactualCollator
from .losses import counterfactual_loss
from .masking import cam_patch_mask, make_counterfactuals
from .model_card import TRAINING_ARGS_JSON, write_model_card
from .modeling import ClipCfftForImageClassification


class CfftTrainer(Trainer):
    """Counterfactual fine-tuning (Xiao et al., CVPR 2023) on top of `transformers.Trainer`.

    Args:
        model: the `ClipCfftForImageClassification` to fine-tune (its head usually the zero-shot classifier).
        args: a `CfftConfig`.
        teacher: the frozen pre-trained model f_hat. Defaults to a copy of ``model`` taken before training, which
            is the paper's choice; pass e.g. a WiSE-FT model to distil from something else.
        data_collator: defaults to a `CounterfactualCollator` configured from ``args``.
        Other keyword arguments go to `transformers.Trainer`.
    """

    _tag_names = ["hf_cfft", "clip", "robust-fine-tuning", "counterfactual-fine-tuning"]
    # compute_loss returns per-micro-batch means (equal-sized batches: dataloader_drop_last), so the Trainer divides
    # by the accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: ClipCfftForImageClassification,
        args: CfftConfig,
        teacher: ClipCfftForImageClassification | None = None,
        data_collator=None,
        **kwargs,
    ):
        if not isinstance(args, CfftConfig):
            raise TypeError(f"args must be a CfftConfig, got {type(args).__name__}")
        if args.linear_probe:
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(name.startswith("classifier."))
        if teacher is None and args.distill_weight > 0:
            teacher = copy.deepcopy(model)
        if data_collator is None:
            data_collator = CounterfactualCollator(
                mask_kind=args.mask_kind if args.uses_counterfactuals else "none",
                fill_kind=args.fill_kind,
                mask_ratio=args.mask_ratio,
                patch_size=model.config.vision_config.patch_size,
                seed=args.seed,
            )
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        self.teacher = None
        if teacher is not None:
            teacher.requires_grad_(False).eval()
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        # What the model card reports beyond the args; recipes set them (eval_results before the final save).
        self.base_model: str | None = None
        self.dataset_name: str | None = None
        self.eval_results: dict[str, dict[str, float]] | None = None
        self.ood_splits: list[str] | None = None
        self._micro_step, self._micro_step_of = 0, -1

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

    # ---- the objective ----

    def _student_cam_from_training_forward(self, unwrapped) -> bool:
        """Whether the student's CAM can be read off its training forward (`CamRecorder`) instead of an extra pass.

        Only when that forward computes what `compute_cam`'s eval-mode pass does: no attention dropout, and no
        gradient checkpointing or compilation, under which the recording hooks would not see the live graph.
        """
        args = self.args
        dropout = getattr(unwrapped.config.vision_config, "attention_dropout", 0.0)
        return not (dropout or args.gradient_checkpointing or args.torch_compile)

    def _student_counterfactuals(self, model, pixel_values: torch.Tensor, labels: torch.Tensor):
        """CAM of the model being trained -> masks -> refilled images, seeded by (seed, step, process, micro-step).

        Returns (cf_pixel_values, patch_keep or None, clean outputs or None). When possible the CAM comes from the
        training forward on the clean images, whose outputs are returned so that the caller does not run it again:
        that saves the separate eager forward `compute_cam` needs (docs/performance.md).
        """
        unwrapped = self.accelerator.unwrap_model(model)
        clean_outputs = None
        if self._student_cam_from_training_forward(unwrapped):
            with CamRecorder(unwrapped, self.args.cam_method) as recorder:
                clean_outputs = model(pixel_values=pixel_values)
            cam = recorder.cam(clean_outputs.logits, labels)
        else:
            cam = compute_cam(unwrapped, pixel_values, labels, self.args.cam_method)
        mask = cam_patch_mask(cam, self.args.mask_kind, self.args.mask_threshold, self.args.mask_top_fraction).cpu()
        # Keyed by optimizer step and micro-step, not a running counter, so a resumed run draws the same refills.
        key = f"{self.args.seed}/{self.state.global_step}/{self.args.process_index}/{self._micro_step}"
        seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") & (2**63 - 1)
        generator = torch.Generator().manual_seed(seed)
        cf, keep = make_counterfactuals(
            pixel_values,
            mask.to(pixel_values.device),
            self.args.fill_kind,
            unwrapped.config.vision_config.patch_size,
            generator,
        )
        return cf, keep, clean_outputs

    def _teacher_outputs(self, pixel_values: torch.Tensor, patch_keep: torch.Tensor | None) -> torch.Tensor:
        """f_hat(x): the frozen teacher's embeddings [B, D] (or logits [B, K] when distilling logits)."""
        # accelerate's autocast wraps only ``forward``; get_image_features needs it explicitly, or a bf16 run would
        # run its teacher in fp32. Inference mode: a frozen model needs no autograd bookkeeping at all.
        with self.accelerator.autocast(), torch.inference_mode():
            out = self.teacher.get_image_features(pixel_values, patch_keep)
            if self.args.distill_target == "logits":
                out = self.teacher.logits_from_features(out)
        return out.clone()  # an inference tensor cannot be saved for the loss's backward

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """CE on clean images + beta * distillation on counterfactuals; logs both parts separately.

        ``num_items_in_batch`` is accepted for the Trainer's signature; both terms are per-batch means.
        """
        args = self.args
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        cf_pixel_values, cf_keep = inputs.get("cf_pixel_values"), inputs.get("cf_patch_keep")
        distill = model.training and self.teacher is not None and args.distill_weight > 0
        clean_outputs = None
        if model.training:
            if self._micro_step_of != self.state.global_step:
                self._micro_step_of, self._micro_step = self.state.global_step, 0
            self._micro_step += 1
        if distill and args.uses_counterfactuals and cf_pixel_values is None:
            if args.mask_kind in ("object", "context") and args.cam_source == "student":
                cf_pixel_values, cf_keep, clean_outputs = self._student_counterfactuals(model, pixel_values, labels)
            elif args.needs_teacher_cams and pixel_values.shape[0] >= 2:
                raise ValueError(
                    f"mask_kind={args.mask_kind!r} with cam_source='teacher' needs a 'cam' column in the train set; "
                    "run hf_cfft.precompute_cams on it first (recipes/finetune.py does)"
                )
            else:
                distill = False  # a batch of one image has no partner to refill from

        teacher_cf = None
        if distill:
            # Before the student's (remaining) forward: the same result, and on CPU ~8% faster per step, as the
            # teacher's short-lived activations then reuse memory that the student's pass needs next instead of
            # growing the heap past the student's saved activations (docs/performance.md).
            counterfactual = args.uses_counterfactuals  # else FT+FD: distil on the clean images
            teacher_cf = self._teacher_outputs(
                cf_pixel_values if counterfactual else pixel_values, cf_keep if counterfactual else None
            )

        if distill and args.uses_counterfactuals and clean_outputs is not None:
            # The clean forward already ran through the wrapped model (its graph gave the CAM); the counterfactual
            # pass only embeds, under the same autocast, and its gradients reach the same parameters.
            outputs, unwrapped = clean_outputs, self.accelerator.unwrap_model(model)
            with self.accelerator.autocast():
                outputs.cf_image_embeds = student_cf = unwrapped.get_image_features(cf_pixel_values, cf_keep)
                outputs.cf_logits = student_cf_logits = unwrapped.logits_from_features(student_cf)
        elif distill and args.uses_counterfactuals:
            outputs = model(pixel_values=pixel_values, cf_pixel_values=cf_pixel_values, cf_patch_keep=cf_keep)
            student_cf, student_cf_logits = outputs.cf_image_embeds, outputs.cf_logits
        else:
            outputs = model(pixel_values=pixel_values)
            # FT+FD distils on the clean images: reuse the clean pass instead of a second forward.
            student_cf, student_cf_logits = outputs.image_embeds, outputs.logits
        if distill and args.distill_target == "logits":
            student_cf = student_cf_logits
        parts = counterfactual_loss(
            outputs.logits,
            labels,
            student_cf if distill else None,
            teacher_cf,
            distill_weight=args.distill_weight,
            distill_target=args.distill_target,
            temperature=args.kd_temperature,
        )
        mode = "train" if model.training else "eval"
        if model.training and not torch.isfinite(parts["loss"]):
            self._stop_on_non_finite_loss(parts)
        self._metrics[f"{mode}/task_loss"].append(parts["task_loss"].item())
        if distill:
            self._metrics[f"{mode}/distill_loss"].append(parts["distill_loss"].item())
        return (parts["loss"], outputs) if return_outputs else parts["loss"]

    def _stop_on_non_finite_loss(self, parts: dict[str, torch.Tensor]) -> None:
        from .checkpoints import latest_complete_checkpoint

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
        super().log(logs, start_time)

    # ---- release: a model card next to every saved model and checkpoint ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, plus the model card (README.md) and ``training_args.json`` beside the weights.

        The Trainer saves every ``checkpoint-N`` through this method too, so checkpoints get their card as well.
        Only processes that write the model (``args.should_save``) write them.
        """
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            self._write_release_files(output_dir if output_dir is not None else self.args.output_dir)

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
        )
        card_kwargs.update({key: value for key, value in overrides.items() if value is not None})
        write_model_card(output_dir, **card_kwargs)
        (Path(output_dir) / TRAINING_ARGS_JSON).write_text(self.args.to_json_string(), encoding="utf-8")
