"""The ID/OOD trade-off of several methods: result rows -> mean curves -> tables, a plain-language summary, a plot.

A *row* is one evaluated model, as ``recipes/compare.py`` appends them to JSONL:

    {"method": "FT+FD", "strength": 3.0, "strength_name": "beta", "epochs": 1, "seed": 0,
     "results": {"test_id": 81.2, ..., "ood_avg": 60.4}}

``strength`` is the method's strength and ``strength_name`` says which: "beta" (the distillation weight), "alpha"
(WiSE-FT's mixing weight) or "" (a method without one). Rows written before 2026-12-03 hold it under ``beta`` for
every method; `hf_cfft.evaluation.paired.row_strength` reads both. A *curve* is one (method, epochs): its points
are the strengths, each the mean and standard deviation over the seeds.
"""

from __future__ import annotations

import functools
import json
import logging
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import paired
from .paired import row_strength, row_strength_name
from .prediction import OOD_AVG
from .report import markdown_table, rounded

logger = logging.getLogger(__name__)

Curve = tuple[str, float | str]  # (method, epochs): a number of epochs, or "<n> steps" for runs set by max_steps


@dataclass(frozen=True)
class Point:
    """One strength of a curve: ID and OOD-average accuracy (%), mean and std over ``seeds`` rows."""

    strength: float
    id_mean: float
    id_std: float
    ood_mean: float
    ood_std: float
    seeds: int


def row_key(row: Mapping) -> str:
    """``method|strength|epochs|seed``: what makes a row unique (the key every row file has used)."""
    return f"{row['method']}|{row_strength(row):g}|{row['epochs']}|{row['seed']}"


def _rows_of(path: Path) -> list[dict]:
    """The rows of one JSONL file; a cut-off last line (a run killed while writing it) is named and skipped."""
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if any(rest.strip() for rest in lines[number:]):
                raise ValueError(
                    f"{path}, line {number}, is not a row ({error}: {line[:80]!r}) and rows follow it: the file was "
                    "edited or written by two programs at once. Fix or remove that line"
                ) from None
            logger.warning(
                "%s: its last row (line %d) is cut off (%r), as when a run is killed while writing it; it is skipped "
                "and its cell runs again", path, number, line[:80],
            )  # fmt: skip
    return rows


def drop_cut_off_row(path: str | Path) -> str | None:
    """Remove a cut-off last row from ``path`` before rows are appended to it (kept in ``<path>.cut-off``).

    Returns the removed text, or None when the file ends with a complete row.
    """
    path = Path(path)
    if not path.is_file():
        return None
    text = path.read_text()
    keep = text if text.endswith("\n") or not text else text[: text.rfind("\n") + 1]
    tail = text[len(keep) :]
    if not tail.strip():
        return None
    try:
        json.loads(tail)
        path.write_text(keep + tail + "\n")  # a whole row that lacks only its newline
        return None
    except json.JSONDecodeError:
        pass
    with open(f"{path}.cut-off", "a") as f:
        f.write(tail + "\n")
    path.write_text(keep)
    logger.warning("%s: removed its cut-off last row (kept in %s.cut-off): %r", path, path, tail[:80])
    return tail


def read_rows(output_dir: str | Path) -> list[dict]:
    """Every row of ``rows*.jsonl`` in ``output_dir`` (rows.jsonl, and a sharded run's rows-<i>of<n>.jsonl).

    A cell scored twice (two processes that ran the same cell, e.g. an unsharded run started while a shard was still
    running) is kept once, the first row read, so no seed counts twice; a warning names the cells, and says when the
    two rows' results differ. A cut-off last line of a file (a run killed while writing it) is skipped with a
    warning that names it, so its cell runs again.
    """
    rows, seen, twice, differ = [], {}, [], []
    for path in sorted(Path(output_dir).glob("rows*.jsonl")):
        for row in _rows_of(path):
            key = row_key(row)
            if key in seen:
                twice.append(key)
                if seen[key].get("results") != row.get("results"):
                    differ.append(key)
                continue
            seen[key] = row
            rows.append(row)
    if twice:
        logger.warning(
            "%d cell(s) have more than one row in %s; the first is used: %s%s", len(twice), output_dir,
            ", ".join(twice[:5]) + (" ..." if len(twice) > 5 else ""),
            f" (results differ for {', '.join(differ[:5])})" if differ else " (identical results)",
        )  # fmt: skip
    return rows


