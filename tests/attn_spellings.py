"""A catalog of hand-written attention spellings, near misses and model blocks.

Each entry is a :class:`Case`: a small ``nn.Module`` factory, an example-input factory,
the number of ``attnfuse::flash_attention`` nodes a correct matcher must emit (in eval
mode), and for near misses the near-miss kinds (contract codes) that are acceptable.

The module also holds the harness the tests, the fuzzer and the benchmarks share:
capturing a module in one of the three graph dialects, counting fused-op and softmax
nodes, and comparing outputs.

Sizes are deliberately tiny: B=2, H=4, L=6, D=8 unless a case needs otherwise.
The "square" cases use H == L == D == 4 so that size equality cannot tell axes apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F

B, H, L, D = 2, 4, 6, 8
LQ, LK, DV = 5, 7, 6  # cross-attention / Dv != D sizes
SC = 1.0 / math.sqrt(D)
FMIN = torch.finfo(torch.float32).min
NEG_INF = float("-inf")

DIALECTS = ("fx", "aten", "dynamo")
# symbolic_trace cannot slice a real buffer with a traced length (nanoGPT's tril slice fails to
# trace there); those cases run in the other dialects, and *_fixed_len variants cover fx.
NO_FX = ("aten", "dynamo")

# --------------------------------------------------------------------------------------
# Catalog machinery
# --------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    module: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    fused: int = 1
    # Acceptable near-miss kinds: the report must contain at least one near miss whose
    # kind is in this tuple. ("*",) = any kind; () = no requirement.
    near_miss: tuple = ()
    # When set, every fused node must carry this causal alignment (and no bias unless
    # ``bias_ok``): causal masks must be recognised, not loaded as an N x N tensor.
    causal: str | None = None
    bias_ok: bool = False  # with ``causal``: a (non-causal) bias tensor may be passed as well
    # Dialects whose GraphModule holds the causal mask's buffer as module state (a get_attr the
    # user can change after the rewrite, which nothing checks): there the mask must stay a
    # tensor (causal "none", a bias); ``causal`` applies to the other dialects.
    mask_is_state: tuple = ()
    dropout_p: float = 0.0  # > 0: the module has dropout; in train mode it must be fused with it
    # GQA/MQA: the number of K/V heads the fused op must receive (the unrepeated K/V)
    kv_heads: int | None = None
    fused_or_reported: bool = False  # SQUARE_DATAFLOW: 0 fused (+ near miss reported) or ``fused``
    dialects: tuple = DIALECTS
    group: str = ""
    note: str = ""
    atol: float = 1e-5
    rtol: float = 1e-5

    def __repr__(self):  # pytest ids
        return self.name


SPELLINGS: dict[str, Case] = {}
NEAR_MISSES: dict[str, Case] = {}
MODELS: dict[str, Case] = {}
# Square-size cases whose dataflow IS attention with transposed operands (e.g. q.mT @ k is
# Q'.K'^T with Q' = q.mT, K' = k.mT): a sound matcher may fuse them (on views) or decline
# with a reported near miss; either way the output must not change.
SQUARE_DATAFLOW: dict[str, Case] = {}


def _register(table, name, module, inputs, **kw):
    assert name not in table, name
    table[name] = Case(name=name, module=module, inputs=inputs, **kw)


def spelling(name, inputs, **kw):
    def deco(cls):
        _register(SPELLINGS, name, cls, inputs, **kw)
        return cls
    return deco


def near_miss(name, inputs, kinds, **kw):
    def deco(cls):
        kw.setdefault("fused", 0)
        _register(NEAR_MISSES, name, cls, inputs, near_miss=tuple(kinds), **kw)
        return cls
    return deco


def model(name, inputs, **kw):
    def deco(cls):
        _register(MODELS, name, cls, inputs, **kw)
        return cls
    return deco


def square_dataflow(name, inputs, **kw):
    def deco(cls):
        _register(SQUARE_DATAFLOW, name, cls, inputs, fused_or_reported=True, **kw)
        return cls
    return deco


def all_cases() -> dict[str, Case]:
    out = {}
    out.update(SPELLINGS)
    out.update(NEAR_MISSES)
    out.update(SQUARE_DATAFLOW)
    out.update(MODELS)
    return out


# --------------------------------------------------------------------------------------
# Input factories (deterministic)
# --------------------------------------------------------------------------------------


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rnd(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def qkv(b=B, h=H, lq=L, lk=None, d=D, dv=None, hkv=None, layout="bhld", dtype=torch.float32, seed=0):
    """q, k, v in a layout: bhld (B,H,L,D), blhd (B,L,H,D), flat (B*H,L,D), bld, ld,
    bhdl_k (k stored transposed as (B,H,D,L)), flatdl_k (k as (B*H,D,L))."""
    g = _gen(seed)
    lk = lq if lk is None else lk
    dv = d if dv is None else dv
    hkv = h if hkv is None else hkv
    if layout == "bhld":
        return rnd(b, h, lq, d, g=g, dtype=dtype), rnd(b, hkv, lk, d, g=g, dtype=dtype), rnd(b, hkv, lk, dv, g=g, dtype=dtype)
    if layout == "blhd":
        return rnd(b, lq, h, d, g=g, dtype=dtype), rnd(b, lk, hkv, d, g=g, dtype=dtype), rnd(b, lk, hkv, dv, g=g, dtype=dtype)
    if layout == "bhdl_k":
        return rnd(b, h, lq, d, g=g, dtype=dtype), rnd(b, hkv, d, lk, g=g, dtype=dtype), rnd(b, hkv, lk, dv, g=g, dtype=dtype)
    if layout == "flat":
        return rnd(b * h, lq, d, g=g, dtype=dtype), rnd(b * h, lk, d, g=g, dtype=dtype), rnd(b * h, lk, dv, g=g, dtype=dtype)
    if layout == "flatdl_k":
        return rnd(b * h, lq, d, g=g, dtype=dtype), rnd(b * h, d, lk, g=g, dtype=dtype), rnd(b * h, lk, dv, g=g, dtype=dtype)
    if layout == "bld":
        return rnd(b, lq, d, g=g, dtype=dtype), rnd(b, lk, d, g=g, dtype=dtype), rnd(b, lk, dv, g=g, dtype=dtype)
    if layout == "ld":
        return rnd(lq, d, g=g, dtype=dtype), rnd(lk, d, g=g, dtype=dtype), rnd(lk, dv, g=g, dtype=dtype)
    raise ValueError(layout)


def keep_mask(b=B, lq=L, lk=L, seed=1):
    """Random bool keep-mask (True = attend) with key 0 always kept (no fully masked rows)."""
    g = _gen(seed)
    m = torch.rand(b, 1, lq, lk, generator=g) > 0.35
    m[..., 0] = True
    return m


def keypad_keep(b=B, lk=L, seed=1):
    g = _gen(seed)
    m = torch.rand(b, 1, 1, lk, generator=g) > 0.35
    m[..., 0] = True
    return m


def additive_from_keep(keep, fill=FMIN):
    return torch.zeros(keep.shape).masked_fill(~keep, fill)


def causal_keep(lq, lk, align="top_left"):
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    return j <= i if align == "top_left" else j <= i + (lk - lq)


# --------------------------------------------------------------------------------------
# Spellings: Q.K^T forms
# --------------------------------------------------------------------------------------


@spelling("qk_at", qkv, group="qk")
class QkAt(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SC
        return s.softmax(-1) @ v


@spelling("qk_torch_matmul", qkv, group="qk")
class QkTorchMatmul(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) * SC
        return torch.matmul(F.softmax(s, dim=-1), v)


@spelling("qk_tensor_matmul", qkv, group="qk")
class QkTensorMatmul(nn.Module):
    def forward(self, q, k, v):
        s = q.matmul(k.transpose(2, 3)) * SC
        return s.softmax(dim=-1).matmul(v)


@spelling("qk_mT", qkv, group="qk")
class QkMT(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.mT * SC, dim=-1) @ v


@spelling("qk_transpose_positive_dims", qkv, group="qk")
class QkTransposePos(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(torch.matmul(q, k.transpose(3, 2)) / math.sqrt(D), dim=3) @ v


@spelling("qk_keys_pretransposed", lambda: qkv(layout="bhdl_k"), group="qk")
class QkKeysPretransposed(nn.Module):
    def forward(self, q, kt, v):
        return F.softmax((q @ kt) * SC, dim=-1) @ v


@spelling("qk_permute_blhd", lambda: qkv(layout="blhd"), group="qk")
class QkPermuteBLHD(nn.Module):
    def forward(self, q, k, v):
        qh = q.permute(0, 2, 1, 3)
        kt = k.permute(0, 2, 3, 1)  # (B,L,H,D) -> (B,H,D,L): the real transpose
        vh = v.permute(0, 2, 1, 3)
        p = F.softmax(qh @ kt * SC, dim=-1)
        return (p @ vh).permute(0, 2, 1, 3)


@spelling("qk_bmm_flat_inputs", lambda: qkv(layout="flat"), group="qk")
class QkBmmFlat(nn.Module):
    def forward(self, q, k, v):
        s = torch.bmm(q, k.transpose(1, 2)) * SC
        return torch.bmm(F.softmax(s, dim=-1), v)


@spelling("qk_bmm_reshape_bart", lambda: qkv() + (rnd(B, 1, L, L, g=_gen(3)),), group="qk",
          note="fairseq/BART: bmm on (B*H,L,D), view to 4-D to add the mask, view back")
class QkBmmReshapeBart(nn.Module):
    def forward(self, q, k, v, mask):
        b, h, lq, d = q.shape
        lk = k.shape[2]
        q2 = (q * SC).reshape(b * h, lq, d)
        k2 = k.reshape(b * h, lk, d)
        v2 = v.reshape(b * h, lk, v.shape[-1])
        w = torch.bmm(q2, k2.transpose(1, 2))
        w = w.view(b, h, lq, lk) + mask
        w = w.view(b * h, lq, lk)
        w = nn.functional.softmax(w, dim=-1)
        o = torch.bmm(w, v2)
        return o.view(b, h, lq, -1).transpose(1, 2).reshape(b, lq, -1)


@spelling("qk_einsum_bhqd", qkv, group="qk")
class QkEinsumBhqd(nn.Module):
    def forward(self, q, k, v):
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * SC
        return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


@spelling("qk_einsum_other_letters", qkv, group="qk")
class QkEinsumLetters(nn.Module):
    def forward(self, q, k, v):
        s = torch.einsum("zyad,zybd->zyab", q * SC, k)
        return torch.einsum("zyab,zybe->zyae", s.softmax(dim=-1), v)


@spelling("qk_einsum_ellipsis", qkv, group="qk")
class QkEinsumEllipsis(nn.Module):
    def forward(self, q, k, v):
        s = torch.einsum("...id,...jd->...ij", q, k) * SC
        return torch.einsum("...ij,...jd->...id", s.softmax(-1), v)


@spelling("qk_einsum_heads_after_seq", lambda: qkv(layout="blhd"), group="qk")
class QkEinsumBqhd(nn.Module):
    def forward(self, q, k, v):
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * SC
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


@spelling("qk_einsum_scores_bqkh", lambda: qkv(layout="blhd"), group="qk",
          note="scores laid out (b,q,k,h); softmax over dim=2, which is the key axis")
class QkEinsumBqkh(nn.Module):
    def forward(self, q, k, v):
        s = torch.einsum("bqhd,bkhd->bqkh", q, k) * SC
        return torch.einsum("bqkh,bkhd->bqhd", s.softmax(dim=2), v)


@spelling("qk_einsum_keys_transposed", lambda: qkv(layout="bhdl_k"), group="qk")
class QkEinsumKT(nn.Module):
    def forward(self, q, kt, v):
        s = torch.einsum("bhqd,bhdk->bhqk", q, kt) * SC
        return torch.einsum("bhqk,bhkd->bhqd", F.softmax(s, -1), v)


def _alibi_inputs():
    q, kt, v = qkv(layout="flatdl_k")
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(H)])
    alibi = (slopes[:, None, None] * torch.arange(L)[None, None, :]).repeat(B, 1, 1)  # (B*H,1,L)
    return q, kt, v, alibi


@spelling("qk_baddbmm_alibi", _alibi_inputs, group="qk", note="BLOOM: baddbmm(alibi, q, k^T, beta=1, alpha=1/sqrt(d))")
class QkBaddbmmAlibi(nn.Module):
    def forward(self, q, kt, v, alibi):
        s = alibi.baddbmm(batch1=q, batch2=kt, beta=1.0, alpha=SC)
        p = F.softmax(s, dim=-1)
        return torch.bmm(p, v)


@spelling("qk_torch_baddbmm_alibi", _alibi_inputs, group="qk")
class QkTorchBaddbmm(nn.Module):
    def forward(self, q, kt, v, alibi):
        s = torch.baddbmm(alibi, q, kt, beta=1.0, alpha=SC)
        return torch.bmm(s.softmax(-1), v)


@spelling("qk_3d_single_head", lambda: qkv(layout="bld"), group="qk")
class Qk3dSingleHead(nn.Module):
    def forward(self, q, k, v):
        return torch.matmul(F.softmax(torch.matmul(q, k.transpose(1, 2)) * SC, dim=-1), v)


@spelling("qk_2d_unbatched_t", lambda: qkv(layout="ld"), group="qk")
class Qk2dUnbatched(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.t() * SC, dim=-1) @ v


# --------------------------------------------------------------------------------------
# Spellings: scale forms
# --------------------------------------------------------------------------------------


@spelling("scale_mul_float", qkv, group="scale")
class ScaleMulFloat(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * 0.3).softmax(-1) @ v


@spelling("scale_div_sqrt", qkv, group="scale")
class ScaleDivSqrt(nn.Module):
    def __init__(self):
        super().__init__()
        self.d = D

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) / math.sqrt(self.d)).softmax(-1) @ v


@spelling("scale_div_shape_pow", qkv, group="scale", note="scale computed from q.size(-1) in the graph")
class ScaleShapePow(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) / (q.size(-1) ** 0.5)).softmax(-1) @ v


@spelling("scale_mul_0d_buffer", qkv, group="scale")
class ScaleMul0dBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.3))

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * self.scale).softmax(-1) @ v


@spelling("scale_div_0d_param", qkv, group="scale")
class ScaleDiv0dParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.temp = nn.Parameter(torch.tensor(2.5))

    def forward(self, q, k, v):
        return torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / self.temp, -1) @ v


@spelling("scale_head_temperature", qkv, group="scale", note="XCiT-style per-head temperature (H,1,1)")
class ScaleHeadTemperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.linspace(0.2, 0.9, H).view(H, 1, 1))

    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1)) * self.temperature
        return s.softmax(dim=-1) @ v


@spelling("scale_head_temperature_4d_div", qkv, group="scale")
class ScaleHeadTemp4dDiv(nn.Module):
    def __init__(self):
        super().__init__()
        self.tau = nn.Parameter(torch.linspace(1.5, 4.0, H).view(1, H, 1, 1))

    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) / self.tau, dim=-1) @ v


@spelling("scale_per_query_row", lambda: qkv() + (torch.rand(1, 1, L, 1, generator=_gen(5)) + 0.2,), group="scale",
          note="a factor constant along the key axis (varies per query): foldable into q")
class ScalePerQuery(nn.Module):
    def forward(self, q, k, v, w):
        return F.softmax((q @ k.transpose(-2, -1)) * w, dim=-1) @ v


@spelling("scale_q_before_matmul", qkv, group="scale")
class ScaleQBefore(nn.Module):
    def forward(self, q, k, v):
        q = q * SC
        return F.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


@spelling("scale_q_before_div", qkv, group="scale")
class ScaleQBeforeDiv(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(torch.matmul(q / math.sqrt(D), k.transpose(2, 3)), dim=-1) @ v


@spelling("scale_k_before_matmul", qkv, group="scale")
class ScaleKBefore(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ (k * SC).transpose(-2, -1), dim=-1) @ v


@spelling("scale_split_quarter", qkv, group="scale", note="d^-1/4 on both q and k")
class ScaleSplitQuarter(nn.Module):
    def forward(self, q, k, v):
        s = D ** -0.25
        return F.softmax((q * s) @ (k * s).transpose(-2, -1), dim=-1) @ v


@spelling("scale_none_t5", qkv, group="scale")
class ScaleNone(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


@spelling("scale_torch_mul_div", qkv, group="scale")
class ScaleTorchMulDiv(nn.Module):
    def forward(self, q, k, v):
        s = torch.div(torch.mul(q @ k.transpose(-2, -1), 0.7), 2.0)
        return F.softmax(s, dim=-1) @ v


@spelling("scale_div_inplace", qkv, group="scale")
class ScaleDivInplace(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1)
        s.div_(math.sqrt(D))
        return F.softmax(s, dim=-1) @ v


@spelling("scale_rmul_python_left", qkv, group="scale")
class ScaleRmul(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(SC * (q @ k.transpose(-2, -1)), dim=-1) @ v


# --------------------------------------------------------------------------------------
# Spellings: bias and masks
# --------------------------------------------------------------------------------------


@spelling("bias_add_4d", lambda: qkv() + (rnd(B, H, L, L, g=_gen(7)),), group="bias")
class BiasAdd4d(nn.Module):
    def forward(self, q, k, v, bias):
        return F.softmax(q @ k.transpose(-2, -1) * SC + bias, dim=-1) @ v


@spelling("bias_add_2d", lambda: qkv() + (rnd(L, L, g=_gen(7)),), group="bias")
class BiasAdd2d(nn.Module):
    def forward(self, q, k, v, bias):
        return F.softmax(q @ k.transpose(-2, -1) * SC + bias, dim=-1) @ v


@spelling("bias_left_add_param", qkv, group="bias", note="T5/Swin relative bias as a parameter (1,H,L,L), bias + scores")
class BiasParamLeft(nn.Module):
    def __init__(self):
        super().__init__()
        self.rel = nn.Parameter(torch.randn(1, H, L, L, generator=_gen(8)))

    def forward(self, q, k, v):
        s = self.rel + torch.matmul(q, k.transpose(-2, -1))
        return F.softmax(s, dim=-1) @ v


@spelling("bias_alibi_h1l", lambda: qkv() + ((torch.arange(L)[None, None, :] * torch.linspace(-1, -0.1, H)[:, None, None]),),
          group="bias")
class BiasAlibi(nn.Module):
    def forward(self, q, k, v, alibi):
        return F.softmax(q @ k.transpose(-2, -1) * SC + alibi, dim=-1) @ v


@spelling("bias_keypad_finfo_min", lambda: qkv() + (additive_from_keep(keypad_keep()),), group="bias")
class BiasKeypad(nn.Module):
    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-2, -1) * SC
        s = s + mask
        return F.softmax(s, dim=-1) @ v


@spelling("bias_4d_finfo_min_causal", lambda: qkv() + (additive_from_keep(causal_keep(L, L).expand(B, 1, L, L)),),
          group="bias", note="HF 4-D additive mask filled with finfo.min (any pattern, here causal)")
class Bias4dMask(nn.Module):
    def forward(self, q, k, v, mask):
        return torch.softmax(torch.matmul(q, k.transpose(2, 3)) * SC + mask, dim=-1) @ v


@spelling("bias_add_inplace", lambda: qkv() + (rnd(B, 1, L, L, g=_gen(9)),), group="bias")
class BiasAddInplace(nn.Module):
    def forward(self, q, k, v, bias):
        s = q @ k.transpose(-2, -1)
        s.mul_(SC)
        s.add_(bias)
        return F.softmax(s, dim=-1) @ v


@spelling("mask_fill_neginf_keypad", lambda: qkv() + (keypad_keep(),), group="mask", note="DistilBERT-like")
class MaskFillNegInf(nn.Module):
    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-2, -1) * SC
        s = s.masked_fill(~keep, float("-inf"))
        return F.softmax(s, dim=-1) @ v


@spelling("mask_fill_finfo_min", lambda: qkv() + (~keep_mask(),), group="mask")
class MaskFillFinfo(nn.Module):
    def forward(self, q, k, v, masked):
        s = (q @ k.transpose(-2, -1) * SC).masked_fill(masked, torch.finfo(torch.float32).min)
        return F.softmax(s, dim=-1) @ v


@spelling("mask_fill_distilbert_view_expand", lambda: qkv() + (keypad_keep().view(B, L).long(),), group="mask",
          note="DistilBERT: (mask == 0).view(bs,1,1,k).expand_as(scores); masked_fill(mask, finfo.min)")
class MaskFillDistil(nn.Module):
    def forward(self, q, k, v, attention_mask):
        s = torch.matmul(q / math.sqrt(D), k.transpose(2, 3))
        m = (attention_mask == 0).view(q.shape[0], 1, 1, k.shape[2]).expand_as(s)
        s = s.masked_fill(m, torch.tensor(torch.finfo(torch.float32).min))
        return nn.functional.softmax(s, dim=-1) @ v


@spelling("mask_fill_inplace", lambda: qkv() + (~keep_mask(),), group="mask")
class MaskFillInplace(nn.Module):
    def forward(self, q, k, v, masked):
        s = q @ k.transpose(-2, -1) * SC
        s.masked_fill_(masked, float("-inf"))
        return F.softmax(s, dim=-1) @ v


@spelling("mask_torch_masked_fill", lambda: qkv() + (~keep_mask(),), group="mask")
class MaskTorchMaskedFill(nn.Module):
    def forward(self, q, k, v, masked):
        s = torch.masked_fill(q @ k.transpose(-2, -1) * SC, masked, float("-inf"))
        return F.softmax(s, dim=-1) @ v


@spelling("mask_where_gpt2", lambda: qkv() + (keep_mask(),), group="mask",
          note="GPT-2: where(causal_mask, w, full([], finfo.min))")
class MaskWhereGpt2(nn.Module):
    def forward(self, q, k, v, keep):
        w = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], v.size(-1) ** 0.5, dtype=q.dtype)
        mask_value = torch.full([], torch.finfo(torch.float32).min, dtype=w.dtype)
        w = torch.where(keep, w.to(w.dtype), mask_value)
        return nn.functional.softmax(w, dim=-1) @ v


@spelling("mask_where_neginf_scalar_first", lambda: qkv() + (~keep_mask(),), group="mask")
class MaskWhereInverted(nn.Module):
    def forward(self, q, k, v, masked):
        s = torch.where(masked, float("-inf"), q @ k.transpose(-2, -1) * SC)
        return F.softmax(s, dim=-1) @ v


class _TrilBuf(nn.Module):
    def __init__(self, n=8):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(n, n)).view(1, 1, n, n))


@spelling("mask_tril_buffer_nanogpt", qkv, group="mask", causal="top_left", dialects=NO_FX, mask_is_state=("aten", "aten_symbolic"),)
class MaskTrilBuffer(_TrilBuf):
    def forward(self, q, k, v):
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * SC
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


@spelling("mask_tril_buffer_fixed_len", qkv, group="mask",
          note="fx-friendly nanoGPT: the buffer slice has constant bounds (a constant tensor in fx graphs)")
class MaskTrilBufferFixed(_TrilBuf):
    def forward(self, q, k, v):
        att = (q @ k.transpose(-2, -1)) * SC
        att = att.masked_fill(self.bias[:, :, :L, :L] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


@spelling("mask_triu_bool_buffer", qkv, group="mask", causal="top_left", dialects=NO_FX, mask_is_state=("aten", "aten_symbolic"),)
class MaskTriuBoolBuffer(nn.Module):
    def __init__(self, n=8):
        super().__init__()
        self.register_buffer("future", torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1))

    def forward(self, q, k, v):
        T = q.shape[2]
        att = (q @ k.transpose(-2, -1)) * SC
        att = att.masked_fill(self.future[:T, :T], float("-inf"))
        return F.softmax(att, dim=-1) @ v


@spelling("mask_arange_causal", qkv, group="mask", causal="top_left")
class MaskArangeCausal(nn.Module):
    def forward(self, q, k, v):
        lq, lk = q.size(2), k.size(2)
        i = torch.arange(lq, device=q.device)
        j = torch.arange(lk, device=q.device)
        future = j[None, :] > i[:, None]
        att = (q @ k.transpose(-2, -1)) * SC
        att = att.masked_fill(future, float("-inf"))
        return F.softmax(att, dim=-1) @ v


@spelling("mask_arange_bottom_right", lambda: qkv(lq=4, lk=7), group="mask", causal="bottom_right",
          note="KV-cache causal: query i sees keys j <= i + (Lk - Lq)")
class MaskArangeBottomRight(nn.Module):
    def forward(self, q, k, v):
        lq, lk = q.size(2), k.size(2)
        i = torch.arange(lq, device=q.device).view(-1, 1)
        j = torch.arange(lk, device=q.device).view(1, -1)
        keep = j <= i + (lk - lq)
        att = torch.where(keep, (q @ k.transpose(-2, -1)) * SC, torch.tensor(float("-inf")))
        return F.softmax(att, dim=-1) @ v


@spelling("mask_triu_in_graph", qkv, group="mask")
class MaskTriuInGraph(nn.Module):
    def forward(self, q, k, v):
        T = q.size(2)
        future = torch.triu(torch.ones((T, T), dtype=torch.bool, device=q.device), diagonal=1)
        return F.softmax((q @ k.transpose(-2, -1) * SC).masked_fill(future, float("-inf")), dim=-1) @ v


@spelling("mask_triu_diag2_buffer_not_causal", qkv, group="mask", dialects=NO_FX,
          note="soundness trap: a band mask (j <= i+1) looks causal but is not; fused as a bias")
class MaskTriuDiag2(nn.Module):
    def __init__(self, n=8):
        super().__init__()
        self.register_buffer("future", torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=2))

    def forward(self, q, k, v):
        T = q.shape[2]
        att = (q @ k.transpose(-2, -1)) * SC
        att = att.masked_fill(self.future[:T, :T], float("-inf"))
        return F.softmax(att, dim=-1) @ v


@spelling("mask_causal_plus_keypad_bias", lambda: qkv() + (additive_from_keep(keypad_keep()),), group="mask",
          mask_is_state=("aten", "aten_symbolic"),
          causal="top_left", bias_ok=True, dialects=NO_FX)
class MaskCausalPlusKeypad(_TrilBuf):
    def forward(self, q, k, v, pad):
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * SC
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = att + pad
        return F.softmax(att, dim=-1) @ v


@spelling("softcap_gemma2", qkv, group="mask")
class Softcap(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q * SC, k.transpose(2, 3))
        s = s / 1.5
        s = torch.tanh(s)
        s = s * 1.5
        return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


@spelling("softcap_then_bias", lambda: qkv() + (additive_from_keep(causal_keep(L, L).expand(B, 1, L, L)),), group="mask")
class SoftcapBias(nn.Module):
    def forward(self, q, k, v, mask):
        s = (q @ k.transpose(-2, -1)) * SC
        s = torch.tanh(s / 2.0) * 2.0
        s = s + mask
        return F.softmax(s, dim=-1) @ v


# --------------------------------------------------------------------------------------
# Spellings: softmax forms
# --------------------------------------------------------------------------------------


@spelling("softmax_F", qkv, group="softmax")
class SmF(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) * SC, -1) @ v


@spelling("softmax_torch", qkv, group="softmax")
class SmTorch(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * SC, dim=-1) @ v


@spelling("softmax_method", qkv, group="softmax")
class SmMethod(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1) * SC).softmax(dim=-1) @ v


@spelling("softmax_module", qkv, group="softmax")
class SmModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, q, k, v):
        return self.softmax(q @ k.transpose(-2, -1) * SC) @ v


@spelling("softmax_positive_dim", qkv, group="softmax")
class SmPosDim(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) * SC, dim=3) @ v


@spelling("softmax_dtype_kw", qkv, group="softmax")
class SmDtype(nn.Module):
    def forward(self, q, k, v):
        p = F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1, dtype=torch.float32).to(q.dtype)
        return p @ v


@spelling("softmax_upcast_cast_back", qkv, group="softmax")
class SmUpcast(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SC
        p = F.softmax(s.float(), dim=-1).type_as(s)
        return p @ v


@spelling("softmax_bf16_upcast_llama", lambda: qkv(dtype=torch.bfloat16), group="softmax", atol=2e-2, rtol=2e-2,
          note="bf16 inputs; softmax(dtype=float32).to(bf16) as in HF LLaMA")
class SmBf16(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(2, 3)) * SC
        p = nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)


@spelling("softmax_bf16_float_then_to", lambda: qkv(dtype=torch.bfloat16), group="softmax", atol=2e-2, rtol=2e-2)
class SmBf16Float(nn.Module):
    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1)).float() * SC
        p = s.softmax(-1).to(torch.bfloat16)
        return p @ v


# --------------------------------------------------------------------------------------
# Spellings: dropout (eval: dropped; train: fused as dropout_p)
# --------------------------------------------------------------------------------------


@spelling("dropout_F", qkv, group="dropout", dropout_p=0.25)
class DoF(nn.Module):
    def forward(self, q, k, v):
        p = F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1)
        p = F.dropout(p, p=0.25, training=self.training)
        return p @ v


@spelling("dropout_module", qkv, group="dropout", dropout_p=0.25)
class DoModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_dropout = nn.Dropout(0.25)

    def forward(self, q, k, v):
        return self.attn_dropout(F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1)) @ v


@spelling("dropout_module_inplace", qkv, group="dropout", dropout_p=0.25)
class DoModuleInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.25, inplace=True)

    def forward(self, q, k, v):
        p = F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1)
        return self.drop(p) @ v


@spelling("dropout_torch_dropout", qkv, group="dropout", dropout_p=0.25,
          note="torch.dropout(x, p, train) (there is no Tensor.dropout method)")
class DoTorch(nn.Module):
    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * SC, dim=-1)
        return torch.dropout(p, 0.25, self.training) @ v


@spelling("dropout_after_cast_back", lambda: qkv(dtype=torch.bfloat16), group="dropout", dropout_p=0.25,
          atol=2e-2, rtol=2e-2)
class DoAfterCast(nn.Module):
    def forward(self, q, k, v):
        p = F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1, dtype=torch.float32).to(q.dtype)
        p = nn.functional.dropout(p, p=0.25, training=self.training)
        return torch.matmul(p, v)


# --------------------------------------------------------------------------------------
# Spellings: P.V forms, shapes
# --------------------------------------------------------------------------------------


@spelling("pv_einsum_after_at", qkv, group="pv")
class PvEinsum(nn.Module):
    def forward(self, q, k, v):
        p = F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1)
        return torch.einsum("bhij,bhjd->bhid", p, v)


@spelling("pv_bmm_after_reshape", qkv, group="pv")
class PvBmm(nn.Module):
    def forward(self, q, k, v):
        b, h, l, d = q.shape
        p = F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1)
        o = torch.bmm(p.reshape(b * h, l, l), v.reshape(b * h, l, d))
        return o.view(b, h, l, d)


@spelling("dv_ne_d", lambda: qkv(dv=DV), group="shape")
class DvNeD(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1) @ v


@spelling("cross_attention_lq_ne_lk", lambda: qkv(lq=LQ, lk=LK), group="shape")
class Cross(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1) @ v


@spelling("cross_attention_dv_keypad", lambda: qkv(lq=LQ, lk=LK, dv=DV) + (additive_from_keep(keypad_keep(lk=LK)),),
          group="shape")
class CrossDvPad(nn.Module):
    def forward(self, q, k, v, pad):
        return F.softmax(torch.matmul(q, k.transpose(-1, -2)) + pad, dim=-1) @ v


@spelling("lq_1_decode", lambda: qkv(lq=1, lk=LK), group="shape")
class Decode(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1) @ v


# --------------------------------------------------------------------------------------
# Spellings: GQA / MQA
# --------------------------------------------------------------------------------------


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HF transformers' repeat_kv, verbatim."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


@spelling("gqa_hf_repeat_kv", lambda: qkv(hkv=2), kv_heads=2, group="gqa")
class GqaRepeatKv(nn.Module):
    def forward(self, q, k, v):
        k = repeat_kv(k, 2)
        v = repeat_kv(v, 2)
        return F.softmax(torch.matmul(q, k.transpose(2, 3)) * SC, dim=-1) @ v


@spelling("gqa_repeat_interleave", lambda: qkv(hkv=2), kv_heads=2, group="gqa")
class GqaRepeatInterleave(nn.Module):
    def forward(self, q, k, v):
        k = k.repeat_interleave(2, dim=1)
        v = torch.repeat_interleave(v, 2, dim=1)
        return F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1) @ v


@spelling("mqa_repeat", lambda: qkv(hkv=1), kv_heads=1, group="gqa")
class MqaRepeat(nn.Module):
    def forward(self, q, k, v):
        k = k.repeat(1, H, 1, 1)
        v = v.repeat(1, H, 1, 1)
        return F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1) @ v


@spelling("gqa_repeat_tiles_heads", lambda: qkv(hkv=2), group="gqa",
          note="repeat(1,2,1,1) tiles kv heads (q head h uses kv head h % Hkv, not h // rep): must stay exact")
class GqaRepeatTile(nn.Module):
    def forward(self, q, k, v):
        k = k.repeat(1, 2, 1, 1)
        v = v.repeat(1, 2, 1, 1)
        return F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1) @ v


@spelling("mqa_expand", lambda: qkv(hkv=1), kv_heads=1, group="gqa")
class MqaExpand(nn.Module):
    def forward(self, q, k, v):
        k = k.expand(-1, q.size(1), -1, -1)
        v = v.expand(-1, q.size(1), -1, -1)
        return F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1) @ v


@spelling("mqa_broadcast_matmul", lambda: qkv(hkv=1), kv_heads=1, group="gqa", note="MQA by matmul broadcasting (B,1,L,D)")
class MqaBroadcast(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1) @ v


# Three batch axes (B, G, R): merged into the op's (batch, head) (passes/batchaxes.py).
@spelling("gqa_grouped_einsum_5d", lambda: qkv(hkv=2), group="gqa",
          note="q viewed (B,G,R,L,D) against k (B,G,L,D): three batch axes, merged")
class GqaGroupedEinsum(nn.Module):
    def forward(self, q, k, v):
        b, h, l, d = q.shape
        qg = q.view(b, 2, h // 2, l, d)
        s = torch.einsum("bgrqd,bgkd->bgrqk", qg, k) * SC
        o = torch.einsum("bgrqk,bgkd->bgrqd", s.softmax(-1), v)
        return o.reshape(b, h, l, -1)


# --------------------------------------------------------------------------------------
# Spellings: output layouts, several attentions
# --------------------------------------------------------------------------------------


@spelling("out_transpose_reshape", qkv, group="out")
class OutTransposeReshape(nn.Module):
    def forward(self, q, k, v):
        o = F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1) @ v
        return o.transpose(1, 2).reshape(q.size(0), q.size(2), -1)


@spelling("out_permute_contiguous_view", qkv, group="out")
class OutPermuteView(nn.Module):
    def forward(self, q, k, v):
        o = torch.matmul(F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1), v)
        o = o.permute(0, 2, 1, 3).contiguous()
        return o.view(B, L, H * D)


@spelling("out_flat_bmm_view_transpose", lambda: qkv(layout="flat"), group="out")
class OutFlatBmm(nn.Module):
    def forward(self, q, k, v):
        o = torch.bmm(F.softmax(torch.bmm(q, k.transpose(1, 2)) * SC, dim=-1), v)
        return o.view(B, H, L, D).transpose(1, 2).flatten(2)


@spelling("two_attentions", qkv, group="multi", fused=2)
class TwoAttentions(nn.Module):
    def forward(self, q, k, v):
        o = F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1) @ v
        return F.softmax(o @ k.transpose(-2, -1) * SC, dim=-1) @ v


@spelling("attention_and_unrelated_softmax", qkv, group="multi", fused=1)
class AttnAndClassifier(nn.Module):
    def forward(self, q, k, v):
        o = F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1) @ v
        return o, F.softmax(o.sum(2), dim=-1)


@spelling("shared_kv_two_queries", lambda: qkv() + (rnd(B, H, LQ, D, g=_gen(11)),), group="multi", fused=2)
class SharedKV(nn.Module):
    def forward(self, q, k, v, q2):
        kt = k.transpose(-2, -1)
        a = F.softmax(q @ kt * SC, dim=-1) @ v
        b = F.softmax(q2 @ kt * SC, dim=-1) @ v
        return a, b


# --------------------------------------------------------------------------------------
# Near misses: every one must stay unfused, unchanged, and be reported
# --------------------------------------------------------------------------------------


def sq_qkv(**kw):
    """Square sizes: H == L == D == 4, so size equality cannot tell axes apart."""
    return qkv(h=4, lq=4, d=4, **kw)


@near_miss("nm_softmax_dim_m2", qkv, ["softmax_axis"])
class NmSoftmaxDimM2(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) * SC, dim=-2) @ v


@near_miss("nm_softmax_dim_m2_square", sq_qkv, ["softmax_axis"])
class NmSoftmaxDimM2Sq(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=2) @ v


@near_miss("nm_softmax_over_heads", qkv, ["softmax_axis"])
class NmSoftmaxHeads(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) * SC, dim=1) @ v


@near_miss("nm_softmax_bqkh_query_axis", lambda: qkv(layout="blhd"), ["softmax_axis"])
class NmSoftmaxBqkh(nn.Module):
    def forward(self, q, k, v):
        s = torch.einsum("bqhd,bkhd->bqkh", q, k) * SC
        return torch.einsum("bqkh,bkhd->bqhd", s.softmax(dim=1), v)


@near_miss("nm_return_probs", qkv, ["probs_other_users"])
class NmReturnProbs(nn.Module):
    def forward(self, q, k, v):
        p = F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1)
        return p @ v, p


@near_miss("nm_probs_also_summed", qkv, ["probs_other_users"])
class NmProbsSummed(nn.Module):
    def forward(self, q, k, v):
        p = F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1)
        return (p @ v) + p.mean()


@near_miss("nm_after_softmax_masked_fill", lambda: qkv() + (~keep_mask(),), ["after_softmax"])
class NmAfterMask(nn.Module):
    def forward(self, q, k, v, masked):
        p = F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1)
        return p.masked_fill(masked, 0.0) @ v


@near_miss("nm_after_softmax_scale", qkv, ["after_softmax"])
class NmAfterScale(nn.Module):
    def forward(self, q, k, v):
        p = F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1)
        return (p * 0.5) @ v


@near_miss("nm_after_softmax_add", lambda: qkv() + (rnd(L, L, g=_gen(12)),), ["after_softmax"])
class NmAfterAdd(nn.Module):
    def forward(self, q, k, v, extra):
        p = F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1)
        return (p + extra) @ v


@near_miss("nm_after_dropout_then_mask", lambda: qkv() + (~keep_mask(),), ["after_softmax"])
class NmAfterDropoutMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, q, k, v, masked):
        p = self.drop(F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1))
        return p.masked_fill(masked, 0.0) @ v


@near_miss("nm_after_softmax_renormalise", qkv, ["after_softmax", "probs_other_users"])
class NmRenorm(nn.Module):
    def forward(self, q, k, v):
        p = F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1)
        p = p / (p.sum(-1, keepdim=True) + 1e-3)
        return p @ v


@near_miss("nm_fill_finite_m1e4", lambda: qkv() + (~keep_mask(),), ["mask_fill_value"])
class NmFillM1e4(nn.Module):
    def forward(self, q, k, v, masked):
        s = (q @ k.transpose(-2, -1) * SC).masked_fill(masked, -1e4)
        return F.softmax(s, dim=-1) @ v


@near_miss("nm_fill_zero", lambda: qkv() + (~keep_mask(),), ["mask_fill_value"])
class NmFillZero(nn.Module):
    def forward(self, q, k, v, masked):
        s = (q @ k.transpose(-2, -1) * SC).masked_fill(masked, 0.0)
        return F.softmax(s, dim=-1) @ v


@near_miss("nm_fill_posinf", lambda: qkv() + (~keep_mask(),), ["mask_fill_value"])
class NmFillPosInf(nn.Module):
    def forward(self, q, k, v, masked):
        s = (q @ k.transpose(-2, -1) * SC).masked_fill(masked, 30.0)
        return F.softmax(s, dim=-1) @ v


@near_miss("nm_where_finite_fill", lambda: qkv() + (keep_mask(),), ["mask_fill_value"])
class NmWhereFinite(nn.Module):
    def forward(self, q, k, v, keep):
        s = torch.where(keep, q @ k.transpose(-2, -1) * SC, torch.tensor(-5.0))
        return F.softmax(s, dim=-1) @ v


@near_miss("nm_key_varying_scale", lambda: qkv() + (torch.rand(1, 1, 1, L, generator=_gen(13)) + 0.5,),
           ["key_varying_scale"])
class NmKeyScale(nn.Module):
    def forward(self, q, k, v, w):
        return F.softmax((q @ k.transpose(-2, -1)) * w, dim=-1) @ v


@near_miss("nm_multiplicative_keypad_mask", lambda: qkv() + (keypad_keep().float(),), ["key_varying_scale"])
class NmMulMask(nn.Module):
    def forward(self, q, k, v, keep):
        return F.softmax((q @ k.transpose(-2, -1) * SC) * keep, dim=-1) @ v


@near_miss("nm_log_softmax", qkv, ["log_softmax"])
class NmLogSoftmax(nn.Module):
    def forward(self, q, k, v):
        return F.log_softmax(q @ k.transpose(-2, -1) * SC, dim=-1) @ v


@near_miss("nm_return_scores", qkv, ["scores_other_users"])
class NmReturnScores(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SC
        return F.softmax(s, dim=-1) @ v, s


@near_miss("nm_raw_scores_reused", qkv, ["scores_other_users"])
class NmRawScoresReused(nn.Module):
    def forward(self, q, k, v):
        raw = q @ k.transpose(-2, -1)
        return F.softmax(raw * SC, dim=-1) @ v + raw.amax()


@near_miss("nm_permute_0231_square", sq_qkv, ["qk_contraction"],
           note="k is (B,H,L,D); permute(0,2,3,1) is not the transpose it resembles (pytorch#195320)")
class NmPermuteSquare(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.permute(0, 2, 3, 1) * SC, dim=-1) @ v


# pytorch#195320 as Inductor sees it: q, v permuted (0,2,1,3) and k permuted (0,2,3,1). Inductor fuses
# it as if k were transposed and returns wrong results (reproduced). By dataflow it IS attention with
# keys k.permute(0,2,1,3) (a layout the graph cannot tell apart from (B,L,H,D) inputs), so attnfuse may
# fuse it exactly — or decline; the harness checks the output either way.
@square_dataflow("sq_permute_0231_inductor_pattern", lambda: (rnd(B, 4, 4, 4, g=_gen(16)), rnd(B, 4, 4, 4, g=_gen(17)),
                 rnd(B, 4, 4, 4, g=_gen(18))))
class NmPermuteInductorPattern(nn.Module):
    def forward(self, q, k, v):
        q = q.permute(0, 2, 1, 3)
        k = k.permute(0, 2, 3, 1)
        v = v.permute(0, 2, 1, 3)
        return torch.matmul(F.softmax(torch.matmul(q, k) * 0.5, dim=-1), v)


@square_dataflow("sq_q_transposed_square", sq_qkv)
class NmQTransposed(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q.transpose(-2, -1) @ k * SC, dim=-1) @ v


@square_dataflow("sq_bmm_no_transpose_square", lambda: qkv(h=4, lq=4, d=4, layout="flat"))
class NmBmmNoT(nn.Module):
    def forward(self, q, k, v):
        return torch.bmm(F.softmax(torch.bmm(q, k) * SC, dim=-1), v)


@square_dataflow("sq_einsum_wrong_key_axis_square", sq_qkv)
class NmEinsumWrong(nn.Module):
    def forward(self, q, k, v):
        s = torch.einsum("bhqd,bhdk->bhqk", q, k) * SC  # k is (B,H,L,D): contracts k's sequence axis (K' = k.mT)
        return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


@square_dataflow("sq_pv_transposed_square", sq_qkv)
class NmPvTransposed(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1) @ v.transpose(-2, -1)


@near_miss("nm_pv_probs_transposed_square", sq_qkv, ["pv_contraction", "softmax_axis"])
class NmPvProbsT(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) * SC, dim=-1).transpose(-2, -1) @ v


@near_miss("nm_heads_mixed_square", sq_qkv, ["qk_contraction"],
           note="k transposed on (heads, seq) instead of (seq, dim): square sizes make it type-check")
class NmHeadsMixed(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(q @ k.transpose(1, 2).transpose(-2, -1) * SC, dim=-1) @ v


@near_miss("nm_relu_scores", qkv, ["unsupported_op"])
class NmRelu(nn.Module):
    def forward(self, q, k, v):
        return F.softmax(torch.relu(q @ k.transpose(-2, -1) * SC), dim=-1) @ v


@near_miss("nm_softcap_mismatched", qkv, ["*"], note="tanh(s/2)*3 is not a softcap")
class NmSoftcapBad(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * SC
        return F.softmax(torch.tanh(s / 2.0) * 3.0, dim=-1) @ v


@near_miss("nm_bias_after_scale_mul_again", lambda: qkv() + (rnd(L, L, g=_gen(14)),), ["*"],
           note="(s + bias) * w with per-key w")
class NmBiasThenKeyScale(nn.Module):
    def forward(self, q, k, v, bias):
        s = (q @ k.transpose(-2, -1) + bias) * torch.linspace(0.5, 1.5, L)
        return F.softmax(s, dim=-1) @ v


@near_miss("nm_sigmoid_not_softmax", qkv, [])
class NmSigmoid(nn.Module):
    def forward(self, q, k, v):
        return torch.sigmoid(q @ k.transpose(-2, -1) * SC) @ v


@near_miss("nm_plain_softmax_classifier", lambda: (rnd(B, L, D, g=_gen(15)),), [])
class NmClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 5)

    def forward(self, x):
        return F.softmax(self.fc(x), dim=-1)


@near_miss("nm_softmax_then_linear", lambda: (rnd(B, L, D, g=_gen(15)),), [])
class NmSoftmaxLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, L)
        self.fc2 = nn.Linear(L, D)

    def forward(self, x):
        return self.fc2(F.softmax(self.fc(x), dim=-1))


# --------------------------------------------------------------------------------------
# Model-style blocks (small sizes), written in the style of the real implementations
# --------------------------------------------------------------------------------------

C_EMB, T_SEQ = H * D, L  # 32, 6


def x_input(seed=20):
    return (rnd(B, T_SEQ, C_EMB, g=_gen(seed)),)


@model("nanogpt", x_input, causal="top_left", dropout_p=0.1, dialects=NO_FX, mask_is_state=("aten", "aten_symbolic"),
       note="karpathy/nanoGPT CausalSelfAttention, slow path; fx cannot trace math.sqrt(k.size(-1))")
class NanoGPTAttention(nn.Module):
    def __init__(self, n_embd=C_EMB, n_head=H, block_size=8, dropout=0.1):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B_, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B_, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B_, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B_, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B_, T, C)
        return self.resid_dropout(self.c_proj(y))


class Conv1D(nn.Module):
    """HF GPT-2's Conv1D (a linear with transposed weight, via addmm)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


