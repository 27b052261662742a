"""Evaluate one or several classifiers in distribution and under distribution shift; plot effective robustness.

    python recipes/evaluate_ood.py                                          # the embedded world, tiny world CLIP
    python recipes/evaluate_ood.py --model_name_or_path openai/clip-vit-base-patch32 outputs/imagenet_cfft \\
        --benchmark imagenet --data_root /data/shifts --output_dir outputs/ood
    python recipes/evaluate_ood.py --model_name_or_path outputs/mine --dataset_name /data/my_images \\
        --id_split test --ood_splits test_sketch test_night

    accelerate launch --num_processes 8 recipes/evaluate_ood.py --model_name_or_path ... --bf16   # all GPUs

Writes results.json, results.md and effective_robustness.png to --output_dir. See docs/ood_evaluation.md. Under
`accelerate launch` every process scores its share of each set; the first process writes the report.
"""

from __future__ import annotations

import hf_cfft_help  # noqa: F401  (first: --help from its cache, before the library loads)

# isort: split
import os
import sys
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from transformers import AutoImageProcessor, HfArgumentParser

from hf_cfft import is_cfft_checkpoint, load_class_names, load_classifier, load_templates
from hf_cfft.cli.script_args import check_batch_size, check_split_names, default_model, run_recipe
from hf_cfft.cli.sources import WORLD, class_names_for, load_image_splits
from hf_cfft.dataset_checks import check_max_samples
from hf_cfft.evaluation import (
    RunResult,
    dataset_eval_sets,
    evaluate_splits,
    imagenet_eval_sets,
    subsample,
    write_robustness_report,
)
from hf_cfft.evaluation.imagenet_shifts import ID_SHIFT, SHIFTS, find_sources
from hf_cfft.image_checks import check_eval_images
from hf_cfft.output_folder import OutputFolder