def append_row(path: str | Path, row: Mapping) -> None:
    """Append one row to a JSONL file (one line, flushed on close: a crash loses at most the run in progress)."""
    with Path(path).open("a") as f:
        f.write(json.dumps(rounded(dict(row))) + "\n")


def strength_label(row: Mapping) -> str:
    name = row_strength_name(row)
    return f"{name} {row_strength(row):g}" if name else "-"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _grouped(rows: Iterable[Mapping]) -> dict[Curve, dict[float, list[Mapping]]]:
    out: dict[Curve, dict[float, list[Mapping]]] = {}
    for row in rows:
        out.setdefault((row["method"], row["epochs"]), {}).setdefault(row_strength(row), []).append(row)
    return out


def _length(value: float | str) -> tuple[int, float, str]:
    return (0, float(value), "") if isinstance(value, (int, float)) else (1, 0.0, str(value))


def _curve_order(curves: Iterable[Curve], first: Sequence[str] = ()) -> list[Curve]:
    rank = {name: i for i, name in enumerate(first)}
    return sorted(curves, key=lambda c: (rank.get(c[0], len(rank)), _length(c[1]), c[0]))


def _labeller(curves: Iterable[Curve]):
    """Curve -> legend label: the run length is named only when the curves differ in it."""
    lengths = [c[1] for c in curves]
    common = max(set(lengths), key=lengths.count) if lengths else None

    def label(curve: Curve) -> str:
        if len(set(lengths)) < 2 or curve[1] == common:
            return curve[0]
        length = f"{curve[1]:g} epochs" if isinstance(curve[1], (int, float)) else str(curve[1])
        return f"{curve[0]} ({length})"

    return label, common


def curve_points(rows: Iterable[Mapping], id_split: str) -> dict[Curve, list[Point]]:
    """{(method, epochs): [Point per strength, by strength]}; rows lacking ``id_split`` or an OOD average left out."""
    curves = {}
    for curve, per_strength in _grouped(rows).items():
        points = []
        for strength in sorted(per_strength):
            scored = [r["results"] for r in per_strength[strength]]
            scored = [r for r in scored if id_split in r and OOD_AVG in r]
            if scored:
                ids, oods = _mean_std([r[id_split] for r in scored]), _mean_std([r[OOD_AVG] for r in scored])
                points.append(Point(strength, *ids, *oods, len(scored)))
        if points:
            curves[curve] = points
    return curves


def results_by_cell_table(
    rows: Iterable[Mapping], columns: Sequence[str], *, headers: Sequence[str] | None = None, order: Sequence[str] = ()
) -> str:
    """One line per (method, epochs, strength): ``columns`` (split names, ``ood_avg``) as mean ± std over seeds."""
    rows = list(rows)
    grouped = _grouped(rows)
    lines = []
    for curve in _curve_order(grouped, order):
        for strength in sorted(grouped[curve]):
            cell_rows = grouped[curve][strength]
            cells = []
            for column in columns:
                values = [r["results"][column] for r in cell_rows if column in r["results"]]
                cells.append("{:.1f} ± {:.1f}".format(*_mean_std(values)) if values else "-")
            epochs = f"{curve[1]:g}" if isinstance(curve[1], (int, float)) else str(curve[1])
            label = strength_label(cell_rows[0])
            lines.append([curve[0], epochs, label, str(len(cell_rows)), *cells])
    return markdown_table(["method", "epochs", "strength", "seeds", *(headers or columns)], lines)


def ood_at_id(points: Sequence[Point], target_id: float) -> float | None:
    """The OOD average interpolated linearly at ``target_id`` along a curve's mean points (by ID); None outside."""
    pairs = sorted((p.id_mean, p.ood_mean) for p in points)
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    if not xs or target_id < xs[0] - 1e-6 or target_id > xs[-1] + 1e-6:
        return None
    return float(np.interp(target_id, xs, ys))


