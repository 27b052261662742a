"""The comparison's two pictures: the ID/OOD frontier (full view and a zoom where the curves meet) and the paired
differences against a reference method (one panel per OOD split and one for the average).

Every curve gets its own colour and marker; zero-shot is drawn last, as a large marked point, so no curve hides it.
matplotlib is imported only here (the ``plots`` extra).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .paired import Comparison, column_label
from .prediction import OOD_AVG

Curve = tuple[str, float | str]

# Fixed styles for the world study's method names, so its plots keep their look; other names draw from _CYCLE.
STYLES = {
    "FT+FD": ("tab:blue", "o"),
    "CFFT object/single": ("tab:red", "*"),
    "CFFT random/single": ("tab:green", "^"),
    "CFFT context/single": ("tab:purple", "v"),
    "CFFT object/single, threshold 0.3": ("tab:orange", "P"),
    "CFFT object/none": ("tab:pink", "p"),
    "WiSE-FT": ("black", "."),
    "vanilla FT": ("tab:gray", "s"),
    "zero-shot": ("gold", "*"),
    "oracle FT (context independent of class)": ("tab:olive", "X"),
}
_CYCLE = [
    (colour, marker)
    for marker in ("h", "d", "<", ">", "8", "H", "x", "+")
    for colour in ("tab:cyan", "darkgoldenrod", "navy", "crimson", "teal", "indigo", "olive", "salmon")
]
ZERO_SHOT = "zero-shot"


def curve_styles(curves: Iterable[Curve], order) -> dict[Curve, tuple[str, str]]:
    """A (colour, marker) per curve, no two alike: the fixed ones first, then unused pairs in order."""
    styles, used = {}, set()
    ordered = order(curves)
    for curve in ordered:
        if curve[0] in STYLES and STYLES[curve[0]] not in used:
            styles[curve] = STYLES[curve[0]]
            used.add(styles[curve])
    spare = iter(pair for pair in _CYCLE if pair not in used and pair not in STYLES.values())
    for curve in ordered:
        if curve not in styles:
            styles[curve] = next(spare)
    return styles


def zoom_window(curves: Mapping[Curve, Sequence], pad: float = 0.12) -> tuple[tuple[float, float], ...]:
    """((x0, x1), (y0, y1)): the ID interval that the most curves (of two points or more) span, and the OOD range of
    their points inside it, padded. Falls back to every point's range when no two curves overlap."""
    spans = [
        (min(p.id_mean for p in pts), max(p.id_mean for p in pts))
        for c, pts in curves.items()
        if c[0] != ZERO_SHOT and len(pts) >= 2
    ]
    edges = sorted({x for span in spans for x in span})
    best, best_count = None, 1
    for lo, hi in zip(edges, edges[1:]):
        count = sum(1 for a, b in spans if a <= lo and b >= hi)
        if count > best_count or (count == best_count and best is not None and hi - lo > best[1] - best[0]):
            best, best_count = (lo, hi), count
    points = [p for pts in curves.values() for p in pts]
    if best is None:
        x0, x1 = min(p.id_mean for p in points), max(p.id_mean for p in points)
    else:
        x0, x1 = best
    inside = [p.ood_mean for p in points if x0 - 1e-9 <= p.id_mean <= x1 + 1e-9] or [p.ood_mean for p in points]
    y0, y1 = min(inside), max(inside)
    dx, dy = max(x1 - x0, 0.2) * pad, max(y1 - y0, 0.2) * pad
    return (x0 - dx, x1 + dx), (y0 - dy, y1 + dy)


def _draw_curves(axes, curves, styles, label, common, *, error_bars: bool) -> None:
    for curve, points in curves.items():
        if curve[0] == ZERO_SHOT:
            continue
        points = sorted(points, key=lambda p: p.id_mean)
        colour, marker = styles[curve]
        long = curve[1] != common  # another run length than most curves: dashed, hollow markers
        if len(points) == 1:  # single points are often on top of each other (LP-FT on vanilla FT): hollow, on top
            p = points[0]
            axes.errorbar([p.id_mean], [p.ood_mean], xerr=[p.id_std] if error_bars else None,
                          yerr=[p.ood_std] if error_bars else None, color=colour, marker=marker, markersize=11,
                          markerfacecolor="none", markeredgewidth=2, capsize=2, linestyle="none", label=label(curve),
                          zorder=8, elinewidth=0.6)  # fmt: skip
            continue
        axes.errorbar(
            [p.id_mean for p in points], [p.ood_mean for p in points],
            xerr=[p.id_std for p in points] if error_bars else None,
            yerr=[p.ood_std for p in points] if error_bars else None,
            fmt="--" if long else "-", color=colour, marker=marker, markersize=9 if marker == "*" else 6,
            capsize=2, label=label(curve), markerfacecolor="none" if long else colour, alpha=0.9,
            elinewidth=0.6,
        )  # fmt: skip
    for curve, points in curves.items():
        if curve[0] == ZERO_SHOT:  # last and on top: nothing hides it
            p = points[0]
            axes.plot([p.id_mean], [p.ood_mean], marker="*", markersize=20, color="gold", markeredgecolor="black",
                      markeredgewidth=1.2, linestyle="none", zorder=10, label=label(curve))  # fmt: skip
            axes.annotate(label(curve), (p.id_mean, p.ood_mean), textcoords="offset points", xytext=(8, -14),
                          fontsize=8, zorder=11)  # fmt: skip