@dataclass
class EvalArguments:
    model_name_or_path: list[str] = field(
        default_factory=list,
        metadata={
            "help": "One or more CLIP checkpoints (scored zero-shot) or saved hf_cfft classifiers; several give one "
            "plot. Default for the world: the tiny CLIP shipped with hf_cfft."
        },
    )
    run_names: list[str] = field(default_factory=list, metadata={"help": "Names of the runs (default: folder names)."})
    class_names: str | None = field(
        default=None, metadata={"help": "For CLIP checkpoints: 'imagenet' or a text file; default per benchmark."}
    )
    templates: str | None = field(
        default=None, metadata={"help": "'openai_imagenet', 'simple', 'world' or a text file; default per benchmark."}
    )
    benchmark: str | None = field(default=None, metadata={"help": "'imagenet': ImageNet val + its five shifts."})
    data_root: str | None = field(default=None, metadata={"help": "Folder holding the sets in their layouts."})
    imagenet_dir: str | None = field(default=None, metadata={"help": "ImageNet val: folder or Hub id[:split]."})
    imagenet_v2_dir: str | None = field(default=None, metadata={"help": "ImageNet-V2 matched-frequency."})
    imagenet_r_dir: str | None = field(default=None, metadata={"help": "ImageNet-R: folder or Hub id[:split]."})
    imagenet_sketch_dir: str | None = field(default=None, metadata={"help": "ImageNet-Sketch."})
    imagenet_a_dir: str | None = field(default=None, metadata={"help": "ImageNet-A: folder or Hub id[:split]."})
    objectnet_dir: str | None = field(default=None, metadata={"help": "ObjectNet (evaluation only, by licence)."})
    shifts: list[str] = field(default_factory=lambda: list(SHIFTS), metadata={"help": "ImageNet sets to score."})
    label_kind: str = field(
        default="auto", metadata={"help": "Hub label numbering: auto, imagenet, local, wnid, name (ObjectNet)."}
    )
    allow_partial: bool = field(
        default=False, metadata={"help": "Score sets whose image count differs from the published size."}
    )
    unrestricted: bool = field(
        default=False, metadata={"help": "Argmax over all 1000 classes for ImageNet-R/-A/ObjectNet."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "'world', an ImageFolder dir or a Hub id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    id_split: str | None = field(default=None, metadata={"help": "In-distribution split of --dataset_name."})
    ood_splits: list[str] = field(default_factory=list, metadata={"help": "OOD splits of --dataset_name."})
    image_column: str = field(default="image", metadata={"help": "Image column of --dataset_name."})
    label_column: str = field(default="label", metadata={"help": "Label column of --dataset_name."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "At most this many images per set."})
    batch_size: int = field(default=64, metadata={"help": "Images per forward pass."})
    num_workers: int = field(
        default_factory=lambda: min(4, os.cpu_count() or 1), metadata={"help": "DataLoader workers per process."}
    )
    device: str | None = field(
        default=None, metadata={"help": "Default: this process's accelerator device (cuda when available), else cpu."}
    )
    bf16: bool = field(default=False, metadata={"help": "Score under bf16 autocast (the precision of bf16 runs)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the embedded world's splits."})
    world_object_contrast: float | None = field(
        default=None,
        metadata={"help": "The embedded world only: the object's contrast (0.35: the adaptation world)."},
    )
    output_dir: str = field(default="outputs/ood_eval", metadata={"help": "Where the results are written."})

    def __post_init__(self):
        check_batch_size("--batch_size", self.batch_size)
        check_max_samples("--max_eval_samples", self.max_eval_samples)
        check_split_names(self.ood_splits, "--ood_splits", id_split=self.id_split)


def build_sets(args: EvalArguments):
    """-> (eval sets, ID name, OOD names, class names, default templates, benchmark label)."""
    if args.benchmark is not None:
        if args.benchmark != "imagenet":
            raise ValueError(f"--benchmark must be 'imagenet', got {args.benchmark!r}")
        overrides = {key: getattr(args, f"{key}_dir") for key in SHIFTS}
        sources = find_sources(args.data_root, overrides, args.shifts)
        missing = [key for key in args.shifts if key not in sources]
        if not sources:
            raise FileNotFoundError(
                f"no ImageNet set found: pass --data_root holding {', '.join(SHIFTS[k].layout for k in args.shifts)} "
                "or per-set --<set>_dir folders / Hub ids"
            )
        if missing:
            print(f"not scored (no source found): {', '.join(SHIFTS[k].title for k in missing)}")
        sets = imagenet_eval_sets(sources, allow_partial=args.allow_partial, label_kind=args.label_kind)
        id_name = ID_SHIFT if ID_SHIFT in sources else None
        names = load_class_names(args.class_names or "imagenet")
        return sets, id_name, [s.name for s in sets if s.name != ID_SHIFT], names, "openai_imagenet", "ImageNet"

    dataset_name = args.dataset_name or WORLD
    id_split = args.id_split or ("test_id" if dataset_name == WORLD else None)
    ood_splits = args.ood_splits
    if dataset_name == WORLD and not ood_splits:
        from hf_cfft.world import OOD_SPLITS

        ood_splits = list(OOD_SPLITS)
    if id_split is None:
        raise ValueError("--id_split is required with --dataset_name (and --ood_splits for the shifted splits)")
    check_split_names(ood_splits, "--ood_splits", id_split=id_split)  # the world's default ID split too
    splits = load_image_splits(
        dataset_name, [id_split, *ood_splits], dataset_config=args.dataset_config, world_seed=args.world_seed,
        world_object_contrast=args.world_object_contrast,
    )  # fmt: skip
    names = class_names_for(args.class_names, splits[id_split], args.label_column)
    sets = dataset_eval_sets(splits, image_column=args.image_column, label_column=args.label_column)
    templates = WORLD if dataset_name == WORLD else "simple"
    return sets, id_split, list(ood_splits), names, templates, os.path.basename(os.path.normpath(dataset_name))


def _run_names(paths: list[str], given: list[str]) -> list[str]:
    if given:
        if len(given) != len(paths):
            raise ValueError(f"--run_names has {len(given)} names for {len(paths)} models")
        return given
    names = [os.path.basename(os.path.normpath(path)) or path for path in paths]
    return [f"{name}-{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(
        args=sys.argv[1:] if argv is None else argv, look_for_args_file=False
    )
    state = PartialState(cpu=args.device == "cpu")
    # Before any set is read: a file, a read-only folder or another kind of output is refused; locked until the end.
    with OutputFolder(args.output_dir, "ood_eval", write=state.is_main_process):
        return _evaluate(args, state)


def _evaluate(args: EvalArguments, state: PartialState) -> dict:
    sets, id_name, ood_names, class_names, default_templates, benchmark = build_sets(args)
    if not args.model_name_or_path and args.benchmark is None and (args.dataset_name or WORLD) == WORLD:
        args.model_name_or_path = [default_model(None, WORLD)]
    if not args.model_name_or_path:
        raise ValueError("--model_name_or_path is required (one or more CLIP checkpoints or saved classifiers)")
    for s in sets:
        s.dataset = subsample(s.dataset, args.max_eval_samples)
    checked = check_eval_images({s.name: s.dataset for s in sets})  # refused by name before any model is scored
    for s in sets:
        s.dataset = checked[s.name]
    device = args.device or state.device
    templates = load_templates(args.templates or default_templates)

    runs = []
    for name, path in zip(_run_names(args.model_name_or_path, args.run_names), args.model_name_or_path):
        model = load_classifier(path, class_names=class_names, templates=templates).to(device)
        image_processor = AutoImageProcessor.from_pretrained(path)
        accuracy = evaluate_splits(
            model,
            sets,
            image_processor,
            restrict=not args.unrestricted,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=device,
            distributed=state.num_processes > 1,
            autocast_dtype=torch.bfloat16 if args.bf16 else None,
            show_progress=not args.disable_tqdm,
        )
        runs.append(RunResult(name, path, zero_shot=not is_cfft_checkpoint(path), accuracy=accuracy))
        del model

    if not state.is_main_process:
        return {}
    report = write_robustness_report(
        args.output_dir, runs, sets, id_name=id_name, ood_names=ood_names, benchmark=benchmark
    )
    with open(os.path.join(args.output_dir, "results.md")) as f:
        print(f.read())
    print(f"Wrote results.json, results.md and effective_robustness.png to {args.output_dir}")
    return report


if __name__ == "__main__":
    run_recipe(main)
