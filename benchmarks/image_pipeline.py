"""Images/s of one DataLoader worker at 224 px on JPEG files, before and after the scale-out changes.

    python benchmarks/image_pipeline.py                    # 500x375 JPEGs, quality 90, batch 128, 1 thread
    python benchmarks/image_pipeline.py --output perf_pipeline.md
    python benchmarks/image_pipeline.py --accuracy        # FastImageProcessor vs the processor: pixels, accuracy

The JPEGs are generated here (smooth gradients plus noise, so they compress like photographs). Each case runs on
the same undecoded ``{"path", "bytes"}`` items a ``datasets`` image column gives the transform, in this process (=
one worker), round-robin over the cases, medians of ``--repeats`` rounds:

- ``decode_processor`` / ``decode_fast``: decode + preprocessing alone, with the checkpoint's image processor (PIL)
  or `hf_cfft.fast_images.FastImageProcessor`;
- ``before``: `CounterfactualTransform` (object masks from cached CAMs) + the collator refilling in the worker, with
  the image processor: the pipeline before the change;
- ``after``: the same with `FastImageProcessor` and the collator drawing masks and donors only (``refill_on_device``,
  what `CfftTrainer` uses);
- ``device_refill``: what the trainer then does per batch on the training device (``--refill_device``, default the
  CPU), for reference.
"""

from __future__ import annotations

import argparse
import datetime
import io
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Measurement, machine_description, markdown_table, timed  # noqa: E402

from hf_cfft.data import CounterfactualCollator, CounterfactualTransform, preprocess_images  # noqa: E402

try:  # absent before the change: run this script on an older checkout for its "before" alone
    from hf_cfft.fast_images import FastImageProcessor
    from hf_cfft.masking import make_counterfactuals
except ImportError:
    FastImageProcessor = None

LABELS = {
    "decode_processor": "decode + the CLIP image processor (PIL)",
    "decode_fast": "decode + FastImageProcessor",
    "before": "before: transform + collator refilling in the worker, image processor",
    "after": "after: transform + collator drawing masks and donors, FastImageProcessor",
    "device_refill": "the trainer's refill of the batch on the training device (--refill_device)",
}


def make_jpegs(count: int, width: int, height: int, quality: int, seed: int = 0) -> list[dict]:
    """``count`` JPEG files as undecoded dataset items: gradients and a blob on noise, like photographs compress."""
    rng = np.random.default_rng(seed)
    items = []
    ys, xs = np.mgrid[0:height, 0:width]
    for i in range(count):
        base = rng.uniform(0, 1, 3) * 120 + np.stack([xs / width, ys / height, (xs + ys) / (width + height)], -1) * 100
        cy, cx = rng.uniform(0.2, 0.8, 2) * (height, width)
        blob = np.exp(-(((ys - cy) / (height / 5)) ** 2 + ((xs - cx) / (width / 5)) ** 2))[..., None]
        pixels = base + blob * rng.uniform(-80, 80, 3) + rng.normal(0, 12, (height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
        items.append({"path": f"generated_{i}.jpg", "bytes": buffer.getvalue()})
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=224, help="the model's input side")
    parser.add_argument("--patch_size", type=int, default=32)
    parser.add_argument("--source", default="500x375", help="JPEG width x height")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a worker usually has 1)")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--refill_device", default="cpu", help="where device_refill runs, e.g. cuda")
    parser.add_argument(
        "--accuracy",
        action="store_true",
        help="instead: pixel differences on the JPEGs, and the world CLIP's zero-shot accuracy with either path",
    )
    return parser.parse_args(argv)


