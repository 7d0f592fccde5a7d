"""Test-wide set-up: the Triton kernels run on CPU tensors in the interpreter.

TRITON_INTERPRET must be set before any kernel module is imported, so it is set
here, at the top of the first module pytest loads.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
