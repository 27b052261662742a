"""Figures for evaluation results, drawn with matplotlib's Agg canvas (no display, no global pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
