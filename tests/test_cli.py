"""The recipes' glue (`hf_cfft.cli`) and the commands a pip-installed user has."""

from __future__ import annotations

import os
import subprocess
import sys

from hf_cfft.cli.script_args import DataArguments, default_model, load_train_and_eval_splits
from hf_cfft.cli.sources import class_names_for
from hf_cfft.world import WORLD_CLASS_NAMES, world_clip_path


def test_world_splits_load_truncated_with_their_class_names():
    data_args = DataArguments(eval_splits=["test_id"], max_train_samples=16, max_eval_samples=8)
    train, splits = load_train_and_eval_splits(data_args, seed=0)
    assert len(train) == 16 and list(splits) == ["test_id"] and len(splits["test_id"]) == 8
    assert class_names_for(None, train) == list(WORLD_CLASS_NAMES)
    assert default_model(None, "world") == str(world_clip_path())


def test_the_push_command_named_in_retry_messages_exists(tmp_path):
    done = subprocess.run([sys.executable, "-m", "hf_cfft.release.push", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--model_dir" in done.stdout and "--repo_id" in done.stdout
    # Run as the retry message writes it, on a folder that holds no model: refused before any Hub call, rc 1.
    (tmp_path / "empty").mkdir()
    command = [
        sys.executable,
        "-m",
        "hf_cfft.release.push",
        "--model_dir",
        str(tmp_path / "empty"),
        "--repo_id",
        "me/x",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "has no config.json: save the model with save_pretrained first" in done.stderr, done.stderr[-2000:]
