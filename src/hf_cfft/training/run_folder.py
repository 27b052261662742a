"""The training run's folder: a fresh run never lands on another run, a resume never loads a half-written checkpoint
nor mixes two configurations (the changed training arguments, and the run manifest's data and global batch:
`hf_cfft.training.run_manifest`).

A run killed while saving (SIGKILL, a pre-empted node, a full disk) leaves a ``checkpoint-N`` folder with missing or
truncated files. `transformers.trainer_utils.get_last_checkpoint` would pick it by number; here every file the
resume needs is checked first: ``trainer_state.json`` (written last) parses, safetensors files hold every byte
their header promises, and the optimizer/scheduler/RNG archives pass their zip CRC checks.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..output_folder import is_guard_file
from .run_manifest import MANIFEST_KEY, manifest_changes, refuse_changed_manifest, run_manifest

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _safetensors_problem(path: str) -> str | None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return "shorter than a safetensors header"
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            return "header runs past the end of the file"
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return "header is not valid JSON"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        return f"holds {size} bytes, its header promises {8 + header_len + end}"
    return None


def _zip_problem(path: str) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        return f"not a readable archive ({error})"
    return f"member {bad} fails its CRC check" if bad else None


def checkpoint_problems(path: str) -> list[str]:
    """Reasons why ``path`` cannot be resumed from; an empty list means the checkpoint is complete."""
    problems = []
    state = os.path.join(path, "trainer_state.json")
    try:
        with open(state) as f:
            json.load(f)
    except (OSError, ValueError):
        problems.append("trainer_state.json is missing or truncated (it is written last)")
    names = os.listdir(path) if os.path.isdir(path) else []
    if not any(name.endswith(".safetensors") for name in names):
        problems.append("no .safetensors weights")
    for name in sorted(names):
        full = os.path.join(path, name)
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(full)
        elif name.endswith((".pt", ".pth")):
            problem = _zip_problem(full)
        else:
            continue
        if problem:
            problems.append(f"{name}: {problem}")
    return problems


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` under ``output_dir`` that passes `checkpoint_problems`; logs each one skipped."""
    if not os.path.isdir(output_dir):
        return None
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    for _, name in sorted(found, reverse=True):
        path = os.path.join(output_dir, name)
        problems = checkpoint_problems(path)
        if not problems:
            return path
        logger.warning("Skipping incomplete checkpoint %s: %s", path, "; ".join(problems))
    return None


def resolve_resume_checkpoint(
    resume_from_checkpoint: str | bool | None, output_dir: str, args: Any = None
) -> str | None:
    """Turn ``--resume_from_checkpoint`` (a path, True/"true"/"auto", or None) into a complete checkpoint path.

    True/"auto" picks the newest complete checkpoint (None when there is none: the run starts fresh). An explicit
    path that is incomplete is refused with the reasons, instead of loading half a checkpoint. Given the run's
    ``args`` (the recipe passes them), "auto" on a finished run that ``args`` would not train further is refused
    (`refuse_resuming_a_finished_run`).
    """
    if resume_from_checkpoint in (None, False, "", "false", "False"):
        return None
    if resume_from_checkpoint in (True, "true", "True", "auto"):
        if args is not None:
            refuse_resuming_a_finished_run(output_dir, args)
        return latest_complete_checkpoint(output_dir)
    path = str(resume_from_checkpoint)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"resume_from_checkpoint={path!r} does not exist; pass a checkpoint-N folder or 'auto'"
        )
    problems = checkpoint_problems(path)
    if problems:
        raise ValueError(
            f"checkpoint {path} is incomplete ({'; '.join(problems)}); it was probably being written when the run "
            "stopped. Resume with --resume_from_checkpoint auto to use the newest complete checkpoint"
        )
    return path


def checkpoint_ends_the_run(state: Mapping[str, Any], args: Any) -> bool:
    """Whether a checkpoint (its ``trainer_state.json``, ``state``) is the last step ``args`` would train.

    With ``max_steps`` set: its step reached it. With epochs: the same ``num_train_epochs`` as the saved run, and its
    step reached that run's last step. transformers' loop, resumed there, would train one step past the end.
    """
    step, max_steps = state.get("global_step", 0), getattr(args, "max_steps", -1) or -1
    if max_steps > 0:
        return step >= max_steps
    epochs, last = state.get("num_train_epochs"), state.get("max_steps")
    same_length = epochs is not None and float(getattr(args, "num_train_epochs", 0)) == float(epochs)
    return same_length and last is not None and 0 < last <= step


