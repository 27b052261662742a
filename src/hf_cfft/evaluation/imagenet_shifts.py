"""The ImageNet distribution shifts: class lists, published layouts and sizes, and loaders that label every image in
the space its protocol scores (the 1000-way ImageNet index; ObjectNet: one of its 113 ImageNet-mapped classes).

Class lists ship as data under ``hf_cfft/resources``:

- ``imagenet_wnids.txt``: the 1000 ILSVRC-2012 WordNet ids in class-index order (the devkit's sorted synsets; the
  same list is ``all_wnids`` in Hendrycks et al.'s ImageNet-R ``eval.py``).
- ``imagenet_r_indices.txt``, ``imagenet_a_indices.txt``: ``<ImageNet index> <wnid>`` for the 200 classes of
  ImageNet-R and of ImageNet-A, as published with the datasets by Hendrycks et al. (github.com/hendrycks/imagenet-r
  ``eval.py``; github.com/hendrycks/natural-adv-examples ``eval.py``, ``thousand_k_to_200``) and reproduced as
  ``CLASS_SUBLIST`` in WiSE-FT's ``src/datasets/imagenet_r.py`` and ``imagenet_a.py``. The files were written from
  the copies of these lists in timm's ImageNet metadata and checked entry by entry against Hendrycks et al.'s.
- ``objectnet_to_imagenet.json``: ObjectNet image folder -> ObjectNet class name and ImageNet indices, for the 113
  ObjectNet classes that map to ImageNet-1k. From ObjectNet's ``mappings/objectnet_to_imagenet_1k.json`` and
  ``mappings/folder_to_objectnet_label.json`` (as shipped in WiSE-FT's ``src/datasets/objectnet_metadata``), with
  the ImageNet class names resolved to indices through the ILSVRC-2012 synset names.

ObjectNet's licence allows evaluation only: its images must not be used to train or tune a model. hf_cfft only ever
reads ObjectNet to score a model; keep it out of training and model-selection data.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import NamedTuple

from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
LABEL_KINDS = ("auto", "imagenet", "local", "wnid", "name")
_WNID = re.compile(r"^n\d{8}$")


class IncompleteShiftError(ValueError):
    """A shift set whose image count differs from the published size: a partial download is never scored silently."""


@dataclass(frozen=True)
class ShiftSpec:
    """One evaluation set: where it lives, how big it is, how its folders are named and how it is scored.

    ``layout``: the class-folder directory relative to a data root. ``size``: the published number of scored images.
    ``folders``: class folders named by ``"wnid"``, by ImageNet index (``"index"``) or by ObjectNet folder name
    (``"objectnet"``). ``protocol``: ``"imagenet"`` (1000-way argmax), ``"subset"`` (argmax over the set's 200
    classes) or ``"objectnet"`` (max logit over the ImageNet classes of each ObjectNet class). ``border``: pixels
    cropped from every side before preprocessing.
    """

    key: str
    title: str
    layout: str
    size: int
    folders: str
    protocol: str
    border: int = 0


SHIFTS: dict[str, ShiftSpec] = {
    spec.key: spec
    for spec in (
        ShiftSpec("imagenet", "ImageNet", "imagenet/val", 50000, "wnid", "imagenet"),
        ShiftSpec("imagenet_v2", "ImageNet-V2", "imagenetv2-matched-frequency-format-val", 10000, "index", "imagenet"),
        ShiftSpec("imagenet_r", "ImageNet-R", "imagenet-r", 30000, "wnid", "subset"),
        ShiftSpec("imagenet_sketch", "ImageNet-Sketch", "sketch", 50889, "wnid", "imagenet"),
        ShiftSpec("imagenet_a", "ImageNet-A", "imagenet-a", 7500, "wnid", "subset"),
        # 18574 = the images of the 113 ImageNet-mapped classes in objectnet-1.0 (50273 images in 313 classes in all).
        ShiftSpec("objectnet", "ObjectNet", "objectnet-1.0/images", 18574, "objectnet", "objectnet", 2),
    )
}
ID_SHIFT = "imagenet"
OOD_SHIFTS: tuple[str, ...] = tuple(key for key in SHIFTS if key != ID_SHIFT)


class ObjectNetClass(NamedTuple):
    folder: str
    name: str
    imagenet_indices: tuple[int, ...]


def _resource_text(name: str) -> str:
    return resources.files("hf_cfft").joinpath("resources", name).read_text(encoding="utf-8")


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet wnids; position i is the wnid of class index i."""
    return tuple(_resource_text("imagenet_wnids.txt").split())


