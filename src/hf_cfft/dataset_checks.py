"""Data checked at the boundary: an ImageFolder's layout, the label and image columns, class names, subsets.

Each check raises one ``ValueError`` that names the value it found and the fix, before a model is loaded: a
wrongly laid out folder or a wrong column would otherwise train on the wrong labels, or fail an hour later.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence

import numpy as np
from datasets import ClassLabel, Dataset, Value
from datasets import Image as ImageFeature

# What the ``imagefolder`` builder reads as images (lower case), and the metadata files that carry labels instead.
IMAGE_EXTENSIONS = frozenset(
    ".bmp .gif .jpeg .jpg .png .ppm .pgm .pbm .tif .tiff .webp .jp2 .ico .pcx .tga .dds .blp .eps .icns .im .msp .sgi"
    .split()
)  # fmt: skip
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
LAYOUT = "<dir>/<split>/<class>/<image>"


def _hidden(name: str) -> bool:
    return name.startswith((".", "__"))  # the imagefolder builder skips these too (.ipynb_checkpoints, __MACOSX)


def _images_in(folder: str) -> list[str]:
    return [n for n in os.listdir(folder) if not _hidden(n) and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]


def _listing(names: Sequence[str], limit: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def check_image_folder(root: str, splits: Sequence[str]) -> None:
    """Refuse a split folder of ``root`` that is not ``<split>/<class>/<image>`` (a split with metadata is let be).

    Refused: an empty split, images lying in the split folder itself (no class folders), class folders that hold
    folders instead of images (nested), class folders whose names differ only by case, and one class in all (the
    builder would then drop the labels).
    """
    every_class: dict[str, int] = {}
    for split in splits:
        folder = os.path.join(root, split)
        entries = os.listdir(folder)
        if any(name in entries for name in METADATA_FILES):
            continue  # labels come from the metadata's columns (--label_column), not from folders
        classes = sorted(n for n in entries if not _hidden(n) and os.path.isdir(os.path.join(folder, n)))
        loose = _images_in(folder)
        if not classes and not loose:
            raise ValueError(
                f"split folder {folder} is empty: no class folders and no images. Put the images of each class in "
                f"{folder}/<class>/ ({LAYOUT}), or leave {split!r} out of the splits you pass"
            )
        if loose and not classes:
            raise ValueError(
                f"split folder {folder} has no class folders: its {len(loose)} image(s) ({_listing(loose, 3)}) lie "
                f"directly in it, so they have no label. Move each class's images into {folder}/<class>/ ({LAYOUT})"
            )
        if loose:
            raise ValueError(
                f"split folder {folder} holds {len(loose)} image(s) ({_listing(loose, 3)}) beside its class folders "
                f"({_listing(classes)}); an image outside a class folder has no label. Move them into their class "
                f"folder ({LAYOUT}) or out of {folder}"
            )
        for name in classes:
            inner = os.path.join(folder, name)
            nested = sorted(s for s in os.listdir(inner) if not _hidden(s) and os.path.isdir(os.path.join(inner, s)))
            if nested:
                raise ValueError(
                    f"class folder {inner} holds folders ({_listing(nested)}) instead of only images: an ImageFolder "
                    f"is {LAYOUT}, one level of class folders, and nested folders would be labelled by their "
                    f"innermost name. Move the images of each class into one folder {folder}/<class>/ (e.g. "
                    f"{folder}/{nested[0]}/), or pass the level that holds the split folders as --dataset_name"
                )
        for name in classes:
            every_class[name] = every_class.get(name, 0) + len(_images_in(os.path.join(folder, name)))
        by_case: dict[str, list[str]] = {}
        for name in classes:
            by_case.setdefault(name.casefold(), []).append(name)
        clashes = [names for names in by_case.values() if len(names) > 1]
        if clashes:
            shown = "; ".join(" and ".join(repr(n) for n in names) for names in clashes)
            raise ValueError(
                f"class folders {shown} in {folder} differ only by case: on macOS and Windows they are one folder, "
                "and their prompts name the same class. Merge them into one folder, or rename one"
            )
    if len(every_class) == 1:
        (name, count), shown = next(iter(every_class.items())), ", ".join(splits)
        raise ValueError(
            f"{root} has one class only ({name!r}, {count} images in {shown}): a classifier needs two classes or "
            f"more to tell apart. Add a folder of images for each other class ({LAYOUT})"
        )


def _suggest(value: str, columns: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, columns, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_columns(splits: Mapping[str, Dataset], *, image_column: str = "image", label_column: str = "label") -> None:
    """Refuse a split without ``image_column`` / ``label_column``, or whose labels are not class indices.

    Labels must be integers or a ``ClassLabel``; a column of strings (a CSV's ``species``) is refused with how to
    make it one.
    """
    for split, dataset in splits.items():
        columns = list(dataset.column_names)
        for flag, column in (("--image_column", image_column), ("--label_column", label_column)):
            if column not in columns:
                if flag == "--label_column" and columns == [image_column]:
                    raise ValueError(
                        f"split {split!r} has no label column at all (only {image_column!r}): its images carry no "
                        f"class. Lay the folder out as {LAYOUT}, whose folder names become the classes"
                    )
                raise ValueError(
                    f"{flag} {column!r} is not a column of split {split!r}{_suggest(column, columns)}; its columns "
                    f"are {', '.join(columns)}. Pass {flag} <one of them>"
                )
        if image_column in dataset.features and not isinstance(dataset.features[image_column], ImageFeature):
            raise ValueError(
                f"--image_column {image_column!r} of split {split!r} is {dataset.features[image_column]}, not an "
                "Image; pass the column that holds the images"
            )
        feature = dataset.features[label_column]
        if isinstance(feature, ClassLabel):
            continue
        dtype = getattr(feature, "dtype", None)
        if isinstance(feature, Value) and dtype in ("string", "large_string"):
            shown = ", ".join(repr(v) for v in dataset.unique(label_column)[:3])
            raise ValueError(
                f"--label_column {label_column!r} of split {split!r} holds strings ({shown}, ...), not class "
                f"indices. Lay the images out as an ImageFolder ({LAYOUT}; the folder names become the classes), "
                f"or turn the column into a ClassLabel first: dataset.class_encode_column({label_column!r})"
            )
        if not (isinstance(feature, Value) and dtype.startswith(("int", "uint"))):
            raise ValueError(
                f"--label_column {label_column!r} of split {split!r} is {feature}, not integer class indices or a "
                f"ClassLabel; pass the column that holds the class of each image"
            )


def check_train_classes(train: Dataset, label_column: str, split: str = "train") -> None:
    """Refuse a train split with images of fewer than two classes (one class: every label is the same)."""
    present = sorted(train.unique(label_column))
    if len(train) == 0:
        raise ValueError(f"the train split {split!r} has no images; pass a split that holds the training images")
    if len(present) < 2:
        feature = train.features.get(label_column)
        name = feature.names[present[0]] if isinstance(feature, ClassLabel) else present[0]
        raise ValueError(
            f"the train split {split!r} has images of one class only ({name!r}, {len(train)} images): a classifier "
            "trained on it learns nothing about telling classes apart. Add the images of the other classes (for an "
            f"ImageFolder: one folder per class, {LAYOUT})"
        )


def check_class_names_file(names: Sequence[str], dataset: Dataset, label_column: str, source: str) -> None:
    """Refuse ``--class_names`` from ``source`` that contradicts the dataset's own ClassLabel (count or order).

    Names that merely read differently (a file of readable names for folders named by WordNet id) are accepted; the
    same names in another order, a line naming another class's folder (``cat, cat, fox`` for folders ``cat, dog,
    fox``), or another number of names would score images against the wrong class.
    """
    feature = dataset.features.get(label_column)
    if not isinstance(feature, ClassLabel):
        return
    folders = list(feature.names)
    if len(names) != len(folders):
        raise ValueError(
            f"--class_names {source} has {len(names)} names ({_listing(names, 4)}) but the dataset has "
            f"{len(folders)} classes ({', '.join(folders[:4])}{', ...' if len(folders) > 4 else ''}); give one name "
            "per class, in the dataset's class order (an ImageFolder's: its folder names sorted), or drop "
            "--class_names to use the dataset's own names"
        )
    # A line naming another class's folder: the same names in another order, or a name repeated in another's place.
    moved = [(i, a, b) for i, (a, b) in enumerate(zip(names, folders)) if a != b and a in folders]
    if moved:
        i, given, expected = moved[0]
        what = (
            "lists the dataset's classes in another order"
            if sorted(names) == sorted(folders)
            else f"names class {folders.index(given)}'s folder {given!r} in the place of another class"
        )
        raise ValueError(
            f"--class_names {source} {what} (line {i + 1} is {given!r}, but class {i} of the dataset is "
            f"{expected!r}): images would be scored against the wrong name. Write one name per class in the "
            "dataset's class order (an ImageFolder's: its folder names sorted), or drop --class_names"
        )


def check_max_samples(flag: str, value: int | None) -> None:
    """Refuse a ``--max_train_samples`` / ``--max_eval_samples`` that is not a positive integer."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{flag} {value!r} must be a positive number of images (0 or less would train or score nothing); drop "
            "the flag to use the whole split"
        )


