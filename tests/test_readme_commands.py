"""Every command of the README runs as written (at small sizes) and ends with a line that says what it produced.

The commands are listed here verbatim and the test first checks that the README holds each of them, so a README edit
that changes a command fails here until the command is re-checked. Each runs in a scratch working directory, with
three substitutions only: the README's CLIP and dataset placeholders become a tiny CLIP and a tiny ImageFolder
built in code, and size flags (steps, samples) are appended, which override the command's own values.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _builders import save_tiny_clip, write_imagefolder

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

WORLD_SMALL = ["--max_steps", "2", "--max_train_samples", "128", "--max_eval_samples", "64"]
MINE_SMALL = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "true"]  # the README's is a GPU

MAIN_JOB = "accelerate launch recipes/finetune.py"
YOUR_DATA = (
    "accelerate launch recipes/finetune.py --model_name_or_path openai/clip-vit-base-patch32 \\\n"
    "    --dataset_name /data/my_images --train_split train --eval_splits validation \\\n"
    "    --templates simple --output_dir outputs/mine --bf16 true"
)
IMAGENET = (
    "accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/finetune.py \\\n"
    "    --config recipes/configs/imagenet_vit_b32.yaml"
)
ZERO_SHOT = (
    "python recipes/zero_shot.py --model_name_or_path openai/clip-vit-base-patch32 --dataset_name DIR --output_dir zs"
)
BASELINE = "accelerate launch recipes/finetune.py --config recipes/configs/baselines/vanilla_ft.yaml"
WISE_FT = (
    "python recipes/wise_ft.py --zero_shot_model zs --fine_tuned_model ft --alphas 0 0.5 1 --save_models "
    "--output_dir wise"
)
SOUP = "python recipes/soup.py --models ft1 ft2 ft3 --output_dir soup"
OOD = "python recipes/evaluate_ood.py --model_name_or_path out --benchmark imagenet --data_root /data"
VISUALIZE = (
    "python recipes/visualize.py --model_name_or_path out --dataset_name world --num_images 6 --output_file grid.png"
)
PUSH = "python -m hf_cfft.release.push --model_dir out --repo_id you/clip-cfft"
THROUGHPUT = "python benchmarks/training_throughput.py --size tiny"
GREEDY = (
    "python recipes/soup.py --models ft1 ft2 ft3 --greedy --held_out_split validation --dataset_name DIR "
    "--output_dir greedy_soup"
)
FLYP = "accelerate launch recipes/finetune.py --config recipes/configs/baselines/flyp.yaml"
COMPARE = (
    "accelerate launch recipes/compare.py --model_name_or_path openai/clip-vit-base-patch32 --dataset_name DIR "
    "--eval_splits test ood --ood_splits ood --methods ft ft_fd cfft wise_ft --betas 1 3 --alphas 0.5 --seeds 0 1 "
    "--output_dir compare"
)


def test_the_readme_holds_every_command_listed_here():
    for command in (MAIN_JOB, YOUR_DATA, IMAGENET, ZERO_SHOT, BASELINE, WISE_FT, SOUP, OOD, VISUALIZE, PUSH, GREEDY):
        assert command in README, f"the README no longer holds {command!r}: update this test with it"
    assert THROUGHPUT in README
    # Commands of the recipes table (its second column); other tables list checkpoint names, not commands.
    listed = [
        c for c in re.findall(r"^\| [^|]+ \| `([^`]+)`", README, re.M) if c.startswith(("python ", "accelerate "))
    ]
    known = {ZERO_SHOT, BASELINE, WISE_FT, SOUP, OOD, VISUALIZE, THROUGHPUT, GREEDY, FLYP, COMPARE}
    assert all(c in known or c.startswith(PUSH) for c in listed), f"a README command is not run here: {listed}"


def _run(command: str, cwd: Path, clip: Path, images: Path, extra=(), timeout=600) -> subprocess.CompletedProcess:
    text = command.replace("\\\n", " ").replace("openai/clip-vit-base-patch32", str(clip))
    text = text.replace("/data/my_images", str(images)).replace(" DIR ", f" {images} ")
    argv = shlex.split(text)
    if argv[:2] == ["accelerate", "launch"]:
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", *argv[2:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    argv = [str(ROOT / a) if a.startswith(("recipes/", "benchmarks/")) else a for a in argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([*argv, *extra], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert done.returncode == 0, done.stderr[-3000:]
    return lines[-1] if lines else ""


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.mark.skipif(sys.platform != "linux", reason="runs the recipes as subprocesses")
def test_every_readme_command_runs_and_says_what_it_produced(tmp_path):
    clip, images = (
        save_tiny_clip(tmp_path / "clip"),
        write_imagefolder(tmp_path / "images", ("train", "validation", "test", "ood")),
    )
    work = tmp_path / "work"
    work.mkdir()

    # The main job: the world's config, flags (sizes) on top; its table has the vanilla row.
    done = _run(MAIN_JOB, work, clip, images, WORLD_SMALL)
    assert (
        _last_line(done)
        == "Saved the fine-tuned model, its model card and eval_results.json/.md to outputs/world_cfft"
    )
    assert "| vanilla FT (beta 0) |" in done.stdout and "OOD average against zero-shot:" in done.stdout
    # Twice in a row: the second run refuses, in one message that says what to do.
    again = _run(MAIN_JOB, work, clip, images, WORLD_SMALL)
    # (the recipe stops accelerate after its message: exit status 143, no launcher traceback; test_error_path.py)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert "already holds a finished model" in again.stderr and "--overwrite_output_dir true" in again.stderr

    assert _last_line(_run(YOUR_DATA, work, clip, images, MINE_SMALL)).startswith("Saved the fine-tuned model")
    for name in ("ft", "ft1", "ft2", "ft3"):
        shutil.copytree(work / "outputs" / "mine", work / name)
    shutil.copytree(work / "outputs" / "world_cfft", work / "out")

    assert _last_line(_run(ZERO_SHOT, work, clip, images)).startswith("Saved the zero-shot classifier (3 classes")
    done = _run(BASELINE, work, clip, images, WORLD_SMALL)
    assert _last_line(done).endswith("to outputs/world_vanilla_ft")

    last = _last_line(_run(WISE_FT, work, clip, images))
    assert last.startswith("Saved 3 WiSE-FT model(s)") and "wise/alpha_0.50" in last
    assert '"alpha": 0.5' in (work / "wise" / "alpha_0.50" / "model_origin.json").read_text()
    assert "**WiSE-FT**" in (work / "wise" / "alpha_0.50" / "README.md").read_text()

    assert (
        _last_line(_run(SOUP, work, clip, images))
        == "Saved the uniform soup of 3 models (weights, image processor, card) to soup"
    )
    done = _run(GREEDY, work, clip, images)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "greedy_soup" / "greedy_soup.json").is_file() and "Saved the greedy soup" in done.stdout
    done = _run(FLYP, work, clip, images, WORLD_SMALL)
    assert done.returncode == 0, done.stderr[-3000:]
    done = _run(COMPARE, work, clip, images, ["--max_steps", "2", "--per_device_train_batch_size", "4"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "compare" / "frontier.png").is_file() and (work / "compare" / "summary.md").is_file()
    assert _last_line(_run(VISUALIZE, work, clip, images)).startswith("Wrote grid.png (")
    assert (work / "grid.png").is_file()

    # No ImageNet here: the command says so in one message.
    done = _run(OOD, work, clip, images)
    assert done.returncode == 2 and "no ImageNet set found" in done.stderr and "Traceback" not in done.stderr

    # No network here: the push fails, says so, and leaves the folder byte for byte as it was.
    before = _hashes(work / "out")
    done = _run(PUSH, work, clip, images)
    assert done.returncode == 1 and "Nothing local changed" in done.stderr and "retry with" in done.stderr
    assert _hashes(work / "out") == before

    done = _run(THROUGHPUT, work, clip, images, ["--repeats", "1", "--warmup", "0", "--cases", "ft", "--no_memory"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vanilla FT" in done.stdout