@functools.cache
def wnid_to_index() -> dict[str, int]:
    """ImageNet wnid -> class index 0..999."""
    return {wnid: i for i, wnid in enumerate(imagenet_wnids())}


@functools.cache
def _subset(name: str) -> tuple[int, ...]:
    rows = [line.split() for line in _resource_text(name).splitlines() if line.strip()]
    wnids = imagenet_wnids()
    if any(wnids[int(index)] != wnid for index, wnid in rows):
        raise RuntimeError(f"{name}: an index and its wnid disagree with imagenet_wnids.txt; the package is corrupt")
    return tuple(int(index) for index, _ in rows)


def imagenet_r_indices() -> tuple[int, ...]:
    """The 200 ImageNet class indices of ImageNet-R, ascending (= the order of its sorted wnid folders)."""
    return _subset("imagenet_r_indices.txt")


def imagenet_a_indices() -> tuple[int, ...]:
    """The 200 ImageNet class indices of ImageNet-A, ascending (= the order of its sorted wnid folders)."""
    return _subset("imagenet_a_indices.txt")


@functools.cache
def objectnet_classes() -> tuple[ObjectNetClass, ...]:
    """The 113 ObjectNet classes that map to ImageNet, in sorted folder order (= ObjectNet label 0..112)."""
    table = json.loads(_resource_text("objectnet_to_imagenet.json"))
    rows = sorted(table.items())
    return tuple(ObjectNetClass(folder, entry["name"], tuple(entry["imagenet_indices"])) for folder, entry in rows)


def class_indices(key: str) -> tuple[int, ...]:
    """The ImageNet indices a set's images belong to: its 200 classes for R and A, all 1000 otherwise."""
    subsets = {"imagenet_r": imagenet_r_indices, "imagenet_a": imagenet_a_indices}
    return subsets[key]() if key in subsets else tuple(range(1000))


def num_labels(key: str) -> int:
    """Size of the label space of a set's ``label`` column: 113 for ObjectNet, 1000 (ImageNet indices) otherwise."""
    return len(objectnet_classes()) if _spec(key).protocol == "objectnet" else 1000


def _spec(key: str) -> ShiftSpec:
    if key not in SHIFTS:
        raise ValueError(f"unknown ImageNet shift {key!r}; known sets: {', '.join(SHIFTS)}")
    return SHIFTS[key]


def check_size(key: str, found: int, source: str, *, allow_partial: bool = False) -> None:
    """Raise `IncompleteShiftError` when ``found`` differs from the published size, unless ``allow_partial``."""
    spec = _spec(key)
    if found == 0:
        raise IncompleteShiftError(f"{spec.title} from {source} has no images of its classes; check the layout")
    if found == spec.size or allow_partial:
        return
    what = "fewer" if found < spec.size else "more"
    raise IncompleteShiftError(
        f"{spec.title} from {source} has {found} images, {what} than the {spec.size} of the published set: the "
        "download looks incomplete or mixed with other files. Fix it (see docs/ood_evaluation.md), or pass "
        f"allow_partial=True (recipe: --allow_partial) to score the {found} images found."
    )


def _folder_labels(spec: ShiftSpec, folders: Sequence[str], root: str) -> dict[str, int]:
    """Class folder -> label; ObjectNet folders outside the 113 mapped classes are left out (not scored)."""
    if spec.folders == "objectnet":
        by_folder = {c.folder: i for i, c in enumerate(objectnet_classes())}
        return {f: by_folder[f] for f in folders if f in by_folder}
    labels = {}
    allowed = set(class_indices(spec.key))
    for folder in folders:
        if spec.folders == "index":
            # ImageNet-V2 names folders by class index; ImageFolder's lexicographic order ("0", "1", "10", ...)
            # would scramble the labels, so the label is the folder name read as an integer.
            label = int(folder) if folder.isdigit() else -1
        else:
            label = wnid_to_index().get(folder, -1)
        if label not in allowed:
            expected = "ImageNet class indices 0..999" if spec.folders == "index" else f"{len(allowed)} ImageNet wnids"
            raise ValueError(f"{spec.title} folder {os.path.join(root, folder)!r} is not one of its {expected}")
        labels[folder] = label
    return labels


