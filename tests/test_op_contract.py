"""The op's contract: whatever its fake (tracing) kernel accepts, its real kernels run.

The rewriter emits ``torch.ops.attnfuse.flash_attention`` into graphs that are traced
with fake tensors (AOTAutograd, Inductor, export) long before they run. A call the fake
kernel accepts but a real kernel rejects is a compile that succeeds and a model that
then raises at every call (as integer biases did). So both kernels run one check,
``validate_op_call``; this file checks the agreement directly, over the op's argument
space: each call goes to the fake kernel (under ``FakeTensorMode``) and to the real one
(CPU, impl 'torch' or 'auto'; a sample also through the Triton kernels in the
interpreter), and

- either both raise, with the same exception type, or neither does;
- where they accept, the real outputs have the fake outputs' shapes, dtypes and
  strides, and the backward runs for real where the inputs are differentiable.

The space: every value of every argument (dtypes, shapes, bias and key-mask kinds,
scale, causal, window, softcap, dropout and seed, impl) varied from three base calls,
plus random combinations (fixed seed) of accepted values, and of any values.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Dict

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import attnfuse  # noqa: F401  (registers the op)

B, HQ, HKV, LQ, LK, D, DV = 2, 4, 2, 5, 6, 4, 3

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64]


def _tensor(shape, dtype, g):
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.3
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g).to(dtype)
    lo = 0 if dtype == torch.uint8 else -3
    return torch.randint(lo, 4, shape, generator=g, dtype=dtype)


# Each axis: name -> list of values. A value is what the call builder reads.
AXES: Dict[str, list] = {
    "qkv_dtype": [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                  "mixed"],
    "shape": ["ok", "gqa1", "mha", "q3d", "hq_not_multiple", "batch", "d0", "d257", "dv_big",
              "lk0", "lq0", "lq1", "v_len", "k_dim"],
    "bias_dtype": [None] + DTYPES,
    "bias_shape": [(LK,), (LQ, LK), (1, HQ, LQ, LK), (B, 1, 1, LK), (HQ, 1, LK), (), (LQ, LK + 1),
                   (1, 1, 1, 1, LK), (B, HQ, LQ, 1)],
    "scale": [0.5, 2, 0.0, -1.0, float("nan"), float("inf")],
    "causal": ["none", "top_left", "bottom_right", "diagonal"],
    "window": [0, 2, 7, -1],
    "softcap": [0.0, 5.0, -1.0, float("inf")],
    "dropout": [(0.0, None), (0.3, "int64"), (0.3, None), (0.3, "float"), (0.3, "vector"),
                (1.0, "int64"), (-0.1, "int64"), (0.0, "float")],
    "key_mask": [None, "bool", "bool_row", "bool_none_visible", "int", "long_shape", "3d"],
    "impl": ["torch", "auto", "cuda"],
    "causal_offsets": [None, "int32", "int64", "int16", "float", "shape"],
}

# values the op rejects whatever the other arguments are (the random combinations of
# accepted values skip them; the test does not rely on this list being right)
REJECTED = {
    "qkv_dtype": [torch.float64, torch.int64, "mixed"],
    "shape": ["q3d", "hq_not_multiple", "batch", "d0", "d257", "dv_big", "v_len", "k_dim"],
    "bias_dtype": [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.complex64],
    "bias_shape": [(LQ, LK + 1), (1, 1, 1, 1, LK)],
    "scale": [float("nan"), float("inf")],
    "causal": ["diagonal"],
    "window": [-1],
    "softcap": [-1.0, float("inf")],
    "dropout": [(0.3, None), (0.3, "float"), (0.3, "vector"), (1.0, "int64"), (-0.1, "int64")],
    "key_mask": ["int", "long_shape", "3d"],
    "impl": ["cuda"],
    "causal_offsets": ["int16", "float", "shape"],
}

BASES = [
    dict(qkv_dtype=torch.float32, shape="ok", bias_dtype=None, bias_shape=(LQ, LK), scale=0.5,
         causal="none", window=0, softcap=0.0, dropout=(0.0, None), key_mask=None, impl="torch"),
    dict(qkv_dtype=torch.float32, shape="ok", bias_dtype=torch.float32, bias_shape=(1, HQ, LQ, LK),
         scale=0.5, causal="top_left", window=2, softcap=0.0, dropout=(0.0, None), key_mask="bool",
         impl="torch"),
    dict(qkv_dtype=torch.bfloat16, shape="gqa1", bias_dtype=torch.bool, bias_shape=(B, 1, 1, LK),
         scale=0.5, causal="bottom_right", window=0, softcap=5.0, dropout=(0.3, "int64"), key_mask=None,
         impl="auto"),
]


def _cases():
    seen, out = set(), []

    def add(c):
        key = tuple(sorted((k, repr(v)) for k, v in c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)

    for base in BASES:
        for axis, values in AXES.items():
            for val in values:
                add({**base, axis: val})
    rnd = random.Random(0)
    for _ in range(100):  # combinations of accepted values: the kernels' paths together
        add({axis: rnd.choice([v for v in values if v not in REJECTED.get(axis, ())])
             for axis, values in AXES.items()})
    for _ in range(60):   # anything
        add({axis: rnd.choice(values) for axis, values in AXES.items()})
    return out


def _shapes(kind):
    b, hq, hkv, lq, lk, d, dv = B, HQ, HKV, LQ, LK, D, DV
    q4 = k4 = v4 = None
    if kind == "gqa1":
        hkv = 1
    elif kind == "mha":
        hkv = hq
    elif kind == "hq_not_multiple":
        hq = 3
    elif kind == "d0":
        d = 0
    elif kind == "d257":
        d = 257
    elif kind == "dv_big":
        dv = 257
    elif kind == "lk0":
        lk = 0
    elif kind == "lq0":
        lq = 0
    elif kind == "lq1":
        lq = 1
    q4 = (b, hq, lq, d)
    k4 = (b, hkv, lk, d)
    v4 = (b, hkv, lk, dv)
    if kind == "q3d":
        q4 = (b * hq, lq, d)
    elif kind == "batch":
        k4, v4 = (1,) + k4[1:], (1,) + v4[1:]
    elif kind == "v_len":
        v4 = (b, hkv, lk + 1, dv)
    elif kind == "k_dim":
        k4 = (b, hkv, lk, d + 1)
    return q4, k4, v4, lq, lk


def _build(c: Dict[str, Any]) -> tuple:
    """The arguments of one call of torch.ops.attnfuse.flash_attention."""
    g = torch.Generator().manual_seed(0)
    q4, k4, v4, lq, lk = _shapes(c["shape"])
    dt = c["qkv_dtype"]
    dts = (torch.float32, torch.float16, torch.float32) if dt == "mixed" else (dt, dt, dt)
    q, k, v = (_tensor(s, t, g) for s, t in zip((q4, k4, v4), dts))
    bias = None
    if c["bias_dtype"] is not None:
        shape = tuple(lq if s == LQ else lk if s == LK else s for s in c["bias_shape"])
        bias = _tensor(shape, c["bias_dtype"], g)
    p, how = c["dropout"]
    seed_t = {None: None, "int64": torch.tensor(123, dtype=torch.int64),
              "float": torch.tensor(1.5), "vector": torch.tensor([1, 2])}[how]
    km = {None: None,
          "bool": torch.arange(lk)[None, :] < torch.tensor([[lk], [max(lk - 2, 0)]]),
          "bool_row": torch.arange(lk)[None, :] >= 1,
          "bool_none_visible": torch.zeros(B, lk, dtype=torch.bool),
          "int": torch.ones(B, lk, dtype=torch.int64),
          "long_shape": torch.ones(B, lk + 1, dtype=torch.bool),
          "3d": torch.ones(B, 1, lk, dtype=torch.bool)}[c["key_mask"]]
    offsets = {None: None, "int32": torch.tensor([1, -2], dtype=torch.int32)[:B],
               "int64": torch.tensor([0, 9])[:B], "int16": torch.tensor([0, 1], dtype=torch.int16),
               "float": torch.tensor([0.0, 1.0]), "shape": torch.tensor([[0, 1]])}[c.get("causal_offsets")]
    return (q, k, v, bias, c["scale"], c["causal"], p, c["softcap"], seed_t, c["impl"], c["window"], km,
            None, None, offsets)


def _leaves(args):
    q, k, v, bias = args[:4]
    return [t for t in (q, k, v, bias) if t is not None and t.dtype.is_floating_point]


def _run(args, fake: bool):
    """(error type or None, [(shape, dtype, stride) of out, lse], backward error type or None)."""
    mode = FakeTensorMode() if fake else None
    if mode is not None:
        args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    leaves = _leaves(args)
    differentiable = len(leaves) >= 3 and all(t.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                              for t in args[:3])
    with mode if mode is not None else contextlib.nullcontext():
        for t in leaves if differentiable else ():
            t.requires_grad_()
        try:
            out, lse = torch.ops.attnfuse.flash_attention(*args)
        except Exception as e:  # noqa: BLE001
            return type(e), None, None
        meta = [(tuple(t.shape), t.dtype, t.stride()) for t in (out, lse)]
        bwd = None
        if differentiable and not fake:
            try:
                torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
            except Exception as e:  # noqa: BLE001
                bwd = e
    return None, meta, bwd


def _check(c):
    fake_err, fake_meta, _ = _run(_build(c), fake=True)
    real_err, real_meta, bwd_err = _run(_build(c), fake=False)
    assert fake_err == real_err, f"fake raised {fake_err}, real raised {real_err} for {c}"
    if fake_err is None:
        assert fake_meta == real_meta, f"fake {fake_meta} != real {real_meta} for {c}"
        assert bwd_err is None, f"the backward of an accepted call raised {bwd_err!r} for {c}"
    return fake_err


CASES = _cases()


def test_fake_and_real_kernels_accept_the_same_calls():
    accepted = [c for c in CASES if _check(c) is None]
    # the space is not degenerate: a fair share of calls runs, and so does each value of
    # the axes that the op accepts in several forms
    assert 0.25 * len(CASES) < len(accepted) < 0.9 * len(CASES), (len(accepted), len(CASES))
    for axis, values in (("bias_dtype", [None, torch.float32, torch.float16, torch.bfloat16,
                                         torch.float64, torch.bool]),
                         ("causal", ["none", "top_left", "bottom_right"]),
                         ("key_mask", [None, "bool", "bool_row", "bool_none_visible"]),
                         ("impl", ["torch", "auto"])):
        for val in values:
            assert any(c[axis] == val for c in accepted), (axis, val)


@pytest.mark.parametrize("i", range(8))
def test_triton_kernels_run_what_the_fake_kernel_accepts(i):
    """A sample of the space through the Triton kernels (the interpreter on CPU)."""
    rnd = random.Random(1000 + i)
    while True:
        c = {**rnd.choice(CASES), "impl": "triton"}
        c["shape"] = rnd.choice(["ok", "gqa1", "mha", "lq1", "lk0"])
        c["qkv_dtype"] = rnd.choice([torch.float32, torch.float16])
        if _check(c) is None:
            break


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_integer_bias_fails_when_traced(dtype):
    """The op itself takes float (additive) and bool (keep) biases only: an integer bias is
    ambiguous (uint8 was PyTorch's old bool mask), so the rewriter converts an added
    integer term to the scores' dtype in the graph; a direct call with one fails already
    in the fake kernel, naming the argument."""
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    bias = torch.ones(4, 4, dtype=dtype)
    with FakeTensorMode() as mode:
        fq, fk, fv, fb = (mode.from_tensor(t) for t in (q, k, v, bias))
        with pytest.raises(TypeError, match="bias must be a float"):
            torch.ops.attnfuse.flash_attention(fq, fk, fv, fb)
    with pytest.raises(TypeError, match="bias must be a float"):
        torch.ops.attnfuse.flash_attention(q, k, v, bias)


def test_dropout_without_a_seed_fails_when_traced():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        with pytest.raises(ValueError, match="needs a seed"):
            torch.ops.attnfuse.flash_attention(fq, fk, fv, None, 1.0, "none", 0.2)
