"""Every method of the paper's comparison on the embedded world, over several seeds: the table and the ID-vs-OOD plot.

    python benchmarks/world_methods.py --seeds 0 1 2 --output_dir outputs/world_methods --docs docs

Runs, per seed (the seed draws the world's images, the data order and the refill partners): zero-shot, vanilla
fine-tuning, FT+FD (distillation on clean images), FT+KD (logit distillation), WiSE-FT (alpha sweep of the vanilla
model), the CFFT grid {object, context, random} x {no-fill, single-fill, multi-fill} with teacher CAMs, and the
paper's best cell (object, single) with student CAMs. Every fine-tuning run is recipes/finetune.py with
recipes/configs/world.yaml and the overrides below. Writes world_methods.md (mean +/- std per split, ID, OOD average)
and world_methods.png into --docs, and every run's results as JSON into --output_dir.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "world.yaml"
NO_MASK = ["--mask_kind", "none", "--fill_kind", "none"]
FINE_TUNING = {
    "vanilla FT": ["--distill_weight", "0", *NO_MASK],
    "FT+FD": NO_MASK,
    "FT+KD": ["--distill_target", "logits", "--distill_weight", "1", *NO_MASK],
    **{
        f"CFFT {mask}/{fill}": ["--mask_kind", mask, "--fill_kind", fill]
        for mask in ("object", "context", "random")
        for fill in ("none", "single", "multi")
    },
    "CFFT object/single, student CAM": ["--mask_kind", "object", "--fill_kind", "single", "--cam_source", "student"],
    # beta's scale depends on the features' (the MSE is not normalised); the grid above uses the world's default.
    "CFFT object/single, beta=1": ["--mask_kind", "object", "--fill_kind", "single", "--distill_weight", "1"],
    "CFFT object/single, beta=30": ["--mask_kind", "object", "--fill_kind", "single", "--distill_weight", "30"],
}
WISE_ALPHAS = (0.25, 0.5, 0.75)


def _recipe():
    spec = importlib.util.spec_from_file_location("finetune_recipe", ROOT / "recipes" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _cache_world_splits() -> None:
    """Generate each world split once per process: every run of a seed reads the same images."""
    import hf_cfft.world as world

    if not hasattr(world.make_world_split, "cache_info"):
        world.make_world_split = functools.lru_cache(maxsize=None)(world.make_world_split)


def run_seed(seed: int, output_dir: Path, methods: list[str]) -> dict[str, dict[str, float]]:
    """All methods for one seed -> {method: {split: accuracy %}} (zero-shot and WiSE-FT rows included)."""
    import torch
    from transformers import AutoImageProcessor

    import hf_cfft.world as world
    from hf_cfft import evaluate_splits, load_classifier, wise_ft
    from hf_cfft.world import OOD_SPLITS, WORLD_CLASS_NAMES, WORLD_TEMPLATES, world_clip_path

    recipe = _recipe()
    _cache_world_splits()
    rows: dict[str, dict[str, float]] = {}
    for name in methods:
        out = output_dir / f"seed{seed}" / name.replace(" ", "_").replace("/", "-").replace(",", "")
        argv = ["--config", str(CONFIG), *FINE_TUNING[name], "--seed", str(seed), "--output_dir", str(out)]
        argv += ["--evaluate_zero_shot", "true" if not rows else "false", "--report_to", "none"]
        started = time.time()
        results = recipe.main(argv)
        print(f"[seed {seed}] {name}: {time.time() - started:.0f} s", flush=True)
        if "zero-shot" in results:
            rows["zero-shot"] = results["zero-shot"]
        rows[name] = results["fine-tuned"]
        (output_dir / f"seed{seed}.json").write_text(json.dumps(rows, indent=2))  # progress survives a stop
        if name == "vanilla FT":
            fine_tuned = load_classifier(str(out)).eval()
            zero_shot = load_classifier(
                str(world_clip_path()), class_names=list(WORLD_CLASS_NAMES), templates=list(WORLD_TEMPLATES),
                show_progress=False,
            ).eval()  # fmt: skip
            processor = AutoImageProcessor.from_pretrained(str(out))
            splits = {s: world.make_world_split(s, seed=seed) for s in ("test_id", *OOD_SPLITS)}
            with torch.no_grad():
                for alpha in WISE_ALPHAS:
                    model = wise_ft(zero_shot, fine_tuned, alpha)
                    rows[f"WiSE-FT alpha={alpha}"] = evaluate_splits(
                        model, splits, processor, ood_splits=OOD_SPLITS, batch_size=256
                    )
    with open(output_dir / f"seed{seed}.json", "w") as f:
        json.dump(rows, f, indent=2)
    return rows


def summarize(per_seed: list[dict[str, dict[str, float]]], columns: list[str]) -> str:
    """Markdown table of mean +/- std over seeds, one row per method."""
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method in per_seed[0]:
        cells = []
        for column in columns:
            values = [seed[method][column] for seed in per_seed if method in seed]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scatter(per_seed: list[dict[str, dict[str, float]]], path: Path) -> None:
    """ID accuracy vs OOD average, one point per method (mean over seeds) with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6), dpi=120)
    for method in per_seed[0]:
        ids = [s[method]["test_id"] for s in per_seed]
        oods = [s[method]["ood_avg"] for s in per_seed]
        marker = "*" if method.startswith("CFFT") else ("s" if method == "zero-shot" else "o")
        ax.errorbar(
            statistics.mean(ids), statistics.mean(oods),
            xerr=statistics.stdev(ids) if len(ids) > 1 else 0, yerr=statistics.stdev(oods) if len(oods) > 1 else 0,
            fmt=marker, markersize=9 if marker == "*" else 6, capsize=2, label=method,
        )  # fmt: skip
    ax.set_xlabel("ID accuracy, test_id (%)")
    ax.set_ylabel("OOD accuracy, average of 4 shifts (%)")
    ax.set_title("Embedded world: ID vs OOD (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(FINE_TUNING), help="Subset of the fine-tuning runs.")
    parser.add_argument("--output_dir", default="outputs/world_methods")
    parser.add_argument("--docs", default=None, help="Also write world_methods.md/png here (e.g. docs).")
    parser.add_argument(
        "--summarize_only", action="store_true", help="Only merge the seed*.json of earlier runs (seeds run apart)."
    )
    args = parser.parse_args()
    if "vanilla FT" not in args.methods:
        args.methods.insert(0, "vanilla FT")  # WiSE-FT interpolates it
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.summarize_only:
        per_seed = [json.loads((output_dir / f"seed{seed}.json").read_text()) for seed in args.seeds]
        common = [m for m in per_seed[0] if all(m in seed for seed in per_seed)]  # methods every seed finished
        per_seed = [{m: seed[m] for m in common} for seed in per_seed]
    else:
        per_seed = [run_seed(seed, output_dir, args.methods) for seed in args.seeds]
    from hf_cfft.world import OOD_SPLITS

    table = summarize(per_seed, ["test_id", *OOD_SPLITS, "ood_avg"])
    minutes = (time.time() - started) / 60
    header = (
        f"Command: `python benchmarks/world_methods.py --seeds {' '.join(map(str, args.seeds))}`; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {minutes:.0f} min.\n\n"
    )
    print(header + table)
    target = Path(args.docs) if args.docs else output_dir
    target.mkdir(parents=True, exist_ok=True)
    (target / "world_methods_table.md").write_text(header + table + "\n")
    scatter(per_seed, target / "world_methods.png")


if __name__ == "__main__":
    main()
