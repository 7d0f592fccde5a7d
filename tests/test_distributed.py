"""Distributed use on CPU: two ranks, gloo, one spawned process group for every check.

The checks themselves live in :mod:`tests.dist_checks` (they run inside the spawned
ranks); each test here asserts that its check passed on both ranks. Every check compares
with a single-process run of the same weights and inputs, forward and gradients.
"""
import pytest
import torch.distributed as dist

from tests import dist_checks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    return dist_checks.run_group(str(tmp_path_factory.mktemp("dist")))


@pytest.mark.parametrize("name", list(dist_checks.CHECKS))
def test_two_ranks(group_results, name):
    if name == "tp_llama":
        pytest.importorskip("transformers")
    for rank, results in group_results.items():
        assert results[name]["status"] == "ok", f"rank {rank}:\n{results[name]['status']}"
