"""`CfftConfig`: `TrainingArguments` plus the knobs of counterfactual fine-tuning.

Every field is a CLI flag and a YAML key through `HfArgumentParser`. Defaults follow the paper's best setting
(object-mask, CAM threshold 0.3, single-fill, beta = 30), with two deliberate exceptions documented in the README:
weight decay skips biases and LayerNorms, and the schedule is transformers' linear warm-up/decay, unless
``decay_all_parameters`` and ``one_cycle_schedule`` are set as the reference implementation does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property

import torch
from transformers import TrainingArguments

from .cam import CAM_METHODS
from .hub_ids import hub_is_off
from .image_checks import CHECKS as IMAGE_CHECKS
from .losses import DISTILL_TARGETS
from .masking import FILL_KINDS, MASK_KINDS

CAM_SOURCES = ("teacher", "student", "teacher_online")
CAM_DTYPES = ("float16", "float32")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
TRAINING_METHODS = ("cfft", "flyp")
AUGMENTATIONS = ("none", "flip", "crop_flip")


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6 (CUDA, XPU, MPS, ...)
    return torch.cuda.is_available() or bool(accelerator and accelerator.is_available())


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(choices)}")


# Fields that count things: a float there (``per_device_train_batch_size: 2.5`` in a YAML) is refused up front.
_INTEGER_FIELDS = (
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "cam_batch_size",
    "max_steps", "seed", "dataloader_num_workers",
)  # fmt: skip


@dataclass
class CfftConfig(TrainingArguments):
    """Training arguments for `CfftTrainer`: the method's knobs, validated when the config is built."""

    method: str = field(
        default="cfft",
        metadata={
            "help": "'cfft': CfftTrainer (vanilla FT, LP, FT+FD, FT+KD and CFFT, by the knobs below); 'flyp': "
            "hf_cfft.baselines.flyp.FlypTrainer (FLYP: both towers fine-tuned with the contrastive pre-training "
            "loss on class prompts; needs distill_weight 0)."
        },
    )
    distill_weight: float = field(
        default=30.0,
        metadata={"help": "beta: weight of the distillation term on counterfactual images. 0 = vanilla fine-tuning."},
    )
    mask_kind: str = field(
        default="object",
        metadata={
            "help": "Patches to mask: 'object' (CAM > threshold), 'context' (CAM <= threshold), 'random', or "
            "'none' (distil on the clean images: FT+FD)."
        },
    )
    fill_kind: str = field(
        default="single",
        metadata={
            "help": "Refill masked patches: 'none' (patches removed from the encoder's input), 'single' (from one "
            "other image of the batch), 'multi' (each patch from a random other image)."
        },
    )
    mask_threshold: float = field(
        default=0.3, metadata={"help": "CAM threshold in (0, 1) for object/context masks (CAMs are max-normalised)."}
    )
    mask_top_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Rank-based object masks: mask this fraction of patches with the highest CAM (ties to the lower "
            "patch index; context masks keep the complement) instead of thresholding at mask_threshold. Unset = the "
            "paper's threshold rule."
        },
    )
    mask_ratio: float = field(default=0.5, metadata={"help": "Fraction of patches masked by random-mask, in (0, 1)."})
    cam_method: str = field(
        default="rollout",
        metadata={"help": "CAM method: 'rollout' (gradient-weighted attention rollout) or 'gradcam' (last block)."},
    )
    cam_source: str = field(
        default="teacher",
        metadata={
            "help": "Model whose CAM picks the mask: 'teacher' (pre-computed once over the train set, cached: cheap), "
            "'student' (recomputed every step by the model being trained, as the reference code does), or "
            "'teacher_online' (the frozen teacher's CAM computed per batch on the device: for streamed train sets, "
            "which cannot be pre-computed)."
        },
    )
    distill_target: str = field(
        default="features",
        metadata={"help": "Distil 'features' (MSE of image embeddings, the paper) or 'logits' (KD with temperature)."},
    )
    kd_temperature: float = field(
        default=10.0,
        metadata={
            "help": "Temperature of logit distillation (--distill_target logits, FT+KD; > 0). Default 10, the "
            "reference implementation's FT+KD temperature (docs/fidelity.md); 1 is the plain KL."
        },
    )
    linear_probe: bool = field(
        default=False, metadata={"help": "Train only the linear head; the image encoder stays frozen."}
    )
    decay_all_parameters: bool = field(
        default=False,
        metadata={"help": "Apply weight decay to every parameter, biases and norms included (the reference code)."},
    )
    one_cycle_schedule: bool = field(
        default=False,
        metadata={
            "help": "Use torch's OneCycleLR (cosine, warm-up fraction = warmup_steps if < 1, else 0.02) as the "
            "reference code does, instead of lr_scheduler_type."
        },
    )
    augment: str = field(
        default="none",
        metadata={
            "help": "Geometric augmentation applied in the data transform, the CAM following the same geometry: "
            "'none' (the paper: CLIP's resize + centre crop), 'flip', or 'crop_flip' (random resized crop + flip)."
        },
    )
    cam_batch_size: int = field(default=64, metadata={"help": "Batch size of the teacher-CAM pre-computation pass."})
    cam_dtype: str = field(
        default="float16",
        metadata={
            "help": "Storage of the pre-computed teacher CAMs: 'float16' (ImageNet at ViT-B/16: 1.28M x 196 x 2 bytes "
            "= 502 MB) or 'float32' (1.0 GB). Masks differ only for patches within 1.2e-4 of the threshold."
        },
    )
    fast_image_processing: bool = field(
        default=False,
        metadata={
            "help": "Preprocess train images with hf_cfft.fast_images.FastImageProcessor: the checkpoint processor's "
            "resize, crop and normalisation as batched torch ops (no torchvision needed), about 2-3x the images/s "
            "of one DataLoader worker at 224 px; pixels within 1-2 grey levels of the processor's."
        },
    )
    image_check: str = field(
        default="verify",
        metadata={
            "help": "Check train images before training: 'verify' (file structure), 'decode' (every pixel), 'none'."
        },
    )
    skip_corrupt_images: bool = field(
        default=False, metadata={"help": "Drop unreadable train images (and report how many) instead of failing."}
    )
    lora_rank: int = field(
        default=0,
        metadata={
            "help": "LoRA rank of an adapter in the image tower (0 = train full weights). The head is trained in "
            "full, and the teacher of CFFT / FT+FD / FT+KD is the same model with its adapters off (no second copy "
            "of the tower). Needs the 'peft' extra."
        },
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (the update is alpha / rank)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module name suffixes that get LoRA (default: the vision tower's attention projections q_proj, "
            "k_proj, v_proj, out_proj, for every family)."
        },
    )
    merge_adapter: bool = field(
        default=True,
        metadata={
            "help": "With an adapter, also save the merged classifier (adapter folded into the weights) in "
            "output_dir; the adapter alone always goes to output_dir/adapter."
        },
    )
    teacher_dtype: str = field(
        default="float32",
        metadata={
            "help": "Precision the frozen teacher copy is kept in: 'float32', 'bfloat16', or 'float16' (GPU only). "
            "A lighter teacher for big towers; its features differ from float32's by bf16 rounding (docs/scale.md)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a fresh run in an output_dir that holds another run's model or checkpoints, removing "
            "them first. Without it such a folder is refused (resuming with --resume_from_checkpoint is allowed)."
        },
    )
    allow_changed_args_on_resume: bool = field(
        default=False,
        metadata={
            "help": "Resume although the method or optimisation settings differ from the checkpoint's "
            "training_args.json (refused otherwise); the model card records the changed fields."
        },
    )

    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Resume training: 'auto' (or 'true') = the newest complete checkpoint-N in output_dir (a fresh "
            "start when there is none), or a checkpoint-N folder. The run's settings must match the checkpoint's "
            "(see --allow_changed_args_on_resume)."
        },
    )

    # Method-required defaults of TrainingArguments fields (TRL's idiom: defaults, not mutations in the trainer).
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the image column for the transform (must stay False)."}
    )
    dataloader_drop_last: bool = field(
        default=True, metadata={"help": "Drop the last incomplete batch, so refilling always has partners."}
    )
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "Integrations to report to (e.g. 'tensorboard')."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP's find_unused_parameters. Every student forward, the counterfactual pass included, runs "
            "through the wrapped model and uses every trainable parameter, so the extra graph traversal is not needed."
        },
    )

    def __post_init__(self):
        for name in _INTEGER_FIELDS:  # a YAML 2.5 or a library float: refused before the CAM pass and the data
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"{name}={value!r} must be a whole number (e.g. {name}={max(1, int(value or 0))}); got a "
                    f"{type(value).__name__}"
                )
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:  # the eval batch would fail only after training, losing the run
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 (--{name} 1 or more)")
        if self.push_to_hub and hub_is_off():
            raise ValueError(
                "--push_to_hub true needs the Hub, but it is switched off here (HF_HUB_OFFLINE=1): the upload would "
                "fail after training. Train without --push_to_hub, then push the saved folder where there is network "
                "(python -m hf_cfft.release.push --model_dir OUTPUT_DIR --repo_id you/name)"
            )
        super().__post_init__()
        _choice("method", self.method, TRAINING_METHODS)
        if self.method == "flyp" and (self.distill_weight != 0 or self.linear_probe):
            raise ValueError(
                f"method='flyp' trains both towers with the contrastive loss alone, but distill_weight="
                f"{self.distill_weight} and linear_probe={self.linear_probe}; set distill_weight 0 and linear_probe "
                "false (recipes/configs/baselines/flyp.yaml does)"
            )
        _choice("mask_kind", self.mask_kind, MASK_KINDS)
        _choice("fill_kind", self.fill_kind, FILL_KINDS)
        _choice("cam_method", self.cam_method, CAM_METHODS)
        _choice("cam_source", self.cam_source, CAM_SOURCES)
        _choice("cam_dtype", self.cam_dtype, CAM_DTYPES)
        _choice("distill_target", self.distill_target, DISTILL_TARGETS)
        _choice("augment", self.augment, AUGMENTATIONS)
        _choice("image_check", self.image_check, IMAGE_CHECKS)
        # Written as "not (within range)" so that NaN, which compares False with everything, is refused too.
        if not 0 <= self.distill_weight < math.inf:
            raise ValueError(
                f"distill_weight={self.distill_weight} must be a finite number >= 0 (0 = vanilla fine-tuning)"
            )
        if self.max_steps <= 0 and not 0 < self.num_train_epochs < math.inf:
            raise ValueError(
                f"num_train_epochs={self.num_train_epochs} with max_steps={self.max_steps} (unset) would train no "
                "step and save the starting model as if fine-tuned; pass --num_train_epochs > 0 (e.g. 1), or "
                "--max_steps N"
            )
        if not 0 <= self.label_smoothing_factor <= 1:
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor} must lie in [0, 1] (0 = none, e.g. 0.1)"
            )
        if not 0 < self.mask_threshold < 1:
            raise ValueError(f"mask_threshold={self.mask_threshold} must lie in (0, 1); the paper's best is 0.3")
        if self.mask_top_fraction is not None and not 0 < self.mask_top_fraction < 1:
            raise ValueError(
                f"mask_top_fraction={self.mask_top_fraction} must lie in (0, 1), or be unset for the threshold rule"
            )
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio={self.mask_ratio} must lie in (0, 1); the paper tries 0.25, 0.5, 0.75")
        if not 0 < self.kd_temperature < math.inf:
            raise ValueError(f"kd_temperature={self.kd_temperature} must be > 0")
        if self.cam_batch_size < 1:
            raise ValueError(f"cam_batch_size={self.cam_batch_size} must be >= 1")
        if self.mask_kind == "none" and self.fill_kind != "none":
            raise ValueError(
                f"fill_kind={self.fill_kind!r} needs masked patches to refill, but mask_kind='none'; "
                "set fill_kind='none' too (that is FT+FD), or choose a mask_kind"
            )
        if self.cam_source == "student" and self.linear_probe:
            raise ValueError(
                "cam_source='student' with linear_probe=True: a frozen encoder's CAM never changes, so it is the "
                "teacher's; use cam_source='teacher'"
            )
        if self.fill_kind != "none" and self.per_device_train_batch_size < 2:
            raise ValueError(
                f"fill_kind={self.fill_kind!r} refills from other images of the batch, but "
                f"per_device_train_batch_size={self.per_device_train_batch_size}; use >= 2"
            )
        if self.fp16 and (self.use_cpu or not _has_accelerator()):
            raise ValueError(
                "fp16=True is not supported on the CPU (no CUDA device found, or use_cpu=True): pass "
                "--bf16 true --use_cpu true for CPU mixed precision, or leave both off for float32"
            )
        if self.push_to_hub and str(getattr(self.hub_strategy, "value", self.hub_strategy)) in (
            "checkpoint",
            "all_checkpoints",
        ):
            raise ValueError(
                f"hub_strategy={getattr(self.hub_strategy, 'value', self.hub_strategy)!r} uploads checkpoint folders "
                "with their pickled optimizer, scheduler and RNG states; hf_cfft never uploads pickles: use "
                "--hub_strategy every_save or end (checkpoints stay local for resuming)"
            )
        _choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        self._check_adapter_and_teacher_settings()
        if self.dataloader_pin_memory and (self.use_cpu or not _has_accelerator()):
            self.dataloader_pin_memory = False  # nothing to pin for; torch would warn at every dataloader
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns=True would drop the image column before the transform; use False")

    def _check_adapter_and_teacher_settings(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 0 (0 = full fine-tuning, e.g. 8 or 16 for LoRA)")
        if self.lora_rank > 0:
            if not (0 < self.lora_alpha < math.inf and 0 <= self.lora_dropout < 1):
                raise ValueError(
                    f"lora_alpha={self.lora_alpha} must be > 0 and lora_dropout={self.lora_dropout} in [0, 1)"
                )
            if self.linear_probe or self.method == "flyp":
                what = "linear_probe trains the head alone" if self.linear_probe else "method='flyp' trains 2 towers"
                raise ValueError(f"lora_rank={self.lora_rank} with {what}; an image-tower adapter does not apply: "
                                 "set lora_rank 0")  # fmt: skip
            if self.teacher_dtype != "float32":
                raise ValueError(
                    f"teacher_dtype={self.teacher_dtype!r} with lora_rank={self.lora_rank}: with an adapter the "
                    "teacher is the student's own frozen weights (no copy to keep in lower precision); drop "
                    "--teacher_dtype"
                )
        if self.teacher_dtype == "float16" and (self.use_cpu or not _has_accelerator()):
            raise ValueError("teacher_dtype='float16' needs a GPU; on the CPU use --teacher_dtype bfloat16")

    @cached_property
    def _setup_devices(self):
        # transformers passes ddp_timeout to the process group on GPUs only: with use_cpu (gloo) a hung process
        # would keep the others waiting for torch's default 30 minutes whatever --ddp_timeout says. Starting the
        # group here, with the timeout, is what the Trainer then uses (accelerate keeps an initialised group).
        if self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(
                backend=self.ddp_backend or "gloo", timeout=timedelta(seconds=self.ddp_timeout)
            )
        return TrainingArguments._setup_devices.func(self)

    @property
    def uses_counterfactuals(self) -> bool:
        """Whether training distils on masked images (as opposed to vanilla FT or FT+FD)."""
        return self.distill_weight > 0 and self.mask_kind != "none"

    @property
    def needs_teacher_cams(self) -> bool:
        """Whether the train set needs a pre-computed ``cam`` column."""
        return self.uses_counterfactuals and self.mask_kind in ("object", "context") and self.cam_source == "teacher"

    @property
    def needs_online_teacher_cams(self) -> bool:
        """Whether the frozen teacher computes the CAM that picks the masks, per batch, inside the step."""
        return (
            self.uses_counterfactuals
            and self.mask_kind in ("object", "context")
            and self.cam_source == "teacher_online"
        )

    @property
    def needs_student_cams(self) -> bool:
        """Whether the model being trained computes the CAM that picks the masks, every step."""
        return self.uses_counterfactuals and self.mask_kind in ("object", "context") and self.cam_source == "student"