def _gpt2_inputs():
    keep = keypad_keep(lk=T_SEQ, seed=21)
    attention_mask = (1.0 - keep.float()) * torch.finfo(torch.float32).min  # (B,1,1,T)
    return x_input() + (attention_mask,)


@model("hf_gpt2", _gpt2_inputs, dropout_p=0.1, dialects=NO_FX,
       note="HF GPT2Attention._attn: where(causal_mask, w, mask_value) + additive attention_mask. The causal "
            "mask's fill is finite (finfo.min) and another term is added: a row both mask entirely is, in eager, "
            "uniform over the keys that only one of them masks, which no structure reproduces: kept as a bias")
class GPT2Attention(nn.Module):
    def __init__(self, embed_dim=C_EMB, num_heads=H, max_positions=8, attn_pdrop=0.1):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones((max_positions, max_positions), dtype=torch.bool)).view(
            1, 1, max_positions, max_positions), persistent=False)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.split_size = embed_dim
        self.c_attn = Conv1D(3 * embed_dim, embed_dim)
        self.c_proj = Conv1D(embed_dim, embed_dim)
        self.attn_dropout = nn.Dropout(attn_pdrop)

    def _attn(self, query, key, value, attention_mask=None):
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        attn_weights = attn_weights / torch.full([], value.size(-1) ** 0.5, dtype=attn_weights.dtype,
                                                 device=attn_weights.device)
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length: key_length, :key_length]
        mask_value = torch.finfo(attn_weights.dtype).min
        mask_value = torch.full([], mask_value, dtype=attn_weights.dtype, device=attn_weights.device)
        attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = attn_weights.type(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        attn_output = torch.matmul(attn_weights, value)
        return attn_output, attn_weights

    def _split_heads(self, tensor, num_heads, attn_head_size):
        new_shape = tensor.size()[:-1] + (num_heads, attn_head_size)
        tensor = tensor.view(new_shape)
        return tensor.permute(0, 2, 1, 3)

    def _merge_heads(self, tensor, num_heads, attn_head_size):
        tensor = tensor.permute(0, 2, 1, 3).contiguous()
        new_shape = tensor.size()[:-2] + (num_heads * attn_head_size,)
        return tensor.view(new_shape)

    def forward(self, hidden_states, attention_mask):
        query, key, value = self.c_attn(hidden_states).split(self.split_size, dim=2)
        query = self._split_heads(query, self.num_heads, self.head_dim)
        key = self._split_heads(key, self.num_heads, self.head_dim)
        value = self._split_heads(value, self.num_heads, self.head_dim)
        attn_output, _ = self._attn(query, key, value, attention_mask)  # weights unused (output_attentions=False)
        attn_output = self._merge_heads(attn_output, self.num_heads, self.head_dim)
        return self.c_proj(attn_output)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def _llama_inputs():
    (x,) = x_input(22)
    keep = causal_keep(T_SEQ, T_SEQ)[None, None] & keypad_keep(lk=T_SEQ, seed=23)
    mask = torch.zeros(B, 1, T_SEQ, T_SEQ).masked_fill(~keep, torch.finfo(torch.float32).min)
    position_ids = torch.arange(T_SEQ)[None].expand(B, -1)
    return x, mask, position_ids


@model("hf_llama", _llama_inputs, dialects=NO_FX, note="fx cannot trace (*input_shape, -1, d) unpacking; "
       "HF LlamaAttention eager path: rotary + GQA repeat_kv + additive 4-D mask")
class LlamaAttention(nn.Module):
    def __init__(self, hidden=C_EMB, heads=H, kv_heads=2, theta=10000.0):
        super().__init__()
        self.head_dim = hidden // heads
        self.num_heads, self.num_key_value_heads = heads, kv_heads
        self.num_key_value_groups = heads // kv_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = 0.0
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rotary(self, x, position_ids):
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def forward(self, hidden_states, attention_mask, position_ids):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = self.rotary(hidden_states, position_ids)
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        key_states = repeat_kv(key_states, self.num_key_value_groups)
        value_states = repeat_kv(value_states, self.num_key_value_groups)
        attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) * self.scaling
        causal_mask = attention_mask[:, :, :, : key_states.shape[-2]]
        attn_weights = attn_weights + causal_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
        attn_weights = nn.functional.dropout(attn_weights, p=self.attention_dropout, training=self.training)
        attn_output = torch.matmul(attn_weights, value_states)
        attn_output = attn_output.transpose(1, 2).contiguous()
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output)


