"""Score classifiers on an in-distribution set and its distribution shifts, and report accuracy and robustness.

    sets (ImageNet shifts via `imagenet_eval_sets`, or any dataset's splits via `dataset_eval_sets`)
        -> `evaluate_model` per model: logits -> the set's protocol -> predictions -> `evaluate` accuracy
        -> `write_results`: results.json, results.md (ID, each shift, OOD average), effective_robustness.png

Protocols (`Protocol`): a 1000-way (or the model's own) argmax; for ImageNet-R and -A the argmax over their 200
classes; for ObjectNet the argmax over its 113 ImageNet-mapped classes, each scored by the max logit of the ImageNet
classes mapped to it. ``restrict=False`` takes the unrestricted argmax over every class instead (R/A: wrong unless
the top class is the label; ObjectNet: right when the top ImageNet class maps to the label). ObjectNet is licensed
for evaluation only and must never be used for training or tuning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from datasets import Dataset

from .evaluation import load_accuracy, predict_logits, results_table, top1_accuracy
from .imagenet_shifts import SHIFTS, class_indices, load_shift, objectnet_classes, shift_from_dataset
from .sources import load_image_splits

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


def load_eval_splits(
    dataset_name: str, splits: Sequence[str], *, dataset_config: str | None = None, world_seed: int = 0
) -> dict[str, Dataset]:
    """Splits of ``"world"``, a Hub dataset, or a ``<dir>/<split>/<class>/<image>`` folder with any split names."""
    return load_image_splits(dataset_name, splits, dataset_config=dataset_config, world_seed=world_seed)


def subsample(dataset: Dataset, max_samples: int | None) -> Dataset:
    """At most ``max_samples`` rows spread evenly over ``dataset`` (folder sets are sorted by class): quick runs."""
    if not max_samples or len(dataset) <= max_samples:
        return dataset
    return dataset.select(np.linspace(0, len(dataset) - 1, max_samples).round().astype(int).tolist())


def evaluate_model(
    model: torch.nn.Module,
    sets: Sequence[EvalSet],
    image_processor: Callable,
    *,
    restrict: bool = True,
    **predict_kwargs,
) -> dict[str, float]:
    """Top-1 accuracy (%) of ``model`` on each set, by name. ``predict_kwargs``: batch_size, device, num_workers."""
    width = getattr(getattr(model, "config", None), "num_labels", None)
    for eval_set in sets:  # before any forward pass: a wrong head should fail fast, not after the first 50000 images
        eval_set.protocol.check_width(width)
    metric = load_accuracy()
    results = {}
    for eval_set in sets:
        logits, labels = predict_logits(
            model, eval_set.dataset, image_processor, image_transform=eval_set.image_transform, **predict_kwargs
        )
        predictions = eval_set.protocol.predict(logits, restrict=restrict)
        results[eval_set.name] = top1_accuracy(predictions, labels, metric)
    return results


@dataclass
class RunResult:
    """The accuracies (%) of one model; ``zero_shot`` marks models the robustness fit is drawn through."""

    name: str
    model: str
    zero_shot: bool
    accuracy: dict[str, float]


def summarize(accuracy: Mapping[str, float], id_name: str | None, ood_names: Sequence[str]) -> dict[str, float]:
    """``{"id": ..., "ood_avg": ...}`` from per-set accuracies; a key is left out when its sets were not scored."""
    summary = {}
    if id_name in accuracy:
        summary["id"] = accuracy[id_name]
    present = [accuracy[name] for name in ood_names if name in accuracy]
    if present:
        summary["ood_avg"] = float(np.mean(present))
    return summary


def robustness_fit(runs: Sequence[RunResult], id_name: str, ood_names: Sequence[str]) -> tuple[float, float] | None:
    """(slope, intercept) of OOD average vs ID accuracy (%) through the zero-shot runs; None with < 2 distinct."""
    points = [summarize(r.accuracy, id_name, ood_names) for r in runs if r.zero_shot]
    points = [(p["id"], p["ood_avg"]) for p in points if "id" in p and "ood_avg" in p]
    if len({x for x, _ in points}) < 2:
        return None
    slope, intercept = np.polyfit([x for x, _ in points], [y for _, y in points], deg=1)
    return float(slope), float(intercept)


def write_results(
    output_dir: str,
    runs: Sequence[RunResult],
    sets: Sequence[EvalSet],
    *,
    id_name: str | None,
    ood_names: Sequence[str],
    benchmark: str,
    plot: bool = True,
) -> dict:
    """Write results.json, results.md and (with an ID set and an OOD set) effective_robustness.png; return the JSON.

    Effective robustness of a run = its OOD average minus the zero-shot fit at its ID accuracy (Taori et al. 2020).
    """
    os.makedirs(output_dir, exist_ok=True)
    titles = {s.name: s.display + (" (ID)" if s.name == id_name else "") for s in sets}
    fit = robustness_fit(runs, id_name, ood_names) if id_name else None
    report = {
        "benchmark": benchmark,
        "id_split": id_name,
        "ood_splits": list(ood_names),
        "num_examples": {s.name: len(s.dataset) for s in sets},
        "zero_shot_fit": {"slope": fit[0], "intercept": fit[1]} if fit else None,
        "runs": {},
    }
    rows = {}
    for run in runs:
        entry = asdict(run) | summarize(run.accuracy, id_name, ood_names)
        if fit and "id" in entry and "ood_avg" in entry:
            entry["effective_robustness"] = entry["ood_avg"] - (fit[0] * entry["id"] + fit[1])
        report["runs"][run.name] = entry
        rows[run.name] = {titles[k]: v for k, v in run.accuracy.items()} | (
            {"OOD avg": entry["ood_avg"]} if "ood_avg" in entry else {}
        )
    columns = ([titles[id_name]] if id_name else []) + [titles[n] for n in ood_names] + ["OOD avg"]
    table = results_table(rows, columns)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(f"Top-1 accuracy (%) on {benchmark}\n\n{table}\n")
    points = [e for e in report["runs"].values() if "id" in e and "ood_avg" in e]
    if plot and points:
        from .plots import plot_effective_robustness

        plot_effective_robustness(
            [(e["name"], e["id"], e["ood_avg"], e["zero_shot"]) for e in points],
            os.path.join(output_dir, "effective_robustness.png"),
            fit=fit,
            xlabel=f"{titles[id_name]} top-1 accuracy (%)",
            ylabel=f"OOD average top-1 accuracy (%) over {len(ood_names)} set(s)",
            title=f"Effective robustness: {benchmark}",
        )
    return report