def accuracy_report(args: argparse.Namespace) -> str:
    """FastImageProcessor against the checkpoint's processor: pixel differences at 224 px, accuracy on the world."""
    from transformers import AutoImageProcessor, CLIPImageProcessor

    from hf_cfft import load_classifier, load_templates
    from hf_cfft.cli.script_args import default_model
    from hf_cfft.cli.sources import WORLD, class_names_for, load_image_splits
    from hf_cfft.evaluation import evaluate_splits
    from hf_cfft.world import OOD_SPLITS

    side = args.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    width, height = (int(v) for v in args.source.split("x"))
    items = make_jpegs(args.batch_size, width, height, args.quality)
    step = torch.tensor(processor.image_std).view(1, 3, 1, 1) * 255  # one grey level in normalised units
    levels = (preprocess_images(processor, items) - preprocess_images(FastImageProcessor(processor), items)) * step
    levels = levels.abs().round()
    rows = [[f"{width}x{height} JPEG -> {side} px, {args.batch_size} images", f"{levels.max():.0f}",
             f"{(levels > 0).float().mean():.2%}", f"{levels.mean():.4f}"]]  # fmt: skip
    splits = load_image_splits(WORLD, ["test_id", *OOD_SPLITS])
    path = default_model(None, WORLD)
    model = load_classifier(
        path, class_names=class_names_for(None, splits["test_id"]), templates=load_templates(WORLD)
    )
    world_processor = AutoImageProcessor.from_pretrained(path)
    plain = evaluate_splits(model, splits, world_processor, ood_splits=OOD_SPLITS)
    fast = evaluate_splits(model, splits, FastImageProcessor(world_processor), ood_splits=OOD_SPLITS)
    accuracy = [
        [name, f"{plain[name]:.2f}", f"{fast[name]:.2f}", f"{fast[name] - plain[name]:+.2f}"] for name in plain
    ]
    return "\n".join(
        [
            f"## FastImageProcessor against the checkpoint's processor ({args.command})",
            "",
            markdown_table(["images", "max grey levels apart", "pixels differing", "mean grey levels apart"], rows),
            "",
            f"World CLIP zero-shot top-1 (%), {len(splits['test_id'])} images per split:",
            "",
            markdown_table(["split", "processor", "FastImageProcessor", "difference"], accuracy),
            "",
        ]
    )


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    from transformers import CLIPImageProcessor

    side, patch = args.image_size, args.patch_size
    refill_device = torch.device(args.refill_device)
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    fast = FastImageProcessor(processor) if FastImageProcessor is not None else None
    width, height = (int(v) for v in args.source.split("x"))
    items = make_jpegs(args.batch_size, width, height, args.quality)
    grid = (side // patch, side // patch)
    rng = np.random.default_rng(1)
    cams = rng.random((args.batch_size, grid[0] * grid[1]), dtype=np.float32)
    batch = {
        "image": items,
        "label": rng.integers(0, 1000, args.batch_size).tolist(),
        "cam": (cams / cams.max(1, keepdims=True)).tolist(),
    }
    common = dict(mask_kind="object", fill_kind="single", mask_ratio=0.5, patch_size=patch)

    def pipeline(image_processor, refill_on_device: bool):
        transform = CounterfactualTransform(image_processor, grid=grid, mask_kind="object", num_labels=1000)
        collator = CounterfactualCollator(**common, **({"refill_on_device": True} if refill_on_device else {}))

        def step():
            out = transform(dict(batch))
            return collator([{key: out[key][i] for key in out} for i in range(args.batch_size)])

        return step

    cases = {"decode_processor": lambda: preprocess_images(processor, items), "before": pipeline(processor, False)}
    if fast is not None:
        after = pipeline(fast, True)
        prepared = {key: value.to(refill_device) for key, value in after().items()}

        def device_refill():
            return make_counterfactuals(
                prepared["pixel_values"], prepared["cf_mask"], "single", patch, donors=prepared["cf_donors"]
            )

        cases.update(
            decode_fast=lambda: preprocess_images(fast, items),
            after=after,
            device_refill=device_refill,
        )
    device = torch.device("cpu")
    load_before = machine_description(device)
    times = {name: Measurement() for name in cases}
    for round_index in range(args.warmup + args.repeats):
        for name, fn in cases.items():
            wall, cpu = timed(fn, refill_device if name == "device_refill" else device)
            if round_index >= args.warmup:
                times[name].wall.append(wall)
                times[name].cpu.append(cpu)
    load_after = machine_description(device)

    ips = {name: args.batch_size / m.wall_median for name, m in times.items()}
    cpu_ips = {name: args.batch_size / m.cpu_median for name, m in times.items()}
    rows = [
        [
            f"{LABELS[name]} (`{name}`)",
            f"{ips[name]:,.1f}",
            f"{cpu_ips[name]:,.1f}",
            f"{ips[name] / ips['before']:.2f}",
        ]
        for name in cases
    ]
    lines = [
        f"## Data pipeline per worker: {width}x{height} JPEG (quality {args.quality}) -> {side} px, batch "
        f"{args.batch_size}, {args.threads} thread(s)",
        "",
        f"- command: `{args.command}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}",
        f"- machine before: {load_before}",
        f"- machine after: {load_after}",
        f"- {args.repeats} timed rounds after {args.warmup} warm-up, round-robin; medians",
        "",
        markdown_table(["case", "images/s (wall)", "images/s (CPU time)", "x before (wall)"], rows),
        "",
    ]
    if "after" in times:
        overhead = times["after"].cpu_median / times["decode_fast"].cpu_median - 1
        speedup = cpu_ips["after"] / cpu_ips["before"]
        lines += [
            "Targets:",
            f"- after >= 2x before per worker: {speedup:.2f}x (CPU time): **{'holds' if speedup >= 2 else 'MISSED'}**",
            f"- masking and donors add <= 10% over decode + preprocessing: {overhead:+.1%} (CPU time): "
            f"**{'holds' if overhead <= 0.10 else 'MISSED'}**",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print the markdown report (and write it to ``--output``); return it."""
    args = parse_args(argv)
    words = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python", "benchmarks/image_pipeline.py", *map(shlex.quote, words)])
    report = accuracy_report(args) if args.accuracy else run(args)
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report, encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