def _bert_inputs():
    (x,) = x_input(24)
    return x, keypad_keep(lk=T_SEQ, seed=25).view(B, T_SEQ).long()


@model("hf_bert", _bert_inputs, dropout_p=0.1,
       note="HF BertSelfAttention with the extended mask (1 - m) * finfo.min built in the graph")
class BertSelfAttention(nn.Module):
    def __init__(self, hidden=C_EMB, heads=H, p=0.1):
        super().__init__()
        self.num_attention_heads = heads
        self.attention_head_size = hidden // heads
        self.all_head_size = hidden
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(p)

    def transpose_for_scores(self, x):
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        x = x.view(new_x_shape)
        return x.permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask):
        extended = attention_mask[:, None, None, :].to(torch.float32)
        extended = (1.0 - extended) * torch.finfo(torch.float32).min
        query_layer = self.transpose_for_scores(self.query(hidden_states))
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / math.sqrt(self.attention_head_size)
        attention_scores = attention_scores + extended
        attention_probs = nn.functional.softmax(attention_scores, dim=-1)
        attention_probs = self.dropout(attention_probs)
        context_layer = torch.matmul(attention_probs, value_layer)
        context_layer = context_layer.permute(0, 2, 1, 3).contiguous()
        new_context_layer_shape = context_layer.size()[:-2] + (self.all_head_size,)
        return context_layer.view(new_context_layer_shape)