def refuse_resuming_a_finished_run(output_dir: str, args: Any) -> None:
    """Raise when ``output_dir`` holds a finished run that ``args`` would not train further: nothing is left to resume.

    A run saves its model at the top of ``output_dir`` only once training has ended (a stopped run holds checkpoints
    alone). Resuming it to train longer (a larger ``max_steps`` or ``num_train_epochs`` than its last checkpoint's,
    with ``--allow_changed_args_on_resume true``) goes on.
    """
    folder = Path(output_dir)
    weights = ("model.safetensors", "model.safetensors.index.json", "adapter")
    if not (folder / "config.json").is_file() or not any((folder / name).exists() for name in weights):
        return
    newest = latest_complete_checkpoint(output_dir)
    state = {}
    if newest is not None:
        with open(Path(newest) / "trainer_state.json") as f:
            state = json.load(f)
        step, max_steps, epochs = (
            state.get("global_step", 0),
            getattr(args, "max_steps", -1),
            state.get("num_train_epochs"),
        )
        if (max_steps or -1) > 0 and max_steps > step:
            return
        if (
            (max_steps or -1) <= 0
            and epochs is not None
            and float(getattr(args, "num_train_epochs", 0)) > float(epochs)
        ):
            return
    where = (
        f" (its last checkpoint, {Path(newest).name}, is step {state.get('global_step')} of {state.get('max_steps')})"
        if newest
        else " (and no checkpoint)"
    )
    raise ValueError(
        f"--resume_from_checkpoint auto: --output_dir {str(output_dir)!r} holds a finished run{where}: its "
        "fine-tuned model is saved there, so nothing is left to resume. Use that model as it is; to train it longer, "
        "raise --max_steps or --num_train_epochs (with --allow_changed_args_on_resume true); to train again, pass "
        "another --output_dir (or --overwrite_output_dir true to replace this run)"
    )


# ---- a fresh run never lands on top of another run; a resume never mixes two configs ----

# What a run writes into --output_dir besides checkpoint-N folders; removed (with them) by --overwrite_output_dir.
RUN_FILES = (
    "model.safetensors", "model.safetensors.index.json", "config.json", "modeling.py", "preprocessor_config.json",
    "README.md", "training_args.json", "training_args.bin", "trainer_state.json", "eval_results.json",
    "eval_results.md", "all_results.json", "train_results.json",
)  # fmt: skip

# Fields of CfftConfig / TrainingArguments that shape what a run learns: a resume with any of them changed would
# train half a run with one setting and half with another.
RESUME_FIELDS = (
    "distill_weight", "mask_kind", "fill_kind", "mask_threshold", "mask_top_fraction", "mask_ratio", "cam_method",
    "cam_source", "distill_target", "kd_temperature", "linear_probe", "augment", "decay_all_parameters",
    "one_cycle_schedule", "learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps", "max_grad_norm",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "num_train_epochs", "seed",
    "optim", "adam_beta1", "adam_beta2", "adam_epsilon", "bf16", "fp16",
)  # fmt: skip


