"""Every `transformers.TrainingArguments` field, and how it reaches an hf_cfft run: applied, or refused.

hf_cfft's trainers override the loss, the data preparation, the schedule (optionally) and the push, so a field the
Trainer applies inside its own ``compute_loss`` (``label_smoothing_factor``) would otherwise be recorded in the
card and never used. Each field is in exactly one of:

- `TRAINER_APPLIES`: the Trainer's loop applies it to hf_cfft's trainers as to any model (optimiser, precision,
  saving, logging, distribution, its own ``evaluate``); some values are refused (`REFUSED_VALUES`);
- `HF_CFFT_APPLIES`: hf_cfft applies it itself (the reason says where);
- `NO_EFFECT`: it has nothing to act on in an image classifier, and saying so is the whole story;
- `REFUSED`: a value other than its default is refused before any work (`check_training_arguments`), with the
  reason and what to do instead.

`tests/test_training_arguments.py` walks every field of the installed transformers: a field added by a new release
fails that test until it is placed here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

TRAINER_APPLIES = frozenset(
    """
    output_dir per_device_train_batch_size num_train_epochs max_steps learning_rate lr_scheduler_type
    lr_scheduler_kwargs warmup_steps optim optim_args weight_decay adam_beta1 adam_beta2 adam_epsilon
    optim_target_modules gradient_accumulation_steps max_grad_norm bf16 fp16 bf16_full_eval fp16_full_eval tf32
    activation_checkpointing activation_checkpointing_kwargs gradient_checkpointing gradient_checkpointing_kwargs
    torch_compile torch_compile_backend torch_compile_mode torch_empty_cache_steps logging_strategy logging_steps
    logging_first_step log_on_each_node logging_nan_inf_filter log_level log_level_replica disable_tqdm report_to
    run_name project trackio_space_id trackio_bucket_id trackio_static_space_id eval_strategy eval_steps eval_delay
    per_device_eval_batch_size prediction_loss_only eval_on_start eval_do_concat_batches eval_use_gather_object
    eval_accumulation_steps include_for_metrics batch_eval_metrics save_only_model save_strategy save_steps
    save_on_each_node save_total_limit enable_jit_checkpoint hub_token hub_private_repo hub_model_id hub_revision
    load_best_model_at_end metric_for_best_model greater_is_better ignore_data_skip
    restore_callback_states_from_checkpoint full_determinism seed data_seed use_cpu accelerator_config
    dataloader_num_workers dataloader_pin_memory dataloader_persistent_workers dataloader_prefetch_factor
    dataloader_multiprocessing_context dataloader_in_order ddp_bucket_cap_mb ddp_broadcast_buffers ddp_static_graph
    ddp_backend ddp_timeout fsdp fsdp_config debug skip_memory_metrics local_rank train_sampling_strategy
    """.split()
)

HF_CFFT_APPLIES = {
    "label_smoothing_factor": "the classification loss of CFFT and its baselines (losses.counterfactual_loss); "
    "FLYP refuses it",
    "remove_unused_columns": "must stay False (CfftConfig refuses True): the transform needs the image column",
    "dataloader_drop_last": "True by default: every batch has partners to refill masked patches from",
    "ddp_find_unused_parameters": "False by default: every trainable parameter is used in every step",
    "resume_from_checkpoint": "'auto' picks the newest complete checkpoint; a resume is checked against the "
    "checkpoint's settings and run manifest (hf_cfft.training.run_folder)",
    "push_to_hub": "hf_cfft's push: the model card and training_args.json, never a pickle",
    "hub_strategy": "'end' and 'every_save' (hf_cfft's push); 'checkpoint' and 'all_checkpoints' are refused by "
    "CfftConfig (they upload pickled optimizer states)",
    "hub_always_push": "hf_cfft's push of every save honours it",
    "do_train": "not used by the Trainer (transformers says so); the fine-tuning recipe always trains",
    "do_eval": "not used by the Trainer; the fine-tuning recipe evaluates the --eval_splits (none: no evaluation)",
}

NO_EFFECT = {
    "average_tokens_across_devices": "hf_cfft's losses are per-batch means of equal-sized batches, so there are no "
    "tokens to count: the gradient is the global batch's mean either way",
    "use_cache": "a key/value cache of generative models; image encoders have none",
    "include_num_input_tokens_seen": "counts a language model's tokens; the count of an image batch means nothing",
    "length_column_name": "only read by train_sampling_strategy='group_by_length', which is refused",
}

# field -> (the value that is accepted, why another one is refused and what to do instead)
REFUSED: dict[str, tuple[Any, str]] = {
    "use_liger_kernel": (
        False,
        "Liger kernels replace a language model's layers; CLIP-family towers have none they patch",
    ),
    "liger_kernel_config": (None, "it configures Liger kernels, which are refused (use_liger_kernel)"),
    "neftune_noise_alpha": (
        None,
        "NEFTune adds noise to a language model's input embeddings; an image classifier has none (use --augment)",
    ),
    "auto_find_batch_size": (
        False,
        "after an out-of-memory error it halves the per-device batch mid-run, which changes the global batch (and "
        "the run manifest a resume is checked against); set --per_device_train_batch_size to what fits "
        "(docs/performance.md) and --gradient_accumulation_steps for the global batch",
    ),
    "label_names": (
        None,
        "hf_cfft's batches carry the class under 'labels' (set --label_column to name your dataset's column)",
    ),
    "do_predict": (False, "the recipes have no predict step: score splits with recipes/evaluate_ood.py"),
    "deepspeed": (
        None,
        "DeepSpeed is not tested with the frozen teacher and the CAM pass; use accelerate launch (DDP) or LoRA "
        "for big towers (docs/scale.md)",
    ),
    "parallelism_config": (
        None,
        "tensor / context parallelism is not tested with the frozen teacher and the CAM pass; use DDP",
    ),
}

# Values of fields otherwise applied that are refused: (field, refused value, why).
REFUSED_VALUES = (
    ("train_sampling_strategy", "group_by_length", "images have no length to group by; use 'random'"),
    ("train_sampling_strategy", "batch_rebalance", "it balances padded tokens; images have none; use 'random'"),
)

# Fields FLYP refuses beyond these (its loss is contrastive, over images and their class prompts).
FLYP_REFUSED = {
    "label_smoothing_factor": (
        0.0,
        "FLYP's contrastive loss has no class targets to smooth; use it with --method cfft (any beta)",
    ),
}


def check_training_arguments(args: Any, refused: dict[str, tuple[Any, str]] | None = None) -> None:
    """Raise ValueError naming every field of ``args`` set to a value hf_cfft would not apply, with the fix.

    ``refused``: more fields a method refuses (e.g. `FLYP_REFUSED`), beside `REFUSED` and `REFUSED_VALUES`.
    """
    problems = []
    for name, (accepted, why) in {**REFUSED, **(refused or {})}.items():
        value = getattr(args, name, accepted)
        if value != accepted and not (accepted in (None, False) and value in (None, False, "", [])):
            problems.append(f"--{name} {_shown(value)}: {why}")
    for name, value, why in REFUSED_VALUES:
        current = getattr(args, name, None)
        if str(getattr(current, "value", current)) == value:
            problems.append(f"--{name} {value}: {why}")
    if getattr(args, "one_cycle_schedule", False):
        scheduler = getattr(args, "lr_scheduler_type", "linear")
        if str(getattr(scheduler, "value", scheduler)) != "linear" or getattr(args, "lr_scheduler_kwargs", None):
            problems.append(
                f"--lr_scheduler_type {getattr(scheduler, 'value', scheduler)} with --one_cycle_schedule true: the "
                "one-cycle schedule replaces it (only --warmup_steps shapes it); drop one of the two"
            )
    if problems:
        raise ValueError("training arguments hf_cfft would not apply:\n  " + "\n  ".join(problems))


def _shown(value: Any) -> str:
    return str(getattr(value, "value", value))


def classified_fields() -> dict[str, str]:
    """{field: its category} for every field named here (the test compares it with TrainingArguments')."""
    table = {name: "trainer" for name in TRAINER_APPLIES}
    for category, names in (("hf_cfft", HF_CFFT_APPLIES), ("no effect", NO_EFFECT), ("refused", REFUSED)):
        for name in names:
            if name in table:
                raise AssertionError(f"{name} is classified twice")
            table[name] = category
    return table


def training_argument_names() -> list[str]:
    """The fields of the installed `transformers.TrainingArguments`."""
    from transformers import TrainingArguments

    return [field.name for field in dataclasses.fields(TrainingArguments)]
