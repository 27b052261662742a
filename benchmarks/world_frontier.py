"""The ID/OOD trade-off of each method on the embedded world: curves over the method's strength, several seeds.

    python benchmarks/world_frontier.py --seeds 0 1 2 --shard 0/2 &    # two processes of one thread each
    python benchmarks/world_frontier.py --seeds 0 1 2 --shard 1/2 &
    python benchmarks/world_frontier.py --summarize --docs docs         # table + plot from the rows so far

Every fine-tuning cell is recipes/finetune.py on recipes/configs/world.yaml with overrides (below); a cell's result
is appended to ``<output_dir>/rows-<shard>.jsonl`` as soon as it finishes, and a restarted shard skips the cells it
finds there, so the grid can be run in pieces. Cells run in this order (the issue's priority order):

1. per seed: vanilla FT (beta 0) and, from it, the WiSE-FT curve (alpha 0, 0.1, ..., 1; alpha 0 = zero-shot);
2. 1 epoch, beta in {1, 3, 10, 0.3, 30} x {FT+FD, CFFT object/single, CFFT random/single, CFFT context/single};
3. the oracle: vanilla FT on a train split whose context is independent of the class (correlation 0.1);
4. CFFT object/single with the paper's threshold 0.3 (the world's old masking), beta in {1, 3, 10, 0.3, 30};
5. CFFT object/none (masked patches removed, no refill), beta in {1, 3, 10, 0.3, 30};
6. 5 epochs, beta in {1, 3, 10} x {FT+FD, CFFT object/single}.

CFFT masks use the world config's rule (chosen by localisation alone: docs/world.md).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "world.yaml"
NO_MASK = ["--mask_kind", "none", "--fill_kind", "none"]
METHODS: dict[str, list[str]] = {
    "vanilla FT": ["--distill_weight", "0", *NO_MASK],
    "oracle FT (context independent of class)": [
        "--distill_weight",
        "0",
        *NO_MASK,
        "--world_train_correlation",
        "0.1",
    ],
    "FT+FD": NO_MASK,
    "CFFT object/single": ["--mask_kind", "object", "--fill_kind", "single"],
    "CFFT random/single": ["--mask_kind", "random", "--fill_kind", "single"],
    "CFFT context/single": ["--mask_kind", "context", "--fill_kind", "single"],
    "CFFT object/none": ["--mask_kind", "object", "--fill_kind", "none"],
    # The world's masking before it was chosen by localisation: the paper's threshold, no rank-based rule.
    "CFFT object/single, threshold 0.3": ["--mask_kind", "object", "--fill_kind", "single", "--mask_threshold", "0.3"],
}
BETAS = (1.0, 3.0, 10.0, 0.3, 30.0)
LONG_BETAS = (1.0, 3.0, 10.0)
WISE_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
# Below this OOD gain of the oracle over zero-shot (points), a method's "share of the oracle's gain" is noise.
MIN_ORACLE_GAIN = 1.0
SPLITS = ("test_id", "ood_shuffled", "ood_swapped", "ood_novel", "ood_style")


def cells(seeds: list[int]) -> list[dict]:
    """Every cell of the grid, in the order they are run."""
    out = [dict(method="vanilla FT", beta=0.0, epochs=1, seed=s) for s in seeds]
    for beta in BETAS:
        for method in ("FT+FD", "CFFT object/single", "CFFT random/single", "CFFT context/single"):
            out += [dict(method=method, beta=beta, epochs=1, seed=s) for s in seeds]
    out += [dict(method="oracle FT (context independent of class)", beta=0.0, epochs=1, seed=s) for s in seeds]
    for beta in BETAS:
        out += [dict(method="CFFT object/single, threshold 0.3", beta=beta, epochs=1, seed=s) for s in seeds]
    for beta in BETAS:
        out += [dict(method="CFFT object/none", beta=beta, epochs=1, seed=s) for s in seeds]
    for beta in LONG_BETAS:
        for method in ("FT+FD", "CFFT object/single"):
            out += [dict(method=method, beta=beta, epochs=5, seed=s) for s in seeds]
    return out


def key(cell: dict) -> str:
    return f"{cell['method']}|{cell['beta']:g}|{cell['epochs']}|{cell['seed']}"


def _recipe():
    spec = importlib.util.spec_from_file_location("finetune_recipe", ROOT / "recipes" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_cell(recipe, cell: dict, output_dir: Path, extra: list[str] = ()) -> list[dict]:
    """Fine-tune one cell; returns its row (and, for vanilla FT, the WiSE-FT and zero-shot rows)."""
    import shutil

    name = key(cell).replace(" ", "_").replace("/", "-").replace("|", "_").replace("(", "").replace(")", "")
    out = output_dir / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--config", str(CONFIG), *METHODS[cell["method"]], "--seed", str(cell["seed"]), "--output_dir", str(out)]
    argv += ["--num_train_epochs", str(cell["epochs"]), "--report_to", "none", "--save_strategy", "no"]
    argv += ["--compare_with_vanilla", "false"]  # the vanilla row is a cell of its own here
    if cell["beta"] > 0:
        argv += ["--distill_weight", str(cell["beta"])]
    zero_shot = cell["method"] == "vanilla FT"
    argv += ["--evaluate_zero_shot", "true" if zero_shot else "false", *extra]
    started = time.time()
    results = recipe.main(argv)
    seconds = time.time() - started
    rows = [{**cell, "results": results["fine-tuned"], "seconds": round(seconds, 1)}]
    if zero_shot:
        rows.append({**cell, "method": "zero-shot", "results": results["zero-shot"], "seconds": 0.0})
        rows += wise_rows(cell, out)
    shutil.rmtree(out, ignore_errors=True)  # keep the disk small; the rows hold the results
    return rows


def wise_rows(cell: dict, fine_tuned_dir: Path) -> list[dict]:
    """The WiSE-FT curve of one vanilla FT run: one row per alpha."""
    import torch
    from transformers import AutoImageProcessor

    import hf_cfft.world as world
    from hf_cfft import evaluate_splits, load_classifier, wise_ft

    fine_tuned = load_classifier(str(fine_tuned_dir)).eval()
    zero_shot = load_classifier(
        str(world.world_clip_path()), class_names=list(world.WORLD_CLASS_NAMES),
        templates=list(world.WORLD_TEMPLATES), show_progress=False,
    ).eval()  # fmt: skip
    processor = AutoImageProcessor.from_pretrained(str(fine_tuned_dir))
    splits = {s: world.make_world_split(s, seed=cell["seed"]) for s in SPLITS}
    rows = []
    with torch.no_grad():
        for alpha in WISE_ALPHAS:
            results = evaluate_splits(
                wise_ft(zero_shot, fine_tuned, alpha), splits, processor, ood_splits=list(SPLITS[1:]), batch_size=500
            )
            rows.append({**cell, "method": "WiSE-FT", "alpha": alpha, "beta": alpha, "results": results})
    return rows


def read_rows(output_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(output_dir.glob("rows-*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def run(seeds: list[int], shard: tuple[int, int], output_dir: Path, only: list[str] | None, extra: list[str]) -> None:
    import hf_cfft.world as world

    # Render each world split once per process: every cell of a seed reads the same images.
    world.make_world_split = functools.lru_cache(maxsize=None)(world.make_world_split)
    recipe = _recipe()
    index, count = shard
    path = output_dir / f"rows-{index}of{count}.jsonl"
    done = {key(r) for r in read_rows(output_dir) if r["method"] in METHODS}
    todo = [c for i, c in enumerate(cells(seeds)) if i % count == index and key(c) not in done]
    if only:
        todo = [c for c in todo if c["method"] in only]
    print(f"shard {index}/{count}: {len(todo)} cells to run", flush=True)
    for cell in todo:
        rows = run_cell(recipe, cell, output_dir, extra)
        with path.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        r = rows[0]["results"]
        print(
            f"[{key(cell)}] {rows[0]['seconds']:.0f} s: test_id {r['test_id']:.1f} ood_avg {r['ood_avg']:.1f}",
            flush=True,
        )


# ---- summary ----


def curves(rows: list[dict]) -> dict[tuple[str, int], dict[float, list[dict]]]:
    """{(method, epochs): {strength: [results of each seed]}} (strength = beta, or alpha for WiSE-FT)."""
    out: dict[tuple[str, int], dict[float, list[dict]]] = {}
    for row in rows:
        out.setdefault((row["method"], row["epochs"]), {}).setdefault(row["beta"], []).append(row["results"])
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def ood_at_id(points: list[tuple[float, float]], target_id: float) -> float | None:
    """OOD average interpolated linearly at ``target_id`` along a curve's (ID, OOD) points sorted by ID."""
    points = sorted(points)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if not xs or target_id < xs[0] or target_id > xs[-1]:
        return None
    return float(np.interp(target_id, xs, ys))


