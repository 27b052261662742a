"""WiSE-FT: interpolate a zero-shot and a fine-tuned classifier's weights for several alphas; save and/or evaluate.

    # the world: the zero-shot end is the shipped tiny CLIP's zero-shot classifier (world templates)
    python recipes/wise_ft.py --fine_tuned_model outputs/world_vanilla_ft --output_dir outputs/world_wise_ft \
        --config recipes/configs/world.yaml                       # its dataset, eval and OOD splits
    # any data: zero-shot classifier folder (recipes/zero_shot.py) or CLIP checkpoint + --templates
    python recipes/wise_ft.py --zero_shot_model outputs/zs --fine_tuned_model outputs/ft --alphas 0.5 \
        --save_models --output_dir outputs/wise_ft

Each alpha is saved to <output_dir>/alpha_0.50/ (safetensors, image processor, model_origin.json with alpha and both
endpoints, and a model card) with --save_models, and evaluated
on --eval_splits; accuracies go to <output_dir>/results.json and results.md (rewritten after every alpha).
The dataset flags are recipes/finetune.py's; --config reads them (and templates, seed) from a finetune YAML.
"""

from __future__ import annotations

import hf_cfft_help  # noqa: F401  (first: --help from its cache, before the library loads)

# isort: split
import os
import sys
from dataclasses import dataclass, field

from transformers import AutoImageProcessor

from hf_cfft import load_classifier, load_templates
from hf_cfft.baselines.weight_averaging import class_names, wise_ft
from hf_cfft.cli.script_args import (
    SHARED_CONFIG_KEYS,
    DataArguments,
    PostHocArguments,
    check_dataset_classes,
    default_model,
    evaluate_kwargs,
    load_eval_splits,
    parse_with_config,
    resolve_device,
    run_recipe,
    write_results,
)
from hf_cfft.cli.sources import WORLD
from hf_cfft.evaluation import evaluate_splits
from hf_cfft.output_folder import OutputFolder, refuse_output_inside
from hf_cfft.release.model_card import write_origin_card

DEFAULT_ALPHAS = [round(0.1 * i, 1) for i in range(11)]


@dataclass
class WiseFtArguments(PostHocArguments):
    fine_tuned_model: str | None = field(default=None, metadata={"help": "Saved fine-tuned classifier folder."})
    zero_shot_model: str | None = field(
        default=None,
        metadata={
            "help": "Zero-shot end: a saved classifier folder (recipes/zero_shot.py), or a CLIP checkpoint whose head "
            "is built from the fine-tuned model's class names and --templates. Default on the world: its tiny CLIP."
        },
    )
    templates: str | None = field(
        default=None,
        metadata={
            "help": "Prompt templates for a CLIP-checkpoint zero-shot end; use the ones the fine-tuning started "
            "from. Default: 'world' on the world, else 'simple'."
        },
    )
    alphas: list[float] = field(
        default_factory=lambda: list(DEFAULT_ALPHAS),
        metadata={"help": "Weights of the fine-tuned model: 0 = zero-shot, 1 = fine-tuned."},
    )
    save_models: bool = field(default=False, metadata={"help": "Save every interpolated model to alpha_X.XX/."})


def alpha_dirname(alpha: float) -> str:
    """'alpha_0.50' for 0.5: the folder (and results row) of one interpolation."""
    return f"alpha_{alpha:.2f}"


def main(argv: list[str] | None = None) -> dict:
    args, data_args = parse_with_config(
        (WiseFtArguments, DataArguments), sys.argv[1:] if argv is None else argv, config_keys=SHARED_CONFIG_KEYS
    )
    if args.fine_tuned_model is None or args.output_dir is None:
        raise ValueError("--fine_tuned_model and --output_dir are required")
    if not args.save_models and not data_args.eval_splits:
        raise ValueError("nothing to do: pass --save_models, --eval_splits, or both")
    on_world = data_args.dataset_name == WORLD
    zero_shot_path = default_model(args.zero_shot_model, data_args.dataset_name, flag="--zero_shot_model")
    templates = args.templates or (WORLD if on_world else "simple")
    refuse_output_inside(
        args.output_dir, {"--fine_tuned_model": args.fine_tuned_model, "--zero_shot_model": zero_shot_path}
    )
    with OutputFolder(args.output_dir, "wise_ft"):  # before the models are loaded
        return _interpolate(args, data_args, zero_shot_path, templates)


def _interpolate(args: WiseFtArguments, data_args: DataArguments, zero_shot_path: str, templates: str) -> dict:
    device = resolve_device(args.device)

    fine_tuned = load_classifier(args.fine_tuned_model).to(device).eval()
    names = class_names(fine_tuned)
    zero_shot = load_classifier(
        zero_shot_path, class_names=names, templates=load_templates(templates), show_progress=False
    )
    zero_shot = zero_shot.to(device).eval()
    image_processor = AutoImageProcessor.from_pretrained(args.fine_tuned_model)
    splits = load_eval_splits(data_args, args.seed)
    check_dataset_classes(splits, names, data_args.label_column, args.fine_tuned_model)

    alphas = {alpha_dirname(float(a)): float(a) for a in args.alphas}  # de-duplicated, in the given order
    if len(set(alphas.values())) != len(set(map(float, args.alphas))):
        raise ValueError(f"--alphas {args.alphas} has values that round to the same folder; use 2 decimals")
    results: dict[str, dict[str, float]] = {}
    saved: list[str] = []
    for name, alpha in alphas.items():
        model = wise_ft(zero_shot, fine_tuned, alpha)
        if args.save_models:
            folder = os.path.join(args.output_dir, name)
            model.save_pretrained(folder)
            image_processor.save_pretrained(folder)
            origin = {
                "kind": "wise_ft",
                "alpha": alpha,
                "zero_shot": zero_shot_path,
                "fine_tuned": args.fine_tuned_model,
            }
            write_origin_card(folder, origin, dataset_name=data_args.dataset_name)
            saved.append(folder)
        if splits:
            kwargs = evaluate_kwargs(data_args, args.per_device_eval_batch_size, device)
            results[name] = evaluate_splits(model, splits, image_processor, **kwargs)
            table = write_results(results, args.output_dir, data_args)
        del model
    if splits:
        print("\nWiSE-FT, top-1 accuracy (%)\n" + table)
        print(f"Wrote {os.path.join(args.output_dir, 'results.json')} and results.md")
    if saved:
        print(f"Saved {len(saved)} WiSE-FT model(s) (alpha, endpoints and card in each): {', '.join(saved)}")
    return results


if __name__ == "__main__":
    run_recipe(main)