@model("hf_t5", lambda: x_input(26) + (additive_from_keep(keypad_keep(lk=T_SEQ, seed=27)),),
       note="T5Attention: relative position bias from buckets (in graph), no scale, scores += bias, float softmax")
class T5Attention(nn.Module):
    def __init__(self, d_model=C_EMB, heads=H, num_buckets=8, p=0.1):
        super().__init__()
        self.n_heads, self.key_value_proj_dim, self.inner_dim = heads, d_model // heads, d_model
        self.num_buckets = num_buckets
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)
        self.dropout = p

    def compute_bias(self, query_length, key_length):
        context_position = torch.arange(query_length, dtype=torch.long)[:, None]
        memory_position = torch.arange(key_length, dtype=torch.long)[None, :]
        relative_position = memory_position - context_position
        half = self.num_buckets // 2
        buckets = (relative_position > 0).to(torch.long) * half + torch.clamp(relative_position.abs(), max=half - 1)
        values = self.relative_attention_bias(buckets)  # (q, k, H)
        return values.permute([2, 0, 1]).unsqueeze(0)  # (1, H, q, k)

    def forward(self, hidden_states, mask):
        batch_size, seq_length = hidden_states.shape[:2]

        def shape(states):
            return states.view(batch_size, -1, self.n_heads, self.key_value_proj_dim).transpose(1, 2)

        query_states = shape(self.q(hidden_states))
        key_states = shape(self.k(hidden_states))
        value_states = shape(self.v(hidden_states))
        scores = torch.matmul(query_states, key_states.transpose(3, 2))
        position_bias = self.compute_bias(seq_length, seq_length)
        position_bias = position_bias + mask
        scores += position_bias
        attn_weights = nn.functional.softmax(scores.float(), dim=-1).type_as(scores)
        attn_weights = nn.functional.dropout(attn_weights, p=self.dropout, training=self.training)
        attn_output = torch.matmul(attn_weights, value_states)
        attn_output = attn_output.transpose(1, 2).contiguous().view(batch_size, -1, self.inner_dim)
        return self.o(attn_output)