def resolve_folder(key: str, path: str) -> str:
    """The class-folder directory of a set: ``path`` itself, or ``path/<layout>`` when ``path`` is a data root."""
    spec = _spec(key)
    path = os.path.expanduser(path)
    for candidate in (os.path.join(path, spec.layout), os.path.join(path, os.path.basename(spec.layout))):
        if os.path.isdir(candidate):
            return candidate
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{spec.title} folder {path!r} does not exist (expected layout: <root>/{spec.layout})")
    return path


def load_shift_folder(key: str, path: str, *, allow_partial: bool = False) -> Dataset:
    """A set stored in its published folder layout -> Dataset with ``image`` (decoded lazily) and int ``label``.

    ``path``: the class-folder directory or a data root holding it at ``spec.layout``. Labels are ImageNet indices
    (ObjectNet: 0..112, see `objectnet_classes`). Raises `IncompleteShiftError` on a size mismatch.
    """
    spec = _spec(key)
    root = resolve_folder(key, path)
    # Hidden folders (.ipynb_checkpoints, .cache) are tool litter, not classes.
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    labels = _folder_labels(spec, folders, root)
    paths, targets = [], []
    for folder, label in labels.items():
        with os.scandir(os.path.join(root, folder)) as entries:
            files = sorted(e.path for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        paths.extend(files)
        targets.extend([label] * len(files))
    check_size(key, len(paths), root, allow_partial=allow_partial)
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    return Dataset.from_dict({"image": paths, "label": targets}, features=features)


def _image_column(dataset: Dataset, image_column: str | None) -> str:
    if image_column is not None:
        if image_column not in dataset.features:
            raise KeyError(f"image column {image_column!r} not found; the dataset has {dataset.column_names}")
        return image_column
    found = [name for name, feature in dataset.features.items() if isinstance(feature, ImageFeature)]
    if not found:
        raise ValueError(f"no Image column among {dataset.column_names}; pass image_column (--image_column)")
    return found[0]


def _label_column(dataset: Dataset, label_column: str | None) -> str:
    candidates = [label_column] if label_column is not None else ["label", "wnid", "cls", "labels", "target"]
    for name in candidates:
        if name in dataset.features:
            return name
    raise KeyError(f"label column {candidates[0]!r} not found among {dataset.column_names}; pass label_column")


def _auto_kind(spec: ShiftSpec, feature, values: Sequence) -> str:
    names = feature.names if isinstance(feature, ClassLabel) else [v for v in values if isinstance(v, str)]
    if names and all(_WNID.match(str(n)) for n in names):
        return "wnid"
    if spec.protocol == "objectnet" and names:
        return "name"
    size = len(objectnet_classes()) if spec.protocol == "objectnet" else len(class_indices(spec.key))
    if isinstance(feature, ClassLabel) and feature.num_classes in (size, 1000):
        return "local" if feature.num_classes == size else "imagenet"
    if size == 1000 and not names:
        return "imagenet"  # for 1000-class sets, local indices and ImageNet indices coincide
    raise ValueError(
        f"cannot tell how the labels of this {spec.title} dataset are numbered ({feature}); pass label_kind "
        "(--label_kind): 'imagenet' (ImageNet indices 0..999), 'local' (0..K-1 in the set's sorted class order), "
        "'wnid' or, for ObjectNet, 'name'"
    )


def _map_labels(spec: ShiftSpec, kind: str, values: Sequence, feature) -> list[int]:
    """Label values -> labels in the protocol's space; -1 marks rows to drop (ObjectNet classes outside ImageNet)."""
    if kind in ("wnid", "name") and isinstance(feature, ClassLabel):
        values = [feature.names[v] for v in values]
    if spec.protocol == "objectnet":
        classes = objectnet_classes()
        if kind == "local":
            return [int(v) if 0 <= int(v) < len(classes) else -2 for v in values]
        if kind == "name":
            # Folder names ("alarm_clock") or class names ("Alarm clock"); other ObjectNet classes are not scored.
            lookup = {c.folder: i for i, c in enumerate(classes)} | {c.name.lower(): i for i, c in enumerate(classes)}
            return [lookup.get(str(v).lower(), -1) for v in values]
        raise ValueError(f"label_kind {kind!r} does not apply to ObjectNet; use 'name' or 'local'")
    allowed = class_indices(spec.key)
    if kind == "wnid":
        mapped = [wnid_to_index().get(str(v), -2) for v in values]
    elif kind == "local":
        mapped = [allowed[int(v)] if 0 <= int(v) < len(allowed) else -2 for v in values]
    elif kind == "imagenet":
        mapped = [int(v) for v in values]
    else:
        raise ValueError(f"label_kind {kind!r} does not apply to {spec.title}; use 'imagenet', 'local' or 'wnid'")
    allowed_set = set(allowed)
    return [label if label in allowed_set else -2 for label in mapped]


def shift_from_dataset(
    key: str,
    dataset: Dataset,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    label_kind: str = "auto",
    allow_partial: bool = False,
    source: str = "the given dataset",
) -> Dataset:
    """A set loaded from the Hub (or built in memory) -> Dataset with ``image`` and ``label`` in the protocol's space.

    Hub copies number their labels differently: ImageNet indices, local indices 0..199 (R, A) or 0..112 (ObjectNet)
    in sorted class order, or only wnids / class names. ``label_kind`` says which (``"auto"``: from a ClassLabel's
    names and size, or from string values). Labels that name no class of the set raise ValueError, except ObjectNet
    classes outside the 113 mapped ones, which are dropped as in the folder layout.
    """
    spec = _spec(key)
    if label_kind not in LABEL_KINDS:
        raise ValueError(f"label_kind must be one of {LABEL_KINDS}, got {label_kind!r}")
    image_column = _image_column(dataset, image_column)
    label_column = _label_column(dataset, label_column)
    feature = dataset.features[label_column]
    values = list(dataset[label_column])  # a columnar read: no image is decoded
    kind = _auto_kind(spec, feature, values) if label_kind == "auto" else label_kind
    labels = _map_labels(spec, kind, values, feature)
    bad = sorted({str(v) for v, label in zip(values, labels) if label == -2})
    if bad:
        raise ValueError(
            f"{spec.title} labels read as {kind!r} name no class of the set: {bad[:5]}; check label_kind "
            f"(--label_kind) and label_column ({label_column!r})"
        )
    # Add the label column before dropping rows: adding a column to a row selection would copy every image.
    out = dataset.select_columns([image_column]).add_column("label", labels, feature=Value("int64"))
    if image_column != "image":
        out = out.rename_column(image_column, "image")
    keep = [i for i, label in enumerate(labels) if label >= 0]
    if len(keep) < len(labels):
        out = out.select(keep)
    check_size(key, len(out), source, allow_partial=allow_partial)
    return out


def load_shift(
    key: str,
    source: str,
    *,
    allow_partial: bool = False,
    dataset_config: str | None = None,
    cache_dir: str | None = None,
    **label_kwargs,
) -> Dataset:
    """A set from a local folder (its published layout) or a Hub dataset id, optionally ``"<id>:<split>"``.

    ``label_kwargs``: ``image_column``, ``label_column``, ``label_kind`` for Hub datasets (see `shift_from_dataset`).
    """
    if os.path.isdir(os.path.expanduser(source)):
        return load_shift_folder(key, source, allow_partial=allow_partial)
    from datasets import get_dataset_split_names, load_dataset

    hub_id, _, split = source.partition(":")
    if not split:
        splits = get_dataset_split_names(hub_id, dataset_config)
        if len(splits) != 1:
            raise ValueError(f"{hub_id} has splits {splits}; name the one to score as '{hub_id}:<split>'")
        split = splits[0]
    dataset = load_dataset(hub_id, dataset_config, split=split, cache_dir=cache_dir)
    return shift_from_dataset(key, dataset, allow_partial=allow_partial, source=source, **label_kwargs)


def find_sources(data_root: str | None, overrides: dict[str, str | None], keys: Sequence[str]) -> dict[str, str]:
    """Where each set in ``keys`` comes from: its override (folder or Hub id), else ``data_root/<layout>`` if present.

    Sets with neither are left out of the result; the caller decides whether that is an error.
    """
    sources = {}
    for key in keys:
        spec = _spec(key)
        if overrides.get(key):
            sources[key] = overrides[key]
        elif data_root and os.path.isdir(os.path.join(os.path.expanduser(data_root), spec.layout)):
            sources[key] = os.path.join(os.path.expanduser(data_root), spec.layout)
    return sources
