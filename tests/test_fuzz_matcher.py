"""Property-based fuzzing of the matcher (hypothesis): random compositions of the
attention spellings and of near-miss perturbations (generator: tests/fuzz_gen.py).

Property: the rewrite never changes numerics; an unperturbed composition is fused
exactly once or left unfused with a near-miss reason (a coverage gap, which
``benchmarks/fuzz_matcher.py`` counts as "missed"); a perturbed one is not fused and a
near miss is reported (which kind is
checked by tests/test_near_misses.py, where each case breaks exactly one rule).
``benchmarks/fuzz_matcher.py`` runs the same generator for >= 10,000 examples.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared generator

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fuzz_gen import draw_recipe, run_example

# A few hundred examples in all (dynamo capture is the slowest dialect).
BUDGET = {"fx": 100, "aten": 80, "dynamo": 40}


def _chooser(data):
    return lambda name, options: data.draw(st.sampled_from(options), label=name)


def _make(dialect):
    @settings(max_examples=BUDGET[dialect], deadline=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def test(data):
        recipe = draw_recipe(_chooser(data), dialects=[dialect])
        outcome = run_example(recipe)
        assert outcome.kind != "harness", outcome.describe()  # a bug in the generator itself
        assert outcome.ok, outcome.describe()
    test.__name__ = f"test_fuzz_{dialect}"
    return test


test_fuzz_fx = _make("fx")
test_fuzz_aten = _make("aten")
test_fuzz_dynamo = _make("dynamo")
