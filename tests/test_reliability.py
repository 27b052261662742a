"""Reliability: exact resume after SIGKILL, incomplete checkpoints skipped, bad input stopped with a clear message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _builders import CLASSES, save_tiny_clip, write_imagefolder
from safetensors.torch import load_file

from hf_cfft.classifier_loading import load_classifier
from hf_cfft.training.run_folder import checkpoint_problems, latest_complete_checkpoint, resolve_resume_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "finetune.py"

# Runs the real recipe in a child process; after the checkpoint of step STOP_AFTER is on disk it writes a flag file
# and sleeps, so the test can SIGKILL it at a known point (the kill itself is real and unannounced to the child).
_DRIVER = """
import importlib.util, os, sys, time
from transformers import TrainerCallback
spec = importlib.util.spec_from_file_location("finetune_recipe", sys.argv[1])
recipe = importlib.util.module_from_spec(spec); sys.modules[spec.name] = recipe; spec.loader.exec_module(recipe)
stop_after, flag = int(os.environ["STOP_AFTER"]), os.environ["STOP_FLAG"]

class Pause(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == stop_after:
            open(flag, "w").close()
            time.sleep(600)

def pausing(base):  # every method's trainer: CFFT's and FLYP's
    class Pausing(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            if not os.environ.get("STOP_LATE"):
                self.add_callback(Pause())

        def _save_rng_state(self, output_dir):
            # STOP_LATE: pause inside the checkpoint write, after the weights and optimizer, before trainer_state.json.
            super()._save_rng_state(output_dir)
            if os.environ.get("STOP_LATE") and self.state.global_step == stop_after:
                open(flag, "w").close()
                time.sleep(600)

    return Pausing

import hf_cfft.baselines.flyp as flyp, hf_cfft.trainer as cfft  # the job builds what the method table names
cfft.CfftTrainer, flyp.FlypTrainer = pausing(cfft.CfftTrainer), pausing(flyp.FlypTrainer)
recipe.main(sys.argv[2:])
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return save_tiny_clip(root / "clip"), write_imagefolder(root / "images", per_class=6)


def _args(clip, images, out, *extra):
    return [
        "--model_name_or_path", str(clip), "--dataset_name", str(images), "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--max_steps", "7", "--save_steps", "3", "--templates", "simple",
        "--use_cpu", "--logging_steps", "1", "--evaluate_zero_shot", "false", "--learning_rate", "1e-3", *extra,
    ]  # fmt: skip


def _run(args, env=None, timeout=240):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *args], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "method",
    [
        ["--mask_kind", "object", "--fill_kind", "single"],  # teacher CAMs cached, content-seeded refills
        ["--mask_kind", "context", "--fill_kind", "multi", "--cam_source", "student"],  # step-seeded refills
        ["--mask_kind", "random", "--fill_kind", "none", "--mask_ratio", "0.5"],  # random masks + token drop
        # FLYP: both towers, step-seeded template draws, the shared base trainer's checkpoints
        ["--method", "flyp", "--distill_weight", "0", "--mask_kind", "none", "--fill_kind", "none"],
    ],
    ids=["object-single-teacher", "context-multi-student", "random-none", "flyp"],
)
def test_sigkilled_run_resumes_to_the_same_weights_bitwise(workspace, tmp_path, method):
    clip, images = workspace
    whole = _run([str(RECIPE), *_args(clip, images, tmp_path / "whole", *method)])
    out, err = whole.communicate(timeout=240)
    assert whole.returncode == 0, err.decode()[-3000:]

    flag = tmp_path / "paused"
    killed_dir = tmp_path / "killed"
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    child = _run(
        [str(driver), str(RECIPE), *_args(clip, images, killed_dir, *method)],
        env={"STOP_AFTER": "3", "STOP_FLAG": str(flag)},
    )
    deadline = time.time() + 240
    while not flag.exists():
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the child never reached its checkpoint"
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not (killed_dir / "model.safetensors").exists(), "the killed run must not have finished"
    assert latest_complete_checkpoint(str(killed_dir)).endswith("checkpoint-3")

    resumed = _run([str(RECIPE), *_args(clip, images, killed_dir, *method), "--resume_from_checkpoint", "auto"])
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err.decode()[-3000:]

    expected, got = _weights(tmp_path / "whole"), _weights(killed_dir)
    assert expected.keys() == got.keys()
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not different, f"resumed weights differ from the uninterrupted run in {different[:5]}"


