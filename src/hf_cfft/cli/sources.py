"""Where image datasets come from: the embedded world, a local ImageFolder, or a dataset on the Hub."""

from __future__ import annotations

import os
from collections.abc import Sequence

from datasets import ClassLabel, Dataset, load_dataset

from ..dataset_checks import check_class_names_file, check_image_folder
from ..hub_ids import reads_as_path
from ..zeroshot import load_class_names

WORLD = "world"


def load_image_splits(
    dataset_name: str,
    splits: Sequence[str],
    *,
    dataset_config: str | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    world_seed: int = 0,
    world_train_correlation: float | None = None,
    world_object_contrast: float | None = None,
    world_eval_size: int | None = None,
) -> dict[str, Dataset]:
    """Load ``splits`` of an image dataset as a dict of `datasets.Dataset`.

    ``dataset_name`` is ``"world"`` (the embedded world, generated in memory), a local folder in ImageFolder layout
    (``<dir>/<split>/<class>/<image>``), ``"imagefolder"`` with ``data_dir``, or a Hub dataset id.
    The ``world_*`` arguments are `hf_cfft.world.world_splits`'s (the world's only; another dataset refuses them).
    """
    if dataset_name == WORLD:
        from ..world import world_splits

        return world_splits(
            splits,
            seed=world_seed,
            train_correlation=world_train_correlation,
            object_contrast=world_object_contrast,
            eval_size=world_eval_size,
        )
    world_only = (
        ("--world_train_correlation", world_train_correlation),
        ("--world_object_contrast", world_object_contrast),
        ("--world_eval_size", world_eval_size),
    )
    for flag, value in world_only:
        if value is not None:
            raise ValueError(f"{flag} {value} applies to the embedded world only, not to {dataset_name!r}; drop it")
    if os.path.isdir(os.path.expanduser(dataset_name)):
        return _local_image_folder(os.path.expanduser(dataset_name), splits)
    if reads_as_path(dataset_name):
        raise FileNotFoundError(
            f"dataset folder {dataset_name!r} does not exist; pass an existing ImageFolder directory "
            "(<dir>/<split>/<class>/<image>) or a Hub dataset id"
        )
    if dataset_name == "imagefolder":
        if data_dir is None or not os.path.isdir(data_dir):
            raise FileNotFoundError(f"ImageFolder data_dir {data_dir!r} does not exist; pass an existing directory")
    try:
        loaded = load_dataset(dataset_name, dataset_config, data_dir=data_dir, cache_dir=cache_dir)
    except ConnectionError as error:  # offline, or no network: datasets says "Couldn't reach ..." with a traceback
        raise ValueError(
            f"--dataset_name {dataset_name!r} is a Hub dataset id and cannot be loaded here: {error}. Download it "
            f"first where there is network (hf download {dataset_name} --repo-type dataset, or load it once with "
            "datasets so that it is cached), or pass a local ImageFolder (<dir>/<split>/<class>/<image>)"
        ) from error
    missing = [s for s in splits if s not in loaded]
    if missing:
        raise ValueError(
            f"split(s) {missing} not found in {dataset_name} {data_dir or ''}; available: {', '.join(loaded)}"
        )
    return {split: loaded[split] for split in splits}


def _local_image_folder(path: str, splits: Sequence[str]) -> dict[str, Dataset]:
    missing = [split for split in splits if not os.path.isdir(os.path.join(path, split))]
    if missing:
        present = sorted(name for name in os.listdir(path) if os.path.isdir(os.path.join(path, name)))
        raise FileNotFoundError(
            f"split folder(s) {missing} not found in {path} (it has {present}); expected <dir>/<split>/<class>/<image>"
        )
    check_image_folder(path, splits)
    # The imagefolder builder renames split folders to its standard names ("test_id" would load as "test"); naming
    # each split's files keeps the user's split names, and the class labels stay shared across splits.
    loaded = load_dataset("imagefolder", data_files={split: os.path.join(path, split, "**") for split in splits})
    return {split: loaded[split] for split in splits}


def class_names_of(dataset: Dataset, label_column: str = "label") -> list[str]:
    """The class names of a dataset whose label column is a `ClassLabel`, in label-index order."""
    if label_column not in dataset.features:
        raise ValueError(
            f"--label_column {label_column!r} is not a column of the dataset; its columns are "
            f"{', '.join(dataset.column_names)}. Pass --label_column <one of them>"
        )
    feature = dataset.features[label_column]
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"column {label_column!r} is {feature}, not a ClassLabel, so class names are unknown; "
            "pass class names explicitly (--class_names imagenet or a text file with one name per line)"
        )
    return list(feature.names)


def class_names_for(class_names: str | None, dataset: Dataset, label_column: str = "label") -> list[str]:
    """The ``--class_names`` option ('imagenet' or a file: `load_class_names`), else ``dataset``'s ClassLabel names.

    Names given that contradict the dataset's ClassLabel (another count, or the same names in another order) are
    refused (`hf_cfft.dataset_checks.check_class_names_file`).
    """
    if not class_names:
        return class_names_of(dataset, label_column)
    names = load_class_names(class_names)
    check_class_names_file(names, dataset, label_column, repr(class_names))
    return names
