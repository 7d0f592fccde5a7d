"""Issue 20's before/after table: every row of a full ``e2e.py`` run that was below Inductor
on medians, and what the rechecks with more repetitions (``e2e.py --reps 15``) measured for it.

    python benchmarks/e2e_recheck_summary.py benchmarks/results/e2e.json \\
        benchmarks/results/e2e_recheck_ci*.json [--out benchmarks/results/e2e_recheck_summary.md]

"Before" is the full run's ratio Inductor / attnfuse on the two variants' medians (on minima).
"After" is the recheck of the same (case, dtype, mode, L): the same ratio, then the median of
the paired per-round ratio with its distribution-free >= 95 % interval
(``e2e.paired_ratio_ci``); the verdict follows issue 20's rule: "below" only when the whole
interval is below 1.00, else "within noise" (or "not below" when the medians' ratio is at
least 1.00). A row with no recheck says so. Nothing is measured here: it reads JSON files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from e2e import paired_ratio_ci  # noqa: E402

Key = Tuple[str, str, str, int]


def _key(rec: dict) -> Key:
    return rec["case"], rec["dtype"], rec["mode"], int(rec["L"])


def _ratio(rec: dict, stat: str) -> Optional[float]:
    t = rec.get(stat, {})
    if not t.get("inductor") or not t.get("attnfuse"):
        return None
    return t["inductor"] / t["attnfuse"]


def below_rows(full: List[dict]) -> List[dict]:
    """The full run's records below 1.00x Inductor on medians."""
    return [r for r in full if (_ratio(r, "ms_median") or 1.0) < 1.0]


def verdict(rec: dict) -> Tuple[str, Optional[Tuple[int, float, float, float]]]:
    """Issue 20's verdict for one recheck record, with its paired interval."""
    ci = paired_ratio_ci(rec)
    if (_ratio(rec, "ms_median") or 0.0) >= 1.0:
        return "not below", ci
    if ci is None:
        return "below (no per-round times to test)", ci
    return ("below" if ci[3] < 1.0 else "within noise"), ci


def table(full: List[dict], rechecks: Dict[Key, Tuple[str, dict]]) -> List[str]:
    lines = ["| case | dtype | mode | tokens | before ind/af | recheck file | reps | after ind/af | "
             "paired median | >= 95 % interval | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in below_rows(full):
        k = _key(r)
        shown = " | ".join(map(str, (*k[:3], r.get("tokens", k[3]))))
        before = f"{_ratio(r, 'ms_median'):.2f}x ({_ratio(r, 'ms_min'):.2f}x)"
        if k not in rechecks:
            lines.append(f"| {shown} | {before} | - | - | - | - | - | not rechecked |")
            continue
        name, rec = rechecks[k]
        v, ci = verdict(rec)
        after = f"{_ratio(rec, 'ms_median'):.2f}x ({_ratio(rec, 'ms_min'):.2f}x)"
        paired = f"{ci[1]:.3f}" if ci else "-"
        interval = f"[{ci[2]:.3f}, {ci[3]:.3f}]" if ci else "-"
        lines.append(f"| {shown} | {before} | {name} | {rec.get('reps', '-')} | {after} | "
                     f"{paired} | {interval} | {v} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("full", help="the full run's JSON (e2e.py --json)")
    ap.add_argument("rechecks", nargs="+", help="recheck JSONs; a later file wins for the same row")
    ap.add_argument("--out", help="also write the markdown here")
    ap.add_argument("--note", default="", help="a paragraph printed under the table (e.g. where the runs differ)")
    args = ap.parse_args()
    full = json.load(open(args.full))["records"]
    rechecks: Dict[Key, Tuple[str, dict]] = {}
    for path in args.rechecks:
        for rec in json.load(open(path))["records"]:
            if rec.get("ms_rounds"):
                rechecks[_key(rec)] = (os.path.basename(path), rec)
    rows = table(full, rechecks)
    verdicts = [line.rsplit("|", 2)[-2].strip() for line in rows[2:]]
    text = "\n".join(["# Rows of the full e2e run below Inductor, before and after the recheck", "",
                      f"Full run: `{os.path.relpath(args.full)}`; rechecks: "
                      + ", ".join(f"`{os.path.relpath(p)}`" for p in args.rechecks) + ".", "",
                      *rows, "",
                      f"{len(verdicts)} rows below 1.00x on medians in the full run; after the rechecks: "
                      + ", ".join(f"{verdicts.count(v)} {v}" for v in sorted(set(verdicts))) + ".",
                      *([""] + [args.note] if args.note else [])])
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
