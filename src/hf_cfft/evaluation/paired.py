"""Paired-by-seed differences between methods at matched ID accuracy, with Student t intervals and verdicts.

Runs of one seed share that seed's data (on the embedded world the seed draws the test sets) and its initialisation,
so most of the seed-to-seed spread of two methods is shared: the difference *within* a seed is far less noisy than
the difference of two means over seeds. This module takes that difference.

*Matched ID.* A method's point (one strength) is compared with the reference method at the same ID accuracy, on the
same seed: the reference's own curve of that seed (the polyline through its strengths in order) is interpolated
linearly in ID at the point's ID, every split at the same crossing (`values_at_id`). Where the reference is a single
point per seed (vanilla FT, say) and the method a curve, the method's curve is interpolated at the reference's point
instead. A seed whose curves do not overlap in ID gives
no pair; two single points give no matched value.

*The interval.* Over the n paired seeds, the mean difference and its 95 % confidence interval
``mean ± t(0.975, n - 1) * sd / sqrt(n)`` (Student t, the seeds taken as independent draws). A difference is
*resolved* when that interval excludes zero; one seed resolves nothing. For an unresolved difference the number of
seeds that would resolve one of the observed size and spread is the smallest n with ``t(0.975, n - 1) * sd /
sqrt(n) < |mean|``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .prediction import OOD_AVG
from .report import markdown_table

Curve = tuple[str, float | str]
ZERO_SHOT = "zero-shot"

# Two-sided 95 % quantiles of Student's t, t(0.975, df), for df = 1..30 (standard tables).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959964
# Seeds beyond which "seeds needed" is reported as "more than" this.
MAX_SEEDS_NEEDED = 1000


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the table for df <= 30, the Cornish-Fisher expansion in 1/df beyond (error under 1e-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def seeds_needed(mean: float, sd: float, *, limit: int = MAX_SEEDS_NEEDED) -> int | None:
    """Smallest number of seeds n >= 2 whose 95 % interval of a difference ``mean`` with spread ``sd`` excludes 0.

    None when no number up to ``limit`` does (or ``mean`` is 0).
    """
    if mean == 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, limit + 1):
        if t_quantile_975(n - 1) * sd / math.sqrt(n) < abs(mean):
            return n
    return None


@dataclass(frozen=True)
class Difference:
    """A paired difference over seeds: its mean, 95 % interval, and how the seeds agree."""

    mean: float
    low: float | None  # None with one seed: no interval
    high: float | None
    seeds: int
    same_sign: int  # seeds whose difference has the sign of the mean (a zero difference has no sign)
    sd: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Difference:
        values = [float(v) for v in values]
        n = len(values)
        mean = statistics.mean(values)
        if abs(mean) < 1e-9 * max(1.0, *(abs(v) for v in values)):
            mean = 0.0  # a zero difference read through interpolation: no sign to count
        sign = (mean > 0) - (mean < 0)
        same = sum(1 for v in values if sign != 0 and ((v > 0) - (v < 0)) == sign)
        if n < 2:
            return cls(mean, None, None, n, same, 0.0)
        sd = statistics.stdev(values)
        half = t_quantile_975(n - 1) * sd / math.sqrt(n)
        return cls(mean, mean - half, mean + half, n, same, sd)

    @property
    def resolved(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)

    @property
    def direction(self) -> str:
        """'better', 'worse', 'tie' or 'unresolved' (one seed)."""
        if self.low is None:
            return "unresolved"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "tie"

    def interval(self) -> str:
        return "-" if self.low is None else f"[{self.low:+.2f}, {self.high:+.2f}]"

    def needed(self) -> str:
        """How many seeds would resolve a difference of this size and spread ('-' when already resolved)."""
        if self.resolved:
            return "-"
        if self.seeds < 2:
            return "unknown (one seed has no spread)"
        if self.sd == 0 and self.mean == 0:
            return "none (identical on every seed)"
        if self.mean == 0:
            return "none (the mean difference is 0)"
        n = seeds_needed(self.mean, self.sd)
        return f"more than {MAX_SEEDS_NEEDED}" if n is None else str(n)

    def verdict(self) -> str:
        if self.low is None:
            return "one seed: not resolved"
        if self.resolved:
            return self.direction
        return f"tie (interval {self.interval()})"


@dataclass(frozen=True)
class Matched:
    """One matched-ID comparison of a method's point (or the reference's point) with the reference."""

    strength: float | None  # the method's strength; None where the reference's single point is the target
    id_mean: float  # the matched ID, mean over the paired seeds
    differences: dict[str, Difference]  # per split (OOD splits and ood_avg): method minus reference


def row_strength(row: Mapping) -> float:
    """A result row's strength (beta or alpha, as ``strength_name`` says); rows written before 2026-12-03 kept it under
    ``beta`` for every method, WiSE-FT's alpha included."""
    return float(row["strength"] if "strength" in row else row["beta"])