def build_alibi_tensor(attention_mask, num_heads, dtype):
    """HF BLOOM's build_alibi_tensor (power-of-two head count)."""
    batch_size, seq_length = attention_mask.shape
    base = 2 ** (-(2 ** -(math.log2(num_heads) - 3)))
    powers = torch.arange(1, 1 + num_heads, dtype=torch.int32)
    slopes = torch.pow(torch.tensor(base, dtype=torch.float32), powers)
    arange_tensor = ((attention_mask.cumsum(dim=-1) - 1) * attention_mask)[:, None, :]
    alibi = slopes[..., None] * arange_tensor
    return alibi.reshape(batch_size * num_heads, 1, seq_length).to(dtype)


def _bloom_inputs():
    (x,) = x_input(28)
    am = torch.ones(B, T_SEQ, dtype=torch.long)
    alibi = build_alibi_tensor(am, H, torch.float32)
    masked = ~(causal_keep(T_SEQ, T_SEQ)[None, None].expand(B, 1, T_SEQ, T_SEQ))  # True = masked
    return x, alibi, masked


@model("hf_bloom", _bloom_inputs, dropout_p=0.1,
       note="BloomAttention: fused qkv, baddbmm(alibi, q, k, beta, alpha), masked_fill finfo.min, float32 softmax, bmm")