def test_kill_late_in_a_checkpoint_write_is_skipped_on_resume(workspace, tmp_path):
    """SIGKILL after checkpoint-6's weights are complete but before its trainer_state.json: resume from 3, bitwise."""
    clip, images = workspace
    method = ["--mask_kind", "object", "--fill_kind", "single"]
    whole = _run([str(RECIPE), *_args(clip, images, tmp_path / "whole", *method)])
    _, err = whole.communicate(timeout=240)
    assert whole.returncode == 0, err.decode()[-3000:]

    flag, killed_dir, driver = tmp_path / "paused", tmp_path / "killed", tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    child = _run(
        [str(driver), str(RECIPE), *_args(clip, images, killed_dir, *method)],
        env={"STOP_AFTER": "6", "STOP_FLAG": str(flag), "STOP_LATE": "1"},
    )
    deadline = time.time() + 240
    while not flag.exists():
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the child never reached its checkpoint"
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    late = killed_dir / "checkpoint-6"
    assert (late / "model.safetensors").is_file() and not (late / "trainer_state.json").exists()
    assert any("trainer_state.json" in problem for problem in checkpoint_problems(str(late)))
    assert latest_complete_checkpoint(str(killed_dir)).endswith("checkpoint-3")

    resumed = _run([str(RECIPE), *_args(clip, images, killed_dir, *method), "--resume_from_checkpoint", "auto"])
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err.decode()[-3000:]
    assert "Skipping incomplete checkpoint" in err.decode() and "checkpoint-6" in err.decode()
    expected, got = _weights(tmp_path / "whole"), _weights(killed_dir)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_truncated_checkpoint_is_skipped_and_never_loaded(workspace, tmp_path, caplog):
    clip, images = workspace
    done = _run([str(RECIPE), *_args(clip, images, tmp_path / "run", "--max_steps", "6")])
    _, err = done.communicate(timeout=240)
    assert done.returncode == 0, err.decode()[-3000:]
    newest = tmp_path / "run" / "checkpoint-6"
    assert checkpoint_problems(str(newest)) == []
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # killed mid-write

    problems = checkpoint_problems(str(newest))
    assert any("model.safetensors" in p for p in problems)
    with caplog.at_level("WARNING"):
        assert latest_complete_checkpoint(str(tmp_path / "run")) == str(tmp_path / "run" / "checkpoint-3")
    assert "checkpoint-6" in caplog.text
    with pytest.raises(ValueError, match="checkpoint-6 is incomplete.*--resume_from_checkpoint auto"):
        resolve_resume_checkpoint(str(newest), str(tmp_path / "run"))
    (newest / "trainer_state.json").write_text('{"global_step": ')
    assert any("trainer_state.json" in p for p in checkpoint_problems(str(newest)))


def test_no_checkpoint_yet_means_a_fresh_start(tmp_path):
    assert resolve_resume_checkpoint("auto", str(tmp_path)) is None
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_resume_checkpoint(str(tmp_path / "nowhere"), str(tmp_path))


def test_library_never_unpickles_checkpoints():
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "src" / "hf_cfft").rglob("*.py")
        if "torch.load(" in path.read_text() or "pickle.load" in path.read_text()
    ]
    assert offenders == []