def row_strength_name(row: Mapping) -> str:
    """ "beta", "alpha" or "" (a method without a strength); older rows without the key: "alpha" if they carry an
    ``alpha``, else "beta", as the world's first frontier harness wrote them."""
    return row.get("strength_name", "alpha" if "alpha" in row else "beta")


def _seed_points(rows: Iterable[Mapping], curve: Curve) -> dict[object, list[tuple[float, Mapping]]]:
    """{seed: [(strength, results), ...]} of one curve; rows of several seeds at once ('all') are left out."""
    out: dict[object, list[tuple[float, Mapping]]] = {}
    for row in rows:
        if (row["method"], row["epochs"]) != curve or row["seed"] == "all":
            continue
        out.setdefault(row["seed"], []).append((row_strength(row), row["results"]))
    return {seed: sorted(points, key=lambda p: p[0]) for seed, points in out.items()}


def values_at_id(
    points: Sequence[tuple[float, Mapping]], id_split: str, x: float, columns: Sequence[str]
) -> dict[str, float] | None:
    """``columns`` where one seed's curve (its points in strength order) reaches ID ``x``; None if it never does.

    The curve is the polyline through its strengths in order (the path from one end of the method to the other), and
    each segment that reaches ``x`` is interpolated linearly in ID. Where the path reaches ``x`` more than once (ID
    is not monotone in the strength near an end), the crossing with the highest OOD average is used, i.e. the
    curve's upper envelope at that ID, and every column is read at that same crossing.
    """
    usable = [r for _, r in points if id_split in r and all(c in r for c in columns)]
    candidates = []
    for results in usable:
        if abs(float(results[id_split]) - x) <= 1e-6:
            candidates.append({c: float(results[c]) for c in columns})
    for a, b in zip(usable, usable[1:]):
        xa, xb = float(a[id_split]), float(b[id_split])
        if xa != xb and min(xa, xb) < x < max(xa, xb):
            w = (x - xa) / (xb - xa)
            candidates.append({c: (1 - w) * float(a[c]) + w * float(b[c]) for c in columns})
    if not candidates:
        return None
    key = OOD_AVG if OOD_AVG in columns else columns[0]
    return max(candidates, key=lambda values: values[key])


def matched_differences(
    rows: Sequence[Mapping], curve: Curve, reference: Curve, *, id_split: str, columns: Sequence[str]
) -> list[Matched]:
    """``curve`` minus ``reference`` at matched ID, paired by seed, for each of ``columns``.

    One entry per strength of ``curve`` when the reference is a curve (two or more strengths); one entry at the
    reference's point when it is a single point and ``curve`` is not; none when both are single points or their
    curves do not overlap in ID on any seed.
    """
    method, ref = _seed_points(rows, curve), _seed_points(rows, reference)
    seeds = [s for s in method if s in ref]
    ref_strengths = {p[0] for s in seeds for p in ref[s]}
    own_strengths = sorted({p[0] for s in seeds for p in method[s]})
    out = []
    if len(ref_strengths) >= 2:
        for strength in own_strengths:
            per_column: dict[str, list[float]] = {c: [] for c in columns}
            ids = []
            for seed in seeds:
                point = next((r for k, r in method[seed] if k == strength), None)
                if point is None or id_split not in point:
                    continue
                x = float(point[id_split])
                values = values_at_id(ref[seed], id_split, x, columns)
                if values is None or any(c not in point for c in columns):
                    continue
                ids.append(x)
                for c in columns:
                    per_column[c].append(float(point[c]) - values[c])
            if ids:
                diffs = {c: Difference.of(v) for c, v in per_column.items()}
                out.append(Matched(strength, statistics.mean(ids), diffs))
    elif len(own_strengths) >= 2:
        per_column = {c: [] for c in columns}
        ids = []
        for seed in seeds:
            target = ref[seed][0][1]
            if id_split not in target or any(c not in target for c in columns):
                continue
            x = float(target[id_split])
            values = values_at_id(method[seed], id_split, x, columns)
            if values is None:
                continue
            ids.append(x)
            for c in columns:
                per_column[c].append(values[c] - float(target[c]))
        if ids:
            out.append(Matched(None, statistics.mean(ids), {c: Difference.of(v) for c, v in per_column.items()}))
    return out


