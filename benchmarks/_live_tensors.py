"""The peak of live tensor bytes while a block runs: what a training step holds in tensors, on any device.

A process's resident memory (the CPU's only allocator statistic) also counts the allocator's free pages, the Python
heap and freed-but-kept arenas, so two configurations' peaks differ by noise of a few hundred MiB. `LiveTensorPeak`
counts tensors instead: every storage an operator returns inside the block is added when it first appears and taken
away when torch frees it (a finaliser on the storage, which torch keeps alive exactly as long as the tensors that
use it); views and in-place results share their storage and are counted once. Tensors made before the block (the
weights) are passed in as ``already``. On a GPU, ``torch.cuda.max_memory_allocated`` measures the same thing.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorPeak(TorchDispatchMode):
    """``with LiveTensorPeak(already=model.parameters()) as live: step()``; then ``live.peak`` (bytes)."""

    def __init__(self, already: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        for tensor in already:
            self._count(tensor)

    def reset_peak(self) -> None:
        """Start a new peak from what is live now (e.g. at the start of the step that is measured)."""
        self.peak = self.live

    def _count(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._sizes:
            return
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self._count(value)
        return out
