"""What `accelerate launch` was asked for, checked against what it started.

accelerate's plain launcher (no ``--multi_gpu``, no distributed config) starts one standalone process even when it is
given ``--num_machines 2`` or ``--num_processes 2``: every machine then trains its own model on the whole dataset and
writes the same output files, and nothing fails. `refuse_a_lone_launch` turns that into one clear error.
"""

from __future__ import annotations

import os
import sys
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


# ---- a handled error under a launcher: printed once, and no launcher traceback after it ----


def _launched_by_accelerate(environ=os.environ) -> bool:
    """Whether this process's parent is `accelerate launch` (its plain launcher, or the torchrun agent it runs)."""
    if not any(key.startswith("ACCELERATE_") for key in environ):
        return False
    argv = _launcher_argv(os.getppid())
    # `accelerate launch ...` (the console script) or `python -m accelerate.commands.launch ...`
    return any(part.endswith("accelerate.commands.launch") for part in argv[:3]) or (
        any(os.path.basename(part) == "accelerate" for part in argv[:2]) and "launch" in argv[1:3]
    )


def _started_at(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, Linux), so that a reused process id names a new launch."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _first_of_launch(name: str, environ=os.environ) -> bool:
    """Whether this process is the first of its launch to claim ``name`` (one process: always).

    The processes of one launch share a marker file named by their launcher's process id, the rendezvous port and
    ``name``, created by the first one only.
    """
    if int(environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    import hashlib
    import tempfile

    digest = hashlib.blake2b(name.encode(), digest_size=8).hexdigest()
    launch = f"{os.getppid()}-{_started_at(os.getppid())}-{environ.get('MASTER_PORT', '')}"
    marker = os.path.join(tempfile.gettempdir(), f"hf_cfft-error-{launch}-{digest}")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True  # no shared scratch folder: better twice than never
    return True


def first_to_report(message: str, environ=os.environ) -> bool:
    """Whether this process is the first of its launch to report ``message`` (one process: always).

    The processes of one launch that fail with the same message (a bad flag fails them all) print it once.
    """
    return _first_of_launch("report:" + message, environ)


def stop_the_launcher(environ=os.environ) -> bool:
    """After a handled error has been printed: stop `accelerate launch` so that it adds no traceback of its own.

    accelerate turns any non-zero exit of the script into a ``CalledProcessError`` traceback that repeats the
    script's stderr (torchrun: a ``ChildFailedError`` report); asked to stop by SIGTERM it shuts its processes down
    and exits with status 143 instead, without a traceback. Only a parent that is `accelerate launch` is signalled;
    returns whether one was.
    """
    import signal

    if environ.get("HF_CFFT_TRACEBACK") or not _launched_by_accelerate(environ):
        return False
    import time

    # accelerate's plain launcher copies this process's stderr through a pipe: close it, so that the launcher reads
    # the message to its end, and give it a moment to write it out before it is asked to stop (a signal that
    # arrives between its read and its write would drop the message).
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.close(2)
    except OSError:
        pass
    time.sleep(1.0)
    if not _first_of_launch("stop the launcher", environ):
        # Another process of this launch has signalled the launcher. A second SIGTERM would reach the launcher while
        # it shuts its processes down, and break that off with a traceback of its own; an exit now would be reported
        # as a failed child. Wait to be stopped with the others.
        time.sleep(_STOP_WAIT_S)
        return False
    try:
        os.kill(os.getppid(), signal.SIGTERM)
    except OSError:
        return False
    return True


_STOP_WAIT_S = 60.0  # how long a process waits for the launcher to stop it before it exits by itself
