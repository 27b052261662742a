"""Which robust fine-tuning method for your data? Run several at a few strengths and seeds, draw the ID/OOD trade-off.

    # an ImageFolder <dir>/<split>/<class>/<image> with train, an ID test split and OOD splits
    accelerate launch recipes/compare.py --model_name_or_path openai/clip-vit-base-patch32 \
        --dataset_name /data/my_images --eval_splits test shift_a shift_b --ood_splits shift_a shift_b \
        --methods zero_shot ft wise_ft ft_fd cfft flyp --betas 1 3 10 --seeds 0 1 2 --output_dir outputs/cmp \
        --learning_rate 1e-5 --num_train_epochs 10 --templates simple
    # the embedded world's frontier study (docs/world.md), in two processes, then the report
    python recipes/compare.py --config recipes/configs/compare/world_frontier.yaml --shard 0/2 &
    python recipes/compare.py --config recipes/configs/compare/world_frontier.yaml --shard 1/2 &
    wait; python recipes/compare.py --config recipes/configs/compare/world_frontier.yaml

Every run is recipes/finetune.py with the method's flags; any flag this script does not know goes to every run
(--finetune_config names a finetune YAML). Rows are appended to <output_dir>/rows.jsonl (rows-<i>of<n>.jsonl with
--shard i/n) as runs finish, and a run whose row is there is not run again. At the end: compare.md (summary,
tables, and every method minus --reference_method paired by seed at matched ID, with 95 % intervals), summary.md,
compare.json, frontier.png and paired.png. `--summarize_only` rewrites them from the rows so far. See
docs/choosing_a_method.md.
"""

from __future__ import annotations

import hf_cfft_help  # noqa: F401  (first: --help from its cache, before the library loads)

# isort: split
import functools
import os
import sys
from pathlib import Path

import torch

from hf_cfft.cli.compare import parse_compare_args, run_compare
from hf_cfft.cli.compare_grid import parse_shard
from hf_cfft.cli.finetune import finetune, parse_finetune_args
from hf_cfft.cli.script_args import run_recipe
from hf_cfft.output_folder import LOCK_NAME, OutputFolder

# What recipes/finetune.py runs with no --config on the embedded world: every training cell is that job, in this
# process (one launch for the whole grid).
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "world.yaml"


def main(argv: list[str] | None = None) -> dict[str, str]:
    args, registry, finetune_argv = parse_compare_args(sys.argv[1:] if argv is None else argv)
    index, count = parse_shard(args.shard)
    # Shards of one comparison run at once, each under its own lock; two runs of the same shard are refused.
    lock = LOCK_NAME if count == 1 else f".hf_cfft.shard-{index}of{count}.lock"
    with OutputFolder(args.output_dir, "compare", write=int(os.environ.get("RANK", "0")) == 0, lock_name=lock):
        paths = run_compare(
            args, registry, finetune_argv,
            train=functools.partial(finetune, default_config=DEFAULT_CONFIG, report=print),
            parse=functools.partial(parse_finetune_args, default_config=DEFAULT_CONFIG),
            report=lambda line: print(line, flush=True),
        )  # fmt: skip
    if paths:
        print("\n" + Path(paths["report"]).read_text())
    return paths


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_recipe(main)
