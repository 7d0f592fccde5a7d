"""Issue 20's recheck rule as benchmarks/e2e.py and benchmarks/e2e_recheck_summary.py apply it:
a row below Inductor on medians counts as below only when the whole distribution-free
interval of its paired per-round ratio is below 1.00."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from e2e import paired_ratio_ci  # noqa: E402
from e2e_recheck_summary import below_rows, table, verdict  # noqa: E402


def _record(ratios, case="bert", L=512, reps=None):
    """A record whose attnfuse rounds take 100 ms and Inductor's 100 * ratio ms."""
    af = [100.0] * len(ratios)
    ind = [100.0 * r for r in ratios]
    med = sorted(ratios)[len(ratios) // 2]
    return {"case": case, "dtype": "fp32", "mode": "eval", "L": L, "tokens": L, "reps": reps or len(ratios),
            "ms_rounds": {"inductor": ind, "attnfuse": af},
            "ms_median": {"inductor": 100.0 * med, "attnfuse": 100.0},
            "ms_min": {"inductor": 100.0 * min(ratios), "attnfuse": 100.0}}


def test_interval_is_the_textbook_order_statistics():
    """For n = 15 the >= 95 % interval of a median is [x_(4), x_(12)] (the sign-test table:
    P(Bin(15, 1/2) <= 3) = 0.0176 <= 0.025 < P(<= 4) = 0.059); for n = 6 it is [x_(1), x_(6)]."""
    ratios = [0.80 + 0.01 * i for i in range(15)]   # distinct, already sorted
    n, med, lo, hi = paired_ratio_ci(_record(ratios[::-1]))
    assert (n, lo, hi) == (15, pytest.approx(ratios[3]), pytest.approx(ratios[11]))
    assert med == pytest.approx(ratios[7])
    six = [1.0, 0.9, 1.1, 0.95, 1.05, 0.97]
    assert paired_ratio_ci(_record(six))[2:] == (pytest.approx(0.9), pytest.approx(1.1))
    assert paired_ratio_ci(_record(six[:5])) is None   # too few rounds for any interval


@pytest.mark.parametrize("ratios,expected", [
    ([0.90 + 0.002 * i for i in range(15)], "below"),           # every round below: a real loss
    ([0.90 + 0.015 * i for i in range(15)], "within noise"),    # median 1.005 by rounds, interval spans 1
    ([1.00 + 0.01 * i for i in range(15)], "not below"),
])
def test_verdict_follows_the_interval(ratios, expected):
    rec = _record(ratios)
    if expected == "within noise":   # the medians' ratio below 1.00 while the rounds straddle it
        rec["ms_median"]["inductor"] = 99.0
    assert verdict(rec)[0] == expected


def test_summary_lists_every_row_below_and_its_recheck():
    full = [_record([0.95] * 15, "bert", 512), _record([1.02] * 15, "vit", 512), _record([0.97] * 15, "gpt2", 512)]
    assert [r["case"] for r in below_rows(full)] == ["bert", "gpt2"]
    rechecked = {("bert", "fp32", "eval", 512): ("recheck.json", _record([1.03] * 15, "bert", 512))}
    rows = table(full, rechecked)[2:]
    assert len(rows) == 2
    assert rows[0].startswith("| bert |") and rows[0].endswith("| not below |")
    assert rows[1].startswith("| gpt2 |") and rows[1].endswith("| not rechecked |")
