"""The fine-tuning job behind `recipes/finetune.py` and every training cell of `recipes/compare.py`.

Parse the flags over a YAML config (`parse_finetune_args`), guard the output folder, load the data, build the method's
trainer (the one `hf_cfft.methods` names for the configuration: `CfftTrainer`, or `FlypTrainer` for ``--method
flyp``) with what it trains loaded (`RobustTrainer.from_checkpoint`), evaluate before and after, save the model with
its card and results. The recipes only pass their default config (``recipes/configs/world.yaml``), which is not part of
the package.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoImageProcessor

from ..callbacks import CounterfactualImagesCallback
from ..config import CfftConfig
from ..evaluation import evaluate_splits
from ..fast_images import FastImageProcessor
from ..image_checks import check_eval_images
from ..methods import METHODS, method_of
from ..output_folder import OutputFolder
from ..training.run_folder import check_run_folder, resolve_resume_checkpoint
from ..training.run_manifest import rows_fingerprint
from .script_args import (
    DataArguments,
    FinetuneArguments,
    ModelArguments,
    default_model,
    flag_value,
    load_train_and_eval_splits,
    parse_with_config,
    run_label,
    train_data_source,
    write_results,
)
from .sources import WORLD, class_names_for

logger = logging.getLogger(__name__)

VANILLA_ROW = "vanilla FT (beta 0)"


def config_in_force(argv: list[str], default_config: str | Path | None) -> str | None:
    """The YAML whose values the flags override: ``--config FILE``, else the world's config on the world, else none.

    The world's config holds the embedded world's data, splits and tuned knobs; on another dataset (``--dataset_name``)
    the `CfftConfig` defaults (the paper's setting) apply instead.
    """
    if flag_value(argv, "--config") is not None:
        return flag_value(argv, "--config")
    if default_config is None or flag_value(argv, "--dataset_name") not in (None, WORLD):
        return None
    return str(default_config)


def parse_finetune_args(
    argv: list[str], default_config: str | Path | None = None
) -> tuple[ModelArguments, DataArguments, CfftConfig, FinetuneArguments]:
    """CLI flags over the config in force (`config_in_force`)."""
    types = (ModelArguments, DataArguments, CfftConfig, FinetuneArguments)
    default_help = "Default: recipes/configs/world.yaml when --dataset_name is world (the default), else none."
    return parse_with_config(
        types, argv, default_config=config_in_force(argv, default_config), default_config_help=default_help
    )


def vanilla_config(args: CfftConfig, output_dir: str) -> CfftConfig:
    """``args`` as vanilla fine-tuning (`METHODS` ``ft``: beta 0, no masks) with the same data, steps and seed; it
    saves nothing."""
    return dataclasses.replace(
        args,
        **dict(METHODS["ft"].settings),
        method="cfft",
        output_dir=output_dir,
        save_strategy="no",
        push_to_hub=False,
        report_to="none",
        resume_from_checkpoint=None,
        overwrite_output_dir=False,
    )


def finetune(
    argv: list[str], *, default_config: str | Path | None = None, report: Callable[[str], None] | None = None
) -> dict:
    """Run the job of ``argv`` (flags over ``--config`` or ``default_config``); returns the results table's rows.

    ``report`` receives the job's lines for the user (the config in force, the resume, the results table, where the
    model went), from the main process only; the recipes pass ``print``, the default logs them.
    """
    say = report or logger.info
    model_args, data_args, args, run_args = parse_finetune_args(argv, default_config)
    config = config_in_force(argv, default_config)
    if args.process_index == 0:
        say(f"Config: {config} (flags override it)" if config else "Config: none (CfftConfig defaults + flags)")
    model_args.model_name_or_path = default_model(model_args.model_name_or_path, data_args.dataset_name)
    resume = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir, args=args)
    if resume is not None and args.process_index == 0:
        say(f"Resuming from {resume}")
    # Before hours of data loading and CAMs: a file, a read-only folder, another kind of output, the user's own files
    # or a run already writing there are refused; the folder stays locked until this run ends.
    with OutputFolder(
        args.output_dir, "finetune", overwrite=args.overwrite_output_dir, resuming=resume is not None,
        write=args.process_index == 0,
    ):  # fmt: skip
        return _train_and_evaluate(model_args, data_args, args, run_args, resume, say)


def _train_and_evaluate(model_args, data_args, args, run_args, resume, say: Callable[[str], None]) -> dict:
    check_run_folder(args, resume)  # the trainer checks again

    # One process per machine loads (and caches) the dataset first; the others then read its cache instead of
    # writing the same cache files at the same time.
    with args.main_process_first(local=True, desc="loading the dataset"):
        train, splits = load_train_and_eval_splits(data_args, seed=args.seed)
    # An unreadable eval image would otherwise stop the run at its first evaluation, possibly after training.
    splits = check_eval_images(
        splits, data_args.image_column, check=args.image_check, skip=args.skip_corrupt_images,
        skip_hint="--skip_corrupt_images true to leave them out of the accuracy",
    )  # fmt: skip
    class_names = class_names_for(model_args.class_names, train, data_args.label_column)
    source = train_data_source(data_args)
    if resume is not None:  # other rows than the checkpoint's are refused now, before any CAM pass (the trainer again)
        rows = rows_fingerprint(train, data_args.image_column, data_args.label_column) or {}
        check_run_folder(args, resume, data={"source": source, **rows}, say_notes=False)

    image_processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
    # What evaluation preprocesses with; the trainer applies the same switch to the train set.
    eval_processor = FastImageProcessor(image_processor) if args.fast_image_processing else image_processor
    columns = {"image_column": data_args.image_column, "label_column": data_args.label_column}
    # The method's trainer loads what it trains (a classifier; FLYP both towers): `hf_cfft.methods` names it.
    trainer = method_of(args).trainer_class().from_checkpoint(
        model_args.model_name_or_path, args, class_names=class_names, templates=model_args.templates,
        teacher_name_or_path=model_args.teacher_name_or_path, show_progress=args.process_index == 0,
        train_dataset=train, processing_class=image_processor, data_source=source, **columns,
    )  # fmt: skip
    if trainer.skipped_images:
        say(f"Skipped {trainer.skipped_images} unreadable train image(s); training on {len(trainer.train_dataset)}.")
    if args.process_index == 0:
        say(f"Training on {len(trainer.train_dataset)} images with {args.world_size} process(es) on {args.device}.")
    trainer.dataset_name, trainer.ood_splits = data_args.dataset_name, data_args.ood_splits
    if "tensorboard" in args.report_to and trainer.shows_counterfactual_images:
        # pictures of the counterfactuals the student's CAM picks
        CounterfactualImagesCallback.from_dataset(
            train, image_processor, every_n_steps=max(1, int(args.logging_steps) * 10), **columns
        ).attach(trainer)

    results: dict[str, dict[str, float]] = {}
    # Every process scores its share of each split (gathered: all get the same results), in the training precision.
    evaluate_kwargs = dict(
        ood_splits=data_args.ood_splits,
        batch_size=args.per_device_eval_batch_size,
        num_workers=args.dataloader_num_workers,
        distributed=args.world_size > 1,
        autocast_dtype=torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else None),
        show_progress=not args.disable_tqdm,
        **columns,
    )
    if data_args.evaluate_zero_shot and splits:
        # The starting point: CLIP's zero-shot classifier, or the saved classifier fine-tuning resumes from (LP-FT);
        # with --teacher_name_or_path the teacher is reported too.
        start = "before fine-tuning" if trainer.card_origin else "zero-shot"
        results[start] = evaluate_splits(trainer.classifier(), splits, eval_processor, **evaluate_kwargs)
        if model_args.teacher_name_or_path:
            results["teacher"] = evaluate_splits(trainer.teacher, splits, eval_processor, **evaluate_kwargs)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.log_metrics("train", train_result.metrics)
    if splits:
        try:
            results["fine-tuned"] = evaluate_splits(trainer.classifier(), splits, eval_processor, **evaluate_kwargs)
        except Exception:  # e.g. an image broken past its header: the trained model is kept all the same
            trainer.save_model(args.output_dir)
            if trainer.is_world_process_zero():
                say(f"The evaluation failed; the fine-tuned model was saved to {args.output_dir} first.")
            raise
        trainer.eval_results = results
        if trainer.is_world_process_zero():
            write_results(results, args.output_dir, data_args, stem="eval_results", row_names=_row_names(args))
    # After evaluation, so the model card (and a --push_to_hub upload) carries the results table.
    trainer.save_model(args.output_dir)
    if run_args.compare_with_vanilla:
        results = _with_vanilla_row(
            results, model_args, args, class_names, train, image_processor, splits,
            {**evaluate_kwargs, "image_processor": eval_processor}, say,
        )  # fmt: skip
        if trainer.is_world_process_zero():
            trainer.eval_results = results
            trainer.create_model_card()  # the card's table gains the vanilla row
    if splits and trainer.is_world_process_zero():
        table = write_results(results, args.output_dir, data_args, stem="eval_results", row_names=_row_names(args))
        say("\nTop-1 accuracy (%)\n" + table + _ood_summary(results, args))
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        say(f"Saved the fine-tuned model, its model card and eval_results.json/.md to {args.output_dir}")
    return results


def _with_vanilla_row(results, model_args, args, class_names, train, image_processor, splits, evaluate_kwargs, say):
    """``results`` with vanilla fine-tuning's row before the "fine-tuned" row: trained here from the same checkpoint,
    data, steps and seed, by the code of compare's ``ft`` cell (`METHODS` ``ft``), evaluated, not saved.

    ``evaluate_kwargs``: `evaluate_splits`' arguments, with ``image_processor`` (the evaluation one).
    """
    columns = {"image_column": evaluate_kwargs["image_column"], "label_column": evaluate_kwargs["label_column"]}
    with tempfile.TemporaryDirectory(prefix="vanilla_ft_") as scratch:
        vanilla = METHODS["ft"].trainer_class().from_checkpoint(
            model_args.model_name_or_path, vanilla_config(args, scratch), class_names=class_names,
            templates=model_args.templates, show_progress=False, train_dataset=train,
            processing_class=image_processor, **columns,
        )  # fmt: skip
        if args.process_index == 0:
            say("Training vanilla fine-tuning (beta 0, no masks; same data, steps, seed) for comparison.")
        vanilla.train()
        if not splits:
            return results
        row = evaluate_splits(vanilla.classifier(), splits, **evaluate_kwargs)  # every process: its shard
    ordered = {key: value for key, value in results.items() if key != "fine-tuned"}
    ordered[VANILLA_ROW] = row
    ordered["fine-tuned"] = results["fine-tuned"]
    return ordered


def _row_names(args: CfftConfig) -> dict[str, str]:
    return {"fine-tuned": run_label(args)}  # the table names this run's method and beta, next to "vanilla FT"


def _ood_summary(results: dict, args: CfftConfig) -> str:
    """One line: OOD average of each row against the zero-shot model's (what fine-tuning kept or lost)."""
    base = results.get("zero-shot", {}).get("ood_avg")
    if base is None or VANILLA_ROW not in results:
        return ""
    parts = [f"zero-shot {base:.1f}"]
    this_run = f"this run ({args.mask_kind}-mask, beta {args.distill_weight:g})"
    for name, label in ((VANILLA_ROW, "vanilla FT"), ("fine-tuned", this_run)):
        value = results[name]["ood_avg"]
        parts.append(f"{label} {value:.1f} ({value - base:+.1f})")
    return "\nOOD average against zero-shot: " + ", ".join(parts)
