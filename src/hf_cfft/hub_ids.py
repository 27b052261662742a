"""A name on the command line: a local folder, or a Hub repo id? One rule for models, datasets and model cards.

`check_model_source` applies it before any work: a folder that does not exist, or a Hub id that cannot be reached
offline, is refused in one line with the fix, before transformers turns it into a Hub lookup.

Hub ids are ``name`` or ``owner/name``. A name is meant as a local path when it exists, starts with ``.``, ``/`` or
``~``, has two slashes or more (``a/b/c``), or its first component is an existing folder (``outputs/world_lp_ft``
once ``outputs/`` exists, even before the run that makes it).
"""

from __future__ import annotations

import os
import re

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def reads_as_path(name: str) -> bool:
    """Whether ``name`` is meant as a local folder or file rather than a Hub repo id."""
    if os.path.exists(os.path.expanduser(name)):
        return True
    first = name.split("/", 1)[0]
    return name.startswith((".", "/", "~")) or name.count("/") >= 2 or ("/" in name and os.path.isdir(first))


def hub_id(name: str | None) -> str | None:
    """``name`` when it reads as a Hub repo id rather than a local path, else None."""
    if not name or reads_as_path(name) or not _HUB_ID.match(name):
        return None
    return name


def hub_is_off() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` as set now (huggingface_hub reads them once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")


def check_model_source(name: str, flag: str = "--model_name_or_path") -> None:
    """Refuse a model folder that does not exist, or a Hub id that cannot be loaded offline.

    ``name`` counts as a folder when it reads as a path (`reads_as_path`); ``flag`` names the option in the message.
    """
    if os.path.isdir(os.path.expanduser(name)):
        return
    if not reads_as_path(name):
        check_hub_reachable(name, flag)
    else:
        raise FileNotFoundError(
            f"{flag} {name!r}: no such folder (relative paths are read from the working directory {os.getcwd()}). "
            "If it is the output of an earlier run (e.g. LP-FT stage 1: recipes/configs/baselines/lp_ft_stage1.yaml), "
            "run that first; if it is a Hub id, check its spelling"
        )


def check_hub_reachable(repo_id: str, flag: str = "--model_name_or_path") -> None:
    """Offline, refuse a Hub model id that is not in the local cache: one line with the fix, before any work."""
    if not hub_is_off():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    raise ValueError(
        f"{flag} {repo_id!r} is a Hub id, but the Hub is switched off (HF_HUB_OFFLINE=1) and {repo_id!r} is not in "
        f"the local cache ({constants.HF_HUB_CACHE}). Download it first where there is network (hf download "
        f"{repo_id}), or pass a local folder that holds it"
    )
