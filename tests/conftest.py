"""Test-wide set-up: the Triton kernels run on CPU tensors in the interpreter.

TRITON_INTERPRET must be set before any kernel module is imported, so it is set
here, at the top of the first module pytest loads.
"""
import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (pyproject's addopts: one worker per core) every worker would start
# torch with one thread per core: split the cores between the workers instead, so that
# they do not oversubscribe the machine. Tests that depend on the thread count set it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))

# Hypothesis: derandomised by default ("ci": examples fixed per test, no example database,
# so a failure replays from a fresh clone); HYPOTHESIS_PROFILE=random draws new ones.
try:
    from hypothesis import settings as _hyp_settings
except ImportError:  # hypothesis is a test extra; the property tests import it themselves
    _hyp_settings = None
if _hyp_settings is not None:
    _hyp_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
    _hyp_settings.register_profile("random", derandomize=False, print_blob=True)
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# The longest test files (about half the suite's time on 2 cores), longest first: under
# xdist's per-file scheduling (pyproject's addopts) they start first, so that the run
# does not end waiting on one of them. The rest keep their order.
LONGEST_FILES = ("test_triton_structural.py", "test_real_models.py", "test_triton_decode.py",
                 "test_fuzz_matcher.py", "test_triton_kernels.py", "test_cli.py", "test_distributed.py",
                 "test_torch_runs.py", "test_models.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(autouse=True)
def bf16_gemm_paths_chosen(monkeypatch):
    """The bf16 GEMM paths (``torch_lowp``, the bf16 inline bounds) are chosen only on a
    CPU with native bf16 matrix products (``kernels/base.py`` ``NATIVE_BF16_GEMM``; these
    machines have none): every test sees the choice such a CPU makes, so that those paths
    are tested everywhere. tests/test_native_bf16.py checks the choice without them."""
    from attnfuse.kernels import base

    monkeypatch.setattr(base, "NATIVE_BF16_GEMM", True)


def pytest_report_header(config):
    if _hyp_settings is None:
        return None
    prof = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    return (f"hypothesis profile: {prof} (derandomize={_hyp_settings.default.derandomize}; "
            "the fuzz tests' seed is tests/test_fuzz_matcher.py SEED)")
