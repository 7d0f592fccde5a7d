"""Real models (transformers, timm, diffusers; tiny random configs from tests/real_models.py) through
``torch.compile(backend="attnfuse")``: every attention site fused, outputs and gradients equal to eager.

The whole corpus runs from ``benchmarks/coverage.py``; these are the fast ones.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared corpus

import pytest
import torch

import real_models as R

FAST = ["gpt2-padded", "bert-padded", "llama-padded", "t5-padded", "falcon_alibi-padded", "timm-vit", "sd-unet"]


def _describe(res) -> str:
    return "; ".join(f"[{k}] {loc}: {r}\n{snip}" for k, r, loc, snip in res.near_misses) or "no near misses"


@pytest.mark.parametrize("name", FAST)
def test_real_model_fused_and_exact(name):
    torch.manual_seed(0)
    model, inputs, sites = R.CASES[name].build()
    ref = R._run(model, R._clone(inputs), train=False)
    res = R.compile_attnfuse(model, inputs, inner="eager", strict=True)
    assert res.ok, res.error
    assert res.graphs == 1, f"{res.graphs} graphs: attnfuse must not add graph breaks"
    assert res.fused == sites, f"{name}: {res.fused}/{sites} sites fused; {_describe(res)}"
    abs_err, rel_err = R.errors(ref, res.out)
    assert rel_err <= R.TOL, f"{name}: max abs error {abs_err:.3g}, relative {rel_err:.3g}"


def test_real_model_padding_mask_matters():
    """The padded variants do exercise the mask: the padded row's output differs from the unpadded one."""
    m1, in1, _ = R.CASES["bert"].build()
    m2, in2, _ = R.CASES["bert-padded"].build()
    with torch.no_grad():
        a, b = m1(*in1)[0], m2(*in2)[0]
    assert torch.allclose(a[0], b[0], atol=1e-6)       # row 0 has no padding
    assert not torch.allclose(a[1], b[1], atol=1e-3)   # row 1 has three padded keys


@pytest.mark.parametrize("name", ["llama-padded"])
def test_real_model_train_gradients(name):
    """Train mode, dropout 0: the backward through the fused op (aot_eager) gives eager's gradients."""
    torch.manual_seed(0)
    model, inputs, sites = R.CASES[name].build(train=True, dropout=0.0)
    ref = R._run(model, R._clone(inputs), train=True)
    R.loss_of(ref).backward()
    ref_grads = R.grads(model)
    model.zero_grad(set_to_none=True)
    res = R.compile_attnfuse(model, inputs, inner="aot_eager", train=True, backward=True, strict=True)
    assert res.ok, res.error
    assert res.fused == sites, f"{name}: {res.fused}/{sites} sites fused; {_describe(res)}"
    _, rel_err = R.errors(ref, res.out)
    assert rel_err <= R.TOL
    g_abs, g_rel = R.grad_errors(ref_grads, R.grads(model))
    assert g_rel <= R.GRAD_TOL, f"{name}: gradient max abs error {g_abs:.3g}, relative {g_rel:.3g}"


def test_real_model_train_dropout_fused():
    """Train mode with attention dropout on: fused with its dropout_p; outputs and gradients finite."""
    torch.manual_seed(0)
    model, inputs, sites = R.CASES["bert-padded"].build(train=True, dropout=0.1)
    res = R.compile_attnfuse(model, inputs, inner="eager", train=True, backward=True, strict=True)
    assert res.ok, res.error
    assert res.fused == sites, _describe(res)
    assert sorted({f.dropout_p for f in res.fusions}) == [0.1]
    assert all(torch.isfinite(t).all() for t in R.flatten(res.out))
    assert all(torch.isfinite(g).all() for g in R.grads(model).values())
