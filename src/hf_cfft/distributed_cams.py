"""The teacher-CAM pass, sharded over the processes of a run and cached as one compact ``cam`` column.

    rank r: rows [start_r, stop_r) --DataLoader workers: decode + preprocess--> device: compute_cam --> float16
    all ranks: gather the shards in rank order --> [N, h * w] --> the ``cam`` column, cached next to the dataset

Each row is computed once, by one process, and no process waits for longer than the slowest shard. `CfftTrainer`
stores the CAMs as float16 (``CfftConfig.cam_dtype``; the functions here default to float32): ImageNet-1k (1,281,167
images) at ViT-B/16 (14 x 14 patches) takes 1,281,167 x 196 x 2 bytes = 502 MB on disk (1.0 GB as float32; ViT-B/32's
7 x 7 grid takes 126 MB). Max-normalised CAMs lie in [0, 1], where float16 is within 1.2e-4 of the float32 value
around the paper's threshold 0.3, so a mask only differs from the float32 one for a patch whose CAM lies that close
to the threshold.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
from collections.abc import Callable

import datasets
import numpy as np
import torch
from datasets import Dataset, Features, List, Value, concatenate_datasets
from datasets.fingerprint import Hasher

from ._distributed import local_main_process_first, sharded_pass, world
from .cam import compute_cam
from .images import check_labels, preprocess_images

logger = logging.getLogger(__name__)

_ARROW_DTYPES = {torch.float16: "float16", torch.float32: "float32"}


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _PreprocessBatch:
    """DataLoader collate: raw rows -> (pixel values [B, C, H, W], labels [B]); a class so workers can pickle it."""

    def __init__(self, image_processor: Callable, image_column: str, label_column: str, num_labels: int | None):
        self.image_processor = image_processor
        self.image_column, self.label_column, self.num_labels = image_column, label_column, num_labels

    def __call__(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = [int(row[self.label_column]) for row in rows]
        check_labels(labels, self.num_labels)
        pixels = preprocess_images(self.image_processor, [row[self.image_column] for row in rows])
        return pixels, torch.tensor(labels)


def shard_cams(
    dataset: Dataset,
    model: torch.nn.Module,
    image_processor: Callable,
    *,
    method: str = "rollout",
    batch_size: int = 64,
    num_workers: int = 0,
    image_column: str = "image",
    label_column: str = "label",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
) -> torch.Tensor:
    """The CAMs of every row of ``dataset``: [N, h * w] in ``dtype``, on the CPU, on every process.

    Each process computes its contiguous shard (`hf_cfft._distributed.sharded_pass`) and the shards are gathered in
    row order; with one process it computes them all. Every process of an initialised group must call it.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    collate = _PreprocessBatch(image_processor, image_column, label_column, model.config.num_labels)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor]:
        pixels, labels = batch
        return (compute_cam(model, pixels.to(device), labels.to(device), method).flatten(1).to(dtype).cpu(),)

    grid = model.patch_grid
    (cams,) = sharded_pass(
        dataset, collate, step, (torch.zeros(0, grid[0] * grid[1], dtype=dtype),), batch_size=batch_size,
        num_workers=num_workers, device=device,
        desc=f"teacher CAMs ({method}), {world()[1]} process(es)", show_progress=show_progress,
    )  # fmt: skip
    return cams


def _cache_dir(dataset: Dataset, fingerprint: str) -> str | None:
    if not dataset.cache_files:
        return None  # in memory: nothing to cache next to
    return os.path.join(os.path.dirname(dataset.cache_files[0]["filename"]), f"cams-{fingerprint}")


def precompute_cams(
    dataset: Dataset,
    model: torch.nn.Module,
    image_processor: Callable,
    *,
    method: str = "rollout",
    batch_size: int = 64,
    num_workers: int = 0,
    image_column: str = "image",
    label_column: str = "label",
    cam_column: str = "cam",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
) -> Dataset:
    """Add a ``cam`` column ([h * w] max-normalised CAM per image, ``dtype``) computed by the frozen ``model``.

    Every process of the run calls it: each computes its contiguous shard on its own ``device``, then all gather
    the shards in order (`shard_cams`). A file-backed dataset keeps the column in a ``cams-<fingerprint>`` folder
    beside its cache files, written by each machine's first process; the fingerprint covers the dataset, the
    teacher's weights, the method, the preprocessing and ``dtype``, so the next run (any number of processes) reads
    it back instead of recomputing.
    """
    if cam_column in dataset.column_names:
        return dataset
    if dtype not in _ARROW_DTYPES:
        raise ValueError(f"CAM dtype {dtype} is not one of {list(_ARROW_DTYPES)}")
    fingerprint = Hasher.hash(
        [
            dataset._fingerprint,
            _weights_digest(model),
            method,
            image_processor.to_dict(),
            image_column,
            label_column,
            str(dtype),
        ]
    )
    cache = _cache_dir(dataset, fingerprint)
    if cache is not None and os.path.isdir(cache):
        logger.info("teacher CAMs: reading %s", cache)
        cams = datasets.load_from_disk(cache)
    else:
        rows = shard_cams(
            dataset,
            model,
            image_processor,
            method=method,
            batch_size=batch_size,
            num_workers=num_workers,
            image_column=image_column,
            label_column=label_column,
            device=device,
            dtype=dtype,
            show_progress=show_progress,
        )
        if rows.shape[0] != len(dataset):
            raise RuntimeError(f"the CAM shards hold {rows.shape[0]} rows for a dataset of {len(dataset)}")
        features = Features({cam_column: List(Value(_ARROW_DTYPES[dtype]), length=rows.shape[1])})
        cams = Dataset.from_dict({cam_column: rows.numpy()}, features=features)
        if cache is not None:
            with local_main_process_first():
                if not os.path.isdir(cache) and int(os.environ.get("LOCAL_RANK", world()[0])) == 0:
                    _save_atomically(cams, cache)
            cams = datasets.load_from_disk(cache)  # memory-mapped: no process keeps the column in RAM
    if cams.num_rows != len(dataset) or cams.column_names != [cam_column]:
        raise RuntimeError(f"cached CAMs {cache} do not match the dataset ({cams.num_rows} rows, {len(dataset)})")
    return concatenate_datasets([dataset, cams], axis=1)


def _save_atomically(cams: Dataset, folder: str) -> None:
    """Write the column to ``folder`` whole or not at all. Another machine on a shared filesystem may have written it
    meanwhile (the same rows: same fingerprint); then its copy is kept and this one dropped."""
    partial = f"{folder}.incomplete-{socket.gethostname()}-{os.getpid()}"
    cams.save_to_disk(partial)
    try:
        os.replace(partial, folder)
    except OSError:
        if not os.path.isdir(folder):
            raise
        shutil.rmtree(partial, ignore_errors=True)


def cam_array(dataset: Dataset, cam_column: str = "cam") -> np.ndarray:
    """The ``cam`` column as one [N, h * w] array (in its stored dtype), for inspection and tests."""
    array = np.asarray(dataset.with_format("numpy", columns=[cam_column])[cam_column])
    stored = dataset.features[cam_column].feature.dtype  # the numpy formatter widens float16 (exactly)
    return array.astype(stored, copy=False)
