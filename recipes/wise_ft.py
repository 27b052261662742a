"""WiSE-FT: interpolate a zero-shot and a fine-tuned classifier's weights for several alphas; save and/or evaluate.

    # the world: the zero-shot end is the shipped tiny CLIP's zero-shot classifier (world templates)
    python recipes/wise_ft.py --fine_tuned_model outputs/world_vanilla_ft --output_dir outputs/world_wise_ft \
        --config recipes/configs/world.yaml                       # its dataset, eval and OOD splits
    # any data: zero-shot classifier folder (recipes/zero_shot.py) or CLIP checkpoint + --templates
    python recipes/wise_ft.py --zero_shot_model outputs/zs --fine_tuned_model outputs/ft --alphas 0.5 \
        --save_models --output_dir outputs/wise_ft

Each alpha is saved to <output_dir>/alpha_0.50/ (safetensors + image processor) with --save_models, and evaluated
on --eval_splits; accuracies go to <output_dir>/results.json and results.md (rewritten after every alpha).
The dataset flags are recipes/finetune.py's; --config reads them (and templates, seed) from a finetune YAML.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml
from transformers import AutoImageProcessor, HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling recipe owns the shared dataset flags
from finetune import DataArguments, _templates  # noqa: E402

from hf_cfft import load_classifier  # noqa: E402
from hf_cfft.evaluation import evaluate_splits, results_table  # noqa: E402
from hf_cfft.sources import WORLD, class_names_of, load_image_splits  # noqa: E402
from hf_cfft.wise_ft import class_names, wise_ft  # noqa: E402

DEFAULT_ALPHAS = [round(0.1 * i, 1) for i in range(11)]
# Keys a finetune YAML may lend to these recipes (when they have such a flag); its output_dir and training knobs are
# ignored on purpose, so --config never sends results into the fine-tuning run's folder.
_SHARED_KEYS = {f.name for f in fields(DataArguments)} | {
    "model_name_or_path",
    "class_names",
    "templates",
    "seed",
    "per_device_eval_batch_size",
}


@dataclass
class WiseFtArguments:
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
    output_dir: str | None = field(default=None, metadata={"help": "Where results (and models) are written."})
    save_models: bool = field(default=False, metadata={"help": "Save every interpolated model to alpha_X.XX/."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size."})
    seed: int = field(default=0, metadata={"help": "Seed of the embedded world's splits (as in finetune)."})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ...; default: cuda when available."})


def parse_with_config(
    dataclass_types: tuple, argv: list[str], extra_keys: frozenset[str] | set[str] = frozenset()
) -> tuple:
    """CLI flags over the shared keys (dataset, splits, model, templates, seed, ``extra_keys``) of a finetune YAML."""
    parser = HfArgumentParser(dataclass_types)
    if "--config" in argv:
        at = argv.index("--config")
        config_file, argv = argv[at + 1], argv[:at] + argv[at + 2 :]
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file {config_file!r} does not exist")
        with open(config_file) as f:
            config = yaml.safe_load(f) or {}
        known = {f.name for cls in dataclass_types for f in fields(cls)}
        parser.set_defaults(**{k: v for k, v in config.items() if k in _SHARED_KEYS | extra_keys and k in known})
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def load_eval_splits(data_args: DataArguments, seed: int) -> dict:
    """The --eval_splits as datasets (empty dict when none), truncated to --max_eval_samples."""
    if not data_args.eval_splits:
        return {}
    splits = load_image_splits(
        data_args.dataset_name,
        data_args.eval_splits,
        dataset_config=data_args.dataset_config,
        data_dir=data_args.data_dir,
        world_seed=seed,
    )
    if data_args.max_eval_samples:
        splits = {k: v.select(range(min(data_args.max_eval_samples, len(v)))) for k, v in splits.items()}
    return splits


def check_dataset_classes(splits: dict, names: list[str], label_column: str, model_name: str) -> None:
    """Refuse a dataset whose ClassLabel has another number of classes than the model; warn when the names differ.

    Names may legitimately differ in spelling only (imagenet-1k's "tench, Tinca tinca" vs CLIP's "tench"), so a
    name mismatch is reported rather than refused.
    """
    for split, dataset in splits.items():
        try:
            dataset_names = class_names_of(dataset, label_column)
        except ValueError:
            continue  # integer labels: nothing to compare; the user vouches for the order
        if len(dataset_names) != len(names):
            raise ValueError(
                f"split {split!r} has {len(dataset_names)} classes ({', '.join(dataset_names[:5])}, ...) but "
                f"{model_name} classifies {len(names)} ({', '.join(names[:5])}, ...); evaluate on the dataset the "
                "models were built for"
            )
        if dataset_names != names:
            differ = [(a, b) for a, b in zip(dataset_names, names) if a != b]
            print(
                f"Warning: {len(differ)} class names of split {split!r} differ from {model_name}'s, e.g. "
                f"{differ[0][0]!r} vs {differ[0][1]!r}; scores assume the same class order"
            )


def write_results(results: dict, output_dir: str, data_args: DataArguments) -> str:
    """results.json and results.md in ``output_dir``; returns the markdown table."""
    columns = [*data_args.eval_splits] + (["ood_avg"] if data_args.ood_splits else [])
    table = results_table(results, columns)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write("Top-1 accuracy (%)\n\n" + table + "\n")
    return table


def evaluate_kwargs(data_args: DataArguments, batch_size: int, device: torch.device) -> dict:
    return dict(
        ood_splits=data_args.ood_splits,
        batch_size=batch_size,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        device=device,
    )


def resolve_device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def alpha_dirname(alpha: float) -> str:
    """'alpha_0.50' for 0.5: the folder (and results row) of one interpolation."""
    return f"alpha_{alpha:.2f}"


def main(argv: list[str] | None = None) -> dict:
    args, data_args = parse_with_config((WiseFtArguments, DataArguments), sys.argv[1:] if argv is None else argv)
    if args.fine_tuned_model is None or args.output_dir is None:
        raise ValueError("--fine_tuned_model and --output_dir are required")
    if not args.save_models and not data_args.eval_splits:
        raise ValueError("nothing to do: pass --save_models, --eval_splits, or both")
    on_world = data_args.dataset_name == WORLD
    zero_shot_path = args.zero_shot_model
    if zero_shot_path is None:
        if not on_world:
            raise ValueError("--zero_shot_model is required outside the embedded world")
        from hf_cfft.world import world_clip_path

        zero_shot_path = str(world_clip_path())
    templates = args.templates or (WORLD if on_world else "simple")
    device = resolve_device(args.device)

    fine_tuned = load_classifier(args.fine_tuned_model).to(device).eval()
    names = class_names(fine_tuned)
    zero_shot = load_classifier(
        zero_shot_path, class_names=names, templates=_templates(templates), show_progress=False
    )
    zero_shot = zero_shot.to(device).eval()
    image_processor = AutoImageProcessor.from_pretrained(args.fine_tuned_model)
    splits = load_eval_splits(data_args, args.seed)
    check_dataset_classes(splits, names, data_args.label_column, args.fine_tuned_model)
    os.makedirs(args.output_dir, exist_ok=True)

    alphas = {alpha_dirname(float(a)): float(a) for a in args.alphas}  # de-duplicated, in the given order
    if len(set(alphas.values())) != len(set(map(float, args.alphas))):
        raise ValueError(f"--alphas {args.alphas} has values that round to the same folder; use 2 decimals")
    results: dict[str, dict[str, float]] = {}
    for name, alpha in alphas.items():
        model = wise_ft(zero_shot, fine_tuned, alpha)
        if args.save_models:
            model.save_pretrained(os.path.join(args.output_dir, name))
            image_processor.save_pretrained(os.path.join(args.output_dir, name))
        if splits:
            kwargs = evaluate_kwargs(data_args, args.per_device_eval_batch_size, device)
            results[name] = evaluate_splits(model, splits, image_processor, **kwargs)
            table = write_results(results, args.output_dir, data_args)
        del model
    if splits:
        print("\nWiSE-FT, top-1 accuracy (%)\n" + table)
    return results


if __name__ == "__main__":
    main()