def plot_frontier(
    curves: Mapping[Curve, Sequence],
    path: str | Path,
    *,
    id_split: str,
    num_ood: int,
    title: str,
    label,
    order,
    common,
) -> str:
    """Two panels: OOD average vs ID for every curve (error bars = std over seeds), and a zoom on where most curves
    meet (means only; which gaps are real is the paired plot's business)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    figure = Figure(figsize=(16, 7))
    FigureCanvasAgg(figure)
    full, zoom = figure.subplots(1, 2)
    ordered = {c: curves[c] for c in order(curves)}
    styles = curve_styles(ordered, order)
    _draw_curves(full, ordered, styles, label, common, error_bars=True)
    _draw_curves(zoom, ordered, styles, label, common, error_bars=False)
    (x0, x1), (y0, y1) = zoom_window(ordered)
    zoom.set_xlim(x0, x1)
    zoom.set_ylim(y0, y1)
    full.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linestyle=":", edgecolor="black", zorder=9))
    for axes in (full, zoom):
        axes.set_xlabel(f"ID accuracy, {id_split} (%)")
        axes.set_ylabel(f"OOD accuracy, average of {num_ood} split(s) (%)")
        axes.grid(alpha=0.3)
    full.set_title(title, fontsize=9)
    zoom.set_title("zoom on the dotted box, where most curves meet (means, no error bars)", fontsize=9)
    handles, labels = full.get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=7, loc="center right", frameon=False)
    figure.tight_layout(rect=(0, 0, 0.83, 1))
    figure.savefig(path, dpi=100)
    return str(path)


def plot_paired(
    comparisons: Mapping[Curve, Comparison],
    path: str | Path,
    *,
    reference: str,
    id_split: str,
    ood_splits: Sequence[str],
    label,
    styles: Mapping[Curve, tuple[str, str]],
) -> str:
    """One panel per OOD split and one for the average: each method's OOD accuracy minus ``reference``'s at matched
    ID, per point, with its 95 % interval as a band (curves) or an error bar (single points)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = [OOD_AVG, *ood_splits]
    ncols = min(3, len(columns) + 1)
    nrows = -(-(len(columns) + 1) // ncols)  # one cell more for the legend
    figure = Figure(figsize=(5.2 * ncols, 4.2 * nrows))
    FigureCanvasAgg(figure)
    grid = figure.subplots(nrows, ncols, squeeze=False)
    panels = [axes for row in grid for axes in row]
    for axes, column in zip(panels, columns):
        axes.axhline(0.0, color="black", linewidth=1)
        means = [m.differences[column].mean for c in comparisons.values() for m in c.points]
        for curve, comparison in comparisons.items():
            colour, marker = styles.get(curve, ("tab:gray", "o"))
            found = sorted(comparison.points, key=lambda m: m.id_mean)
            xs = [m.id_mean for m in found]
            ds = [m.differences[column] for m in found]
            ys = [d.mean for d in ds]
            lows = [d.low if d.low is not None else d.mean for d in ds]
            highs = [d.high if d.high is not None else d.mean for d in ds]
            if len(found) >= 2:
                axes.plot(xs, ys, color=colour, marker=marker, label=label(curve), linewidth=1.6)
                axes.fill_between(xs, lows, highs, color=colour, alpha=0.08, linewidth=0)
            else:
                yerr = [[y - lo for y, lo in zip(ys, lows)], [hi - y for y, hi in zip(ys, highs)]]
                axes.errorbar(xs, ys, yerr=yerr, color=colour, marker=marker, capsize=3, linestyle="none",
                              label=label(curve))  # fmt: skip
        if means:  # the means set the scale; wider intervals (two seeds: t = 12.7) run off it
            low, high = min(0.0, *means), max(0.0, *means)
            pad = max(0.3, 0.5 * (high - low))
            axes.set_ylim(low - pad, high + pad)
        axes.set_title(f"{column_label(column)}: minus {reference} at matched ID", fontsize=9)
        axes.set_xlabel(f"ID accuracy, {id_split} (%)")
        axes.set_ylabel("difference (points)")
        axes.grid(alpha=0.3)
    legend_axes = panels[len(columns)]
    legend_axes.axis("off")
    handles, labels = panels[0].get_legend_handles_labels()
    note = (
        f"minus {reference}'s curve of the same run length\nband / bar: 95 % Student t interval over seeds\n"
        "(clipped where wider than the axes)"
    )
    legend_axes.legend(handles, labels, fontsize=7, loc="center", frameon=False, title=note, title_fontsize=7)
    for axes in panels[len(columns) + 1 :]:
        axes.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return str(path)