class BloomAttention(nn.Module):
    def __init__(self, hidden=C_EMB, heads=H, p=0.1):
        super().__init__()
        self.num_heads, self.head_dim, self.hidden_size = heads, hidden // heads, hidden
        self.inv_norm_factor = 1.0 / math.sqrt(self.head_dim)
        self.beta = 1.0
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.attention_dropout = nn.Dropout(p)

    def forward(self, hidden_states, alibi, attention_mask):
        batch_size, q_length, _ = hidden_states.shape
        fused_qkv = self.query_key_value(hidden_states)
        fused_qkv = fused_qkv.view(batch_size, q_length, self.num_heads, 3, self.head_dim)
        query_layer = fused_qkv[..., 0, :].transpose(1, 2).reshape(batch_size * self.num_heads, q_length, self.head_dim)
        key_layer = fused_qkv[..., 1, :].permute(0, 2, 3, 1).reshape(batch_size * self.num_heads, self.head_dim, q_length)
        value_layer = fused_qkv[..., 2, :].transpose(1, 2).reshape(batch_size * self.num_heads, q_length, self.head_dim)
        kv_length = key_layer.shape[-1]
        matmul_result = alibi.baddbmm(batch1=query_layer, batch2=key_layer, beta=self.beta, alpha=self.inv_norm_factor)
        attention_scores = matmul_result.view(batch_size, self.num_heads, q_length, kv_length)
        input_dtype = attention_scores.dtype
        attn_weights = torch.masked_fill(attention_scores, attention_mask, torch.finfo(torch.float32).min)
        attention_probs = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(input_dtype)
        attention_probs = self.attention_dropout(attention_probs)
        attention_probs_reshaped = attention_probs.view(batch_size * self.num_heads, q_length, kv_length)
        context_layer = torch.bmm(attention_probs_reshaped, value_layer)
        context_layer = context_layer.view(batch_size, self.num_heads, q_length, self.head_dim)
        context_layer = context_layer.permute(0, 2, 1, 3).reshape(batch_size, q_length, self.hidden_size)
        return self.dense(context_layer)