@dataclass(frozen=True)
class RangeDifference:
    """A curve minus the reference averaged over the ID range both cover on every paired seed."""

    id_low: float
    id_high: float
    differences: dict[str, Difference]


RANGE_GRID = 21  # evenly spaced ID values at which both curves are read, per seed


def range_difference(
    rows: Sequence[Mapping], curve: Curve, reference: Curve, *, id_split: str, columns: Sequence[str]
) -> RangeDifference | None:
    """``curve`` minus ``reference`` over their common ID range, paired by seed.

    The range is where both curves reach on every seed they share (the intersection of the seeds' spans). On each
    seed both curves are read (`values_at_id`) at ``RANGE_GRID`` evenly spaced IDs in it and the differences are
    averaged: one number per seed, whose mean and interval are over seeds. None for single points or no overlap.
    """
    method, ref = _seed_points(rows, curve), _seed_points(rows, reference)
    seeds = [s for s in method if s in ref]
    spans = []
    for seed in seeds:
        ids = [[float(r[id_split]) for _, r in points if id_split in r] for points in (method[seed], ref[seed])]
        if min(len(ids[0]), len(ids[1])) < 2:
            return None
        spans.append((max(min(ids[0]), min(ids[1])), min(max(ids[0]), max(ids[1]))))
    if not spans:
        return None
    low, high = max(a for a, _ in spans), min(b for _, b in spans)
    if high - low < 1e-6:
        return None
    grid = [low + (high - low) * i / (RANGE_GRID - 1) for i in range(RANGE_GRID)]
    per_column: dict[str, list[float]] = {c: [] for c in columns}
    for seed in seeds:
        diffs: dict[str, list[float]] = {c: [] for c in columns}
        for x in grid:
            own = values_at_id(method[seed], id_split, x, columns)
            other = values_at_id(ref[seed], id_split, x, columns)
            if own is None or other is None:
                continue
            for c in columns:
                diffs[c].append(own[c] - other[c])
        if diffs[columns[0]]:
            for c in columns:
                per_column[c].append(statistics.mean(diffs[c]))
    if not per_column[columns[0]]:
        return None
    return RangeDifference(low, high, {c: Difference.of(v) for c, v in per_column.items()})


def unmatched_differences(
    rows: Sequence[Mapping], curve: Curve, baseline: Curve, *, columns: Sequence[str]
) -> list[tuple[float, dict[str, Difference]]]:
    """Every point of ``curve`` minus ``baseline``'s single point (e.g. zero-shot) on the same seed, not matched in ID.

    Returns [(strength, {column: difference})] for the points with every column on at least one shared seed; the
    baseline's first strength is used.
    """
    method, base = _seed_points(rows, curve), _seed_points(rows, baseline)
    out = []
    for strength in sorted({p[0] for points in method.values() for p in points}):
        per_column: dict[str, list[float]] = {c: [] for c in columns}
        for seed, points in method.items():
            point = next((r for k, r in points if k == strength), None)
            if point is None or seed not in base:
                continue
            target = base[seed][0][1]
            if all(c in point and c in target for c in columns):
                for c in columns:
                    per_column[c].append(float(point[c]) - float(target[c]))
        if all(per_column.values()):
            out.append((strength, {c: Difference.of(v) for c, v in per_column.items()}))
    return out


@dataclass(frozen=True)
class Comparison:
    """One curve against the reference: the reference curve used, each matched point, the common-range average."""

    reference: Curve | None
    points: list[Matched]
    over_range: RangeDifference | None

    def __bool__(self) -> bool:
        return bool(self.points) or self.over_range is not None


def comparisons(
    rows: Sequence[Mapping], curves: Sequence[Curve], reference: str, *, id_split: str, columns: Sequence[str]
) -> dict[Curve, Comparison]:
    """{curve: Comparison} for every curve but the reference's and zero-shot's (whose change is
    `unmatched_differences`'); a comparison is falsy where nothing can be matched."""
    out = {}
    for curve in curves:
        if curve[0] in (reference, ZERO_SHOT):
            continue
        ref = reference_curve(curves, reference, curve[1])
        if ref is None:
            out[curve] = Comparison(None, [], None)
            continue
        kwargs = {"id_split": id_split, "columns": columns}
        out[curve] = Comparison(
            ref, matched_differences(rows, curve, ref, **kwargs), range_difference(rows, curve, ref, **kwargs)
        )
    return out


