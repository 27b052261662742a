"""Fine-tune a CLIP image encoder with counterfactual feature distillation, then evaluate it ID and OOD.

    accelerate launch recipes/finetune.py                                  # the embedded world (offline, CPU)
    accelerate launch recipes/finetune.py --config recipes/configs/imagenet_vit_b32.yaml
    python recipes/finetune.py --config X.yaml --learning_rate 1e-5        # CLI flags override the YAML

Every CfftConfig / TrainingArguments field is a flag; see `--help`. The job is `hf_cfft.cli.finetune.finetune`.
"""

from __future__ import annotations

import hf_cfft_help  # noqa: F401  (first: --help from its cache, before the library loads)

# isort: split
import sys
from pathlib import Path

import torch

from hf_cfft.cli.finetune import VANILLA_ROW, finetune, parse_finetune_args
from hf_cfft.cli.script_args import run_recipe

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "world.yaml"
__all__ = ["DEFAULT_CONFIG", "VANILLA_ROW", "main", "parse_args"]


def parse_args(argv: list[str]):
    """(model, data, training, run) arguments: CLI flags over --config, or world.yaml on the embedded world."""
    return parse_finetune_args(argv, DEFAULT_CONFIG)


def main(argv: list[str] | None = None) -> dict:
    return finetune(sys.argv[1:] if argv is None else argv, default_config=DEFAULT_CONFIG, report=print)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_recipe(main)