def _gemma2_inputs():
    (x,) = x_input(29)
    keep = causal_keep(T_SEQ, T_SEQ)[None, None].expand(B, 1, T_SEQ, T_SEQ)
    mask = torch.zeros(B, 1, T_SEQ, T_SEQ + 2).masked_fill(
        ~torch.cat([keep, torch.zeros(B, 1, T_SEQ, 2, dtype=torch.bool)], -1), torch.finfo(torch.float32).min)
    return x, mask


@model("hf_gemma2", _gemma2_inputs, dialects=NO_FX,
       note="Gemma2Attention eager: query_pre_attn_scalar**-0.5, GQA, softcap tanh(s/c)*c, sliced additive mask")
class Gemma2Attention(nn.Module):
    def __init__(self, hidden=C_EMB, heads=H, kv_heads=2, query_pre_attn_scalar=16, softcap=5.0):
        super().__init__()
        self.head_dim = hidden // heads
        self.num_key_value_groups = heads // kv_heads
        self.scaling = query_pre_attn_scalar ** -0.5
        self.attn_logit_softcapping = softcap
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, hidden_states, attention_mask):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = repeat_kv(key, self.num_key_value_groups)
        value_states = repeat_kv(value, self.num_key_value_groups)
        attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * self.scaling
        attn_weights = attn_weights / self.attn_logit_softcapping
        attn_weights = torch.tanh(attn_weights)
        attn_weights = attn_weights * self.attn_logit_softcapping
        causal_mask = attention_mask[:, :, :, : key_states.shape[-2]]
        attn_weights = attn_weights + causal_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
        attn_weights = nn.functional.dropout(attn_weights, p=0.0, training=self.training)
        attn_output = torch.matmul(attn_weights, value_states)
        attn_output = attn_output.transpose(1, 2).contiguous()
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())


@model("timm_vit", lambda: (rnd(B, 5, C_EMB, g=_gen(30)),), dropout_p=0.1,
       note="timm Attention (fused_attn=False): qkv reshape/permute/unbind, q * scale, attn_drop")
class ViTAttention(nn.Module):
    def __init__(self, dim=C_EMB, num_heads=H, attn_drop=0.1):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B_, N, C)
        return self.proj(x)


def _swin_inputs():
    nW, N = 2, 4
    g = _gen(31)
    x = rnd(B * nW, N, C_EMB, g=g)
    keep = torch.rand(nW, N, N, generator=g) > 0.3
    keep |= torch.eye(N, dtype=torch.bool)
    mask = torch.zeros(nW, N, N).masked_fill(~keep, -100.0)  # Swin's shifted-window mask uses -100.0 (additive)
    return x, mask


@model("swin_window", _swin_inputs, note="Swin WindowAttention: relative position bias table + per-window additive mask "
       "through view(B_//nW, nW, H, N, N)")
class SwinWindowAttention(nn.Module):
    def __init__(self, dim=C_EMB, window=2, num_heads=H):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        ws = window
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * ws - 1) * (2 * ws - 1), num_heads) * 0.5)
        coords = torch.stack(torch.meshgrid([torch.arange(ws), torch.arange(ws)], indexing="ij"))
        coords_flatten = torch.flatten(coords, 1)
        rel = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += ws - 1
        rel[:, :, 1] += ws - 1
        rel[:, :, 0] *= 2 * ws - 1
        self.register_buffer("relative_position_index", rel.sum(-1))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)
        self.N = ws * ws

    def forward(self, x, mask):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        relative_position_bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            self.N, self.N, -1)
        relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()
        attn = attn + relative_position_bias.unsqueeze(0)
        nW = mask.shape[0]
        attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj(x)


@model("hf_whisper_bart", lambda: x_input(32) + (additive_from_keep(causal_keep(T_SEQ, T_SEQ)[None, None].expand(
    B, 1, T_SEQ, T_SEQ)),), dropout_p=0.1,
       note="BART/Whisper eager attention (older HF): q scaled, bmm on (B*H, L, D), 4-D mask added through views")
class BartAttention(nn.Module):
    def __init__(self, embed_dim=C_EMB, num_heads=H, dropout=0.1):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.dropout = dropout
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _shape(self, tensor, seq_len, bsz):
        return tensor.view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

    def forward(self, hidden_states, attention_mask):
        bsz, tgt_len, _ = hidden_states.size()
        query_states = self.q_proj(hidden_states) * self.scaling
        key_states = self._shape(self.k_proj(hidden_states), -1, bsz)
        value_states = self._shape(self.v_proj(hidden_states), -1, bsz)
        proj_shape = (bsz * self.num_heads, -1, self.head_dim)
        query_states = self._shape(query_states, tgt_len, bsz).view(*proj_shape)
        key_states = key_states.reshape(*proj_shape)
        value_states = value_states.reshape(*proj_shape)
        src_len = key_states.size(1)
        attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))
        attn_weights = attn_weights.view(bsz, self.num_heads, tgt_len, src_len) + attention_mask
        attn_weights = attn_weights.view(bsz * self.num_heads, tgt_len, src_len)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_probs = nn.functional.dropout(attn_weights, p=self.dropout, training=self.training)
        attn_output = torch.bmm(attn_probs, value_states)
        attn_output = attn_output.view(bsz, self.num_heads, tgt_len, self.head_dim)
        attn_output = attn_output.transpose(1, 2)
        attn_output = attn_output.reshape(bsz, tgt_len, self.embed_dim)
        return self.out_proj(attn_output)


@model("two_layer_transformer", x_input, fused=2, dropout_p=0.1,
       note="two pre-LN blocks of ViT attention + MLP in one graph")
class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.ModuleList([nn.LayerNorm(C_EMB) for _ in range(2)])
        self.attn = nn.ModuleList([ViTAttention() for _ in range(2)])
        self.mlp = nn.ModuleList([nn.Sequential(nn.Linear(C_EMB, 64), nn.GELU(), nn.Linear(64, C_EMB)) for _ in range(2)])

    def forward(self, x):
        for ln, attn, mlp in zip(self.ln, self.attn, self.mlp):
            x = x + attn(ln(x))
            x = x + mlp(x)
        return x


# --------------------------------------------------------------------------------------
# Harness: dialects, counting, comparing
# --------------------------------------------------------------------------------------


def capture(module: nn.Module, inputs: Sequence, dialect: str):
    """Trace ``module`` in a graph dialect; returns (GraphModule, example_inputs for it)."""
    inputs = tuple(inputs)
    if dialect == "fx":
        return torch.fx.symbolic_trace(module), inputs
    if dialect == "aten":
        from torch.fx.experimental.proxy_tensor import make_fx
        return make_fx(module)(*inputs), inputs
    if dialect == "aten_symbolic":
        from torch.fx.experimental.proxy_tensor import make_fx
        return make_fx(module, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*inputs), inputs
    if dialect in ("dynamo", "dynamo_dynamic"):
        torch._dynamo.reset()
        rec = []

        def backend(gm, example_inputs):
            rec.append((gm, list(example_inputs)))
            return gm.forward

        compiled = torch.compile(module, backend=backend, fullgraph=True, dynamic=(dialect == "dynamo_dynamic"))
        compiled(*inputs)
        assert len(rec) == 1, f"dynamo produced {len(rec)} graphs"
        gm, raw = rec[0]
        # dynamic graphs take SymInt size inputs: call the graphs with their concrete values, but
        # hand the rewrite exactly what a dynamo backend receives
        gm._attnfuse_test_backend_inputs = raw
        return gm, [int(x.node.hint) if isinstance(x, torch.SymInt) else x for x in raw]
    raise ValueError(dialect)


def _is_fused_target(t) -> bool:
    return "attnfuse.flash_attention" in str(t) or "attnfuse::flash_attention" in str(t)


def _all_graphs(gm):
    yield gm.graph
    for _, sub in gm.named_modules():
        if sub is not gm and isinstance(sub, torch.fx.GraphModule):
            yield sub.graph


def fused_nodes(gm) -> list:
    return [n for g in _all_graphs(gm) for n in g.nodes if n.op == "call_function" and _is_fused_target(n.target)]


_SOFTMAX_TARGETS = {F.softmax, torch.softmax, torch._softmax if hasattr(torch, "_softmax") else F.softmax}


def _is_softmax(gm, n) -> bool:
    if n.op == "call_method":
        return n.target in ("softmax",)
    if n.op == "call_module":
        try:
            return isinstance(gm.get_submodule(n.target), nn.Softmax)
        except AttributeError:
            return False
    if n.op == "call_function":
        if n.target in _SOFTMAX_TARGETS:
            return True
        s = str(n.target)
        return s.startswith("aten._softmax") or s.startswith("aten.softmax") or s.startswith("aten.special_softmax")
    return False


def softmax_nodes(gm) -> list:
    return [n for n in gm.graph.nodes if _is_softmax(gm, n)]