def check_output_dir(output_dir: str, *, resuming: bool, overwrite: bool) -> list[str]:
    """Refuse a fresh run into a folder that holds another run, unless ``overwrite``; then clear that run first.

    Returns the entries removed (with ``overwrite``). A resumed run (``resuming``) writes into its own folder and is
    let through. Only what a run writes is removed (`RUN_FILES`, ``checkpoint-N``); other files stay.
    """
    if resuming or not os.path.isdir(output_dir):
        return []
    entries = sorted(name for name in os.listdir(output_dir) if not is_guard_file(name))
    if not entries:
        return []
    if not overwrite:
        checkpoints = [name for name in entries if _CHECKPOINT.match(name)]
        holds = (
            "a finished model (model.safetensors)"
            if "model.safetensors" in entries
            else f"checkpoints {', '.join(checkpoints[:3])}"
            if checkpoints
            else f"{len(entries)} file(s) ({', '.join(entries[:3])})"
        )
        raise FileExistsError(
            f"output_dir {output_dir!r} already holds {holds} from an earlier run; a fresh run would overwrite it "
            "and a later resume could pick up the other run's checkpoints. Pass --output_dir NEW_FOLDER for a new "
            "run, --resume_from_checkpoint auto to continue the run in it, or --overwrite_output_dir true to "
            "replace it"
        )
    removed = [name for name in entries if _CHECKPOINT.match(name) or name in RUN_FILES]
    for name in removed:
        path = os.path.join(output_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if removed:
        logger.warning("--overwrite_output_dir: removed %d entries of the earlier run in %s", len(removed), output_dir)
    return removed


def changed_args(checkpoint: str, args: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (checkpoint's value, this run's value)}`` for the `RESUME_FIELDS` that differ; {} when none do.

    Reads the checkpoint's ``training_args.json`` (hf_cfft writes it into every checkpoint); a checkpoint without
    one (written by another trainer) cannot be compared and gives {}.
    """
    path = os.path.join(checkpoint, "training_args.json")
    if not os.path.isfile(path):
        logger.warning("%s has no training_args.json: the resumed run's settings cannot be compared", checkpoint)
        return {}
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    changed = {}
    for key in RESUME_FIELDS:
        if key in saved and key in args and _normalised(saved[key]) != _normalised(args[key]):
            changed[key] = (saved[key], args[key])
    if "logits" not in (saved.get("distill_target"), args.get("distill_target")):
        changed.pop("kd_temperature", None)  # unused without logit distillation (its default changed from 1 to 10)
    return changed


def _normalised(value: Any) -> Any:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def refuse_changed_resume(checkpoint: str, changed: Mapping[str, tuple[Any, Any]]) -> None:
    """Raise, listing the changed fields, the checkpoint's values and how to resume or start anew."""
    listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
    flags = " ".join(f"--{key} {old}" for key, (old, _) in changed.items())
    raise ValueError(
        f"resuming {checkpoint} with changed settings ({listed}) would mix two runs in one model. Resume with the "
        f"checkpoint's settings ({flags}), start a new run in another --output_dir, or pass "
        "--allow_changed_args_on_resume true to continue anyway (the model card then records the change)"
    )


def check_run_folder(
    args: Any,
    checkpoint: str | None,
    data: Mapping[str, Any] | None = None,
    say_notes: bool = True,
    model: Mapping[str, Any] | None = None,
) -> dict[str, tuple[Any, Any]]:
    """Read-only checks before a run (a `CfftConfig` ``args``, the resolved ``checkpoint`` or None); raise or pass.

    A fresh run (``checkpoint`` None) into a folder holding another run is refused unless
    ``args.overwrite_output_dir``; a resume with changed settings, another global batch or, given this run's
    ``data`` (`run_manifest.rows_fingerprint` plus its "source"), other data unless
    ``args.allow_changed_args_on_resume``. Returns the changes that were allowed ({} when none). Without ``data``
    only the settings and the global batch are compared: cheap, so recipes call it before loading data, and the
    trainer again with the data. ``say_notes`` logs what changed and may go on (another process count). ``model``:
    the starting model's fingerprints (`RobustTrainer.run_model`), compared with the checkpoint's when given.
    """
    if checkpoint is None:
        if not args.overwrite_output_dir:
            check_output_dir(args.output_dir, resuming=False, overwrite=False)
        return {}
    changed = changed_args(checkpoint, args.to_dict())
    saved, current = saved_manifest(checkpoint), run_manifest(args, data, model)
    if saved and saved.get("global_batch") == current["global_batch"]:
        # Another split of the same global batch (e.g. half the processes, twice the accumulation) trains the same
        # steps: the manifest says so, and goes on.
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            changed.pop(key, None)
    if changed and not args.allow_changed_args_on_resume:
        refuse_changed_resume(checkpoint, changed)
    refused, notes = manifest_changes(saved, current)
    if refused and not args.allow_changed_args_on_resume:
        refuse_changed_manifest(checkpoint, refused)
    for note in notes if say_notes and data is not None else ():  # said once: by the trainer's check
        logger.warning("Resuming %s: %s", checkpoint, note)
    return {**changed, **refused}


def saved_manifest(checkpoint: str) -> dict | None:
    """The run manifest of a checkpoint's ``training_args.json``; None when it has none (older or foreign)."""
    path = os.path.join(checkpoint, "training_args.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get(MANIFEST_KEY)
