"""Every near-miss class of issue 3: not fused, graph and output unchanged, reason reported."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared catalog

import pytest

from attn_spellings import NEAR_MISSES, SQUARE_DATAFLOW, check_case

CONTRACT_KINDS = {"softmax_axis", "log_softmax", "probs_other_users", "after_softmax", "mask_fill_value",
                  "key_varying_scale", "scores_other_users", "qk_contraction", "pv_contraction", "no_qk_matmul",
                  "no_pv_matmul", "unsupported_op", "graph_break", "in_subgraph", "undecided", "*"}

CASES = [pytest.param(c, d, id=f"{c.name}-{d}") for c in NEAR_MISSES.values() for d in c.dialects]


@pytest.mark.parametrize("case,dialect", CASES)
def test_near_miss_not_fused_and_reported(case, dialect):
    result, n = check_case(case, dialect)
    for nm in result.report.near_misses:
        assert isinstance(nm.reason, str) and nm.reason, f"near miss {nm.kind} without a reason"


def test_near_miss_catalog_uses_contract_kinds():
    for c in NEAR_MISSES.values():
        assert c.fused == 0
        assert set(c.near_miss) <= CONTRACT_KINDS, (c.name, c.near_miss)


def test_near_miss_location_points_at_source():
    """Near misses carry a source location (file:line) in dynamo graphs, which have stack traces."""
    case = NEAR_MISSES["nm_softmax_dim_m2"]
    result, _ = check_case(case, "dynamo")
    locs = [nm.location for nm in result.report.near_misses if nm.kind == "softmax_axis"]
    assert locs and all(loc and "attn_spellings.py:" in loc for loc in locs), locs


SQUARE = [pytest.param(c, d, id=f"{c.name}-{d}") for c in SQUARE_DATAFLOW.values() for d in c.dialects]


@pytest.mark.parametrize("case,dialect", SQUARE)
def test_square_dataflow_sound(case, dialect):
    """Square sizes (H == L == D) where the dataflow is attention on transposed operands:
    fused exactly (and idempotently) or declined with a near miss; the output never changes."""
    check_case(case, dialect, idempotent=True)
