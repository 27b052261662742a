"""Draw what the method does to a few images: CAM, object/context/random masks, and no/single/multi-fill refills.

    python recipes/visualize.py --config recipes/configs/world.yaml --num_images 6   # the world and its tiny CLIP
    python recipes/visualize.py --model_name_or_path outputs/world_cfft --split ood_swapped
    python recipes/visualize.py --model_name_or_path openai/clip-vit-base-patch32 --dataset_name /data/imgs \
        --split validation --output_file outputs/imgs_counterfactuals.png

One row per image (the first --num_images of --split), titled with the true and predicted class. The CAM is that
of --model_name_or_path: a CLIP checkpoint (its zero-shot classifier, the teacher that picks the masks by default)
or a saved classifier (e.g. a fine-tuned model, to see where its evidence moved).
"""

from __future__ import annotations

import hf_cfft_help  # noqa: F401  (first: --help from its cache, before the library loads)

# isort: split
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import AutoImageProcessor

from hf_cfft import load_classifier, load_templates, preprocess_images
from hf_cfft.classifier_loading import is_cfft_checkpoint
from hf_cfft.cli.script_args import (
    SHARED_CONFIG_KEYS,
    DataArguments,
    default_model,
    parse_with_config,
    resolve_device,
    run_recipe,
)
from hf_cfft.cli.sources import WORLD, class_names_for, load_image_splits
from hf_cfft.masking import FILL_KINDS
from hf_cfft.output_folder import check_output_file, save_png
from hf_cfft.visualize import VIS_MASK_KINDS, model_counterfactual_grid

WORLD_CONFIG = Path(__file__).parent / "configs" / "world.yaml"
WORLD_MASK_THRESHOLD = float(yaml.safe_load(WORLD_CONFIG.read_text())["mask_threshold"])
PAPER_MASK_THRESHOLD = 0.3

# What a finetune YAML may lend besides the dataset keys: the picture should show the masks that run would use.
_METHOD_KEYS = {"mask_threshold", "mask_ratio", "cam_method"}


@dataclass
class VisualizeArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "CLIP checkpoint or saved classifier folder. Default on the world: its tiny CLIP."},
    )
    class_names: str | None = field(
        default=None, metadata={"help": "'imagenet', a text file, or empty: the dataset's ClassLabel."}
    )
    templates: str | None = field(
        default=None, metadata={"help": "Templates for a CLIP checkpoint's head. Default: 'world' on the world."}
    )
    split: str = field(default="train", metadata={"help": "Split to draw images from."})
    num_images: int = field(default=4, metadata={"help": "Rows of the picture (>= 2: refills need other images)."})
    output_file: str = field(
        default="outputs/counterfactuals.png",
        metadata={"help": "PNG to write (a file hf_cfft did not write is never replaced)."},
    )
    mask_kinds: list[str] = field(default_factory=lambda: list(VIS_MASK_KINDS), metadata={"help": "Mask columns."})
    fill_kinds: list[str] = field(default_factory=lambda: list(FILL_KINDS), metadata={"help": "Fill columns."})
    mask_threshold: float | None = field(
        default=None,
        metadata={
            "help": "CAM threshold of object/context masks. Default: on the world, its config's "
            f"({WORLD_MASK_THRESHOLD:g}, recipes/configs/world.yaml: what the main job trains with); else the paper's "
            f"{PAPER_MASK_THRESHOLD:g}."
        },
    )
    mask_ratio: float = field(default=0.5, metadata={"help": "Masked fraction of random masks."})
    cam_method: str = field(default="rollout", metadata={"help": "'rollout' or 'gradcam'."})
    seed: int = field(default=0, metadata={"help": "Seed of random masks, refill donors and the world's splits."})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ...; default: cuda when available."})


def main(argv: list[str] | None = None) -> str:
    args, data_args = parse_with_config(
        (VisualizeArguments, DataArguments),
        sys.argv[1:] if argv is None else argv,
        config_keys=SHARED_CONFIG_KEYS | _METHOD_KEYS,
    )
    if args.num_images < 1:
        raise ValueError(f"--num_images={args.num_images} must be >= 1")
    for flag, value in (("--mask_threshold", args.mask_threshold), ("--mask_ratio", args.mask_ratio)):
        if value is not None and not 0 < value < 1:  # written so that NaN is refused too
            raise ValueError(f"{flag}={value} must lie in (0, 1): outside it every mask is empty or whole")
    check_output_file(args.output_file)  # before the model and the images are loaded
    on_world = data_args.dataset_name == WORLD
    if args.mask_threshold is None:
        args.mask_threshold = WORLD_MASK_THRESHOLD if on_world else PAPER_MASK_THRESHOLD
    args.model_name_or_path = default_model(args.model_name_or_path, data_args.dataset_name)
    dataset = load_image_splits(
        data_args.dataset_name, [args.split], dataset_config=data_args.dataset_config, data_dir=data_args.data_dir,
        world_seed=args.seed, world_object_contrast=data_args.world_object_contrast,
    )[args.split]  # fmt: skip
    rows = dataset.select(range(min(args.num_images, len(dataset))))

    if is_cfft_checkpoint(args.model_name_or_path):
        model = load_classifier(args.model_name_or_path)
    else:
        names = class_names_for(args.class_names, dataset, data_args.label_column)
        templates = load_templates(args.templates or (WORLD if on_world else "simple"))
        model = load_classifier(args.model_name_or_path, class_names=names, templates=templates, show_progress=False)
    model = model.to(resolve_device(args.device)).eval()
    image_processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)

    picture = model_counterfactual_grid(
        model,
        preprocess_images(image_processor, rows[data_args.image_column]),
        torch.tensor([int(y) for y in rows[data_args.label_column]]),
        image_processor.image_mean,
        image_processor.image_std,
        cam_method=args.cam_method,
        mask_kinds=args.mask_kinds,
        fill_kinds=args.fill_kinds,
        threshold=args.mask_threshold,
        ratio=args.mask_ratio,
        generator=torch.Generator().manual_seed(args.seed),
    )
    save_png(picture, args.output_file)
    print(f"Wrote {args.output_file} ({picture.width}x{picture.height} px, {len(rows)} images)")
    return args.output_file


if __name__ == "__main__":
    run_recipe(main)
