"""Training throughput of counterfactual fine-tuning against vanilla fine-tuning, measured side by side.

    python benchmarks/training_throughput.py --size tiny                    # CPU, < 10 minutes on 2 cores
    python benchmarks/training_throughput.py --size vit-b32 --bf16 --peak_tflops 989 --output gpu.md   # a GPU

Every configuration gets its own real `CfftTrainer` on a tiny in-memory dataset, with batches built beforehand by
the real data pipeline (teacher CAMs via ``precompute_cams``, ``CounterfactualTransform``, the trainer's collator),
so the timed step is the Trainer's optimizer step without data loading. Configurations are timed round-robin, one
step each per round, so that a change in the machine's load hits all of them alike; the tables report medians and
ratios to vanilla FT from the same run. The data pipeline and the CAM pre-computation are timed in the same rounds.

On a CPU shared with other processes the process CPU time per step is the steadier measure; both it and wall time
are reported. By default the CPU run uses one intra-op thread (``--threads``), which keeps other processes' load
from turning into thread-synchronisation stalls.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import shlex
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    OTHER_CASES,
    SIZES,
    TRAIN_CASES,
    CamPass,
    DataPipeline,
    FlypStep,
    Measurement,
    TrainStep,
    build_image_processor,
    build_model,
    count_flops,
    machine_description,
    make_dataset,
    markdown_table,
    minor_faults,
    peak_memory_bytes,
    random_cams,
    timed,
)

from hf_cfft.data import precompute_cams  # noqa: E402

# The targets: step time ratios to vanilla FT, and data throughput per worker over training throughput.
TARGETS = {"cfft_teacher_single": 2.4, "cfft_student_single": 3.0}
DATA_TARGET = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model and batch size preset")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i]; default: cuda when available")
    parser.add_argument("--batch_size", type=int, default=None, help="per-device batch; default: the size's")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (median over them)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument(
        "--cases", default="all", help=f"comma list of {', '.join([*TRAIN_CASES, *OTHER_CASES])}, or 'all'"
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision through accelerate (autocast)")
    parser.add_argument("--torch_compile", action="store_true", help="CfftConfig(torch_compile=True)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU intra-op threads; default 1 on CPU, 0 = torch's default"
    )
    parser.add_argument(
        "--peak_tflops", type=float, default=None, help="the device's peak dense TFLOP/s at the run's precision: MFU"
    )
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown report here")
    return parser.parse_args(argv)


def _select_cases(spec: str) -> tuple[list[str], list[str]]:
    names = [*TRAIN_CASES, *OTHER_CASES] if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRAIN_CASES and n not in OTHER_CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {[*TRAIN_CASES, *OTHER_CASES]}")
    train = [n for n in TRAIN_CASES if n in names]
    if train and "ft" not in train:
        train.insert(0, "ft")  # the reference of every ratio
    return train, [n for n in OTHER_CASES if n in names]


def run(args: argparse.Namespace) -> str:
    """Build every case, time them round-robin, and return the markdown report."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    previous_threads = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace, device: torch.device) -> str:
    size = SIZES[args.size]
    if args.batch_size:
        size = dataclasses.replace(size, batch_size=args.batch_size)
    train_names, other_names = _select_cases(args.cases)

    base = build_model(size)
    processor = build_image_processor(size)
    dataset = make_dataset(size, num_batches=2)
    teacher = copy.deepcopy(base).to(device).eval().requires_grad_(False)
    if train_names or "cam_pass" in other_names:
        # One CAM pass for every teacher-CAM case: each trainer's teacher is a copy of the same weights.
        cam_dataset = precompute_cams(dataset, teacher, processor, batch_size=size.batch_size)
    else:
        # The data pipeline alone (e.g. at 224 px on a CPU): its cost does not depend on the CAMs' values.
        cam_dataset = dataset.add_column("cam", random_cams(len(dataset), size))

    cases: list = []
    if size.family != "clip" and args.cases == "all":
        train_names = [n for n in train_names if n != "flyp"]  # FlypStep builds CLIP-family models only
    for name in train_names:
        data = cam_dataset if name.startswith("cfft_teacher") else dataset
        step = FlypStep if name == "flyp" else TrainStep
        cases.append(step(name, base, size, data, processor, device, bf16=args.bf16, torch_compile=args.torch_compile))
    if "cam_pass" in other_names:
        cases.append(CamPass(teacher, processor, dataset, size, device))
    if "data" in other_names:
        cases.append(DataPipeline(size, processor, cam_dataset))
    if "preprocess" in other_names:
        cases.append(DataPipeline(size, processor, cam_dataset, preprocess_only=True))

    load_before = machine_description(device)
    times = {case.name: Measurement() for case in cases}
    bar = tqdm(total=(args.warmup + args.repeats) * len(cases), desc="timing steps", unit="step")
    for round_index in range(args.warmup + args.repeats):
        for case in cases:
            bar.set_postfix_str(case.name)
            bar.update()
            faults = minor_faults()
            wall, cpu = timed(case.step, device)
            if round_index >= args.warmup:
                times[case.name].wall.append(wall)
                times[case.name].cpu.append(cpu)
                times[case.name].faults.append(minor_faults() - faults)
    bar.close()
    load_after = machine_description(device)

    memory, flops = {}, {}
    for case in cases:
        if isinstance(case, DataPipeline):
            continue
        if not args.no_memory:
            memory[case.name] = peak_memory_bytes(case.step, device)
        if args.peak_tflops:
            flops[case.name] = count_flops(case.step)
    return _report(args, size, device, cases, times, memory, flops, load_before, load_after)