@pytest.mark.xdist_group("two_processes")  # one port (29500): launches of two processes run one at a time
def test_two_processes_match_one_process_with_the_same_global_batch(workspace, tmp_path):
    """Vanilla FT over 2 CPU processes equals 1 process: every step sees the whole 12-image set either way.

    (With refilling the two differ by design: partners come from each process's own half-batch.)
    """
    clip, _ = workspace
    images = write_imagefolder(tmp_path / "images", splits=("train",), per_class=4)
    common = [
        "--model_name_or_path", str(clip), "--dataset_name", str(images), "--max_steps", "3",
        "--save_strategy", "no", "--templates", "simple", "--evaluate_zero_shot", "false", "--distill_weight", "0",
        "--mask_kind", "none", "--fill_kind", "none", "--learning_rate", "1e-3", "--use_cpu",
    ]  # fmt: skip
    one = _run([str(RECIPE), *common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "12"])
    _, err = one.communicate(timeout=240)
    assert one.returncode == 0, err.decode()[-3000:]
    two = _run(
        [
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(RECIPE),
            *common,
            "--output_dir",
            str(tmp_path / "two"),
            "--per_device_train_batch_size",
            "6",
        ]  # fmt: skip
    )
    out, err = two.communicate(timeout=300)
    assert two.returncode == 0, err.decode()[-3000:]
    assert "with 2 process(es) on cpu" in out.decode()
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    # Attention key biases get a gradient that is zero up to rounding (softmax ignores a per-query constant), and
    # Adam scales that rounding noise up to learning-rate-sized steps: they are compared for finiteness only.
    for name in a:
        if name.endswith("k_proj.bias"):
            assert torch.isfinite(b[name]).all()
            continue
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("checkpoint")) == []


_HANG_DRIVER = """
import importlib.util, os, signal, sys
from transformers import TrainerCallback
spec = importlib.util.spec_from_file_location("finetune_recipe", sys.argv[1])
recipe = importlib.util.module_from_spec(spec); sys.modules[spec.name] = recipe; spec.loader.exec_module(recipe)

class HangRankOne(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if args.process_index == 1 and state.global_step == 2:
            os.kill(os.getpid(), signal.SIGSTOP)  # hung: alive, but never joins the next all-reduce

import hf_cfft.trainer as cfft  # the job builds the trainer the method table names (hf_cfft.methods)

class Trainer(cfft.CfftTrainer):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.add_callback(HangRankOne())

cfft.CfftTrainer = Trainer
recipe.run_recipe(lambda: recipe.main(sys.argv[2:]))
"""


