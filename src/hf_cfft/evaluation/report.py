"""Reports of evaluation results: the one markdown table builder and the one writer (JSON + table + plot).

accuracies per run and split -> `results_table` (markdown) -> `write_report`: <stem>.json, <stem>.md and, given
points, effective_robustness.png. `write_robustness_report` adds the zero-shot fit and effective robustness
(Taori et al. 2020) for the OOD benchmark; the recipes' result files and the model card use the same table.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .protocols import EvalSet


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table of pre-formatted cells: first column left-aligned, the others (numbers) right."""
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(
    rows: Mapping[str, Mapping[str, float]], columns: Sequence[str], headers: Sequence[str] | None = None
) -> str:
    """One row per run (e.g. zero-shot, fine-tuned), one column per split, accuracies in % with one decimal.

    ``headers``: the column titles (default: the column keys); a split a run was not scored on shows "-".
    """
    cells = [
        [name, *(f"{float(values[c]):.1f}" if c in values else "-" for c in columns)] for name, values in rows.items()
    ]
    return markdown_table(["model", *(headers if headers is not None else columns)], cells)


def rounded(value: Any, digits: int = 10) -> Any:
    """``value`` with every float (in dicts, lists and tuples too) rounded to ``digits`` significant digits.

    What is written to JSON goes through this: binary floating point turns 0.1 + 0.2 into 0.30000000000000004 and
    100 * 0.939 into 93.89999999999999; 10 significant digits keep every meaningful digit and drop that noise.
    """
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, Mapping):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    return value


def write_report(
    output_dir: str,
    payload: Mapping[str, Any],
    table: str,
    *,
    title: str,
    stem: str = "results",
    plot: Mapping[str, Any] | None = None,
) -> str:
    """Write ``<stem>.json`` (``payload``), ``<stem>.md`` (``title`` + ``table``) and, when ``plot`` holds the
    keyword arguments of `plot_effective_robustness` (without ``path``), effective_robustness.png; returns the table.
    """
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{stem}.json"), "w") as f:
        json.dump(rounded(payload), f, indent=2)
    with open(os.path.join(output_dir, f"{stem}.md"), "w") as f:
        f.write(f"{title}\n\n{table}\n")
    if plot is not None:
        plot_effective_robustness(path=os.path.join(output_dir, "effective_robustness.png"), **plot)
    return table


@dataclass
class RunResult:
    """The accuracies (%) of one model; ``zero_shot`` marks models the robustness fit is drawn through."""

    name: str
    model: str
    zero_shot: bool
    accuracy: dict[str, float]


OOD_AVG = "ood_avg"  # the key of the mean over the OOD splits, in every results dict and row
# Accuracies (%) are rounded to this many decimals where they are computed: 100 * 0.939 is 93.89999999999999 in
# binary floating point, and 1e-6 % is far below one image of any evaluation set (one image in 10^6 is 1e-4 %).
ACCURACY_DECIMALS = 6


def ood_average(accuracy: Mapping[str, float], ood_names: Sequence[str]) -> float | None:
    """The mean top-1 accuracy over the OOD splits that were scored (rounded like every accuracy); None if none was."""
    present = [accuracy[name] for name in ood_names if name in accuracy]
    return round(sum(present) / len(present), ACCURACY_DECIMALS) if present else None


def summarize(accuracy: Mapping[str, float], id_name: str | None, ood_names: Sequence[str]) -> dict[str, float]:
    """``{"id": ..., "ood_avg": ...}`` from per-set accuracies; a key is left out when its sets were not scored."""
    summary = {}
    if id_name in accuracy:
        summary["id"] = accuracy[id_name]
    average = ood_average(accuracy, ood_names)
    if average is not None:
        summary[OOD_AVG] = average
    return summary


def robustness_fit(runs: Sequence[RunResult], id_name: str, ood_names: Sequence[str]) -> tuple[float, float] | None:
    """(slope, intercept) of OOD average vs ID accuracy (%) through the zero-shot runs; None with < 2 distinct."""
    points = [summarize(r.accuracy, id_name, ood_names) for r in runs if r.zero_shot]
    points = [(p["id"], p["ood_avg"]) for p in points if "id" in p and "ood_avg" in p]
    if len({x for x, _ in points}) < 2:
        return None
    slope, intercept = np.polyfit([x for x, _ in points], [y for _, y in points], deg=1)
    return float(slope), float(intercept)


def write_robustness_report(
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
    points = [e for e in report["runs"].values() if "id" in e and "ood_avg" in e]
    write_report(
        output_dir,
        report,
        results_table(rows, columns),
        title=f"Top-1 accuracy (%) on {benchmark}",
        stem="results",
        plot=dict(
            points=[(e["name"], e["id"], e["ood_avg"], e["zero_shot"]) for e in points],
            fit=fit,
            xlabel=f"{titles[id_name]} top-1 accuracy (%)" if id_name else "ID top-1 accuracy (%)",
            ylabel=f"OOD average top-1 accuracy (%) over {len(ood_names)} set(s)",
            title=f"Effective robustness: {benchmark}",
        )
        if plot and points
        else None,
    )
    return report


def plot_effective_robustness(
    points: Sequence[tuple[str, float, float, bool]],
    path: str,
    *,
    fit: tuple[float, float] | None = None,
    xlabel: str = "ID top-1 accuracy (%)",
    ylabel: str = "OOD average top-1 accuracy (%)",
    title: str = "Effective robustness",
) -> str:
    """Scatter OOD average vs ID accuracy for several runs, with y = x and the zero-shot fit; save a PNG at ``path``.

    ``points``: (run name, ID accuracy %, OOD average %, zero_shot) per run. ``fit``: (slope, intercept) of the
    linear fit through the zero-shot runs (drawn when given). A run above the fit line is effectively robust.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xs = np.array([p[1] for p in points], dtype=float)
    ys = np.array([p[2] for p in points], dtype=float)
    low = max(0.0, min(xs.min(), ys.min()) - 5.0)
    high = min(100.0, max(xs.max(), ys.max()) + 5.0)
    span = np.linspace(low, high, 50)

    figure = Figure(figsize=(6.0, 5.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(span, span, linestyle="--", color="0.6", label="y = x (no drop under shift)")
    if fit is not None:
        axes.plot(span, fit[0] * span + fit[1], color="tab:blue", alpha=0.7, label="linear fit, zero-shot models")
    for kind, marker, color in ((True, "s", "tab:blue"), (False, "o", "tab:red")):
        chosen = [p for p in points if bool(p[3]) is kind]
        if chosen:
            label = "zero-shot" if kind else "fine-tuned / other"
            axes.scatter([p[1] for p in chosen], [p[2] for p in chosen], marker=marker, color=color, label=label, s=45)
    seen: dict[tuple[float, float], int] = {}
    for name, x, y, _ in points:
        # Runs with the same accuracies share a marker; stack their names instead of overprinting them.
        stack = seen[(round(x, 1), round(y, 1))] = seen.get((round(x, 1), round(y, 1)), -1) + 1
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4 + 10 * stack), fontsize=8)
    axes.set_xlim(low, high)
    axes.set_ylim(low, high)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path
