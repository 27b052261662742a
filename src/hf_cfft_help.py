"""``--help`` of the recipes without loading the library: the text the recipe printed last time, from a cache.

A recipe's help lists every flag of its dataclasses, and building it imports torch, transformers' TrainingArguments
and hf_cfft (15-40 s on a loaded machine). Each recipe imports this module first: with ``-h`` / ``--help`` among its
flags it prints the cached help and exits before anything heavy is imported. The cache is keyed by the recipe, its
flags, the size and time of every file under ``hf_cfft`` and the recipes' folder, and the versions of the libraries
the help comes from, so an edit or an upgrade builds it anew; the first ``--help`` after one runs at the old speed
and stores its text. ``HF_CFFT_HELP_CACHE`` names the cache folder (default ``~/.cache/hf_cfft/help``; ``0`` turns the
cache off). Importing this module anywhere else does nothing.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import os
import sys
from importlib import metadata, util

_LIBRARIES = ("transformers", "torch", "accelerate", "datasets", "peft")
_READ = (".py", ".yaml", ".yml", ".txt", ".json")


def _cache_dir() -> str | None:
    folder = os.environ.get("HF_CFFT_HELP_CACHE")
    if folder == "0":
        return None
    return folder or os.path.join(os.path.expanduser("~"), ".cache", "hf_cfft", "help")


def cache_key(script: str, argv: list[str]) -> str:
    """What the help of ``script`` with ``argv`` depends on, hashed."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(os.path.abspath(script).encode() + b"\0" + "\0".join(argv).encode() + sys.version.encode())
    roots = [os.path.dirname(os.path.abspath(script))]
    spec = util.find_spec("hf_cfft")  # finds the package without importing it
    roots += list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            for name in sorted(files):
                if name.endswith(_READ):
                    stat = os.stat(os.path.join(folder, name))
                    digest.update(f"{folder}/{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for library in _LIBRARIES:
        try:
            digest.update(f"{library}={metadata.version(library)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{library}=-".encode())
    return digest.hexdigest()


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def serve(script: str, argv: list[str]) -> None:
    """Print the cached help of ``script`` and exit, or record the help it is about to print (``--help`` only)."""
    if "-h" not in argv and "--help" not in argv:
        return
    folder = _cache_dir()
    if folder is None:
        return
    path = os.path.join(folder, f"{os.path.splitext(os.path.basename(script))[0]}-{cache_key(script, argv)}.txt")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            sys.stdout.write(f.read())
        sys.stdout.flush()
        raise SystemExit(0)
    tee = _Tee(sys.stdout)
    sys.stdout = tee

    def store() -> None:
        text = "".join(tee.parts)
        if not text.startswith("usage:"):
            return  # the recipe failed or printed something else: nothing to keep
        try:
            os.makedirs(folder, exist_ok=True)
            scratch = f"{path}.{os.getpid()}.tmp"
            with open(scratch, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(scratch, path)
        except OSError:
            pass  # a read-only home: the help is just not cached

    atexit.register(store)


_main = sys.modules.get("__main__")
if getattr(_main, "__file__", None) and ("-h" in sys.argv[1:] or "--help" in sys.argv[1:]):
    serve(_main.__file__, sys.argv[1:])
