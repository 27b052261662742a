"""Peak memory per training step of vanilla FT, CFFT (float32 teacher copy), CFFT with a bfloat16 teacher and LoRA
CFFT, side by side, at real tower shapes with random weights.

    python benchmarks/memory.py --size vit-b16 --output docs/memory_vit_b16.md            # CPU, one thread
    python benchmarks/memory.py --size vit-l14 --batch_size 8 --output docs/memory_vit_l14.md
    python benchmarks/memory.py --size vit-b16 --device cuda --bf16                        # a GPU

Each configuration runs in a fresh process (so that no allocation of another configuration is still held): it builds
its `CfftTrainer` on two prepared batches (random CAMs stand in for the teacher's, so no CAM pass runs before the
steps), takes two optimizer steps (the first creates AdamW's moments) and reports

- ``peak``: on the CPU the process's peak resident memory (VmHWM) above its resident memory before the model was built;
  on a GPU ``torch.cuda.max_memory_allocated``;
- ``tensor peak``: the peak of live tensor bytes over both steps (`_live_tensors.LiveTensorPeak`: weights, teacher,
  activations, gradients, moments, batches), free of the allocator's and the Python heap's noise;
- ``state``: the bytes of the tensors that live across steps: student weights, their gradients, AdamW's two moments
  and a teacher copy's weights (LoRA: the adapter's gradients and moments only);
- the second step's wall time.

CFFT's floor over vanilla FT is the teacher's weights plus one more set of the student's activations (the
counterfactual pass): ``floor = peak(ft) + teacher bytes + (peak(ft) - state(ft))``. Each row's distance from that
floor is ``peak / floor``. Ratios are to vanilla FT's peak with the same gradient-checkpointing setting, from one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# name -> (label, CfftConfig overrides). Every distilling case uses cached teacher CAMs, object masks, single-fill.
CASES: dict[str, tuple[str, dict]] = {
    "ft": ("vanilla FT", {"distill_weight": 0.0, "mask_kind": "none", "fill_kind": "none"}),
    "cfft": ("CFFT, float32 teacher copy", {"mask_kind": "object", "fill_kind": "single", "cam_source": "teacher"}),
    "cfft_bf16_teacher": (
        "CFFT, bfloat16 teacher copy",
        {"mask_kind": "object", "fill_kind": "single", "cam_source": "teacher", "teacher_dtype": "bfloat16"},
    ),
    "lora_cfft": (
        "LoRA CFFT (rank 16; teacher = adapters off)",
        {"mask_kind": "object", "fill_kind": "single", "cam_source": "teacher", "lora_rank": 16, "lora_alpha": 32},
    ),
    "cfft_student": (
        "CFFT, student CAM online",
        {"mask_kind": "object", "fill_kind": "single", "cam_source": "student"},
    ),
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure_one(case: str, size_name: str, *, batch_size: int | None, gradient_checkpointing: bool, device_name: str,
                bf16: bool) -> dict:  # fmt: skip
    """One configuration in this process: {peak_bytes, state_bytes, teacher_bytes, step_seconds, ...}."""
    import torch
    from _harness import SIZES, TrainStep, build_image_processor, build_model, make_dataset, random_cams
    from _live_tensors import LiveTensorPeak

    from hf_cfft import CfftConfig, CfftTrainer
    from hf_cfft.adapters import AdapterFreeTeacher
    from hf_cfft.data import CounterfactualTransform

    size = SIZES[size_name]
    if batch_size:
        size = replace(size, batch_size=batch_size)
    device = torch.device(device_name)
    dataset = make_dataset(size, num_batches=2)
    dataset = dataset.add_column("cam", random_cams(len(dataset), size))
    processor = build_image_processor(size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _status_kib("VmRSS") * 1024
    _, overrides = CASES[case]
    args = CfftConfig(
        output_dir=tempfile.mkdtemp(prefix=f"cfft_memory_{case}_"), per_device_train_batch_size=size.batch_size,
        use_cpu=device.type == "cpu", bf16=bf16, seed=0, disable_tqdm=True, report_to="none",
        gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        **overrides,
    )  # fmt: skip
    # The trainer owns the only copy of the student (no deepcopy of a base model stays alive beside it).
    trainer = CfftTrainer(model=build_model(size), args=args, processing_class=processor)
    if gradient_checkpointing:
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    transform = CounterfactualTransform(
        processor, grid=size.grid, mask_kind=args.mask_kind, mask_threshold=args.mask_threshold,
        num_labels=size.num_labels,
    )  # fmt: skip
    trainer.train_dataset = dataset.with_transform(transform)
    step = TrainStep.__new__(TrainStep)  # the harness's optimizer step on this trainer
    step.name, step.label, step.device, step.batch_size, step.trainer = (
        case,
        CASES[case][0],
        device,
        size.batch_size,
        trainer,
    )
    TrainStep._prepare(step, 2)
    already = [*trainer.model.parameters(), *trainer.model.buffers()]
    already += [value for batch in step.batches for value in batch.values() if torch.is_tensor(value)]
    if trainer.teacher is not None and isinstance(trainer.teacher, torch.nn.Module):
        already += [*trainer.teacher.parameters(), *trainer.teacher.buffers()]
    # The tensor count's own cost (a Python call per operator) is left out of the timed step: it runs on a third.
    with LiveTensorPeak(already=already) as live:
        step.step()
        step.step()
    tensor_peak = live.peak
    step.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    moments = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]
    teacher = trainer.teacher
    teacher_bytes = (
        0 if teacher is None or isinstance(teacher, AdapterFreeTeacher) else _tensor_bytes(teacher.parameters())
    )
    state = _tensor_bytes(params) + _tensor_bytes(p.grad for p in trainable) + _tensor_bytes(moments) + teacher_bytes
    # Gradients are freed by zero_grad(set_to_none): count them as the step holds them, one per trainable weight.
    state += 0 if any(p.grad is not None for p in trainable) else _tensor_bytes(trainable)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _status_kib("VmHWM") * 1024 - rss_before
    # Under gradient checkpointing the adapter must still learn: its AdamW moment is non-zero after two steps.
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    adapter_learns = None if not lora_b else bool(trainer.optimizer.state[lora_b[0]]["exp_avg"].abs().sum() > 0)
    return {
        "case": case,
        "peak_bytes": peak,
        "tensor_peak_bytes": tensor_peak,
        "state_bytes": state,
        "teacher_bytes": teacher_bytes,
        "step_seconds": seconds,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "parameters": sum(p.numel() for p in params),
        "batch_size": size.batch_size,
        "gradient_checkpointing": gradient_checkpointing,
        "adapter_learns": adapter_learns,
    }


def _child(args: argparse.Namespace, case: str, gc: bool) -> dict:
    command = [sys.executable, __file__, "--child", case, "--size", args.size, "--device", args.device,
               "--gradient_checkpointing", str(gc).lower()]  # fmt: skip
    if args.batch_size:
        command += ["--batch_size", str(args.batch_size)]
    if args.bf16:
        command.append("--bf16")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{case} (gradient checkpointing {gc}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def report(args: argparse.Namespace, rows: list[dict], load_before, load_after, started: str) -> str:
    import torch
    from _harness import machine_description

    lines = [
        f"# Peak memory per training step, {args.size}",
        "",
        f"`python benchmarks/memory.py {shlex.join(sys.argv[1:])}`; {machine_description(torch.device(args.device))}; "
        f"started {started}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) per process; batch {rows[0]['batch_size']}.",
        "",
    ]
    for gc in sorted({r["gradient_checkpointing"] for r in rows}):
        group = [r for r in rows if r["gradient_checkpointing"] == gc]
        ft = next(r for r in group if r["case"] == "ft")
        activations = ft["peak_bytes"] - ft["state_bytes"]
        lines += [
            f"## Gradient checkpointing {'on' if gc else 'off'}",
            "",
            "| configuration | peak GiB | state GiB | x vanilla peak | floor GiB | peak / floor | tensor peak GiB "
            "| x vanilla tensors | tensor floor GiB | tensors / floor | step s | x vanilla step |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        tensors = "tensor_peak_bytes" in ft
        tensor_activations = ft["tensor_peak_bytes"] - ft["state_bytes"] if tensors else 0
        for r in group:
            floor = ft["peak_bytes"] + r["teacher_bytes"] + (activations if r["case"] != "ft" else 0)
            cells = ["-"] * 4
            if tensors:
                tensor_floor = (
                    ft["tensor_peak_bytes"] + r["teacher_bytes"] + (tensor_activations if r["case"] != "ft" else 0)
                )
                cells = [_gib(r["tensor_peak_bytes"]), f"{r['tensor_peak_bytes'] / ft['tensor_peak_bytes']:.2f}",
                         _gib(tensor_floor), f"{r['tensor_peak_bytes'] / tensor_floor:.2f}"]  # fmt: skip
            lines.append(
                f"| {CASES[r['case']][0]} | {_gib(r['peak_bytes'])} | {_gib(r['state_bytes'])} | "
                f"{r['peak_bytes'] / ft['peak_bytes']:.2f} | {_gib(floor)} | {r['peak_bytes'] / floor:.2f} | "
                f"{' | '.join(cells)} | {r['step_seconds']:.1f} | {r['step_seconds'] / ft['step_seconds']:.2f} |"
            )
        lines.append("")
    lines += [
        "peak: the process's peak resident memory above its resident memory before the model was built (CPU), or "
        "`torch.cuda.max_memory_allocated` (GPU). state: weights, gradients, AdamW moments and a teacher copy's "
        "weights. floor: vanilla FT's peak + the teacher's weights + one more set of vanilla FT's activations "
        "(peak - state), the least a CFFT step can hold; LoRA's floor counts no teacher weights (it has none). "
        "tensor peak: the peak of live tensor bytes over the first two steps (benchmarks/_live_tensors.py), free of "
        "the allocator's and the Python heap's noise; its floor is built the same way from vanilla FT's tensor peak. "
        "The step time is a later step's, without the tensor count.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="vit-b16")
    parser.add_argument("--batch_size", type=int, default=None, help="Per-step batch (default: 16).")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--gradient_checkpointing", default="both", choices=("both", "true", "false"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        row = measure_one(args.child, args.size, batch_size=args.batch_size or 16,
                          gradient_checkpointing=args.gradient_checkpointing == "true", device_name=args.device,
                          bf16=args.bf16)  # fmt: skip
        print(json.dumps(row))
        return ""
    args.batch_size = args.batch_size or 16
    settings = {"both": (True, False), "true": (True,), "false": (False,)}[args.gradient_checkpointing]
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_before = os.getloadavg()
    rows = []
    for gc in settings:
        for case in args.cases.split(","):
            rows.append(_child(args, case, gc))
            print(json.dumps(rows[-1]), flush=True)
    text = report(args, rows, load_before, os.getloadavg(), started)
    if args.output:
        Path(args.output).write_text(text)
        Path(args.output).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