def summarize(rows: list[dict], seeds_wanted: int) -> tuple[str, dict]:
    """Markdown tables (per cell mean +/- std, matched-ID comparisons) and the curve means for the plot."""
    by_curve = curves(rows)
    lines = ["| method | epochs | strength | seeds | test_id | " + " | ".join(SPLITS[1:]) + " | OOD avg |"]
    lines.append("|---|---|---|---|---|" + "---|" * (len(SPLITS) - 1) + "---|")
    means: dict[tuple[str, int], list[tuple[float, float, float, float, float]]] = {}
    for (method, epochs), per_strength in sorted(by_curve.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for strength in sorted(per_strength):
            results = per_strength[strength]
            cells_ = []
            for column in (*SPLITS, "ood_avg"):
                m, s = _mean_std([r[column] for r in results])
                cells_.append(f"{m:.1f} ± {s:.1f}")
            label = f"alpha {strength:g}" if method == "WiSE-FT" else f"beta {strength:g}"
            lines.append(f"| {method} | {epochs} | {label} | {len(results)} | " + " | ".join(cells_) + " |")
            ids, oods = [r["test_id"] for r in results], [r["ood_avg"] for r in results]
            means.setdefault((method, epochs), []).append(
                (strength, *_mean_std(ids), *_mean_std(oods)) if len(results) else None
            )
    table = "\n".join(lines)

    # Matched ID: each curve's OOD average interpolated at FT+FD's (1 epoch) mean ID points, against FT+FD and WiSE-FT.
    def curve_points(name: tuple[str, int]) -> list[tuple[float, float]]:
        return [(p[1], p[3]) for p in means.get(name, [])]

    wise, ftfd = curve_points(("WiSE-FT", 1)), curve_points(("FT+FD", 1))
    zero = means.get(("zero-shot", 1), [(0, 0, 0, 0, 0)])[0]
    oracle = means.get(("oracle FT (context independent of class)", 1))
    targets = sorted({round(x, 1) for x, _ in ftfd})
    match = ["| method | epochs | ID (matched) | OOD avg | minus FT+FD | minus WiSE-FT |", "|---|---|---|---|---|---|"]
    for name in sorted(means):
        if name[0] in ("zero-shot", "vanilla FT", "WiSE-FT") or name[0].startswith("oracle"):
            continue
        points = curve_points(name)
        for target in targets:
            ood = ood_at_id(points, target)
            if ood is None:
                continue
            base, w = ood_at_id(ftfd, target), ood_at_id(wise, target)
            match.append(
                f"| {name[0]} | {name[1]} | {target:.1f} | {ood:.1f} | "
                + (f"{ood - base:+.1f}" if base is not None else "n/a")
                + " | "
                + (f"{ood - w:+.1f}" if w is not None else "n/a")
                + " |"
            )
    share = []
    if oracle:
        gain = oracle[0][3] - zero[3]
        share = [
            f"Oracle: test_id {oracle[0][1]:.1f}, OOD avg {oracle[0][3]:.1f}; "
            f"zero-shot {zero[1]:.1f} / {zero[3]:.1f}: the oracle's OOD gain over zero-shot is {gain:+.1f} points.",
            "",
            "| method | epochs | strength | OOD avg minus zero-shot | share of the oracle's gain |",
            "|---|---|---|---|---|",
        ]
        if abs(gain) < MIN_ORACLE_GAIN:
            share[0] += (
                f" A share of a gain under {MIN_ORACLE_GAIN} points is noise, so it is not computed: on this world "
                "fine-tuning without the shortcut does not improve OOD accuracy over zero-shot."
            )
        for name in sorted(means):
            if name[0] in ("zero-shot",) or name[0].startswith("oracle"):
                continue
            for p in means[name]:
                delta = p[3] - zero[3]
                ratio = f"{delta / gain:+.2f}" if abs(gain) >= MIN_ORACLE_GAIN else "n/a"
                share.append(f"| {name[0]} | {name[1]} | {p[0]:g} | {delta:+.1f} | {ratio} |")
    text = table + "\n\n### OOD average at matched ID (linear interpolation on each mean curve)\n\n" + "\n".join(match)
    if share:
        text += "\n\n### Share of the oracle's OOD gain\n\n" + "\n".join(share)
    return text + "\n", means


STYLES = {
    # (colour, marker): no two series alike.
    "FT+FD": ("tab:blue", "o"),
    "CFFT object/single": ("tab:red", "*"),
    "CFFT random/single": ("tab:green", "^"),
    "CFFT context/single": ("tab:purple", "v"),
    "CFFT object/single, threshold 0.3": ("tab:orange", "P"),
    "CFFT object/none": ("tab:pink", "p"),
    "WiSE-FT": ("black", "."),
    "vanilla FT": ("tab:gray", "s"),
    "zero-shot": ("tab:brown", "D"),
    "oracle FT (context independent of class)": ("tab:olive", "X"),
}


def plot(means: dict, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6.5))
    ax = fig.subplots()
    for (method, epochs), points in sorted(means.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        colour, marker = STYLES.get(method, ("tab:cyan", "h"))
        points = sorted(points, key=lambda p: p[1])
        xs, xe = [p[1] for p in points], [p[2] for p in points]
        ys, ye = [p[3] for p in points], [p[4] for p in points]
        line = "-" if epochs == 1 else "--"
        label = f"{method}" + (f", {epochs} epochs" if epochs != 1 else "")
        if method == "WiSE-FT":
            ax.plot(xs, ys, line, color=colour, marker=marker, label=label + " (alpha 0 to 1)")
            ax.fill_between(
                xs, [y - e for y, e in zip(ys, ye)], [y + e for y, e in zip(ys, ye)], color=colour, alpha=0.1
            )
            continue
        ax.errorbar(
            xs, ys, xerr=xe, yerr=ye, linestyle=line if len(points) > 1 else "none", color=colour, marker=marker,
            markersize=9 if marker == "*" else 6, capsize=2, label=label,
            markerfacecolor="none" if epochs != 1 else colour,
        )  # fmt: skip
    ax.set_xlabel("ID accuracy, test_id (%)")
    ax.set_ylabel("OOD accuracy, average of 4 shifts (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th cell starting at i (parallel shards).")
    parser.add_argument("--methods", nargs="+", default=None, help="Only these methods' cells.")
    parser.add_argument("--output_dir", default="outputs/world_frontier")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More recipe flags (smoke tests).")
    parser.add_argument("--summarize", action="store_true", help="Only write the table and plot from the rows.")
    parser.add_argument("--docs", default=None, help="Write world_frontier.md/png (and the rows) here.")
    args = parser.parse_args()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        index, count = (int(x) for x in args.shard.split("/"))
        run(args.seeds, (index, count), output_dir, args.methods, args.extra)
        return
    rows = read_rows(output_dir)
    text, means = summarize(rows, len(args.seeds))
    ran = sorted({key(r) for r in rows if r["method"] in METHODS})
    planned = [key(c) for c in cells(args.seeds)]
    missing = [k for k in planned if k not in ran]
    header = (
        f"Command: `python benchmarks/world_frontier.py --seeds {' '.join(map(str, args.seeds))} --shard i/2` (two "
        f"processes, one thread each), then `--summarize`; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {datetime.date.today()}. {len(ran)} of {len(planned)} planned cells ran"
        + (f"; not run: {len(missing)} (listed in world_frontier_missing.txt)" if missing else "")
        + ".\n\n"
    )
    target = Path(args.docs) if args.docs else output_dir
    target.mkdir(parents=True, exist_ok=True)
    (target / "world_frontier.md").write_text(header + text)
    (target / "world_frontier_missing.txt").write_text("\n".join(missing) + "\n")
    with (target / "world_frontier_rows.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    plot(means, target / "world_frontier.png", "Embedded world: ID vs OOD over each method's strength (mean ± std)")
    print(header + text)


if __name__ == "__main__":
    main()
