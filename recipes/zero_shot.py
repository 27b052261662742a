"""Build the zero-shot classifier of a CLIP checkpoint (head = class-name prompts), save it, optionally evaluate it.

    python recipes/zero_shot.py --output_dir outputs/world_zero_shot --config recipes/configs/world.yaml
    python recipes/zero_shot.py --model_name_or_path openai/clip-vit-base-patch32 --class_names imagenet \
        --templates openai_imagenet --output_dir outputs/imagenet_zero_shot

The folder holds safetensors weights and the checkpoint's image processor, so it loads with
``AutoModelForImageClassification.from_pretrained`` and serves as the alpha = 0 end of recipes/wise_ft.py. Class
names come from --class_names or the dataset's ClassLabel (first eval split, else the train split).
"""

from __future__ import annotations

import hf_cfft_help  # noqa: F401  (first: --help from its cache, before the library loads)

# isort: split
import sys
from dataclasses import dataclass, field

from transformers import AutoImageProcessor

from hf_cfft import load_class_names, load_classifier, load_templates
from hf_cfft.cli.script_args import (
    SHARED_CONFIG_KEYS,
    DataArguments,
    PostHocArguments,
    default_model,
    evaluate_kwargs,
    load_eval_splits,
    parse_with_config,
    resolve_device,
    run_recipe,
    write_results,
)
from hf_cfft.cli.sources import WORLD, class_names_of, load_image_splits
from hf_cfft.evaluation import evaluate_splits
from hf_cfft.output_folder import OutputFolder
from hf_cfft.release.model_card import write_origin_card

ZERO_SHOT_ROW = "zero-shot"


@dataclass
class ZeroShotArguments(PostHocArguments):
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "CLIP checkpoint (Hub id or folder). Default on the world: its tiny CLIP."}
    )
    class_names: str | None = field(
        default=None,
        metadata={"help": "'imagenet', a text file with one class name per line, or empty: the dataset's ClassLabel."},
    )
    templates: str | None = field(
        default=None,
        metadata={"help": "'openai_imagenet', 'simple', 'world' or a text file. Default: 'world' on the world."},
    )


def main(argv: list[str] | None = None) -> dict:
    args, data_args = parse_with_config(
        (ZeroShotArguments, DataArguments), sys.argv[1:] if argv is None else argv, config_keys=SHARED_CONFIG_KEYS
    )
    if args.output_dir is None:
        raise ValueError("--output_dir is required")
    with OutputFolder(args.output_dir, "zero_shot"):  # before any work; e.g. a fine-tuned model's folder is refused
        return _build_and_evaluate(args, data_args)


def _build_and_evaluate(args: ZeroShotArguments, data_args: DataArguments) -> dict:
    on_world = data_args.dataset_name == WORLD
    args.model_name_or_path = default_model(args.model_name_or_path, data_args.dataset_name)
    splits = load_eval_splits(data_args, args.seed)
    if args.class_names:
        names = load_class_names(args.class_names)
    else:
        source = next(iter(splits.values()), None)
        if source is None:
            source = load_image_splits(
                data_args.dataset_name, [data_args.train_split], dataset_config=data_args.dataset_config,
                data_dir=data_args.data_dir, world_seed=args.seed,
                world_object_contrast=data_args.world_object_contrast,
            )[data_args.train_split]  # fmt: skip
        names = class_names_of(source, data_args.label_column)

    templates = load_templates(args.templates or (WORLD if on_world else "simple"))
    model = load_classifier(args.model_name_or_path, class_names=names, templates=templates).eval()
    image_processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    model.save_pretrained(args.output_dir)
    image_processor.save_pretrained(args.output_dir)
    origin = {"kind": "zero_shot", "templates": len(templates)}
    write_origin_card(args.output_dir, origin, base_model=args.model_name_or_path, dataset_name=data_args.dataset_name)
    print(
        f"Saved the zero-shot classifier ({len(names)} classes, {len(templates)} templates) and its card to "
        f"{args.output_dir}"
    )

    results: dict[str, dict[str, float]] = {}
    if splits:
        device = resolve_device(args.device)
        kwargs = evaluate_kwargs(data_args, args.per_device_eval_batch_size, device)
        results[ZERO_SHOT_ROW] = evaluate_splits(model.to(device), splits, image_processor, **kwargs)
        print("\nZero-shot, top-1 accuracy (%)\n" + write_results(results, args.output_dir, data_args))
    return results


if __name__ == "__main__":
    run_recipe(main)
