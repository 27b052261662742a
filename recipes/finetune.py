"""Fine-tune a CLIP image encoder with counterfactual feature distillation, then evaluate it ID and OOD.

    accelerate launch recipes/finetune.py                                  # the embedded world (offline, CPU)
    accelerate launch recipes/finetune.py --config recipes/configs/imagenet_vit_b32.yaml
    python recipes/finetune.py --config X.yaml --learning_rate 1e-5        # CLI flags override the YAML

Every CfftConfig / TrainingArguments field is a flag; see `--help`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoImageProcessor

from hf_cfft import (
    CfftConfig,
    CfftTrainer,
    is_cfft_checkpoint,
    load_classifier,
    load_templates,
)
from hf_cfft.callbacks import CounterfactualImagesCallback
from hf_cfft.cli.script_args import (
    DataArguments,
    default_model,
    load_train_and_eval_splits,
    parse_with_config,
    write_results,
)
from hf_cfft.cli.sources import class_names_for
from hf_cfft.evaluation import evaluate_splits
from hf_cfft.fast_images import FastImageProcessor
from hf_cfft.release.checkpoints import resolve_resume_checkpoint

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "world.yaml"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "CLIP, MetaCLIP 2, SigLIP or fixed-resolution SigLIP 2 checkpoint (Hub id or folder; its zero-shot"
            " head is built on the fly) or a saved hf_cfft classifier folder. Default: the tiny CLIP shipped with "
            "hf_cfft for the embedded world."
        },
    )
    class_names: str | None = field(
        default=None,
        metadata={"help": "'imagenet', a text file with one class name per line, or empty: the dataset's ClassLabel."},
    )
    templates: str = field(
        default="simple",
        metadata={"help": "Prompt templates: 'openai_imagenet', 'simple', 'world', or a text file, one per line."},
    )
    teacher_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Distil from this saved classifier (e.g. a WiSE-FT model) instead of the pre-trained starting "
            "point. It must have the same classes."
        },
    )


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, CfftConfig]:
    """CLI flags over a YAML file (--config; with no flags at all, the embedded-world config)."""
    return parse_with_config((ModelArguments, DataArguments, CfftConfig), argv, default_config=str(DEFAULT_CONFIG))


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, args = parse_args(sys.argv[1:] if argv is None else argv)
    model_args.model_name_or_path = default_model(model_args.model_name_or_path, data_args.dataset_name)

    train, splits = load_train_and_eval_splits(data_args, seed=args.seed)
    class_names = class_names_for(model_args.class_names, train, data_args.label_column)

    model = load_classifier(
        model_args.model_name_or_path,
        class_names=class_names,
        templates=load_templates(model_args.templates),
        show_progress=args.process_index == 0,
    )
    image_processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
    # What evaluation preprocesses with; the trainer applies the same switch to the train set.
    eval_processor = FastImageProcessor(image_processor) if args.fast_image_processing else image_processor
    columns = {"image_column": data_args.image_column, "label_column": data_args.label_column}
    teacher = None
    if model_args.teacher_name_or_path:
        teacher = load_classifier(model_args.teacher_name_or_path, class_names=class_names)
    resume = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    trainer = CfftTrainer(
        model=model, args=args, teacher=teacher, train_dataset=train, processing_class=image_processor, **columns
    )
    if trainer.skipped_images:
        print(f"Skipped {trainer.skipped_images} unreadable train image(s); training on {len(trainer.train_dataset)}.")
    if args.process_index == 0:
        print(f"Training on {len(trainer.train_dataset)} images with {args.world_size} process(es) on {args.device}.")
    trainer.base_model, trainer.dataset_name = model_args.model_name_or_path, data_args.dataset_name
    trainer.ood_splits = data_args.ood_splits
    if "tensorboard" in args.report_to:  # pictures of the counterfactuals the student's CAM picks
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
        start = "before fine-tuning" if is_cfft_checkpoint(model_args.model_name_or_path) else "zero-shot"
        results[start] = evaluate_splits(trainer.model, splits, eval_processor, **evaluate_kwargs)
        if model_args.teacher_name_or_path:
            results["teacher"] = evaluate_splits(trainer.teacher, splits, eval_processor, **evaluate_kwargs)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.log_metrics("train", train_result.metrics)
    if splits:
        results["fine-tuned"] = evaluate_splits(trainer.model, splits, eval_processor, **evaluate_kwargs)
        trainer.eval_results = results
        if trainer.is_world_process_zero():
            print("\nTop-1 accuracy (%)\n" + write_results(results, args.output_dir, data_args, stem="eval_results"))
    # After evaluation, so the model card (and a --push_to_hub upload) carries the results table.
    trainer.save_model(args.output_dir)
    trainer.accelerator.wait_for_everyone()
    return results


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