def reference_curve(curves: Iterable[Curve], name: str, epochs: float | str) -> Curve | None:
    """The curve of method ``name`` with the same run length as ``epochs``, else its first (shortest) one."""
    same = [c for c in curves if c[0] == name]
    if not same:
        return None
    exact = [c for c in same if c[1] == epochs]
    if exact:
        return exact[0]
    return sorted(same, key=lambda c: (isinstance(c[1], str), c[1] if not isinstance(c[1], str) else 0))[0]


def seed_spread(rows: Iterable[Mapping], columns: Sequence[str]) -> dict[str, float]:
    """Mean over cells (method, strength, length) with two or more seeds of each column's std over seeds."""
    cells: dict[tuple, list[Mapping]] = {}
    for row in rows:
        if row["seed"] != "all":
            cells.setdefault((row["method"], row_strength(row), str(row["epochs"])), []).append(row["results"])
    out = {}
    for column in columns:
        stds = [
            statistics.stdev([r[column] for r in results])
            for results in cells.values()
            if sum(column in r for r in results) >= 2 and all(column in r for r in results)
        ]
        if stds:
            out[column] = statistics.mean(stds)
    return out


DOMINANT_RATIO = 1.5  # a split dominates the average's spread when its std is this many times the next split's


def dominant_split(spread: Mapping[str, float], ood_splits: Sequence[str]) -> str | None:
    """The OOD split whose seed spread is at least ``DOMINANT_RATIO`` times every other's; None if none is."""
    shown = sorted((s for s in ood_splits if s in spread), key=lambda s: -spread[s])
    if len(shown) == 1:
        return shown[0]
    if len(shown) >= 2 and spread[shown[0]] >= DOMINANT_RATIO * spread[shown[1]]:
        return shown[0]
    return None


def column_label(column: str) -> str:
    return "OOD average" if column == OOD_AVG else column


# ---- tables and sentences ----


def _single_points(rows: Iterable[Mapping]) -> set[Curve]:
    strengths: dict[Curve, set[float]] = {}
    for row in rows:
        strengths.setdefault((row["method"], row["epochs"]), set()).add(row_strength(row))
    return {curve for curve, values in strengths.items() if len(values) == 1}


def _namer(rows: Sequence[Mapping]):
    """(curve, strength or None, reference label) -> "beta 3", "alpha 0.5", "its point" or "at <reference>'s ID"."""
    names, single = {}, _single_points(rows)
    for row in rows:
        names.setdefault((row["method"], row["epochs"]), row_strength_name(row))

    def at(curve: Curve, strength: float | None, reference: str) -> str:
        if strength is None:
            return f"{reference}'s ID"
        if curve in single or not names.get(curve):
            return "its point"
        return f"{names[curve]} {strength:g}"

    return at


def _cell(d: Difference) -> str:
    return f"{d.mean:+.2f} {d.interval()}" if d.low is not None else f"{d.mean:+.2f}"


def _short_verdict(d: Difference) -> str:
    return d.verdict() if d.resolved or d.low is None else "tie"


def paired_tables(
    rows: Sequence[Mapping],
    curves: Sequence[Curve],
    reference: str,
    *,
    id_split: str,
    ood_splits: Sequence[str],
    label,
) -> str:
    """Markdown: for the OOD average, then each OOD split, every curve minus ``reference`` at matched ID (paired)."""
    columns = [OOD_AVG, *ood_splits]
    at = _namer(rows)
    found_by = comparisons(rows, curves, reference, id_split=id_split, columns=columns)
    parts = []
    for column in columns:
        lines = []
        for curve, comparison in found_by.items():
            ref = label(comparison.reference) if comparison.reference else reference
            entries = [
                (at(curve, m.strength, ref), f"{m.id_mean:.1f}", m.differences[column]) for m in comparison.points
            ]
            if (span := comparison.over_range) is not None:
                where = f"{span.id_low:.1f}-{span.id_high:.1f}"
                entries.insert(0, ("mean over the common ID range", where, span.differences[column]))
            for where, matched_id, d in entries:
                lines.append([
                    label(curve), where, matched_id, str(d.seeds), f"{d.mean:+.2f}", d.interval(),
                    f"{d.same_sign}/{d.seeds}", _short_verdict(d), d.needed(),
                ])  # fmt: skip
        headers = ["method", "strength", f"matched ID ({id_split})", "seeds", "difference", "95 % interval",
                   "seeds with its sign", "verdict", "seeds to resolve"]  # fmt: skip
        parts.append(f"### {column_label(column)}\n\n{markdown_table(headers, lines)}")
    unmatched = [label(curve) for curve, comparison in found_by.items() if not comparison]
    if unmatched:
        parts.append(
            "No matched ID value (single points on both sides, curves that do not overlap in ID on any seed, or one "
            f"model over all seeds): {', '.join(unmatched)}."
        )
    return "\n\n".join(parts)


