"""Where a training step's time goes: torch.profiler's top operators for one or more configurations.

    python benchmarks/profile_step.py --size tiny --cases ft,cfft_teacher_single,cfft_student_single

Uses the same prepared `CfftTrainer` steps as ``training_throughput.py`` (no data loading in the step), warms each
up, then profiles ``--steps`` steps and prints the operators sorted by self time, per configuration, with each
operator's share of the step.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    SIZES,
    TRAIN_CASES,
    TrainStep,
    build_image_processor,
    build_model,
    make_dataset,
    markdown_table,
)

from hf_cfft.data import precompute_cams  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i]; default: cuda when available")
    parser.add_argument("--cases", default="ft,cfft_teacher_single,cfft_student_single", help="comma list")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per configuration")
    parser.add_argument("--top", type=int, default=15, help="operators listed per configuration")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads; default 1 on CPU")
    parser.add_argument("--bf16", action="store_true")
    return parser.parse_args(argv)


def profile_case(step: TrainStep, steps: int, top: int, device: torch.device) -> str:
    """Markdown table of the ``top`` operators by self time over ``steps`` steps of ``step``."""
    step.step()
    step.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    use_cuda = device.type == "cuda"
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]

    def self_time(e) -> float:
        return e.self_device_time_total if use_cuda else e.self_cpu_time_total

    total = sum(self_time(e) for e in events)
    rows = []
    for event in sorted(events, key=self_time, reverse=True)[:top]:
        rows.append(
            [
                f"`{event.key}`",
                f"{self_time(event) / steps / 1000:.1f}",
                f"{self_time(event) / total:.1%}",
                f"{event.count // steps}",
            ]
        )
    header = ["operator", f"self {'device' if use_cuda else 'CPU'} ms/step", "share", "calls/step"]
    return f"### `{step.name}`: {total / steps / 1000:.0f} ms/step in operators\n\n" + markdown_table(header, rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads > 0:
        torch.set_num_threads(threads)
    size = SIZES[args.size]
    base, processor = build_model(size), build_image_processor(size)
    dataset = make_dataset(size, num_batches=2)
    teacher = copy.deepcopy(base).to(device).eval().requires_grad_(False)
    cam_dataset = precompute_cams(dataset, teacher, processor, batch_size=size.batch_size)
    for name in [n.strip() for n in args.cases.split(",")]:
        if name not in TRAIN_CASES:
            raise SystemExit(f"unknown case {name!r}; choose from {list(TRAIN_CASES)}")
        data = cam_dataset if name.startswith("cfft_teacher") else dataset
        step = TrainStep(name, base, size, data, processor, device, bf16=args.bf16)
        print(profile_case(step, args.steps, args.top, device), end="\n\n")


if __name__ == "__main__":
    main()
