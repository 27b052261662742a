"""Output folders that cannot be lost: one guard for every recipe that writes a folder.

A folder is written only if it is new, empty, or *marked* as made by hf_cfft for the same kind of output. The mark
(``.hf_cfft_output.json``) records what made the folder: the kind, the command, the hf_cfft version and the time.
While a run writes a folder it holds a lock file (``.hf_cfft.lock``: process id, host, command), so a second run
into the same folder is refused instead of interleaving its files with the first's. The lock is released on exit;
one left by a process that no longer runs (a crash, a SIGKILL) is stale and taken over with a warning. A path that
is a file, or a folder that cannot be written, is refused before any work, not after hours of training.

    with OutputFolder("outputs/zs", "zero_shot"):
        ...  # write into it

Both guard files start with a dot, so a push to the Hub never uploads them (`hf_cfft.release.hub.EXCLUDED_FILES`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MARK_NAME = ".hf_cfft_output.json"
LOCK_NAME = ".hf_cfft.lock"
# Kinds of output, with what a user calls them in messages.
KINDS = {
    "finetune": "a fine-tuning run (recipes/finetune.py)",
    "zero_shot": "a zero-shot classifier (recipes/zero_shot.py)",
    "wise_ft": "WiSE-FT models and results (recipes/wise_ft.py)",
    "soup": "a model soup (recipes/soup.py)",
    "ood_eval": "an OOD evaluation report (recipes/evaluate_ood.py)",
    "compare": "a method comparison (recipes/compare.py)",
}
# A lock file that cannot be read is being written (or its writer died before writing); older than this: stale.
_UNREADABLE_LOCK_GRACE_S = 30.0

# lock path -> how many times this process holds it (a recipe holds the lock, and its trainer takes it again).
_HELD: dict[str, int] = {}


class OutputFolderError(ValueError):
    """An output folder was refused; the message names the folder, why, and what to do. Nothing was written."""


def is_guard_file(name: str) -> bool:
    """Whether ``name`` (an entry of an output folder) is the mark or a lock of this module."""
    return name == MARK_NAME or (name.startswith(".hf_cfft") and name.endswith(".lock"))


def read_mark(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The mark of ``folder`` (what made it), or None when it has none (or one that is not valid JSON)."""
    path = Path(folder) / MARK_NAME
    try:
        mark = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) and mark.get("made_by") == "hf_cfft" else None


def _shown(entries: list[str]) -> str:
    return ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")