def flat_tensors(out) -> list:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def assert_outputs_close(actual, expected, *, atol=1e-5, rtol=1e-5, msg=""):
    """Compare two (possibly nested) outputs; only where the expected value is finite
    (rows masked entirely with -inf give NaN in eager, 0 in the op)."""
    a, e = flat_tensors(actual), flat_tensors(expected)
    assert len(a) == len(e), f"{msg}: {len(a)} outputs vs {len(e)} expected"
    for i, (x, y) in enumerate(zip(a, e)):
        assert x.shape == y.shape, f"{msg}: output {i} shape {tuple(x.shape)} != {tuple(y.shape)}"
        assert x.dtype == y.dtype, f"{msg}: output {i} dtype {x.dtype} != {y.dtype}"
        fin = torch.isfinite(y)
        torch.testing.assert_close(x[fin], y[fin], atol=atol, rtol=rtol, msg=lambda m: f"{msg}: output {i}: {m}")


def near_miss_kinds(report) -> list:
    return [getattr(nm, "kind", None) for nm in getattr(report, "near_misses", [])]


def run_rewrite(gm, inputs, strict=True):
    import attnfuse
    inputs = getattr(gm, "_attnfuse_test_backend_inputs", inputs)
    return attnfuse.rewrite(gm, list(inputs), strict=strict)


def node_kw(node, name, pos=None, default=None):
    """A fused node's argument by name (kwargs) or schema position."""
    if name in node.kwargs:
        return node.kwargs[name]
    schema_pos = {"q": 0, "k": 1, "v": 2, "bias": 3, "scale": 4, "causal": 5, "dropout_p": 6,
                  "softcap": 7, "seed": 8, "impl": 9}
    p = schema_pos[name] if pos is None else pos
    if p < len(node.args):
        return node.args[p]
    return default


def clone_inputs(inputs):
    return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def check_case(case: Case, dialect: str, *, train: bool = False, strict: bool = True, idempotent: bool = False):
    """The core check shared by the spelling/near-miss/model tests (eval mode).

    Returns (result, n_fused). Raises AssertionError on any violation.
    """
    torch.manual_seed(0)
    mod = case.module()
    mod.train(train)
    inputs = case.inputs()
    with torch.no_grad():
        expected = mod(*clone_inputs(inputs))
    gm, ex = capture(mod, clone_inputs(inputs), dialect)
    with torch.no_grad():
        assert_outputs_close(gm(*clone_inputs(ex)), expected, atol=case.atol, rtol=case.rtol,
                             msg=f"harness: captured {dialect} graph differs from eager")
    n_softmax_before = len(softmax_nodes(gm))
    code_before = gm.code
    result = run_rewrite(gm, clone_inputs(ex), strict=strict)
    out_gm = result.graph_module
    assert isinstance(out_gm, torch.fx.GraphModule), f"result.graph_module is {type(out_gm)}"
    fused = fused_nodes(out_gm)
    kinds = near_miss_kinds(result.report)
    if case.fused_or_reported:
        assert len(fused) in (0, case.fused), f"{len(fused)} fused nodes (expected 0 or {case.fused})"
        assert fused or kinds, "not fused and no near miss reported"
    else:
        assert len(fused) == case.fused, (
            f"expected {case.fused} fused flash_attention node(s), got {len(fused)}; near misses: "
            f"{[(nm.kind, nm.reason) for nm in result.report.near_misses]}")
    with torch.no_grad():
        got = out_gm(*clone_inputs(ex))
    assert_outputs_close(got, expected, atol=case.atol, rtol=case.rtol, msg="rewritten graph output differs")
    # no silent miss: every softmax left in the graph is named by a near miss (its softmax, else its node)
    named = {getattr(nm, "softmax", "") or nm.node for nm in result.report.near_misses}
    silent = [n.name for n in softmax_nodes(out_gm) if n.name not in named]
    assert not silent, f"softmax node(s) {silent} left without a near miss: {result.report.to_text()}"
    if fused:
        left = len(softmax_nodes(out_gm))
        assert left == n_softmax_before - len(fused), f"{left} softmax nodes left after fusing {len(fused)}"
    if not fused:
        assert out_gm.code == code_before, "a graph with nothing to fuse was changed:\n" + out_gm.code
    if case.fused_or_reported:
        pass
    elif case.near_miss and case.near_miss != ("*",):
        assert any(k in case.near_miss for k in kinds), f"expected near miss {case.near_miss}, report has {kinds}"
    elif case.near_miss == ("*",):
        assert kinds, "expected a near miss to be reported, report has none"
    if case.causal is not None and dialect in case.mask_is_state:
        for n in fused:
            assert node_kw(n, "causal") in (None, "none") and node_kw(n, "bias") is not None, \
                f"a mask read from module state was baked in as causal={node_kw(n, 'causal')!r}"
    elif case.causal is not None:
        for n in fused:
            assert node_kw(n, "causal") == case.causal, f"causal={node_kw(n, 'causal')!r}, expected {case.causal!r}"
            assert node_kw(n, "bias") is None or case.bias_ok, \
                f"causal mask should be recognised, not passed as a bias tensor ({node_kw(n, 'bias')})"
    if case.kv_heads is not None:
        seen = fused_call_args(out_gm, ex)
        assert seen, "fused op was not called"
        for args in seen:
            assert args[1].shape[1] == case.kv_heads and args[2].shape[1] == case.kv_heads, (
                f"the op got K/V with {args[1].shape[1]}/{args[2].shape[1]} heads; expected the unrepeated "
                f"{case.kv_heads}")
    if idempotent:
        code1 = out_gm.code
        again = run_rewrite(out_gm, clone_inputs(ex), strict=strict)
        assert len(fused_nodes(again.graph_module)) == len(fused), "second rewrite changed the fused count"
        assert again.graph_module.code == code1, "rewrite is not idempotent: second run changed the graph"
    return result, len(fused)


def fused_call_args(gm, inputs) -> list:
    """Run ``gm`` and record the tensor arguments (q, k, v, bias) of every fused-op call."""
    seen = []

    class Rec(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if _is_fused_target(target):
                names = ("q", "k", "v", "bias")
                got = dict(zip(names, args))
                got.update({n: kwargs[n] for n in names if n in kwargs})
                seen.append(tuple(got.get(n) for n in names))
            return super().call_function(target, args, kwargs)

    with torch.no_grad():
        Rec(gm).run(*clone_inputs(inputs))
    return seen


def check_train_dropout(case: Case, dialect: str, *, n=50, strict=True):
    """Train mode: the attention dropout is fused as dropout_p; the rewritten graph's mean
    output over ``n`` runs equals the eval output (E[dropout(P)] = P) and runs differ."""
    assert case.dropout_p > 0
    torch.manual_seed(0)
    mod = case.module()
    inputs = case.inputs()
    mod.eval()
    with torch.no_grad():
        reference = mod(*clone_inputs(inputs))
    mod.train()
    gm, ex = capture(mod, clone_inputs(inputs), dialect)
    z0, sd0 = dropout_statistics(gm, clone_inputs(ex), reference, n=n)
    assert z0 < 5, f"harness: the captured train graph's mean is off the eval output (|z|={z0:.1f})"
    result = run_rewrite(gm, clone_inputs(ex), strict=strict)
    out_gm = result.graph_module
    fused = fused_nodes(out_gm)
    assert len(fused) == case.fused, (
        f"train mode: expected {case.fused} fused node(s), got {len(fused)}; near misses: "
        f"{[(nm.kind, nm.reason) for nm in result.report.near_misses]}")
    for nd in fused:
        p = node_kw(nd, "dropout_p", default=0.0)
        assert isinstance(p, float) and abs(p - case.dropout_p) < 1e-9, f"dropout_p={p!r}, expected {case.dropout_p}"
        assert node_kw(nd, "seed") is not None, "dropout_p > 0 needs a seed argument"
    z, sd = dropout_statistics(out_gm, clone_inputs(ex), reference, n=n)
    assert z < 5, f"rewritten train graph: mean over {n} runs is off the eval output (|z|={z:.1f})"
    # same dropout rate => same spread (log-ratio standard error ~ 1/sqrt(n) = 14%; runs are seeded)
    assert 0.65 < sd / sd0 < 1.5, f"rewritten train graph's spread differs from the original's ({sd:.4g} vs {sd0:.4g})"
    return result


def dropout_statistics(gm, inputs, reference, *, n=100):
    """Dropout keeps the output's expectation: E[dropout(P)] = P, so the runs of a train graph
    average to the eval output. Per-element z-scores are unreliable here (with few keys an
    element takes only a handful of values), so every run is projected on the reference:
    s_t = <out_t - ref, ref>, a sum over all elements, whose mean must be 0.
    Returns (|z| of mean(s_t), std(s_t)); asserts that dropout actually happens."""
    ref = flat_tensors(reference)[0].double()
    with torch.no_grad():
        outs = torch.stack([flat_tensors(gm(*inputs))[0].double() for _ in range(n)])
    assert outs.std(0).max() > 1e-3, "runs are identical: dropout was not applied"
    s = ((outs - ref) * ref).flatten(1).sum(1)
    z = s.mean() / (s.std() / math.sqrt(n))
    return abs(z.item()), s.std().item()


def intermediate_value(gm: "torch.fx.GraphModule", node, inputs):
    """The value ``node`` (an intermediate of ``gm``'s graph) takes when ``gm`` runs on
    ``inputs``."""
    seen = {}
    interp = torch.fx.Interpreter(gm)
    run_node = interp.run_node

    def spy(n):
        r = run_node(n)
        if n is node:
            seen["v"] = r
        return r
    interp.run_node = spy
    interp.run(*inputs)
    return seen["v"]