def subset(dataset: Dataset, max_samples: int | None, *, seed: int, label_column: str = "label") -> Dataset:
    """At most ``max_samples`` rows of ``dataset``: seeded, spread evenly over its classes, in the dataset's order.

    The first rows of a class-sorted ImageFolder are one class; this takes each class's images in a seeded random
    order and deals them out class by class, so 6 rows of 3 classes are 2 of each. Without a label column the rows
    are a seeded random sample. The same seed gives the same rows.
    """
    if not max_samples or len(dataset) <= max_samples:
        return dataset
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dataset))
    if label_column in dataset.column_names:
        labels = np.asarray(dataset.select_columns([label_column])[label_column])[order]
        rank = np.zeros(len(order), dtype=np.int64)  # the position of each row among its class's rows, in `order`
        for label in np.unique(labels):
            where = np.flatnonzero(labels == label)
            rank[where] = np.arange(len(where))
        class_turn = {label: turn for turn, label in enumerate(rng.permutation(np.unique(labels)))}
        turns = np.array([class_turn[label] for label in labels])
        order = order[np.lexsort((turns, rank))]
    return dataset.select(sorted(order[:max_samples].tolist()))


__all__ = [
    "check_class_names_file",
    "check_columns",
    "check_image_folder",
    "check_max_samples",
    "check_train_classes",
    "subset",
]