@pytest.mark.xdist_group("two_processes")  # one port (29500): launches of two processes run one at a time
@pytest.mark.skipif(sys.platform != "linux", reason="two CPU processes via accelerate launch")
def test_a_hung_process_makes_the_other_exit_within_ddp_timeout_with_a_message(workspace, tmp_path):
    clip, images = workspace
    driver = tmp_path / "hang.py"
    driver.write_text(_HANG_DRIVER)
    launch = [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", str(driver), str(RECIPE),
    ]  # fmt: skip
    started = time.time()
    child = subprocess.Popen(
        [sys.executable, *launch, *_args(clip, images, tmp_path / "run", "--ddp_timeout", "20", "--max_steps", "6")],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = child.communicate(timeout=240)
    finally:
        if child.poll() is None:  # it did not end by itself: stop every process it started (torchrun's ranks too)
            import psutil

            for process in [*psutil.Process(child.pid).children(recursive=True), psutil.Process(child.pid)]:
                process.kill()
    message = err.decode()
    assert child.returncode != 0 and time.time() - started < 240
    assert "process 0 of 2 stopped at step 3: another process died or hung (waited at most ddp_timeout=20 s" in message
    assert "--resume_from_checkpoint auto" in message


# ---- bad input: each row of docs/reliability.md ----


def test_corrupt_image_fails_before_training_with_its_name(workspace, tmp_path):
    clip, _ = workspace
    images = write_imagefolder(tmp_path / "images", splits=("train",), per_class=3)
    broken = images / "train" / "dog" / "2.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    done = _run([str(RECIPE), *_args(clip, images, tmp_path / "run")])
    _, err = done.communicate(timeout=240)
    assert done.returncode != 0
    assert "2.png" in err.decode() and "--skip_corrupt_images" in err.decode()
    assert not (tmp_path / "run" / "checkpoint-3").exists(), "must fail before training starts"


def test_corrupt_image_can_be_skipped_and_counted(workspace, tmp_path):
    clip, _ = workspace
    images = write_imagefolder(tmp_path / "images", splits=("train",), per_class=3)
    (images / "train" / "fox" / "1.png").write_bytes(b"garbage")
    done = _run(
        [str(RECIPE), *_args(clip, images, tmp_path / "run", "--skip_corrupt_images", "true", "--max_steps", "2")]
    )
    out, err = done.communicate(timeout=240)
    assert done.returncode == 0, err.decode()[-3000:]
    assert "Skipped 1 unreadable train image(s); training on 8." in out.decode()


def test_class_names_that_do_not_match_the_head_are_refused(workspace, tmp_path):
    clip, images = workspace
    done = _run([str(RECIPE), *_args(clip, images, tmp_path / "run", "--max_steps", "1", "--save_strategy", "no")])
    assert done.wait(timeout=240) == 0
    with pytest.raises(ValueError, match="built for 3 classes .* but the dataset has 3 .*same order"):
        load_classifier(str(tmp_path / "run"), class_names=[CLASSES[1], CLASSES[0], CLASSES[2]])
    with pytest.raises(ValueError, match="built for 3 classes .* but the dataset has 2"):
        load_classifier(str(tmp_path / "run"), class_names=list(CLASSES[:2]))


def test_label_out_of_range_is_named(workspace, tmp_path):
    clip, images = workspace
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")  # the folder has a third class, label 2
    done = _run([str(RECIPE), *_args(clip, images, tmp_path / "run", "--class_names", str(names))])
    _, err = done.communicate(timeout=240)
    assert done.returncode != 0
    # a names file against an ImageFolder is checked when the data loads (test_data_boundary.py); the label check of
    # the train transform itself: test_data.py::test_label_out_of_range_raises_through_the_dataset
    assert "has 2 names (cat, dog) but the dataset has 3 classes (cat, dog, fox)" in err.decode()


def test_a_checkpoint_that_is_not_clip_is_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    ).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="'vit' checkpoint; hf_cfft fine-tunes CLIP ViT"):
        load_classifier(str(tmp_path / "vit"), class_names=["a", "b"], templates=["{}"])


def test_missing_eval_folder_is_named(workspace, tmp_path):
    clip, images = workspace
    done = _run(
        [str(RECIPE), *_args(clip, images, tmp_path / "run"), "--dataset_name", str(tmp_path / "no" / "such" / "dir")]
    )
    _, err = done.communicate(timeout=240)
    assert done.returncode != 0 and "dataset folder" in err.decode() and "does not exist" in err.decode()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(workspace, tmp_path):
    """Weights poisoned after step 2's checkpoint: step 3 must stop with its number; checkpoint-2 stays loadable."""
    clip, images = workspace
    driver = tmp_path / "poison.py"
    driver.write_text(
        _DRIVER.replace(
            'open(flag, "w").close()\n            time.sleep(600)',
            "kwargs['model'].classifier.weight.data.fill_(float('nan'))",
        )
    )
    done = _run(
        [str(driver), str(RECIPE), *_args(clip, images, tmp_path / "run", "--save_steps", "2")],
        env={"STOP_AFTER": "2", "STOP_FLAG": str(tmp_path / "unused")},
    )
    _, err = done.communicate(timeout=240)
    message = err.decode()
    assert done.returncode != 0
    assert "non-finite loss at step 3" in message and "checkpoint-2" in message
    assert checkpoint_problems(str(tmp_path / "run" / "checkpoint-2")) == []
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_image_broken_past_its_header_is_named_when_decoded(tmp_path):
    """A truncated body passes the quick 'verify' scan but fails at decode time: the message names the file."""
    import numpy as np
    from PIL import Image

    from hf_cfft.data import load_image

    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ValueError, match=r"cannot read image .*cut\.jpg.*--skip_corrupt_images"):
        load_image({"path": str(path), "bytes": None})


