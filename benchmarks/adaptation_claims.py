"""The paper's claims answered from a frontier's compare rows, paired by seed: one verdict per claim.

    python benchmarks/adaptation_claims.py docs/adaptation_world/frontier            # prints the table
    python benchmarks/adaptation_claims.py docs/adaptation_world/frontier --output docs/adaptation_world/claims.md

Each claim is a comparison of two methods' rows of the same seeds (`hf_cfft.evaluation.paired`): a curve against
a curve over their common ID range (and at each of the method's strengths), or a method's points against a single
point on the same seed (zero-shot). The verdict of a claim "A beats B" is *shown* where the paired 95 % Student t
interval of A minus B on the OOD average lies above zero, *the opposite shown* where it lies below, and *not shown*
where it holds zero (or no seeds pair). The per-split differences are listed beside it. The claims and their
comparisons were written down before the frontier's rows were read (issue 21, item 3).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_cfft.evaluation.frontier import read_rows
from hf_cfft.evaluation.paired import (
    Difference,
    matched_differences,
    range_difference,
    unmatched_differences,
)
from hf_cfft.evaluation.report import markdown_table

OOD = ("ood_shuffled", "ood_swapped", "ood_novel", "ood_style")
COLUMNS = (*OOD, "ood_avg")
CFFT = "CFFT object/single"

# (claim, method, reference, kind, sign): kind "curve" compares two curves at matched ID; "point" compares every
# point of the method with the reference's single point on the same seed (not matched in ID). The claim says that
# method minus reference has the sign ``sign`` (-1: the method is below).
CLAIMS = (
    ("Fine-tuning loses OOD accuracy (vanilla FT below zero-shot)", "vanilla FT", "zero-shot", "point", -1),
    ("Masking beats no masking (CFFT above FT+FD)", CFFT, "FT+FD", "curve", 1),
    ("Refill beats no fill (object/single above object/none)", CFFT, "CFFT object/none", "curve", 1),
    ("Object masks beat random masks", CFFT, "CFFT random/single", "curve", 1),
    ("Object masks beat context masks", CFFT, "CFFT context/single", "curve", 1),
    ("CFFT beats WiSE-FT", CFFT, "WiSE-FT", "curve", 1),
    ("CFFT gains OOD accuracy over zero-shot", CFFT, "zero-shot", "point", 1),
)


def _verdict(d: Difference | None, sign: int) -> str:
    if d is None:
        return "not answered (no paired rows)"
    if d.low is None:
        return "not shown (one seed)"
    if d.low > 0:
        return "shown" if sign > 0 else "the opposite shown"
    if d.high < 0:
        return "shown" if sign < 0 else "the opposite shown"
    return "not shown (tie)"


def _cell(d: Difference) -> str:
    return f"{d.mean:+.2f} {d.interval()} ({d.same_sign}/{d.seeds})"


def _curve(rows, method: str):
    epochs = sorted({r["epochs"] for r in rows if r["method"] == method}, key=str)
    return (method, epochs[0]) if epochs else None


def answer(rows: list[dict], id_split: str = "test_id") -> list[dict]:
    """One entry per claim and comparison: {claim, comparison, differences {column: Difference}, verdict}."""
    out = []
    for claim, method, reference, kind, sign in CLAIMS:
        curve, ref = _curve(rows, method), _curve(rows, reference)
        if curve is None or ref is None:
            missing = method if curve is None else reference
            out.append({"claim": claim, "sign": sign, "comparison": f"no rows of {missing} yet", "differences": None})
            continue
        if kind == "point":
            for strength, diffs in unmatched_differences(rows, curve, ref, columns=COLUMNS):
                label = method if strength == 0 else f"{method} at beta {strength:g}"
                out.append({
                    "claim": claim, "sign": sign, "differences": diffs,
                    "comparison": f"{label} minus {reference} (same seed, not matched in ID)",
                })  # fmt: skip
            continue
        over = range_difference(rows, curve, ref, id_split=id_split, columns=COLUMNS)
        if over is not None:
            out.append({
                "claim": claim, "sign": sign, "differences": over.differences,
                "comparison": f"{method} minus {reference}, common ID range {over.id_low:.1f}-{over.id_high:.1f}",
            })  # fmt: skip
        for matched in matched_differences(rows, curve, ref, id_split=id_split, columns=COLUMNS):
            where = "its point" if matched.strength is None else f"beta {matched.strength:g}"
            out.append({
                "claim": claim, "sign": sign, "differences": matched.differences,
                "comparison": f"{method} minus {reference} at {where} (ID {matched.id_mean:.1f})",
            })  # fmt: skip
        if not any(e["claim"] == claim for e in out):
            out.append({"claim": claim, "sign": sign, "comparison": "the curves do not overlap in ID",
                        "differences": None})  # fmt: skip
    for entry in out:
        d = entry["differences"]["ood_avg"] if entry["differences"] else None
        entry["verdict"] = _verdict(d, entry["sign"])
    return out


def claims_table(entries: list[dict]) -> str:
    header = ["claim", "comparison", *COLUMNS, "verdict (OOD avg)"]
    body = []
    for e in entries:
        cells = [_cell(e["differences"][c]) for c in COLUMNS] if e["differences"] else ["-"] * len(COLUMNS)
        body.append([e["claim"], e["comparison"], *cells, e["verdict"]])
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a recipes/compare.py output folder (its rows*.jsonl)")
    parser.add_argument("--id_split", default="test_id")
    parser.add_argument("--output", type=Path, help="also write the table, with how it was made, to this file")
    args = parser.parse_args(argv)
    rows = read_rows(args.folder)
    if not rows:
        print(f"{args.folder} holds no compare rows (rows*.jsonl)", file=sys.stderr)
        return 1
    table = claims_table(answer(rows, args.id_split))
    print(table)
    if args.output:
        how = (
            f"`python benchmarks/adaptation_claims.py {args.folder} --output {args.output}`, from {len(rows)} rows. "
            "Each cell: mean difference in points, 95 % Student t interval over seeds, and the seeds whose "
            "difference has the mean's sign. The verdict reads the OOD average: shown (interval above zero), the "
            "opposite shown (below), not shown (holds zero). For the claim that fine-tuning loses OOD accuracy, a "
            "negative difference is what the claim says."
        )
        text = "# The paper's claims on this frontier, paired by seed\n\n" + how + "\n\n" + table + "\n"
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
