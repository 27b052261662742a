"""Issue 24, item 1: output folders that cannot be lost (hf_cfft.output_folder), in every recipe that writes one.

The adversarial cases run the recipes as a user would (a subprocess, exit status and stderr); the others call the
recipes' ``main`` in-process. Every refusal is checked to leave the folder byte for byte as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _builders import load_script
from conftest import _tiny_config
from PIL import Image

from hf_cfft import CfftConfig, CfftTrainer
from hf_cfft.modeling import ClipCfftForImageClassification
from hf_cfft.output_folder import (
    LOCK_NAME,
    MARK_NAME,
    OutputFolder,
    OutputFolderError,
    acquire_lock,
    check_output_file,
    read_mark,
    release_lock,
    save_png,
    write_mark,
)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def _recipe(name: str):
    return load_script(ROOT / "recipes" / f"{name}.py", f"{name}_recipe")


def _run(recipe: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), *argv]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV)


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _refused(done: subprocess.CompletedProcess) -> str:
    """The one-line message of a refused recipe run (exit status 2, no traceback)."""
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "Training on" not in done.stdout, "the refusal must come before any work"
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    return line


def _model_folder(path: Path, kind: str | None) -> Path:
    """A saved-model-like folder (config.json, README.md, weights), marked for ``kind`` (None: the user's own)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "mine"}\n')
    (path / "README.md").write_text("# my notes\n")
    (path / "model.safetensors").write_bytes(os.urandom(64))
    if kind is not None:
        write_mark(path, kind)
    return path


# ---- the guard itself ----


def test_a_new_folder_is_created_marked_and_locked_then_unlocked(tmp_path):
    out = tmp_path / "a" / "b"
    with OutputFolder(out, "zero_shot"):
        assert (out / LOCK_NAME).is_file()
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert not (out / LOCK_NAME).exists(), "the lock is released on exit"
    mark = read_mark(out)
    assert mark["kind"] == "zero_shot" and mark["made_by"] == "hf_cfft" and "command" in mark
    assert "hf_cfft_version" in mark and "created" in mark
    before = (out / MARK_NAME).read_bytes()
    with OutputFolder(out, "zero_shot"):  # the same kind again: allowed, the mark is not rewritten
        pass
    assert (out / MARK_NAME).read_bytes() == before


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), OutputFolder(out, "soup"):
        raise RuntimeError("boom")
    assert not (out / LOCK_NAME).exists()


def test_a_run_that_fails_before_writing_leaves_no_folder_it_made_but_keeps_what_it_wrote(tmp_path):
    new = tmp_path / "new"
    with pytest.raises(ValueError, match="refused"), OutputFolder(new, "compare"):
        raise ValueError("refused")
    assert not new.exists()  # before: an empty folder (its mark) stayed behind a refused run
    wrote = tmp_path / "wrote"
    with pytest.raises(RuntimeError), OutputFolder(wrote, "compare"):
        (wrote / "rows.jsonl").write_text("{}\n")
        raise RuntimeError("later")
    assert (wrote / "rows.jsonl").read_text() == "{}\n" and (wrote / MARK_NAME).is_file()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ValueError), OutputFolder(existing, "compare"):
        raise ValueError("refused")
    assert existing.is_dir()  # a folder the run did not make is never removed


def test_compare_refuses_a_strength_outside_its_range_before_any_cell_and_leaves_no_folder(tmp_path, capsys):
    from test_error_path import _refused

    for flags, message in (
        (["--methods", "ft", "cfft", "--betas", "-1"], "beta -1 of CFFT object/single must be a finite number >= 0"),
        (["--methods", "ft", "wise_ft", "--alphas", "2"], "alpha 2 of WiSE-FT must lie in [0, 1]"),
    ):
        out = tmp_path / "cmp"
        err = _refused(capsys, ["--output_dir", str(out), *flags, "--ood_splits", "ood"], "compare")
        assert message in err  # before: the ft cell trained first, then the bad cell failed
        assert not out.exists()


def test_another_kind_of_output_is_refused_naming_what_made_the_folder(tmp_path):
    out = _model_folder(tmp_path / "ft", "finetune")
    before = _hashes(out)
    with pytest.raises(OutputFolderError) as error, OutputFolder(out, "wise_ft"):
        pass
    message = str(error.value)
    assert "holds a fine-tuning run (recipes/finetune.py)" in message and "Pass another --output_dir" in message
    assert _hashes(out) == before


