"""Test-wide set-up: the Triton kernels run on CPU tensors in the interpreter.

TRITON_INTERPRET must be set before any kernel module is imported, so it is set
here, at the top of the first module pytest loads.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

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


def pytest_report_header(config):
    if _hyp_settings is None:
        return None
    prof = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    return (f"hypothesis profile: {prof} (derandomize={_hyp_settings.default.derandomize}; "
            "the fuzz tests' seed is tests/test_fuzz_matcher.py SEED)")
