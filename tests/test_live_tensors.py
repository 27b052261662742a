"""benchmarks/_live_tensors.py: the tensor-level peak the memory benchmark reports beside the process's."""

from __future__ import annotations

from pathlib import Path

import torch
from _builders import load_script

live_tensors = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "_live_tensors.py", "_live_tensors")


def test_storages_are_counted_once_and_until_freed():
    with live_tensors.LiveTensorPeak() as live:
        x = torch.ones(1000)  # 4000 bytes
        y = x * 2  # 4000 more
        view = x[:10]  # shares x's storage: nothing new
        x.mul_(3)  # in place: nothing new
        assert (live.live, live.peak) == (8000, 8000)
        del y
        assert (live.live, live.peak) == (4000, 8000)
        live.reset_peak()
        big = torch.zeros(2000, dtype=torch.float64)  # 16000 bytes
        del big
        assert (live.live, live.peak) == (4000, 20000)
    assert view.sum() == 30.0


def test_a_backward_pass_counts_what_autograd_saves_and_the_gradients():
    weight = torch.ones(250, requires_grad=True)  # 1000 bytes, made before: passed in
    with live_tensors.LiveTensorPeak(already=[weight]) as live:
        loss = (weight.exp() * 3).sum()  # exp's result (1000) is saved for backward; the product is freed
        assert live.live == 1000 + 1000 + 4
        loss.backward()
        # exp's saved result is freed with the graph; the gradient (1000) stays
        assert live.live == 1000 + 1000 + 4 and weight.grad is not None
        assert live.peak >= 1000 + 1000 + 1000 + 4  # gradient and saved result at once, before the graph goes


def test_the_memory_benchmark_reports_tensor_peaks_that_order_the_teachers(tmp_path):
    """At micro size: CFFT's fp32 teacher holds more tensor bytes than vanilla FT, a bf16 teacher fewer than fp32."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "memory.md"
    command = [
        sys.executable, str(root / "benchmarks" / "memory.py"), "--size", "micro", "--batch_size", "4",
        "--gradient_checkpointing", "false", "--cases", "ft,cfft,cfft_bf16_teacher", "--output", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["case"]: row for row in json.loads(out.with_suffix(".json").read_text())}
    ft, cfft, bf16 = (rows[k]["tensor_peak_bytes"] for k in ("ft", "cfft", "cfft_bf16_teacher"))
    assert ft < bf16 < cfft
    assert cfft - ft >= rows["cfft"]["teacher_bytes"]  # at least the teacher's weights more
    assert "| tensor peak GiB |" in out.read_text()