def test_a_live_lock_is_refused_with_how_to_clear_it_and_a_stale_one_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        record = {"pid": sleeper.pid, "host": socket.gethostname(), "since": "then", "command": "finetune.py"}
        (out / LOCK_NAME).write_text(json.dumps(record))
        with pytest.raises(OutputFolderError) as error, OutputFolder(out, "soup"):
            pass
        message = str(error.value)
        assert f"is being written by another run (process {sleeper.pid} on {socket.gethostname()}" in message
        assert f"delete {out / LOCK_NAME} and run again" in message
        assert json.loads((out / LOCK_NAME).read_text()) == record, "a refused run leaves the other's lock alone"
    finally:
        sleeper.kill()
        sleeper.wait()
    with OutputFolder(out, "soup"):  # its process is gone: the lock is stale and taken over
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_a_lock_of_another_machine_is_never_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "some-other-node", "command": "x"}))
    with pytest.raises(OutputFolderError, match="process 1 on some-other-node"), OutputFolder(out, "soup"):
        pass


def test_the_lock_is_re_entrant_within_one_process(tmp_path):
    lock = acquire_lock(tmp_path)
    assert acquire_lock(tmp_path) == lock  # the recipe holds it, its trainer takes it again
    release_lock(lock)
    assert lock.exists(), "still held once"
    release_lock(lock)
    assert not lock.exists()


