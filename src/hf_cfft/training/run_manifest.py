"""The run manifest: what a run trained on and with how many processes, recorded so a resume cannot change it.

Every ``training_args.json`` a trainer writes (in each ``checkpoint-N`` and beside the final model) carries a
``run_manifest``::

    {"data": {"source": {"dataset_name": ..., "split": ..., "max_train_samples": ...},
              "rows": 1000, "fingerprint": "sha256 of the rows' labels and a sample of their images"},
     "model": {"start": "sha256 of the starting model's patch embedding and head", "teacher": "... of the teacher"},
     "world_size": 2, "global_batch": 64}

A resume compares its own manifest with the checkpoint's (`manifest_changes`): another dataset, another starting
model (another ``--model_name_or_path``, class names, templates or teacher: the resumed student would be distilled
towards another teacher than its first half) or another global batch would train half a model on one setting and
half on another, so it is refused (as a changed training argument is); another process count with the same global
batch is said and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import datasets

logger = logging.getLogger(__name__)

MANIFEST_KEY = "run_manifest"
# Images whose bytes (or path) enter the fingerprint: evenly spaced rows, so a 1.2 M-image train set costs as little
# as a tiny one; every label enters it.
SAMPLED_IMAGES = 16


def rows_fingerprint(dataset: Any, image_column: str = "image", label_column: str = "label") -> dict | None:
    """``{"rows": n, "fingerprint": hex}`` for a map-style `datasets.Dataset`; None for anything else (a stream).

    The fingerprint hashes the column names, every label and the encoded bytes (or the file path) of
    `SAMPLED_IMAGES` evenly spaced images: the same files in the same order give the same value in every process
    and every session, wherever the folder lies; another subset, another order or another split do not.
    """
    if not isinstance(dataset, datasets.Dataset):
        return None
    dataset = dataset.with_format(None)  # the stored rows, not what a transform set on them makes
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(dataset.column_names)).encode())
    digest.update(str(len(dataset)).encode())
    if label_column in dataset.column_names:
        digest.update(json.dumps(list(dataset[label_column]), default=str).encode())
    if len(dataset) and image_column in dataset.column_names:
        step = max(1, len(dataset) // SAMPLED_IMAGES)
        picked = dataset.select(range(0, len(dataset), step)[:SAMPLED_IMAGES])
        feature = picked.features.get(image_column)
        if isinstance(feature, datasets.Image):
            picked = picked.cast_column(image_column, datasets.Image(decode=False))
        for value in picked[image_column]:
            digest.update(_image_key(value))
    return {"rows": len(dataset), "fingerprint": digest.hexdigest()}


def _image_key(value: Any) -> bytes:
    if isinstance(value, Mapping):  # an undecoded Image: {"bytes", "path"}
        if value.get("bytes") is not None:
            return hashlib.sha256(value["bytes"]).digest()
        path = value.get("path")
        if path and os.path.isfile(path):  # the file's content: a moved folder holds the same data
            with open(path, "rb") as f:
                return hashlib.sha256(f.read()).digest()
        return str(path).encode()
    if hasattr(value, "tobytes"):  # a PIL image or an array
        return hashlib.sha256(value.tobytes()).digest()
    return repr(value).encode()


# The weights that tell a starting model apart cheaply: the pre-trained tower (its patch embedding; the text tower's
# token embedding for contrastive models) and the head built from the class names and templates.
FINGERPRINTED = ("patch_embedding.weight", "token_embedding.weight", "classifier.weight", "classifier.bias")


def weights_fingerprint(model: Any, extra: bytes = b"") -> str:
    """sha256 of ``model``'s `FINGERPRINTED` weights (whatever wraps them: DDP, an adapter) and ``extra``."""
    digest = hashlib.sha256(extra)
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name or ".original_module." in name:  # peft: the adapter, and the head's untrained twin
            continue
        name = name.replace(".modules_to_save.default.", ".")  # peft's trained copy of the head
        if name.endswith(FINGERPRINTED):
            digest.update(".".join(name.split(".")[-2:]).encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_manifest(args: Any, data: Mapping[str, Any] | None, model: Mapping[str, Any] | None = None) -> dict:
    """The manifest of a run with `TrainingArguments`-like ``args`` on ``data`` (`rows_fingerprint` + "source"),
    from the starting ``model`` (``{"start": weights_fingerprint, "teacher": ...}``; left out when not known)."""
    world = int(getattr(args, "world_size", 1) or 1)
    per_device = int(args.per_device_train_batch_size)
    accumulation = int(args.gradient_accumulation_steps)
    manifest = {"data": dict(data or {}), "world_size": world, "global_batch": per_device * accumulation * world}
    if model:
        manifest["model"] = dict(model)
    return manifest


def manifest_changes(saved: Mapping[str, Any] | None, current: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """(refused, notes) between a checkpoint's manifest and this run's.

    ``refused`` maps "data.rows" / "data.fingerprint" (or "data.source" for a stream) / "model.start" /
    "model.teacher" / "global_batch" to
    ``(checkpoint's, this run's)`` where they differ; ``notes`` are what changed and may go on (the process count
    at an unchanged global batch, a renamed source with the same rows). A checkpoint written before manifests
    existed (``saved`` None) cannot be compared: nothing is refused.
    """
    if not saved:
        return {}, []
    refused: dict[str, tuple[Any, Any]] = {}
    notes = []
    old_data, new_data = dict(saved.get("data") or {}), dict(current.get("data") or {})
    if "fingerprint" in old_data and "fingerprint" in new_data:  # the rows themselves decide
        for key in ("rows", "fingerprint"):
            if old_data.get(key) != new_data.get(key):
                refused[f"data.{key}"] = (old_data.get(key), new_data.get(key))
        if not refused and old_data.get("source") != new_data.get("source"):
            notes.append(
                f"the data is named differently ({_short(old_data.get('source'))} -> {_short(new_data.get('source'))})"
                " but its rows are the same: it goes on"
            )
    elif "source" in old_data and "source" in new_data and old_data["source"] != new_data["source"]:
        refused["data.source"] = (old_data["source"], new_data["source"])  # a stream: only its name can be compared
    old_model, new_model = saved.get("model") or {}, current.get("model") or {}
    for key in sorted(set(old_model) & set(new_model)):  # a checkpoint from before models were recorded: not compared
        if old_model[key] != new_model[key]:
            refused[f"model.{key}"] = (old_model[key], new_model[key])
    if saved.get("global_batch") != current.get("global_batch"):
        refused["global_batch"] = (saved.get("global_batch"), current.get("global_batch"))
    if saved.get("world_size") != current.get("world_size") and "global_batch" not in refused:
        notes.append(
            f"the checkpoint was trained with {saved.get('world_size')} process(es), this run has "
            f"{current.get('world_size')} at the same global batch ({current.get('global_batch')}): it goes on, but "
            "the data order after the resume differs from an uninterrupted run"
        )
    return refused, notes


def refuse_changed_manifest(checkpoint: str, refused: Mapping[str, tuple[Any, Any]]) -> None:
    """Raise, naming each changed part of the manifest, the checkpoint's value and how to go on."""
    listed = "; ".join(f"{key}: {_short(old)} -> {_short(new)}" for key, (old, new) in refused.items())
    fixes = []
    if any(key.startswith("data.") for key in refused):
        fixes.append("resume on the checkpoint's data (the same --dataset_name, split and --max_train_samples)")
    if any(key.startswith("model.") for key in refused):
        fixes.append(
            "resume from the checkpoint's starting model (the same --model_name_or_path, --class_names, --templates "
            "and --teacher_name_or_path)"
        )
    if "global_batch" in refused:
        old = refused["global_batch"][0]
        fixes.append(
            f"keep the global batch at {old} (per_device_train_batch_size x gradient_accumulation_steps x "
            "processes), e.g. raise --gradient_accumulation_steps when you launch fewer processes"
        )
    fix = "; ".join(fixes)
    raise ValueError(
        f"resuming {checkpoint} on a different run ({listed}) would train half a model on one setting and half on "
        f"another. {fix[:1].upper() + fix[1:]}; or start a new run in another --output_dir, or pass "
        "--allow_changed_args_on_resume true to continue anyway (the model card then records the change)"
    )


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:12] + "..."
