"""What `accelerate launch` was asked for, checked against what it started.

accelerate's plain launcher (no ``--multi_gpu``, no distributed config) starts one standalone process even when it is
given ``--num_machines 2`` or ``--num_processes 2``: every machine then trains its own model on the whole dataset and
writes the same output files, and nothing fails. `refuse_a_lone_launch` turns that into one clear error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def _launcher_argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:  # not Linux, or the parent is gone: nothing to check
        return []


def _flag(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def refuse_a_lone_launch(environ=os.environ, parent_argv: Sequence[str] | None = None) -> None:
    """Raise when `accelerate launch` was asked for several machines or processes but started this one alone.

    Only a process started by accelerate's plain launcher is checked (it sets ``ACCELERATE_USE_CPU`` but no
    ``WORLD_SIZE``); ``parent_argv`` defaults to the launching process's command line.
    """
    if "WORLD_SIZE" in environ or "ACCELERATE_USE_CPU" not in environ:
        return
    argv = _launcher_argv(os.getppid()) if parent_argv is None else list(parent_argv)
    if not any("accelerate" in part for part in argv[:3]):
        return
    asked = {name: _flag(argv, f"--{name}") for name in ("num_machines", "num_processes")}
    try:
        many = {name: int(value) for name, value in asked.items() if value is not None and int(value) > 1}
    except ValueError:
        return
    if many:
        wanted = ", ".join(f"--{name} {value}" for name, value in many.items())
        raise SystemExit(
            f"accelerate launch was given {wanted} but started this process alone (no distributed mode was named), "
            "so each machine or process would train its own model and write the same files. Add --multi_gpu (DDP; "
            "with --use_cpu on CPUs), or use recipes/accelerate/multi_node.yaml; --num_processes counts the "
            "processes of all machines together (2 machines x 1 process: --num_processes 2 --num_machines 2)."
        )
