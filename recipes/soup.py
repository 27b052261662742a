"""Model soups: average the weights of several fine-tuned classifiers (uniform, or greedy); save and/or evaluate.

    python recipes/soup.py --models outputs/world_vanilla_ft_seed0 outputs/world_vanilla_ft_seed1 \
        outputs/world_vanilla_ft_seed2 --output_dir outputs/world_soup --save_model \
        --config recipes/configs/world.yaml                       # its dataset, eval and OOD splits
    # greedy soup (Wortsman et al., 2022): ingredients by held-out accuracy, each kept only if the soup improves
    python recipes/soup.py --models ft1 ft2 ft3 --greedy --held_out_split validation --dataset_name DIR \
        --eval_splits test sketch --ood_splits sketch --output_dir soup --save_model

The ingredients must be fine-tunings of the same CLIP with the same classes (e.g. different seeds or learning
rates). The soup (safetensors, the first model's image processor, a card naming the members) goes to --output_dir
(--save_model false: evaluate only); with
--eval_splits every ingredient and the soup are evaluated into <output_dir>/results.json and results.md. With
--greedy, --held_out_split (an ID validation split, neither evaluated nor OOD) picks the ingredients; the choice is
written to <output_dir>/greedy_soup.json.
"""

from __future__ import annotations

import hf_cfft_help  # noqa: F401  (first: --help from its cache, before the library loads)

# isort: split
import json
import os
import sys
from dataclasses import dataclass, field, replace

from transformers import AutoImageProcessor

from hf_cfft import load_classifier
from hf_cfft.baselines.greedy_soup import check_held_out_split, greedy_soup
from hf_cfft.baselines.weight_averaging import class_names, uniform_soup
from hf_cfft.cli.script_args import (
    SHARED_CONFIG_KEYS,
    DataArguments,
    PostHocArguments,
    check_dataset_classes,
    evaluate_kwargs,
    load_eval_splits,
    parse_with_config,
    resolve_device,
    run_recipe,
    write_results,
)
from hf_cfft.evaluation import evaluate_splits
from hf_cfft.output_folder import OutputFolder, refuse_output_inside
from hf_cfft.release.model_card import write_origin_card

SOUP_ROW = "uniform soup"
GREEDY_ROW = "greedy soup"


@dataclass
class SoupArguments(PostHocArguments):
    models: list[str] = field(default_factory=list, metadata={"help": "Saved fine-tuned classifier folders."})
    save_model: bool = field(
        default=True, metadata={"help": "Save the soup (weights, image processor, card) to --output_dir."}
    )
    greedy: bool = field(
        default=False, metadata={"help": "Greedy soup: keep an ingredient only if held-out accuracy does not drop."}
    )
    held_out_split: str | None = field(
        default=None, metadata={"help": "--greedy: the ID validation split that picks the ingredients."}
    )
    evaluate_ingredients: bool = field(default=True, metadata={"help": "Also evaluate every ingredient."})


def main(argv: list[str] | None = None) -> dict:
    args, data_args = parse_with_config(
        (SoupArguments, DataArguments), sys.argv[1:] if argv is None else argv, config_keys=SHARED_CONFIG_KEYS
    )
    if not args.models or args.output_dir is None:
        raise ValueError("--models (one or more classifier folders) and --output_dir are required")
    if not args.save_model and not data_args.eval_splits:
        raise ValueError("nothing to do with --save_model false: pass --eval_splits, or leave --save_model on")
    if args.greedy:
        check_held_out_split(args.held_out_split, data_args.ood_splits, data_args.eval_splits)
    refuse_output_inside(args.output_dir, {f"ingredient {i + 1}": path for i, path in enumerate(args.models)})
    with OutputFolder(args.output_dir, "soup"):  # before the ingredients are loaded
        return _make_soup(args, data_args)


def _make_soup(args: SoupArguments, data_args: DataArguments) -> dict:
    device = resolve_device(args.device)
    # Ingredients stay on the CPU: N models on the accelerator at once is what a soup of large models cannot afford.
    ingredients = [load_classifier(path).eval() for path in args.models]
    image_processor = AutoImageProcessor.from_pretrained(args.models[0])
    if args.greedy:
        held_out = load_eval_splits(replace(data_args, eval_splits=[args.held_out_split], ood_splits=[]), args.seed)
        check_dataset_classes(held_out, class_names(ingredients[0]), data_args.label_column, args.models[0])
        kwargs = evaluate_kwargs(data_args, args.per_device_eval_batch_size, device) | {"ood_splits": ()}

        def held_out_accuracy(model) -> float:
            accuracy = evaluate_splits(model.to(device), held_out, image_processor, **kwargs)[args.held_out_split]
            model.cpu()
            return accuracy

        chosen = greedy_soup(ingredients, held_out_accuracy, names=args.models)
        soup = chosen.model
        record = {"held_out_split": args.held_out_split, "chosen": chosen.chosen, "soup_held_out": chosen.soup_score}
        record |= {"ingredients_held_out": chosen.ingredient_scores, "tried": chosen.tried}
        with open(os.path.join(args.output_dir, "greedy_soup.json"), "w") as f:
            json.dump(record, f, indent=2)
        split = args.held_out_split
        for path, score in chosen.ingredient_scores.items():
            print(f"held-out {split} accuracy of {path}: {score:.2f} %")
        for path, score, kept in chosen.tried:
            print(f"  soup with {path}: {score:.2f} % -> {'kept' if kept else 'left out'}")
        print(f"Greedy soup of {len(chosen.chosen)} / {len(ingredients)}: {', '.join(chosen.chosen)}")
    else:
        soup = uniform_soup(ingredients, names=args.models)
    members = chosen.chosen if args.greedy else list(args.models)
    if args.save_model:
        soup.save_pretrained(args.output_dir)
        image_processor.save_pretrained(args.output_dir)
        write_origin_card(args.output_dir, {"kind": "soup", "members": members})

    splits = load_eval_splits(data_args, args.seed)
    results: dict[str, dict[str, float]] = {}
    if splits:
        check_dataset_classes(splits, class_names(soup), data_args.label_column, args.models[0])
        kwargs = evaluate_kwargs(data_args, args.per_device_eval_batch_size, device)
        if args.evaluate_ingredients:
            for path, model in zip(args.models, ingredients):
                results[path] = evaluate_splits(model.to(device), splits, image_processor, **kwargs)
                model.cpu()
        row = GREEDY_ROW if args.greedy else SOUP_ROW
        results[row] = evaluate_splits(soup.to(device), splits, image_processor, **kwargs)
        print(f"\n{row.capitalize()}, top-1 accuracy (%)\n" + write_results(results, args.output_dir, data_args))
        print(f"Wrote {os.path.join(args.output_dir, 'results.json')} and results.md")
    if args.save_model:
        kind = "greedy" if args.greedy else "uniform"
        print(f"Saved the {kind} soup of {len(members)} models (weights, image processor, card) to {args.output_dir}")
    return results


if __name__ == "__main__":
    run_recipe(main)
