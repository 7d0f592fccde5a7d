"""The bf16 GEMM paths are chosen only on a CPU with native bf16 matrix products.

``kernels/base.py`` ``NATIVE_BF16_GEMM`` (oneDNN's bf16 support). Without it a bf16
``bmm`` is emulated (on this project's AVX2 machines a (1, 4, 512, 64) attention took
96 ms on the bf16 GEMM path against 4.9 ms in PyTorch's fused kernel), so a bf16 call
takes the fused kernel, is not inlined for Inductor, and a plain one is lowered to the
fused-kernel call as in float32. tests/conftest.py turns the flag on for every other test.
"""
import pytest
import torch

from attnfuse.kernels import base
from attnfuse.kernels import torch_impl as T
from attnfuse.kernels import torch_inline as TI

BF16 = torch.bfloat16


def _qkv(lq=40, lk=48):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, n, 16, generator=g).to(BF16) for n in (lq, lk, lk)]


@pytest.mark.parametrize("native", [True, False])
def test_bf16_paths_follow_the_cpu(native, monkeypatch):
    monkeypatch.setattr(base, "NATIVE_BF16_GEMM", native)
    q, k, v = _qkv()
    plan = T.forward_plan(q, k, v, None, causal="none", dropout_p=0.0, softcap=0.0)
    assert (plan.path == "lowp") == native, plan
    assert (TI.max_scores(BF16, training=False) > 0) == native
    assert (TI.max_scores(BF16, training=True, banded=True) > 0) == native
    assert TI.max_scores(torch.float32, training=False) > 0       # float32 does not depend on it
    assert TI.inline_applicable(q.shape, k.shape, BF16, q.device, dropout_p=0.0, scale=0.25, softcap=0.0,
                                window=0, causal="none", training=False) == native


def test_without_native_bf16_the_op_matches_float64(monkeypatch):
    """The path taken without native bf16 (the fused kernel) gives eager's result."""
    monkeypatch.setattr(base, "NATIVE_BF16_GEMM", False)
    from attnfuse.op import flash_attention

    q, k, v = _qkv()
    out = flash_attention(q, k, v, scale=0.25, impl="torch")
    ref = torch.softmax((q.double() @ k.double().transpose(-2, -1)) * 0.25, -1) @ v.double()
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
