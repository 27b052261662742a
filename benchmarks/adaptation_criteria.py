"""Check an adaptation-world design against the criteria of docs/adaptation_world.md, from its compare rows.

    python benchmarks/adaptation_criteria.py docs/adaptation_world/design_contrast_035

Reads ``rows*.jsonl`` of a `recipes/compare.py` run of zero-shot, vanilla FT (``vanilla FT``), the oracle (a method
whose name starts with ``oracle``) and a linear probe on the uncorrelated split (``linear probe (uncorrelated
split)``, the longest run of it), and prints one line per criterion: the per-seed values, whether every seed's
difference has the required sign and size, and the verdict. Only those methods are read: the criteria involve no
method that is compared on the world afterwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

OOD = ("ood_shuffled", "ood_swapped", "ood_novel", "ood_style")


def load_rows(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("rows*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def by_seed(rows: list[dict], method_prefix: str) -> dict[int, dict]:
    """{seed: results} of the method whose name starts with ``method_prefix`` (the most epochs when several)."""
    chosen: dict[int, dict] = {}
    for row in rows:
        if row["method"].startswith(method_prefix):
            seed, epochs = row["seed"], float(str(row.get("epochs", 1)).split()[0])
            if seed not in chosen or epochs > chosen[seed][0]:
                chosen[seed] = (epochs, row["results"])
    return {seed: results for seed, (_, results) in sorted(chosen.items())}


def check(rows: list[dict], seeds_wanted: int = 5, max_split_std: float = 1.5) -> list[tuple[str, str, bool]]:
    """[(criterion, the numbers, holds)] for the five criteria."""
    zs, ft = by_seed(rows, "zero-shot"), by_seed(rows, "vanilla FT")
    oracle, probe = by_seed(rows, "oracle"), by_seed(rows, "linear probe (uncorrelated")
    seeds = sorted(set(zs) & set(ft) & set(oracle))
    out = []

    def values(series: dict, key: str) -> list[float]:
        return [round(series[s][key], 1) for s in seeds if s in series]

    def diffs(a: dict, b: dict, key: str, seeds_of=None) -> list[float]:
        return [round(a[s][key] - b[s][key], 1) for s in (seeds_of or seeds) if s in a and s in b]

    zs_id = values(zs, "test_id")
    out.append(("1. zero-shot test_id in [50, 80]", f"{zs_id}", bool(zs_id) and all(50 <= v <= 80 for v in zs_id)))
    d = diffs(probe, zs, "ood_shuffled", sorted(probe))
    out.append(("2. probe - zero-shot on ood_shuffled >= 5", f"{d}", len(d) >= seeds_wanted and min(d) >= 5))
    d_id, d_ood = diffs(oracle, zs, "test_id"), diffs(oracle, zs, "ood_avg")
    ok = len(d_id) >= seeds_wanted and min(d_id) >= 5 and min(d_ood) >= 3
    out.append(("3. oracle - zero-shot: test_id >= 5, ood_avg >= 3", f"{d_id} / {d_ood}", ok))
    d_id, d_ood = diffs(ft, oracle, "test_id"), diffs(oracle, ft, "ood_avg")
    ok = len(d_id) >= seeds_wanted and min(d_id) >= 0 and min(d_ood) >= 3
    out.append(("4. FT - oracle test_id >= 0; oracle - FT ood_avg >= 3", f"{d_id} / {d_ood}", ok))
    worst = []
    for name, series in (("zero-shot", zs), ("vanilla FT", ft), ("oracle", oracle)):
        for split in OOD:
            v = [series[s][split] for s in seeds]
            if len(v) > 1:
                worst.append((statistics.stdev(v), f"{name} {split}"))
    std, where = max(worst) if worst else (float("nan"), "-")
    out.append((f"5. largest OOD split seed std <= {max_split_std}", f"{std:.2f} ({where})", std <= max_split_std))
    return out


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    rows = load_rows(args.folder)
    results = check(rows)
    print(f"{args.folder}: {len(rows)} rows")
    for criterion, numbers, holds in results:
        print(f"{'holds ' if holds else 'FAILS '} {criterion}: {numbers}")
    passed = all(holds for _, _, holds in results)
    print("design meets every criterion" if passed else "design does not meet the criteria")
    return passed


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