def _ratio(value: float, reference: float | None) -> str:
    return f"{value / reference:.2f}" if reference else "n/a"


def _report(args, size, device, cases, times, memory, flops, load_before, load_after) -> str:
    ref = times.get("ft")
    header = ["configuration", "images/s", "steps/s", "step ms", "x vanilla (wall)", "step CPU s", "x vanilla (CPU)"]
    header.append("minor faults/step")
    if memory:
        header.append("peak MiB" + (" (above live / absolute)" if device.type == "cuda" else " (above live)"))
    if flops:
        header += ["GFLOP/step", "MFU"]
    rows = []
    for case in cases:
        if not isinstance(case, TrainStep):
            continue
        m = times[case.name]
        row = [
            f"{case.label} (`{case.name}`)",
            f"{case.batch_size / m.wall_median:,.1f}",
            f"{1 / m.wall_median:.2f}",
            f"{1000 * m.wall_median:.1f}",
            _ratio(m.wall_median, ref.wall_median),
            f"{m.cpu_median:.3f}",
            _ratio(m.cpu_median, ref.cpu_median),
            f"{m.faults_median:,.0f}",
        ]
        if memory:
            above, absolute = memory[case.name]
            row.append(f"{above / 2**20:,.0f}" + (f" / {absolute / 2**20:,.0f}" if absolute is not None else ""))
        if flops:
            mfu = flops[case.name] / m.wall_median / (args.peak_tflops * 1e12)
            row += [f"{flops[case.name] / 1e9:,.3g}", f"{mfu:.1%}"]
        rows.append(row)

    # Pipelines against training images/s: how many training processes one data worker could feed.
    ft_ips = size.batch_size / ref.wall_median if ref else None
    cfft = times.get("cfft_teacher_single")
    cfft_ips = size.batch_size / cfft.wall_median if cfft else None
    other_rows = []
    for case in cases:
        if isinstance(case, TrainStep):
            continue
        m = times[case.name]
        ips = case.batch_size / m.wall_median
        row = [f"{case.label} (`{case.name}`)", f"{ips:,.1f}", _ratio(ips, ft_ips), _ratio(ips, cfft_ips)]
        if case.name == "cam_pass" and memory:
            row.append(f"{memory[case.name][0] / 2**20:,.0f}")
        else:
            row.append("")
        other_rows.append(row)

    checks = []
    for name, target in TARGETS.items():
        if name in times and ref:
            wall = times[name].wall_median / ref.wall_median
            cpu = times[name].cpu_median / ref.cpu_median
            verdict = "holds" if max(wall, cpu) <= target else ("holds on CPU time" if cpu <= target else "MISSED")
            checks.append(f"- `{name}` <= {target}x vanilla FT: {wall:.2f}x wall, {cpu:.2f}x CPU time: **{verdict}**")
    if "data" in times and ft_ips:
        ratio = (size.batch_size / times["data"].wall_median) / ft_ips
        verdict = "holds" if ratio >= DATA_TARGET else "MISSED"
        checks.append(
            f"- data pipeline per worker >= {DATA_TARGET:.0f}x vanilla FT training images/s: {ratio:.1f}x: "
            f"**{verdict}**"
        )
    if "random_none" in times and "random_single" in times:
        none, single = times["random_none"].cpu_median, times["random_single"].cpu_median
        checks.append(
            f"- random-mask no-fill (tokens dropped) cheaper than single-fill: {none:.3f} vs {single:.3f} CPU s: "
            f"**{'holds' if none < single else 'MISSED'}**"
        )

    precision = "bf16 autocast" if args.bf16 else "fp32"
    lines = [
        f"## Training throughput: `{args.size}`, batch {size.batch_size}, {device.type}, {precision}"
        + (", torch.compile" if args.torch_compile else ""),
        "",
        f"- command: `{args.command}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}",
        f"- machine before: {load_before}",
        f"- machine after: {load_after}",
        f"- {args.repeats} timed rounds after {args.warmup} warm-up rounds, round-robin over the configurations; "
        "medians; ratios to vanilla FT from this run",
        "",
    ]
    if rows:
        lines += [markdown_table(header, rows), ""]
    if other_rows:
        header = ["pipeline", "images/s", "/ vanilla FT images/s", "/ CFFT teacher single images/s", "peak MiB"]
        lines += [markdown_table(header, other_rows), ""]
    if checks:
        lines += ["Targets:", *checks, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print the markdown report (and write it to ``--output``); return it."""
    args = parse_args(argv)
    words = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python", "benchmarks/training_throughput.py", *map(shlex.quote, words)])
    report = run(args)
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report, encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