def check_output_folder(
    folder: str | os.PathLike,
    kind: str,
    *,
    overwrite: bool = False,
    resuming: bool = False,
    flag: str = "--output_dir",
) -> None:
    """Refuse ``folder`` for output of ``kind`` (a key of `KINDS`) unless it is new, empty or marked for ``kind``.

    Read-only: raises `OutputFolderError` naming the folder and the fix. ``overwrite`` (``--overwrite_output_dir``)
    is refused on a folder hf_cfft did not make; ``resuming`` lets a fine-tuning run continue in an unmarked folder
    that holds its checkpoints (folders made before marks existed).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {sorted(KINDS)}")
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(
            f"{flag} {str(folder)!r} is a file, not a folder; pass a folder path (new or empty), e.g. "
            f"{flag} {path.with_suffix('')}_out"
        )
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputFolderError(
                    f"{flag} {str(folder)!r} cannot be created: {parent} is a file; pass a path under a folder"
                )
            break
    if not path.is_dir():
        return
    entries = sorted(name for name in os.listdir(path) if not is_guard_file(name))
    mark = read_mark(path)
    if mark is None:
        if not entries or resuming or _written_before_marks(kind, entries):
            return
        why = (
            f"{flag} {str(folder)!r} holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} "
            f"({_shown(entries)}) and no {MARK_NAME}: hf_cfft did not make it"
        )
        if overwrite:
            raise OutputFolderError(
                f"{why}, so --overwrite_output_dir would delete files that may be yours. It only replaces folders "
                f"hf_cfft made; pass a new or empty {flag}, or move those files away first"
            )
        raise OutputFolderError(
            f"{why}, and writing {KINDS[kind]} into it could overwrite files that are yours. Pass a new or empty "
            f"{flag}, or move those files away first"
        )
    if mark.get("kind") != kind:
        made = KINDS.get(mark.get("kind"), repr(mark.get("kind")))
        command = f" by `{mark['command']}`" if mark.get("command") else ""
        raise OutputFolderError(
            f"{flag} {str(folder)!r} holds {made}, made{command}; writing {KINDS[kind]} into it would overwrite "
            f"or mix with those files. Pass another {flag}"
        )


# What a comparison writes (recipes/compare.py): an unmarked folder holding only these was made by it before marks
# existed, and its rows are what lets it resume; it is adopted (marked) instead of refused.
_COMPARE_ENTRIES = re.compile(
    r"^(rows(-[\w.-]+)?\.jsonl|compare\.(md|json)|summary\.md|frontier\w*\.png|paired\w*\.png|runs)$"
)


def _written_before_marks(kind: str, entries: list[str]) -> bool:
    return kind == "compare" and all(_COMPARE_ENTRIES.match(name) for name in entries)


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux: field 22 of /proc/<pid>/stat), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(holder: dict[str, Any] | None, lock: Path) -> str | None:
    """Why the lock ``holder`` (its parsed contents) is stale, or None when its process may still run."""
    if holder is None:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            return "it is gone"
        return f"it is unreadable and {age:.0f} s old" if age > _UNREADABLE_LOCK_GRACE_S else None
    if holder.get("host") != socket.gethostname():
        return None  # another machine's process: cannot be checked from here
    pid = int(holder.get("pid", -1))
    if pid == os.getpid():  # this process holds no such lock (`_HELD`): an earlier process with the same id left it
        return f"process id {pid} is this process, which did not take it"
    if pid <= 0 or not _alive(pid):
        return f"process {pid} no longer runs"
    started = holder.get("process_start")
    if started is not None and _process_start(pid) not in (None, started):
        return f"process id {pid} now belongs to another process"
    return None


def _read_lock(lock: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _command() -> str:
    return " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])[:500]


def acquire_lock(folder: str | os.PathLike, name: str = LOCK_NAME, *, flag: str = "--output_dir") -> Path:
    """Create the lock ``folder/name`` for this process (re-entrant); refuse when a live run holds it.

    A stale lock (its process no longer runs on this host, or its pid was reused) is replaced with a warning. Raises
    `OutputFolderError` when another run holds it, or when the folder cannot be written.
    """
    lock = Path(folder) / name
    key = os.path.realpath(lock)
    if _HELD.get(key):
        _HELD[key] += 1
        return lock
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": _process_start(os.getpid()),
        "since": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": _command(),
    }
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            why = _stale(holder, lock)
            if why is None:
                holder = holder or {}
                raise OutputFolderError(
                    f"{flag} {str(folder)!r} is being written by another run (process {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')} since {holder.get('since', '?')}: `{holder.get('command', '?')}`); "
                    f"two runs in one folder would mix their files. Wait for it to finish, or pass another {flag}. "
                    f"If no run is using this folder (e.g. that machine was restarted), delete {lock} and run again"
                ) from None
            logger.warning("Taking over the stale lock %s (%s)", lock, why)
            lock.unlink(missing_ok=True)
            continue
        except OSError as error:
            raise _not_writable(folder, error, flag) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        _HELD[key] = 1
        return lock
    raise OutputFolderError(f"could not take the lock {lock}: other runs keep creating it; pass another {flag}")


def release_lock(lock: Path) -> None:
    """Undo one `acquire_lock`; the last release removes the file (only if this process still owns it)."""
    key = os.path.realpath(lock)
    count = _HELD.get(key, 0)
    if count > 1:
        _HELD[key] = count - 1
        return
    _HELD.pop(key, None)
    holder = _read_lock(lock)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


def _not_writable(folder, error: OSError, flag: str) -> OutputFolderError:
    return OutputFolderError(
        f"{flag} {str(folder)!r} cannot be written ({error.strerror or error}); nothing was run. Pass a folder you "
        "can write to, or fix its permissions"
    )


def write_mark(folder: str | os.PathLike, kind: str) -> dict[str, Any]:
    """Write ``folder``'s mark for ``kind`` unless it has one (a refused or repeated run changes no byte of it)."""
    existing = read_mark(folder)
    if existing is not None:
        return existing
    from . import __version__

    mark = {
        "made_by": "hf_cfft",
        "kind": kind,
        "what": KINDS[kind],
        "command": _command(),
        "hf_cfft_version": __version__,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    path = Path(folder) / MARK_NAME
    scratch = path.with_name(f"{MARK_NAME}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(mark, indent=2) + "\n", encoding="utf-8")
    os.replace(scratch, path)  # whole or absent: another process never reads half a mark
    return mark


class OutputFolder:
    """Context manager: check ``folder`` for output of ``kind``, create it, lock it and mark it; unlock on exit.

    Args:
        folder: the output folder.
        kind: a key of `KINDS` (what the recipe writes).
        overwrite: ``--overwrite_output_dir`` was given (refused on folders hf_cfft did not make).
        resuming: a fine-tuning run resumes from a checkpoint in ``folder``.
        write: False on processes that do not write (the non-main processes of a distributed run): they only check.
        lock_name: the lock's file name (shards of one comparison each hold their own).
        flag: the recipe's option, for messages.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        kind: str,
        *,
        overwrite: bool = False,
        resuming: bool = False,
        write: bool = True,
        lock_name: str = LOCK_NAME,
        flag: str = "--output_dir",
    ):
        self.folder, self.kind, self.flag = Path(folder), kind, flag
        self.overwrite, self.resuming, self.write, self.lock_name = overwrite, resuming, write, lock_name
        self._lock: Path | None = None
        self._created = False

    def __enter__(self) -> OutputFolder:
        check_output_folder(self.folder, self.kind, overwrite=self.overwrite, resuming=self.resuming, flag=self.flag)
        if not self.write:
            return self
        self._created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _not_writable(self.folder, error, self.flag) from None
        self._lock = acquire_lock(self.folder, self.lock_name, flag=self.flag)
        try:
            write_mark(self.folder, self.kind)
        except OSError as error:
            self.__exit__(OSError)
            raise _not_writable(self.folder, error, self.flag) from None
        except BaseException as error:
            self.__exit__(type(error))
            raise
        return self

    def __exit__(self, error_type=None, *exc_info) -> None:
        if self._lock is not None:
            release_lock(self._lock)
            self._lock = None
        if error_type is not None and self._created:
            self._remove_if_nothing_was_written()

    def _remove_if_nothing_was_written(self) -> None:
        """A run that failed before writing anything leaves no folder it made behind: a refusal changes nothing."""
        try:
            if {entry.name for entry in self.folder.iterdir()} <= {MARK_NAME}:
                (self.folder / MARK_NAME).unlink(missing_ok=True)
                self.folder.rmdir()
        except OSError:  # another process wrote there meanwhile, or it is gone: leave it
            pass


def refuse_output_inside(output_dir: str | os.PathLike, inputs: dict[str, str], flag: str = "--output_dir") -> None:
    """Refuse an ``output_dir`` that is one of the ``inputs`` ({flag: folder}) or lies inside one of them."""
    out = Path(os.path.realpath(output_dir))
    for name, folder in inputs.items():
        source = Path(os.path.realpath(folder))
        if out == source or source in out.parents:
            where = "is" if out == source else "lies inside"
            raise OutputFolderError(
                f"{flag} {str(output_dir)!r} {where} {name} {str(folder)!r}: writing there would overwrite the model "
                f"it is made from. Pass another {flag}"
            )


# ---- single files (recipes/visualize.py's picture) ----

# PNG text key and value that mark a picture as written by hf_cfft, so a re-run may replace it.
PNG_MARK = ("Software", "hf_cfft")


def _png_marked(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get(PNG_MARK[0]) == PNG_MARK[1]
    except Exception:  # not an image at all: certainly not ours
        return False


def check_output_file(path: str | os.PathLike, flag: str = "--output_file") -> None:
    """Refuse ``path`` before any work: a folder, a path under a file, a file hf_cfft did not write, or no access.

    Creates the missing parent folders (the write needs them anyway) and probes them with a scratch file.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputFolderError(
            f"{flag} {str(path)!r} is a folder; pass a file path, e.g. {flag} {target / 'counterfactuals.png'}"
        )
    if target.exists() and not _png_marked(target):
        raise OutputFolderError(
            f"{flag} {str(path)!r} exists and hf_cfft did not write it; it is left as it is. Pass another {flag}, or "
            "delete that file first"
        )
    for parent in target.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputFolderError(f"{flag} {str(path)!r} cannot be written: {parent} is a file, not a folder")
            break
    parent = target.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".hf_cfft_probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise _not_writable(parent, error, f"the folder of {flag}") from None


def save_png(image, path: str | os.PathLike) -> None:
    """Write a PIL ``image`` to ``path`` whole or not at all, marked (`PNG_MARK`) so a later run may replace it."""
    from PIL.PngImagePlugin import PngInfo

    target = Path(path)
    info = PngInfo()
    info.add_text(*PNG_MARK)
    scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        image.save(scratch, format="PNG", pnginfo=info)
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)