def test_a_run_stopped_after_its_last_checkpoint_resumes_to_its_weights_without_an_extra_step(
    tmp_path, tiny_classifier, tiny_image_processor
):
    """Stopped between the last checkpoint and the final save, then resumed: before, transformers' loop trained one
    step past max_steps (checkpoint-5 of a 4-step run; with a constant learning rate, other weights, rc 0)."""
    import copy

    import datasets
    from PIL import Image

    from hf_cfft import CfftConfig, CfftTrainer

    # 12 images, 3 steps an epoch: the run's last step (4) falls inside an epoch, where the loop went on.
    images = [Image.new("RGB", (32, 32), (20 * i, 220 - 15 * i, 90)) for i in range(12)]
    train = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(12)]})
    args = CfftConfig(
        output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2, per_device_train_batch_size=4, use_cpu=True,
        distill_weight=0.0, mask_kind="none", fill_kind="none", report_to="none", lr_scheduler_type="constant",
        learning_rate=1e-2, logging_steps=1,
    )  # fmt: skip
    start = copy.deepcopy(tiny_classifier)
    trainer = CfftTrainer(model=tiny_classifier, args=args, train_dataset=train, processing_class=tiny_image_processor)
    trainer.train()  # no final save_model: as if the run stopped right after checkpoint-4
    finished = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    assert not all(torch.equal(finished[name], tensor) for name, tensor in start.state_dict().items())

    again = CfftTrainer(model=start, args=args, train_dataset=train, processing_class=tiny_image_processor)
    result = again.train(resume_from_checkpoint="auto")
    assert result.global_step == 4 and again.state.global_step == 4 and again.state.max_steps == 4
    assert all(torch.equal(finished[name], tensor) for name, tensor in again.model.state_dict().items())
    assert sorted(path.name for path in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert result.training_loss == pytest.approx(
        sum(log["loss"] for log in again.state.log_history if "loss" in log) / 4
    )


def test_an_unreadable_eval_image_is_named_before_training_and_a_late_one_keeps_the_trained_model(
    workspace, tmp_path, capsys
):
    """Before: a corrupt file in an eval split ended the recipe in a PIL traceback at the first evaluation, which
    with --evaluate_zero_shot false came after training and before the save: the trained model was lost."""
    import shutil

    import numpy as np
    from _builders import load_script
    from PIL import Image

    from hf_cfft.cli.script_args import run_recipe

    clip, images = workspace
    data = tmp_path / "images"
    shutil.copytree(images, data)
    write_imagefolder(data, splits=("test",), per_class=2)
    recipe = load_script(RECIPE, "finetune_recipe_eval_images")

    (data / "test" / "cat" / "junk.png").write_text("not an image")
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        run_recipe(lambda: recipe.main(_args(clip, data, run, "--eval_splits", "test", "--max_steps", "2")))
    err = capsys.readouterr().err
    assert "1 unreadable image(s) in eval split 'test': " in err and "junk.png" in err
    assert not (run / "model.safetensors").exists() and not list(run.glob("checkpoint-*"))  # nothing trained

    # A body cut short passes the quick check; it fails at the final evaluation, after training.
    (data / "test" / "cat" / "junk.png").unlink()
    cut = data / "test" / "cat" / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:1000])  # the header and the first scans: 'verify' passes, decoding fails
    with pytest.raises(ValueError, match=r"cannot read image .*cut\.jpg"):
        recipe.main(_args(clip, data, tmp_path / "late", "--eval_splits", "test", "--max_steps", "2"))
    assert (tmp_path / "late" / "model.safetensors").is_file()
    assert "the fine-tuned model was saved to" in capsys.readouterr().out
