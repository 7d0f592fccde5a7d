"""impl="auto" on CUDA never crashes on a device the Triton kernels cannot run on
(attnfuse/triton_guard.py): the failure is simulated on CPU by making the Triton launch
raise the errors Triton raises (out of resources, a compile error, a ptxas error)."""
from __future__ import annotations

import warnings

import pytest
import torch
from triton.runtime.errors import OutOfResources, PTXASError

from attnfuse import op, triton_guard
from attnfuse.kernels import torch_impl, triton_flash
from tests.reference import attention_reference


@pytest.fixture(autouse=True)
def _fresh():
    triton_guard.reset()
    yield
    triton_guard.reset()


def _qkv(seed=0, lq=9, lk=11, d=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return mk(2, 2, lq, d), mk(2, 2, lk, d), mk(2, 2, lk, d)


KW = dict(scale=0.3, causal="top_left", dropout_p=0.0, softcap=0.0, seed=0, window=0,
          key_mask=None)


def _broken(exc):
    calls = []

    def launch(*a, **k):
        calls.append(1)
        raise exc
    return launch, calls


def test_auto_on_cuda_is_the_guarded_triton_path():
    assert op._backend("auto", torch.device("cuda", 0)) is triton_guard
    assert op._backend("triton", torch.device("cuda", 0)) is triton_flash
    assert op._backend("auto", torch.device("cpu")) is torch_impl


@pytest.mark.parametrize("exc", [
    OutOfResources(233472, 232448, "shared memory"),
    PTXASError("ptxas fatal: Value 'sm_121' is not defined for option 'gpu-name'"),
    ImportError("cannot import name 'range' from 'triton.language'"),
])
def test_kernel_failure_falls_back_once_with_the_cause(monkeypatch, exc):
    fwd, fcalls = _broken(exc)
    bwd, bcalls = _broken(exc)
    monkeypatch.setattr(triton_flash, "forward", fwd)
    monkeypatch.setattr(triton_flash, "backward", bwd)
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning, match=type(exc).__name__) as rec:
        out, lse = triton_guard.forward(q, k, v, None, **KW)
    assert len(rec) == 1 and "cpu" in str(rec[0].message)
    ref = attention_reference(q, k, v, scale=0.3, causal="top_left")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # no second warning, no second Triton try
        out2, _ = triton_guard.forward(q, k, v, None, **KW)
        grads = triton_guard.backward(torch.ones_like(out), q, k, v, None, out, lse,
                                      need_dbias=False, **KW)
    assert fcalls == [1] and bcalls == []
    torch.testing.assert_close(out2, out)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    attention_reference(qr, kr, vr, scale=0.3, causal="top_left").sum().backward()
    for got, want in zip(grads[:3], (qr.grad, kr.grad, vr.grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_backward_failure_falls_back_without_dropout_and_raises_with_it(monkeypatch):
    q, k, v = _qkv(1, dtype=torch.float32)
    out, lse = triton_guard.forward(q, k, v, None, **KW)        # the interpreter runs it
    assert triton_guard.fallen_back(q.device) is None
    bwd, _ = _broken(OutOfResources(300000, 232448, "shared memory"))
    monkeypatch.setattr(triton_flash, "backward", bwd)
    with pytest.warns(RuntimeWarning, match="OutOfResources"):
        dq, dk, dv, _ = triton_guard.backward(torch.ones_like(out), q, k, v, None, out, lse,
                                              need_dbias=False, **KW)
    qr = q.clone().requires_grad_()
    attention_reference(qr, k, v, scale=0.3, causal="top_left").sum().backward()
    torch.testing.assert_close(dq, qr.grad.float(), rtol=1e-4, atol=1e-5)
    triton_guard.reset()
    drop = {**KW, "dropout_p": 0.2, "seed": 7}
    out, lse = triton_guard.forward(q, k, v, None, **drop)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="dropout mask"):
        triton_guard.backward(torch.ones_like(out), q, k, v, None, out, lse,
                              need_dbias=False, **drop)


def test_other_errors_propagate(monkeypatch):
    q, k, v = _qkv(2)
    for exc in (ValueError("bad window"), torch.OutOfMemoryError("CUDA out of memory")
                if hasattr(torch, "OutOfMemoryError") else ValueError("x")):
        fwd, _ = _broken(exc)
        monkeypatch.setattr(triton_flash, "forward", fwd)
        with pytest.raises(type(exc)):
            triton_guard.forward(q, k, v, None, **KW)
        assert triton_guard.fallen_back(q.device) is None
