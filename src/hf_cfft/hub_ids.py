"""A name on the command line: a local folder, or a Hub repo id? One rule for models, datasets and model cards.

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