def zero_shot_table(
    rows: Sequence[Mapping],
    curves: Sequence[Curve],
    zero_shot: Curve,
    *,
    id_split: str,
    ood_splits: Sequence[str],
    label,
) -> str:
    """Markdown: every point's change over zero-shot on the same seed (ID, OOD average, each split), not matched."""
    columns = [id_split, OOD_AVG, *ood_splits]
    at = _namer(rows)
    lines = []
    for curve in curves:
        if curve == zero_shot:
            continue
        for strength, diffs in unmatched_differences(rows, curve, zero_shot, columns=columns):
            avg = diffs[OOD_AVG]
            lines.append([label(curve), at(curve, strength, ""), str(avg.seeds), *(_cell(diffs[c]) for c in columns),
                          _short_verdict(avg)])  # fmt: skip
    headers = ["method", "strength", "seeds", f"ID ({id_split})", "OOD average", *ood_splits, "OOD average verdict"]
    return markdown_table(headers, lines)


def _strength_list(names: Sequence[str]) -> str:
    """["beta 1", "beta 3"] -> "beta 1, 3" (the strength's name said once)."""
    head = names[0].split(" ")[0]
    if len(names) > 1 and all(n.split(" ")[0] == head and " " in n for n in names):
        return f"{head} " + ", ".join(n.split(" ", 1)[1] for n in names)
    return ", ".join(names)


def _needed_phrase(d: Difference) -> str:
    needed = d.needed()
    if needed.isdigit() or needed.startswith("more than"):
        return f"{needed} seeds to resolve"
    if needed.startswith("unknown"):
        return "no spread to extrapolate from"
    return "a mean difference of 0" if "mean difference" in needed else "identical on every seed"


def paired_summary(
    rows: Sequence[Mapping],
    curves: Sequence[Curve],
    reference: str,
    *,
    id_split: str,
    ood_splits: Sequence[str],
    label,
) -> list[str]:
    """Sentences: each curve against ``reference`` on the OOD average (resolved or a tie), then per-split effects."""
    columns = [OOD_AVG, *ood_splits]
    at = _namer(rows)
    lines = []
    for curve, comparison in comparisons(rows, curves, reference, id_split=id_split, columns=columns).items():
        if not comparison:
            continue
        ref = label(comparison.reference)
        said = []
        if (span := comparison.over_range) is not None:
            d = span.differences[OOD_AVG]
            verdict = d.direction if d.resolved else "tie"
            extra = "" if d.resolved else f"; {_needed_phrase(d)}"
            said.append(f"over the common ID range {span.id_low:.1f}-{span.id_high:.1f}, {verdict} ({_cell(d)}, "
                        f"{d.same_sign} of {d.seeds} seeds{extra})")  # fmt: skip
        entries = [(at(curve, m.strength, ref), m) for m in comparison.points]
        groups: dict[str, list[tuple[str, Difference]]] = {"better": [], "worse": [], "tie": [], "unresolved": []}
        for where, m in entries:
            d = m.differences[OOD_AVG]
            groups[d.direction].append((where, d))
        for key in ("better", "worse"):
            if groups[key]:
                items = "; ".join(f"{w} ({_cell(d)}, {d.same_sign} of {d.seeds} seeds)" for w, d in groups[key])
                said.append(f"{key} at {items}")
        if len(groups["tie"]) == 1:
            (where, d), *_ = groups["tie"]
            said.append(f"tie at {where} ({_cell(d)}, {d.seeds} seeds; {_needed_phrase(d)})")
        elif groups["tie"]:
            means = [d.mean for _, d in groups["tie"]]
            said.append(f"tie at {_strength_list([w for w, _ in groups['tie']])} (differences {min(means):+.2f} to "
                        f"{max(means):+.2f})")  # fmt: skip
        if groups["unresolved"]:
            said.append(f"one seed, not resolved, at {', '.join(w for w, _ in groups['unresolved'])}")
        lines.append(f"{label(curve)} vs {ref}, OOD average: {'; '.join(said)}.")
        entries = ([("the common ID range", span)] if span is not None else []) + entries
        split_effects = [
            f"{column} at {where} {_cell(m.differences[column])}"
            for where, m in entries
            for column in ood_splits
            if m.differences[column].resolved
        ]
        if split_effects:
            lines.append(f"{label(curve)} vs {ref}, resolved on single splits: {'; '.join(split_effects)}.")
    return lines
