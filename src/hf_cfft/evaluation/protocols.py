"""Evaluation protocols: how a set turns a model's logits into predictions in the space of its labels.

Protocols (`Protocol`): a 1000-way (or the model's own) argmax; for ImageNet-R and -A the argmax over their 200
classes; for ObjectNet the argmax over its 113 ImageNet-mapped classes, each scored by the max logit of the ImageNet
classes mapped to it. ``restrict=False`` takes the unrestricted argmax over every class instead (R/A: wrong unless
the top class is the label; ObjectNet: right when the top ImageNet class maps to the label). ObjectNet is licensed
for evaluation only and must never be used for training or tuning. An `EvalSet` is a named dataset with its
protocol; `hf_cfft.evaluation.evaluate_splits` scores any list of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset

from .imagenet_shifts import SHIFTS, class_indices, load_shift, objectnet_classes, shift_from_dataset

PROTOCOL_KINDS = ("argmax", "subset", "grouped")


def subset_predictions(logits: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Argmax over the columns ``classes`` only: logits [N, K] -> predicted class indices [N] (values in classes)."""
    classes = np.asarray(classes)
    return classes[np.asarray(logits)[:, classes].argmax(axis=1)]


def grouped_logits(logits: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Max-pool logits [N, K] over each group of columns -> [N, len(groups)] (ObjectNet's mapped ImageNet classes)."""
    logits = np.asarray(logits)
    return np.stack([logits[:, list(group)].max(axis=1) for group in groups], axis=1)


def grouped_predictions(logits: np.ndarray, groups: Sequence[Sequence[int]], *, restrict: bool = True) -> np.ndarray:
    """Predicted group [N] from logits [N, K]; unrestricted: the group of the top class, -1 if it is in none."""
    if restrict:
        return grouped_logits(logits, groups).argmax(axis=1)
    owner = np.full(np.asarray(logits).shape[1], -1)
    for g, group in enumerate(groups):
        owner[list(group)] = g
    return owner[np.asarray(logits).argmax(axis=1)]


@dataclass(frozen=True)
class Protocol:
    """How a set turns logits [N, K] into predictions in the space of its labels.

    ``kind``: ``"argmax"`` over all K classes; ``"subset"``: argmax over ``classes`` (labels are class indices);
    ``"grouped"``: argmax over ``groups`` of classes, each scored by its max logit (labels are group indices).
    ``num_classes``: the logit width the labels refer to (1000 for the ImageNet sets), checked against the model.
    """

    kind: str = "argmax"
    classes: tuple[int, ...] = ()
    groups: tuple[tuple[int, ...], ...] = ()
    num_classes: int | None = None

    def __post_init__(self):
        if self.kind not in PROTOCOL_KINDS:
            raise ValueError(f"protocol kind must be one of {PROTOCOL_KINDS}, got {self.kind!r}")

    def check_width(self, width: int | None) -> None:
        """Raise ValueError when a head of ``width`` classes cannot be scored against this set's labels."""
        if self.num_classes is not None and width is not None and width != self.num_classes:
            raise ValueError(
                f"the model scores {width} classes but this set's labels are indices of {self.num_classes} classes; "
                "for the ImageNet shifts use a 1000-class ImageNet classifier or a CLIP checkpoint"
            )

    def label_count(self, width: int | None) -> int | None:
        """How many label values this set's labels may take against a head of ``width`` classes (None: unknown)."""
        if self.kind == "grouped":
            return len(self.groups)
        return self.num_classes if self.num_classes is not None else width

    def predict(self, logits: np.ndarray, *, restrict: bool = True) -> np.ndarray:
        """Predictions [N] for logits [N, K]; ``restrict=False``: the top class over all K (see module docstring)."""
        logits = np.asarray(logits)
        self.check_width(logits.shape[1])
        if self.kind == "grouped":
            return grouped_predictions(logits, self.groups, restrict=restrict)
        if self.kind == "subset" and restrict:
            return subset_predictions(logits, self.classes)
        return logits.argmax(axis=1)


class BorderCrop:
    """Crop ``pixels`` from every side of a PIL image (ObjectNet's 1-px red border; the standard eval crops 2)."""

    def __init__(self, pixels: int):
        self.pixels = pixels

    def __call__(self, image):
        width, height = image.size
        if width <= 2 * self.pixels or height <= 2 * self.pixels:
            return image
        return image.crop((self.pixels, self.pixels, width - self.pixels, height - self.pixels))


@dataclass
class EvalSet:
    """One set to score: its Dataset (``image`` and ``label`` columns), protocol and per-image transform."""

    name: str
    dataset: Dataset
    protocol: Protocol = field(default_factory=Protocol)
    image_transform: Callable | None = None
    title: str | None = None

    @property
    def display(self) -> str:
        return self.title or self.name


def shift_protocol(key: str) -> Protocol:
    """The standard protocol of an ImageNet shift set (see module docstring)."""
    spec = SHIFTS[key]
    if spec.protocol == "objectnet":
        return Protocol("grouped", groups=tuple(c.imagenet_indices for c in objectnet_classes()), num_classes=1000)
    if spec.protocol == "subset":
        return Protocol("subset", classes=class_indices(key), num_classes=1000)
    return Protocol("argmax", num_classes=1000)


def imagenet_eval_sets(
    sources: Mapping[str, str | Dataset], *, allow_partial: bool = False, **load_kwargs
) -> list[EvalSet]:
    """The ImageNet sets in ``sources`` (key -> folder, Hub id or in-memory Dataset), in the order of `SHIFTS`.

    ``load_kwargs`` go to `load_shift` / `shift_from_dataset` (``label_kind``, ``image_column``, ...).
    Raises `IncompleteShiftError` for a set whose size differs from the published one, unless ``allow_partial``.
    """
    unknown = [key for key in sources if key not in SHIFTS]
    if unknown:
        raise ValueError(f"unknown ImageNet shift(s) {unknown}; known sets: {', '.join(SHIFTS)}")
    sets = []
    for key in (k for k in SHIFTS if k in sources):
        source, spec = sources[key], SHIFTS[key]
        if isinstance(source, Dataset):
            dataset = shift_from_dataset(key, source, allow_partial=allow_partial, **load_kwargs)
        else:
            dataset = load_shift(key, source, allow_partial=allow_partial, **load_kwargs)
        transform = BorderCrop(spec.border) if spec.border else None
        sets.append(EvalSet(key, dataset, shift_protocol(key), transform, spec.title))
    return sets


def dataset_eval_sets(
    splits: Mapping[str, Dataset], *, image_column: str = "image", label_column: str = "label"
) -> list[EvalSet]:
    """Any dataset's splits (e.g. the world's test_id and ood_* splits) as sets scored by the model's own argmax."""
    renames = {k: v for k, v in ((image_column, "image"), (label_column, "label")) if k != v}
    sets = []
    for name, dataset in splits.items():
        if renames:
            dataset = dataset.select_columns([image_column, label_column]).rename_columns(renames)
        sets.append(EvalSet(name, dataset))
    return sets


def subsample(dataset: Dataset, max_samples: int | None) -> Dataset:
    """At most ``max_samples`` rows spread evenly over ``dataset`` (folder sets are sorted by class): quick runs."""
    if not max_samples or len(dataset) <= max_samples:
        return dataset
    return dataset.select(np.linspace(0, len(dataset) - 1, max_samples).round().astype(int).tolist())
