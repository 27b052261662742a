"""Find the newest checkpoint that was written completely, so a resume never loads a half-written one.

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
import struct
import zipfile

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


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """Turn ``--resume_from_checkpoint`` (a path, True/"true"/"auto", or None) into a complete checkpoint path.

    True/"auto" picks the newest complete checkpoint (None when there is none: the run starts fresh). An explicit
    path that is incomplete is refused with the reasons, instead of loading half a checkpoint.
    """
    if resume_from_checkpoint in (None, False, "", "false", "False"):
        return None
    if resume_from_checkpoint in (True, "true", "True", "auto"):
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
