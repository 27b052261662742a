"""Run any computation of a model as the forward of its distributed wrapper, so DDP's and FSDP's hooks see it.

DDP prepares its gradient reduction, and FSDP gathers sharded parameters, only around ``wrapper(...)``. A sub-forward
called on the unwrapped module (``get_image_features``, a CAM-recording pass) bypasses both: DDP then needs
``find_unused_parameters=True`` and FSDP computes on shards. `call_as_forward` patches the inner module's
``forward`` for exactly one call of the wrapper, which runs the given function in its place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_MISSING = object()


def call_as_forward(wrapper: torch.nn.Module, module: torch.nn.Module, fn: Callable[..., Any], *args, **kwargs):
    """``fn(*args, **kwargs)`` run inside ``wrapper(...)`` in place of ``module.forward``; returns ``fn``'s result.

    ``wrapper`` is the prepared model (DDP / FSDP / the module itself) and ``module`` the model it wraps. ``fn`` may
    call ``module`` and its methods: the original ``forward`` is back in place before ``fn`` starts.
    """
    if wrapper is module:
        return fn(*args, **kwargs)
    own_forward = module.__dict__.get("forward", _MISSING)  # accelerate's autocast wrapper is an instance attribute

    def restore() -> None:
        if own_forward is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.forward = own_forward

    def redirected(*inner_args, **inner_kwargs):
        restore()
        return fn(*inner_args, **inner_kwargs)

    module.forward = redirected
    try:
        return wrapper(*args, **kwargs)
    finally:
        restore()
