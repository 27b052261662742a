"""Issue 24, item 5: one error path for every recipe: a handled error is one message, without a traceback.

Under `accelerate launch` (one process and two), compare.py's own mistakes, the Hub offline, YAML mistakes with their
file and line, counts that are not whole numbers, and resuming a finished run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _builders import load_script, save_tiny_clip, write_imagefolder

from hf_cfft import CfftConfig
from hf_cfft.cli.script_args import run_recipe

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "recipes" / "finetune.py"
COMPARE = ROOT / "recipes" / "compare.py"


def _recipe(name: str = "finetune"):
    return load_script(ROOT / "recipes" / f"{name}.py", f"{name}_recipe_errors")


def _refused(capsys, argv: list[str], recipe: str = "finetune") -> str:
    """Run the recipe's main as ``python recipes/<recipe>.py`` does; the one handled message, on one line."""
    module = _recipe(recipe)
    with pytest.raises(SystemExit) as stop:
        run_recipe(lambda: module.main(argv))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err and err.count("error: ") == 1, err
    return " ".join(err[err.index("error: ") :].split())


def _run(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    env.pop("HF_CFFT_TRACEBACK", None)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    return save_tiny_clip(root / "clip"), write_imagefolder(root / "images", splits=("train",), per_class=2)


def _args(workspace, out, *extra) -> list[str]:
    clip, images = workspace
    return [
        "--model_name_or_path", str(clip), "--dataset_name", str(images), "--output_dir", str(out), "--max_steps",
        "2", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--report_to", "none", "--save_steps", "1",
        "--templates", "simple", *extra,
    ]  # fmt: skip


# ---- under accelerate launch ----

LAUNCHES = {
    "one process": ["--num_processes", "1"],
    "two processes": ["--multi_gpu", "--num_processes", "2"],
}


def test_only_one_process_of_a_launch_signals_the_launcher(monkeypatch, tmp_path):
    """Before: every failing process sent SIGTERM; the second one reached the torchrun agent while it was shutting
    its workers down and broke that off with a logging traceback (seen in CI, 2026-12-03)."""
    import tempfile

    from hf_cfft.cli import launch

    sent, slept = [], []
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(launch, "_launched_by_accelerate", lambda environ: True)
    monkeypatch.setattr(launch.os, "close", lambda fd: None)  # the real call closes stderr
    monkeypatch.setattr(launch.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr("time.sleep", slept.append)
    environ = {"WORLD_SIZE": "2", "MASTER_PORT": "29500"}
    assert [launch.stop_the_launcher(environ), launch.stop_the_launcher(environ)] == [True, False]
    assert len(sent) == 1 and sent[0][0] == os.getppid()
    assert slept == [1.0, 1.0, launch._STOP_WAIT_S]  # the second one waits to be stopped with the others
    # one message is printed once per launch; another message is printed too
    assert [launch.first_to_report("a", environ), launch.first_to_report("a", environ)] == [True, False]
    assert launch.first_to_report("b", environ)
    assert launch.first_to_report("a", {"WORLD_SIZE": "1"})


@pytest.mark.xdist_group("two_processes")  # one port (29500): launches of two processes run one at a time
@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_a_handled_error_under_accelerate_launch_is_printed_once_without_a_traceback(tmp_path, launch):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *LAUNCHES[launch], "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(FINETUNE), "--use_cpu", "true", "--output_dir",
        str(tmp_path / "run"), "--mask_threshold", "1.5",
    ]  # fmt: skip
    done = _run(command, tmp_path)
    err = done.stderr
    # before: the message twice (the script's, then accelerate's copy) under a CalledProcessError traceback
    assert err.count("error: mask_threshold=1.5 must lie in (0, 1)") == 1, err
    assert "Traceback" not in err and "CalledProcessError" not in err and "ChildFailedError" not in err, err
    assert done.returncode == 143  # accelerate, stopped by the recipe after its message


def test_compare_under_accelerate_launch_prints_its_error_once(tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(COMPARE), "--methods", "ft", "cfft_nope",
        "--output_dir", str(tmp_path / "cmp"),
    ]  # fmt: skip
    done = _run(command, tmp_path)
    assert done.stderr.count("error: unknown method(s) ['cfft_nope']; choose from") == 1, done.stderr
    assert "Traceback" not in done.stderr and done.returncode == 143


# ---- compare.py's own mistakes (before: tracebacks) ----


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--methods", "ft", "cfft_nope"], "error: unknown method(s) ['cfft_nope']; choose from zero_shot, ft,"),
        (["--shard", "3/2"], "error: --shard '3/2' is not i/n with 0 <= i < n (e.g. --shard 0/2 and --shard 1/2)"),
    ],
    ids=["unknown method", "shard 3/2"],
)
def test_compare_mistakes_are_one_line_each(tmp_path, flags, message):
    done = _run([sys.executable, str(COMPARE), *flags, "--output_dir", str(tmp_path / "cmp")], tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[0].startswith(message) and len(lines) == 2, lines  # the message, then how to see the traceback
    assert not (tmp_path / "cmp").exists()


# ---- the Hub offline ----


def test_an_offline_hub_model_id_is_named_with_the_fix_before_any_work(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = _args(workspace, tmp_path / "run", "--model_name_or_path", "someone/clip-not-cached")
    err = _refused(capsys, args)
    assert (
        "--model_name_or_path 'someone/clip-not-cached' is a Hub id, but the Hub is switched off (HF_HUB_OFFLINE=1)"
        in err
    )
    assert "hf download someone/clip-not-cached" in err and "or pass a local folder" in err


def test_an_offline_hub_dataset_is_named_with_the_fix(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _refused(capsys, _args(workspace, tmp_path / "run", "--dataset_name", "someone/images-not-cached"))
    assert "--dataset_name 'someone/images-not-cached' is a Hub dataset id and cannot be loaded here" in err
    assert "pass a local ImageFolder" in err


def test_push_to_hub_offline_is_refused_before_training(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _refused(capsys, _args(workspace, tmp_path / "run", "--push_to_hub", "true", "--hub_model_id", "me/x"))
    assert "--push_to_hub true needs the Hub, but it is switched off here (HF_HUB_OFFLINE=1)" in err
    assert "python -m hf_cfft.release.push --model_dir" in err
    assert not (tmp_path / "run").exists()  # refused when the flags are read: nothing trained, nothing written


# ---- YAML mistakes name the file and the line ----


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "max_steps: 2\n\tlearning_rate: 1e-3\n",
            "line 2 holds a tab ('learning_rate: 1e-3'): YAML indents with spaces",
        ),
        ("max_steps: 2\nsave_strategy: no\n", "line 2: save_strategy: no is read by YAML as the boolean False"),
        ("learning_rate: [1e-5, 1e-4]\n", "line 1: learning_rate takes one value, got a list ['1e-5', '1e-4']"),
        ("max_steps: 2\nper_device_train_batch_size: 2.5\n", "line 2: per_device_train_batch_size must be a whole"),
    ],
    ids=["tab", "unquoted no", "list for a number", "fractional batch size"],
)
def test_yaml_mistakes_name_the_file_and_the_line(workspace, tmp_path, capsys, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    err = _refused(capsys, ["--config", str(config), *_args(workspace, tmp_path / "run")])
    assert f"config file {config}, {message}" in err.replace(f"{config} line", f"{config}, line")
    assert not (tmp_path / "run").exists()


def test_a_quoted_no_is_text(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("save_strategy: 'no'\nresume_from_checkpoint: true\n")
    _, _, args, _ = _recipe().parse_args(["--config", str(config), "--output_dir", str(tmp_path / "x"), "--use_cpu"])
    assert str(getattr(args.save_strategy, "value", args.save_strategy)) == "no"


def test_a_batch_size_that_is_not_a_whole_number_is_refused_before_any_work(workspace, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"per_device_train_batch_size=2\.5 must be a whole number"):
        CfftConfig(output_dir=str(tmp_path / "lib"), per_device_train_batch_size=2.5, use_cpu=True)
    module = _recipe()
    with pytest.raises(SystemExit) as stop:  # the flag: argparse's one line
        run_recipe(lambda: module.main(_args(workspace, tmp_path / "run", "--per_device_train_batch_size", "2.5")))
    assert stop.value.code == 2 and "invalid int value: '2.5'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("recipe", "flags", "message"),
    [
        ("finetune", ["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size=0 must be >= 1"),
        ("zero_shot", ["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size 0 must be a whole number"),
        ("evaluate_ood", ["--batch_size", "0"], "--batch_size 0 must be a whole number >= 1"),
    ],
)
def test_a_batch_of_no_image_is_refused_when_the_flags_are_read(workspace, tmp_path, capsys, recipe, flags, message):
    """Before: torch's `batch_size should be a positive integer value` at the first evaluation, which in fine-tuning
    came after training and before the save, so the trained model was lost."""
    clip, images = workspace
    out = tmp_path / "out"
    argv = {
        "finetune": _args(workspace, out, "--eval_splits", "train", *flags),
        "zero_shot": ["--model_name_or_path", str(clip), "--dataset_name", str(images), "--eval_splits", "train",
                      "--templates", "simple", "--output_dir", str(out), *flags],
        "evaluate_ood": ["--model_name_or_path", str(clip), "--dataset_name", str(images), "--id_split", "train",
                         "--templates", "simple", "--output_dir", str(out), *flags],
    }[recipe]  # fmt: skip
    assert message in _refused(capsys, argv, recipe)
    assert not out.exists()


# ---- resume auto on a finished run ----


def test_resume_auto_on_a_finished_run_says_it_is_finished(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    _recipe().main(_args(workspace, out, "--evaluate_zero_shot", "false"))
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    before = (out / "model.safetensors").read_bytes()
    err = _refused(capsys, _args(workspace, out, "--resume_from_checkpoint", "auto"))
    assert f"--resume_from_checkpoint auto: --output_dir '{out}' holds a finished run (its last checkpoint, " in err
    assert "checkpoint-2, is step 2 of 2): its fine-tuned model is saved there, so nothing is left to resume" in err
    assert (out / "model.safetensors").read_bytes() == before
    # training it longer is a resume that goes on
    longer = ["--max_steps", "3", "--allow_changed_args_on_resume", "true", "--evaluate_zero_shot", "false"]
    capsys.readouterr()
    _recipe().main(_args(workspace, out, "--resume_from_checkpoint", "auto", *longer))
    assert (out / "checkpoint-3").is_dir()
    assert f"Resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out  # a resumed run names its checkpoint


def test_the_trainer_itself_refuses_resume_auto_on_a_finished_run(tmp_path, tiny_classifier, tiny_image_processor):
    """For library users who call CfftTrainer.train(resume_from_checkpoint='auto') without the recipe."""
    import copy

    import datasets
    from PIL import Image

    from hf_cfft import CfftConfig, CfftTrainer

    images = [Image.new("RGB", (32, 32), (30 * i, 200 - 20 * i, 90)) for i in range(8)]
    train = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(8)]})
    args = CfftConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, save_steps=1, per_device_train_batch_size=4, use_cpu=True,
        distill_weight=0.0, mask_kind="none", fill_kind="none", report_to="none",
    )  # fmt: skip
    start = copy.deepcopy(tiny_classifier)
    trainer = CfftTrainer(model=tiny_classifier, args=args, train_dataset=train, processing_class=tiny_image_processor)
    trainer.train()
    trainer.save_model()
    again = CfftTrainer(model=start, args=args, train_dataset=train, processing_class=tiny_image_processor)
    with pytest.raises(ValueError, match="holds a finished run .*nothing is left to resume"):
        again.train(resume_from_checkpoint="auto")


def _broken_row(index):  # module level: a DataLoader worker imports it
    raise ValueError(f"cannot read image row {index}: broken")


def test_an_error_raised_in_a_dataloader_worker_is_one_line():
    """torch re-raises a worker's error as `Caught ValueError in DataLoader worker process 0.` and the worker's
    traceback; the recipes print the worker's own message (evaluate_ood scores with two workers by default)."""
    import torch.utils.data

    from hf_cfft.cli.script_args import user_message

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return _broken_row(index)

    with pytest.raises(ValueError) as error:
        next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))
    assert "Original Traceback" in str(error.value)
    assert user_message(error.value) == "cannot read image row 0: broken"
    assert user_message(ValueError("plain")) == "plain"
