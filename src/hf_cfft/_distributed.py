"""This process's share of a dataset, and the shares gathered back in order: one sharded pass for every model pass.

`sharded_pass` is the one loop of the teacher-CAM pass (`hf_cfft.distributed_cams`) and of distributed evaluation
(`hf_cfft.evaluation.prediction`). Works on the ``torch.distributed`` group that accelerate (or torchrun) set up;
without one, this process is the whole world and every function is the single-process identity.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm


def world() -> tuple[int, int]:
    """(this process's rank, number of processes) of the initialised default group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(length: int, num_shards: int, index: int) -> tuple[int, int]:
    """Rows [start, stop) of contiguous shard ``index`` of ``num_shards``; shard sizes differ by at most one row."""
    base, extra = divmod(length, num_shards)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def collective_device(device: torch.device | str | None = None) -> torch.device:
    """The device the group's backend communicates through: the CUDA device for NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return (
            torch.device(device)
            if device is not None and torch.device(device).type == "cuda"
            else torch.device("cuda", torch.cuda.current_device())
        )
    return torch.device("cpu")


def gather_rows(rows: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Every process's ``rows`` [n_rank, ...] concatenated in rank order, on every process, on the CPU.

    The shares may differ in length (padded for the collective, trimmed after), so no row is duplicated or dropped.
    """
    rank, size = world()
    if size == 1:
        return rows.cpu()
    via = collective_device(device)
    lengths = [torch.zeros(1, dtype=torch.long, device=via) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([rows.shape[0]], dtype=torch.long, device=via))
    lengths = [int(n.item()) for n in lengths]
    padded = torch.zeros((max(lengths), *rows.shape[1:]), dtype=rows.dtype, device=via)
    padded[: rows.shape[0]] = rows.to(via)
    pieces = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:n].cpu() for piece, n in zip(pieces, lengths)])


@contextlib.contextmanager
def local_main_process_first() -> Iterator[None]:
    """Run the block on each machine's first process, then on the others (which then read what it cached)."""
    rank, size = world()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if size > 1 and local_rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if size > 1 and local_rank == 0:
            dist.barrier()


def barrier() -> None:
    """Wait for every process (a no-op with one)."""
    if world()[1] > 1:
        dist.barrier()


def sharded_pass(
    dataset,
    collate: Callable[[list], tuple],
    step: Callable[[tuple], Sequence[torch.Tensor]],
    empty: Sequence[torch.Tensor],
    *,
    batch_size: int,
    num_workers: int = 0,
    distributed: bool = True,
    device: torch.device | str | None = None,
    even_steps: bool = False,
    desc: str = "",
    show_progress: bool = False,
) -> list[torch.Tensor]:
    """Run ``step`` over this process's contiguous share of ``dataset``; each output gathered in row order.

    ``collate`` turns a list of rows into a batch (it runs in the DataLoader's ``num_workers``); ``step`` turns a
    batch into tensors of one row per input row, moved to the CPU; ``empty`` holds one zero-row tensor per output
    (what a share without rows gives). With ``distributed`` and an initialised group, every process calls this and
    gets all N rows of each output back, in order; else this process is the whole world. ``even_steps``: every
    process runs as many steps as the largest share needs, the short ones on a throw-away copy of the last row (a
    sharded model, FSDP, gathers its weights in every forward: a collective every process must join).
    """
    rank, size = world() if distributed else (0, 1)
    start, stop = shard_bounds(len(dataset), size, rank)
    share = dataset.select(range(start, stop)) if hasattr(dataset, "select") else Subset(dataset, range(start, stop))
    loader = DataLoader(share, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    progress = tqdm(total=len(dataset), desc=desc, unit="img", disable=not show_progress or rank != 0)
    outputs: list[list[torch.Tensor]] = [[tensor] for tensor in empty]
    steps = math.ceil(shard_bounds(len(dataset), size, 0)[1] / batch_size) if size > 1 and even_steps else 0
    for batch in loader:
        for out, tensor in zip(outputs, step(batch), strict=True):
            out.append(tensor)
        progress.update((len(outputs[0][-1]) if outputs else 0) * size)  # the other shares keep about this pace
        steps -= 1
    if steps > 0 and len(dataset):
        spare = collate([dataset[len(dataset) - 1]])
        for _ in range(steps):
            step(spare)
    progress.close()
    gathered = [torch.cat(out) for out in outputs]
    return [gather_rows(tensor, device) for tensor in gathered] if size > 1 else gathered
