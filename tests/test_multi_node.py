"""Two machines, proven on one host: `accelerate launch --num_machines 2` over loopback trains what one machine with
two processes trains, and only one process of the run writes the outputs."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _builders import save_tiny_clip, write_imagefolder
from safetensors.torch import load_file

from hf_cfft.cli.launch import refuse_a_lone_launch

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finetune_args(clip: Path, images: Path, out: Path) -> list[str]:
    return [
        str(ROOT / "recipes" / "finetune.py"), "--model_name_or_path", str(clip), "--dataset_name", str(images),
        "--eval_splits", "test", "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "4",
        "--templates", "simple", "--use_cpu", "--save_strategy", "no", "--logging_steps", "1", "--learning_rate",
        "1e-3", "--mask_kind", "object", "--fill_kind", "single", "--mask_threshold", "0.3", "--cam_source",
        "teacher", "--evaluate_zero_shot", "false",
    ]  # fmt: skip


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp_path / "datasets_cache")}  # fmt: skip


def _losses(stdout: str) -> list[float]:
    return [float(v) for v in re.findall(r"'loss': '([0-9.e+-]+)'", stdout)]


def test_a_plain_launch_asked_for_two_machines_is_refused():
    env = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}
    argv = ["python", "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "2", "x.py"]
    with pytest.raises(SystemExit, match="--num_machines 2 but started this process alone.*--multi_gpu"):
        refuse_a_lone_launch(env, argv)
    # A real distributed launch (torchrun set WORLD_SIZE), or one process asked for, goes on.
    refuse_a_lone_launch({**env, "WORLD_SIZE": "2"}, argv)
    refuse_a_lone_launch(env, ["accelerate", "launch", "--num_processes", "1", "x.py"])
    refuse_a_lone_launch({}, argv)  # not started by accelerate launch


@pytest.mark.skipif(sys.platform != "linux", reason="gloo processes via accelerate launch")
def test_two_machines_over_loopback_train_what_one_machine_with_two_processes_trains(tmp_path):
    clip = save_tiny_clip(tmp_path / "clip")
    images = write_imagefolder(tmp_path / "images", per_class=8)
    env = _env(tmp_path)
    common = ["--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2"]

    # One machine, two processes: writes the teacher-CAM cache of the file-backed train split.
    single = subprocess.run(
        [*LAUNCH, *common, "--num_machines", "1", "--main_process_port", str(_free_port()),
         *_finetune_args(clip, images, tmp_path / "one_machine")],
        capture_output=True, text=True, timeout=400, env=env,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    caches = sorted((tmp_path / "datasets_cache").rglob("cams-*"))
    assert len(caches) == 1 and caches[0].is_dir(), caches
    written = caches[0].stat().st_mtime_ns

    # Two machines of one process each, rank 1 with its own output folder: it must write nothing there.
    port = _free_port()
    machines = [
        subprocess.Popen(
            [
                *LAUNCH,
                *common,
                "--num_machines",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                *_finetune_args(clip, images, tmp_path / f"machine{rank}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [machine.communicate(timeout=400) for machine in machines]
    for machine, (_, stderr) in zip(machines, outputs):
        assert machine.returncode == 0, stderr[-3000:]
    assert "with 2 process(es) on cpu" in outputs[0][0]

    # The same loss curve and the same final weights as the single-machine run with the same global batch (8).
    assert (
        _losses(outputs[0][0]) == pytest.approx(_losses(single.stdout), rel=1e-5) and len(_losses(single.stdout)) == 4
    )
    one = load_file(str(tmp_path / "one_machine" / "model.safetensors"))
    two = load_file(str(tmp_path / "machine0" / "model.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    # One process of the run wrote the model, card and results; machine 1's folder holds none of them.
    assert {"model.safetensors", "README.md", "eval_results.json"} <= {
        p.name for p in (tmp_path / "machine0").iterdir()
    }
    assert not (tmp_path / "machine1").exists() or not any((tmp_path / "machine1").iterdir())
    # The first run's teacher-CAM cache was found (its fingerprint matched), not written again nor left half-written.
    assert sorted((tmp_path / "datasets_cache").rglob("cams-*")) == caches
    assert caches[0].stat().st_mtime_ns == written