def best_at_id(curves: Mapping[Curve, Sequence[Point]], exclude: Sequence[str] = ()) -> list[tuple[float, list]]:
    """At every mean ID accuracy that some curve reaches: the curves ranked by their OOD average there.

    Returns [(target ID, [(OOD avg, curve), ...] best first)]; a curve counts at a target it spans (interpolated).
    """
    kept = {c: p for c, p in curves.items() if c[0] not in exclude}
    targets = sorted({round(p.id_mean, 6) for points in kept.values() for p in points})
    out = []
    for target in targets:
        ranked = [(ood, curve) for curve, points in kept.items() if (ood := ood_at_id(points, target)) is not None]
        out.append((target, sorted(ranked, key=lambda item: -item[0])))
    return out


def matched_id_table(
    curves: Mapping[Curve, Sequence[Point]], exclude: Sequence[str] = (), order: Sequence[str] = ()
) -> str:
    """OOD average of every curve at each target ID, interpolated on the mean curves (a description, not a test)."""
    ranking = best_at_id(curves, exclude)
    names = _curve_order([c for c in curves if c[0] not in exclude], order)
    _label, _ = _labeller(curves)
    lines = []
    for target, ranked in ranking:
        at = {curve: ood for ood, curve in ranked}
        lines.append([f"{target:.1f}", *(f"{at[c]:.1f}" if c in at else "-" for c in names)])
    return markdown_table(["ID accuracy", *(_label(c) for c in names)], lines)


def plain_summary(
    curves: Mapping[Curve, Sequence[Point]],
    rows: Sequence[Mapping] = (),
    *,
    id_split: str,
    ood_splits: Sequence[str],
    reference: str | None = None,
    zero_shot: str = "zero-shot",
) -> str:
    """Sentences: zero-shot's accuracy, the highest ID and OOD points, each method against ``reference`` paired by seed
    at matched ID (better or worse only where the 95 % interval excludes zero), and which split's seed spread dominates
    the OOD average. No method is called best on a gap of means."""
    if not curves:
        return "No finished runs yet."
    _label, _ = _labeller(curves)
    lines = []
    if (zs := next((p for c, p in curves.items() if c[0] == zero_shot), None)) is not None:
        lines.append(f"The zero-shot model scores {zs[0].id_mean:.1f} % on {id_split} and {zs[0].ood_mean:.1f} % on "
                     f"average over the {len(ood_splits)} OOD split(s).")  # fmt: skip
    others = {c: p for c, p in curves.items() if c[0] != zero_shot}
    all_points = [(p, c) for c, points in others.items() for p in points]
    if all_points:
        top_id = max(all_points, key=lambda pc: pc[0].id_mean)
        top_ood = max(all_points, key=lambda pc: pc[0].ood_mean)
        for what, (point, curve) in (("ID", top_id), ("OOD average", top_ood)):
            strength = f" at strength {point.strength:g}" if len(others[curve]) > 1 else ""
            lines.append(f"Highest mean {what}: {_label(curve)}{strength} ({point.id_mean:.1f} % ID, "
                         f"{point.ood_mean:.1f} % OOD).")  # fmt: skip
    seeds = {r["seed"] for r in rows if r["seed"] != "all"}
    ordered = _curve_order(curves)
    if len(seeds) < 2:
        lines.append("One seed per run: no difference between methods can be resolved (a paired interval needs two "
                     "seeds or more), so none is called better; run more --seeds.")  # fmt: skip
    elif reference is not None:
        lines.append(f"Against {reference}, paired by seed at matched ID ({len(seeds)} seeds; mean difference and "
                     "95 % Student t interval over seeds; better or worse only where the interval excludes "
                     "zero):")  # fmt: skip
        lines += paired.paired_summary(rows, ordered, reference, id_split=id_split, ood_splits=ood_splits,
                                       label=_label)  # fmt: skip
    spread = paired.seed_spread(rows, [*ood_splits, OOD_AVG])
    if len(seeds) >= 2 and OOD_AVG in spread:
        per_split = ", ".join(f"{s} {spread[s]:.1f}" for s in ood_splits if s in spread)
        top = paired.dominant_split(spread, ood_splits)
        which = (
            f"{top} dominates the average's spread, so gaps in the average are mostly {top}'s."
            if top
            else f"No split's spread is {paired.DOMINANT_RATIO:g}x every other's."
        )
        lines.append(f"Seed spread (std over seeds, mean over cells): OOD average {spread[OOD_AVG]:.1f} points; per "
                     f"split {per_split}. {which}")  # fmt: skip
    return "\n".join(f"- {line}" for line in lines)


