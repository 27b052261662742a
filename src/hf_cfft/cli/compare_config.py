"""What a comparison's rows were made with: each row carries its cell's configuration, and a re-run must match it.

A row's ``config`` has two parts. ``shared``: what every cell of the comparison is made with (the data, the model
and the training flags recipes/finetune.py gets, the number of processes), the same for every row of one folder.
``method``: the cell's own method (its flags, strength kind, the methods it builds on, and their flags). A re-run into
the same folder may add methods, seeds and strengths (new cells run, old rows stay); a changed shared part, or a
planned cell whose method changed, is refused naming each change. Rows written before rows carried a configuration
are accepted as they are.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, fields
from typing import Any

from ..evaluation.frontier import row_key
from ..evaluation.report import rounded

# CfftConfig's own fields that change nothing a row reports (workers, checks of the files, resume bookkeeping).
_NOT_RESULTS = frozenset({"allow_changed_args_on_resume", "cam_num_workers", "image_check"})
# DataArguments fields compare sets itself for every run.
_SET_BY_COMPARE = frozenset({"evaluate_zero_shot"})
# Per cell (the row's own key says them), not shared.
_PER_CELL = frozenset({"seed", "distill_weight"})


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _as_written(value: Any) -> Any:
    """``value`` as a row holds it once written and read back (JSON, floats rounded as `append_row` does)."""
    return json.loads(json.dumps(rounded(_plain(value))))


def shared_configuration(model_args: Any, data_args: Any, training_args: Any) -> dict:
    """The data, model and training flags every run of the comparison gets (finetune's parse of compare's flags)."""
    from transformers import TrainingArguments

    from ..config import CfftConfig
    from ..training.run_folder import RESUME_FIELDS

    own = [f.name for f in fields(CfftConfig) if f.name not in {g.name for g in fields(TrainingArguments)}]
    training = {
        name: getattr(training_args, name)
        for name in dict.fromkeys([*own, *RESUME_FIELDS, "warmup_ratio", "label_smoothing_factor"])
        if hasattr(training_args, name) and name not in _NOT_RESULTS | _PER_CELL
    }
    training["processes"] = getattr(training_args, "world_size", 1)
    data = {f.name: getattr(data_args, f.name) for f in fields(data_args) if f.name not in _SET_BY_COMPARE}
    model = {f.name: getattr(model_args, f.name) for f in fields(model_args)}
    return _as_written({"data": data, "model": model, "training": training})


def method_configuration(spec: Any, registry: Mapping[str, Any]) -> dict:
    """A cell's method: its spec, and the flags of the methods it is built from (WiSE-FT's run, LP-FT's probe)."""
    method = {key: value for key, value in asdict(spec).items() if key != "strengths"}
    for role in ("source", "init_from"):
        if spec_of := registry.get(getattr(spec, role) or ""):
            method[f"{role}_flags"] = list(spec_of.flags)
    return _as_written(method)


def cell_configuration(cell: Any, shared: dict, registry: Mapping[str, Any]) -> dict:
    return {"shared": shared, "method": method_configuration(cell.spec, registry)}


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in dict.fromkeys([*old, *new]):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key in old and key in new:  # a field one side does not know (another hf_cfft version) is let be
                found.extend(_differences(old[key], new[key], where))
        return found
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def check_rows_configuration(
    rows: Iterable[Mapping], shared: dict, planned: Sequence[Any], registry: Mapping[str, Any], output_dir: str
) -> None:
    """Refuse a comparison whose folder holds rows made with another configuration, naming what changed.

    Every row that records a configuration must have this run's shared part; a row of a planned cell must also have
    its method part. Rows without one (written before rows carried it) are accepted.
    """
    by_id = {cell.id: cell for cell in planned}
    changes: dict[str, list[str]] = {}
    for row in rows:
        config = row.get("config")
        if not isinstance(config, Mapping):
            continue
        found = _differences(config.get("shared"), shared, "")
        cell = by_id.get(row_key(row))
        if cell is not None:
            found += _differences(config.get("method"), method_configuration(cell.spec, registry), "method")
        for change in found:
            changes.setdefault(change, []).append(row_key(row))
    if changes:
        listed = "; ".join(
            f"{change} ({len(ids)} row(s), e.g. {ids[0]})" for change, ids in list(changes.items())[:8]
        ) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        raise ValueError(
            f"--output_dir {output_dir!r} holds rows made with another configuration than this run's: {listed}. "
            "Rows of two configurations would be reported as one comparison. Re-run with the rows' settings (the "
            "old values above), pass another --output_dir, or move its rows*.jsonl away to start the comparison "
            "anew (adding methods, seeds or strengths to the same configuration is fine: only the new cells run)"
        )


__all__ = ["cell_configuration", "check_rows_configuration", "method_configuration", "shared_configuration"]