def test_a_file_or_a_path_under_a_file_is_refused(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with (
        pytest.raises(OutputFolderError, match=r"'.*f.txt' is a file, not a folder"),
        OutputFolder(tmp_path / "f.txt", "soup"),
    ):
        pass
    with (
        pytest.raises(OutputFolderError, match=r"cannot be created: .*f.txt is a file"),
        OutputFolder(tmp_path / "f.txt" / "sub", "soup"),
    ):
        pass
    assert (tmp_path / "f.txt").read_text() == "x"


# ---- the recipes, as a user runs them ----


def test_zero_shot_into_a_fine_tuned_folder_is_refused_and_keeps_every_byte(tmp_path):
    ft = _model_folder(tmp_path / "ft", "finetune")
    before = _hashes(ft)
    line = _refused(_run("zero_shot", "--output_dir", str(ft), cwd=tmp_path))
    assert f"--output_dir '{ft}' holds a fine-tuning run (recipes/finetune.py)" in line
    assert "writing a zero-shot classifier (recipes/zero_shot.py) into it" in line
    assert _hashes(ft) == before


def test_soup_into_one_of_its_ingredients_is_refused_and_keeps_every_byte(tmp_path):
    ingredients = [_model_folder(tmp_path / f"ft{i}", "finetune") for i in range(2)]
    before = _hashes(tmp_path)
    argv = ["--models", *map(str, ingredients), "--output_dir", str(ingredients[1]), "--save_model"]
    line = _refused(_run("soup", *argv, cwd=tmp_path))
    assert f"--output_dir '{ingredients[1]}' is ingredient 2 '{ingredients[1]}'" in line
    assert _hashes(tmp_path) == before


def test_overwrite_output_dir_over_the_users_own_files_is_refused(tmp_path):
    mine = _model_folder(tmp_path / "mine", None)  # README.md and config.json of the user's, no mark
    before = _hashes(mine)
    line = _refused(_run("finetune", "--output_dir", str(mine), "--overwrite_output_dir", "true", cwd=tmp_path))
    assert "holds 3 entries (README.md, config.json, model.safetensors)" in line
    assert "hf_cfft did not make it, so --overwrite_output_dir would delete files that may be yours" in line
    assert _hashes(mine) == before


def test_a_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    # /sys refuses writes even to root; elsewhere a folder without write permission does.
    if os.geteuid() == 0:  # root writes through permissions, not into /sys
        out = Path("/sys/kernel/hf_cfft_out")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = locked / "run"
    line = _refused(_run("finetune", "--output_dir", str(out), "--max_steps", "1", cwd=tmp_path))
    assert f"--output_dir '{out}' cannot be written (" in line and "nothing was run" in line


def test_a_second_finetune_into_a_folder_in_use_is_refused(tmp_path):
    out = tmp_path / "run"
    with OutputFolder(out, "finetune"):  # this test process plays the first run
        line = _refused(_run("finetune", "--output_dir", str(out), cwd=tmp_path))
    assert f"is being written by another run (process {os.getpid()}" in line and "delete" in line


# ---- the recipes, in-process ----


def test_wise_ft_into_its_fine_tuned_model_is_refused(tmp_path):
    ft = _model_folder(tmp_path / "ft", "finetune")
    before = _hashes(ft)
    with pytest.raises(OutputFolderError, match=r"is --fine_tuned_model .* would overwrite the model"):
        _recipe("wise_ft").main(["--fine_tuned_model", str(ft), "--output_dir", str(ft), "--save_models"])
    assert _hashes(ft) == before


def test_evaluate_ood_into_a_soup_folder_is_refused(tmp_path):
    soup = _model_folder(tmp_path / "soup", "soup")
    before = _hashes(soup)
    with pytest.raises(OutputFolderError, match=r"holds a model soup \(recipes/soup.py\)"):
        _recipe("evaluate_ood").main(["--output_dir", str(soup)])
    assert _hashes(soup) == before


def test_compare_into_a_users_folder_is_refused(tmp_path):
    mine = _model_folder(tmp_path / "mine", None)
    before = _hashes(mine)
    with pytest.raises(OutputFolderError, match="hf_cfft did not make it"):
        _recipe("compare").main(["--output_dir", str(mine), "--methods", "zero_shot"])
    assert _hashes(mine) == before


def test_compare_shards_lock_separately():
    source = (ROOT / "recipes" / "compare.py").read_text()
    assert 'f".hf_cfft.shard-{index}of{count}.lock"' in source


# ---- a single output file (visualize) ----


def test_visualize_never_replaces_a_file_it_did_not_write(tmp_path):
    mine = tmp_path / "grid.png"
    Image.new("RGB", (4, 4), "red").save(mine)
    before = mine.read_bytes()
    with pytest.raises(OutputFolderError, match="exists and hf_cfft did not write it"):
        _recipe("visualize").main(["--output_file", str(mine)])
    assert mine.read_bytes() == before
    with pytest.raises(OutputFolderError, match="is a folder; pass a file path"):
        check_output_file(tmp_path)


def test_a_png_hf_cfft_wrote_may_be_replaced(tmp_path):
    path = tmp_path / "sub" / "grid.png"
    check_output_file(path)
    save_png(Image.new("RGB", (4, 4), "blue"), path)
    check_output_file(path)  # ours: no error
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"], "no scratch file is left"


def test_a_folder_the_trainer_made_is_marked_and_one_without_a_mark_is_never_overwritten(tmp_path):
    """Library use (CfftTrainer, no recipe): its folder carries the mark, so --overwrite_output_dir may replace it."""
    out = tmp_path / "run"
    args = CfftConfig(
        output_dir=str(out), max_steps=1, per_device_train_batch_size=2, use_cpu=True, report_to="none",
        distill_weight=0.0, mask_kind="none", fill_kind="none",
    )  # fmt: skip
    data = [{"pixel_values": torch.zeros(3, 32, 32), "labels": i % 3} for i in range(4)]
    CfftTrainer(model=ClipCfftForImageClassification(_tiny_config()), args=args, train_dataset=data).train()
    assert read_mark(out)["kind"] == "finetune" and not (out / LOCK_NAME).exists()
    (out / MARK_NAME).unlink()  # as if the user made the folder
    (out / "notes.txt").write_text("mine")
    before = _hashes(out)
    overwrite = dataclasses.replace(args, overwrite_output_dir=True)
    trainer = CfftTrainer(model=ClipCfftForImageClassification(_tiny_config()), args=overwrite, train_dataset=data)
    with pytest.raises(OutputFolderError, match="hf_cfft did not make it, so --overwrite_output_dir would delete"):
        trainer.train()
    assert _hashes(out) == before


def test_a_comparison_made_before_marks_is_adopted_but_not_a_folder_with_other_files(tmp_path):
    old = tmp_path / "cmp"
    (old / "runs").mkdir(parents=True)
    (old / "rows-0of2.jsonl").write_text("{}\n")
    (old / "compare.md").write_text("# old\n")
    with OutputFolder(old, "compare"):  # its rows are what lets it resume
        pass
    assert read_mark(old)["kind"] == "compare"
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "rows.jsonl").write_text("{}\n")
    (tmp_path / "mixed" / "thesis.tex").write_text("mine")
    with (
        pytest.raises(OutputFolderError, match=r"holds 2 entries \(rows.jsonl, thesis.tex\)"),
        OutputFolder(tmp_path / "mixed", "compare"),
    ):
        pass