# Below this OOD gain of the oracle over zero-shot (points), a share of it is noise and is not computed.
MIN_REFERENCE_GAIN = 1.0


def oracle_share_table(
    curves: Mapping[Curve, Sequence[Point]], oracle: str, *, zero_shot: str = "zero-shot", order: Sequence[str] = ()
) -> str:
    """Every point's OOD gain over zero-shot as a share of ``oracle``'s (the same fine-tuning without the shortcut).

    The oracle is the first point of the curve named ``oracle``; a gain under ``MIN_REFERENCE_GAIN`` points gives no
    shares ("n/a"), and the text says so.
    """
    ref = next((p[0] for c, p in curves.items() if c[0] == oracle), None)
    zs = next((p[0] for c, p in curves.items() if c[0] == zero_shot), None)
    if ref is None or zs is None:
        missing = oracle if ref is None else zero_shot
        return f"No share of the oracle's gain: {missing!r} has no finished rows yet."
    gain = ref.ood_mean - zs.ood_mean
    text = (
        f"{oracle}: ID {ref.id_mean:.1f}, OOD avg {ref.ood_mean:.1f}; {zero_shot}: {zs.id_mean:.1f} / "
        f"{zs.ood_mean:.1f}. The oracle's OOD gain over {zero_shot} is {gain:+.1f} points."
    )
    if abs(gain) < MIN_REFERENCE_GAIN:
        text += (
            f" A share of a gain under {MIN_REFERENCE_GAIN:g} point is noise, so none is computed: on this data "
            "the oracle does not improve OOD accuracy over zero-shot."
        )
    _label, _ = _labeller(curves)
    lines = []
    for curve in _curve_order(curves, order):
        if curve[0] in (oracle, zero_shot):
            continue
        for p in curves[curve]:
            delta = p.ood_mean - zs.ood_mean
            share = f"{delta / gain:+.2f}" if abs(gain) >= MIN_REFERENCE_GAIN else "n/a"
            lines.append([_label(curve), f"{p.strength:g}", f"{delta:+.1f}", share])
    table = markdown_table(["method", "strength", f"OOD avg minus {zero_shot}", "share of the oracle's gain"], lines)
    return f"{text}\n\n{table}"


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def write_frontier_report(
    output_dir: str | Path,
    rows: Sequence[Mapping],
    *,
    id_split: str,
    ood_splits: Sequence[str],
    header: str = "",
    order: Sequence[str] = (),
    title: str = "ID vs OOD over each method's strength (mean ± std over seeds)",
    references: Sequence[str] = (),
    oracle: str | None = None,
) -> dict[str, str]:
    """Write compare.md, summary.md, compare.json, frontier.png and one paired-difference plot per reference.

    compare.md: the summary; every cell's mean ± std (ID and OOD average, then every split); the mean curves at
    matched ID; for each of ``references`` (method names), every other curve minus it at matched ID, paired by seed,
    for the OOD average and each split (`hf_cfft.evaluation.paired`); every point minus zero-shot on the same seed;
    and, with ``oracle``, every point's share of the oracle's OOD gain over zero-shot. The summary's verdicts are
    against the first reference. Returns {what: path}; ``order`` lists method names to show first.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    curves = curve_points(rows, id_split)
    ordered = _curve_order(curves, order)
    _label, common = _labeller(curves)
    present = {c[0] for c in curves}
    references = [r for r in references if r in present]
    summary = plain_summary(
        curves, rows, id_split=id_split, ood_splits=ood_splits, reference=references[0] if references else None
    )
    table = results_by_cell_table(rows, [id_split, OOD_AVG], headers=[f"ID ({id_split})", "OOD avg"], order=order)
    per_split = results_by_cell_table(rows, [id_split, *ood_splits, OOD_AVG], order=order)
    matched = matched_id_table(curves, exclude=("zero-shot",), order=order)
    text = (
        f"{header}## Summary\n\n{summary}\n\n## ID and OOD average (top-1 %, mean ± std over seeds)\n\n{table}\n\n"
        f"## Every split\n\n{per_split}\n\n## OOD average at matched ID accuracy (linear interpolation on each mean "
        f"curve; a description of the means, not a test: the paired tables below say which gaps are resolved)"
        f"\n\n{matched}\n"
    )
    for reference in references:
        paired_text = paired.paired_tables(
            rows, ordered, reference, id_split=id_split, ood_splits=ood_splits, label=_label
        )
        text += (
            f"\n## Paired by seed against {reference}, at matched ID\n\nEach method's point minus {reference} on the "
            f"same seed, {reference}'s curve of that seed interpolated at the point's {id_split} accuracy; mean over "
            "the paired seeds, 95 % Student t interval over seeds, how many seeds' differences have the mean's sign, "
            "and how many seeds would resolve a difference of that size and spread (`hf_cfft.evaluation.paired`)."
            f"\n\n{paired_text}\n"
        )
    zero_shot = next((c for c in ordered if c[0] == "zero-shot"), None)
    if zero_shot is not None and len(curves) > 1:
        zs_table = paired.zero_shot_table(rows, ordered, zero_shot, id_split=id_split, ood_splits=ood_splits,
                                          label=_label)  # fmt: skip
        text += (
            "\n## Change over zero-shot, paired by seed (not matched in ID)\n\nEach point minus the zero-shot model "
            f"on the same seed: mean [95 % Student t interval].\n\n{zs_table}\n"
        )
    if oracle:
        share = oracle_share_table(curves, oracle, order=order)
        text += f"\n## Share of the OOD gain of {oracle} over zero-shot\n\n{share}\n"
    paths = {
        "report": output_dir / "compare.md",
        "summary": output_dir / "summary.md",
        "json": output_dir / "compare.json",
        "plot": output_dir / "frontier.png",
    }
    paths["report"].write_text(text)
    paths["summary"].write_text(summary + "\n")
    comparisons = {
        reference: {
            curve: comparison
            for curve, comparison in paired.comparisons(
                rows, ordered, reference, id_split=id_split, columns=[OOD_AVG, *ood_splits]
            ).items()
            if comparison.points
        }
        for reference in references
    }
    payload = {
        "id_split": id_split,
        "ood_splits": list(ood_splits),
        "curves": [{"method": c[0], "epochs": c[1], "points": [asdict(p) for p in pts]} for c, pts in curves.items()],
        "paired": {
            reference: [{"method": c[0], "epochs": c[1], **asdict(comparison)} for c, comparison in found_by.items()]
            for reference, found_by in comparisons.items()
        },
        "summary": summary,
    }
    paths["json"].write_text(json.dumps(rounded(payload), indent=2))
    if curves:
        from .frontier_plots import curve_styles, plot_frontier, plot_paired

        order_fn = functools.partial(_curve_order, first=order)
        plot_frontier(curves, paths["plot"], id_split=id_split, num_ood=len(ood_splits), title=title, label=_label,
                      order=order_fn, common=common)  # fmt: skip
        styles = curve_styles(curves, order_fn)
        for i, (reference, found_by) in enumerate(comparisons.items()):
            if not found_by:
                continue
            what = "paired_plot" if i == 0 else f"paired_plot_{_slug(reference)}"
            paths[what] = output_dir / ("paired.png" if i == 0 else f"paired_{_slug(reference)}.png")
            plot_paired(found_by, paths[what], reference=reference, id_split=id_split, ood_splits=ood_splits,
                        label=_label, styles=styles)  # fmt: skip
    else:
        paths.pop("plot")
    return {what: str(path) for what, path in paths.items()}
