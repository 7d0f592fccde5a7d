"""Triton forward kernel of the fused attention op, and the helpers it shares with
the backward kernels (``triton_bwd``).

Semantics (per batch ``z``, query head ``h``, query row ``i``, key ``j``)::

    logit[i, j] = softcap(scale * q[i]·k[j]) + bias[i, j]      (softcap(s) = c·tanh(s/c))
    logit[i, j] = -inf where the causal mask hides key j from query i
    p = softmax(logit, over j); p = dropout(p); out[i] = Σ_j p[i, j] v[j]

The kernel works in base 2: every logit is kept in "log2 units" (``logit * log2(e)``),
so the softmax uses ``exp2`` and the factor log2(e) is folded into the q·kᵀ scale.

Edge rows (documented contract):

* A row whose logits are ALL ``-inf`` (fully masked by a bool/-inf bias or by the
  causal mask, e.g. bottom-right causal with Lq > Lk) has no defined softmax (eager
  gives NaN).  Here it gives ``out = 0``, ``lse = -inf`` and zero gradients.
* A row whose logits are all large FINITE negatives (e.g. a bias of
  ``torch.finfo(dtype).min`` everywhere, as Hugging Face masks do) gives what eager
  softmax gives: the uniform average of the row.  ``finfo.min * log2(e)`` overflows to
  ``-inf`` in fp32, so finite values are clamped at -2.35e38 before the conversion
  to log2 units (:func:`_to_log2`) and never become ``-inf``.

Kernel layout follows Triton's fused-attention tutorial: one program per
(query block, batch × head), online softmax over key blocks.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.random import philox, uint_to_uniform_float

LOG2E = tl.constexpr(1.4426950408889634)     # log2(e): natural units -> log2 units
LN2 = tl.constexpr(0.6931471805599453)       # ln(2):   log2 units -> natural units
TWO_LOG2E = tl.constexpr(2.8853900817779268)  # 2*log2(e), for tanh via exp2
MIN_NAT = tl.constexpr(-2.35e38)              # lowest finite logit kept (natural units)


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------

@triton.jit
def _tanh(x):
    # tanh from exp2 (libdevice.tanh is not available in the interpreter):
    # tanh(x) = 1 - 2 / (e^{2x} + 1).  At x -> +inf, exp2 -> inf and the result is
    # exactly 1; at x -> -inf, exp2 -> 0 and the result is exactly -1: no NaN.
    return 1.0 - 2.0 / (tl.exp2(x * TWO_LOG2E) + 1.0)


@triton.jit
def _to_log2(x):
    # natural units -> log2 units without turning large finite negatives into -inf:
    # finfo.min * log2(e) overflows fp32, so finite values are clamped at MIN_NAT first
    # (MIN_NAT * log2(e) ≈ -3.39e38 still fits) and only a true -inf stays -inf.
    return tl.where(x == float("-inf"), float("-inf"), tl.maximum(x, MIN_NAT) * LOG2E)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr):
    # DOT_FP32 is only set under TRITON_INTERPRET=1 with bf16 inputs: the interpreter
    # computes bf16 tl.dot wrongly (triton #11584).  On GPU it is False: zero cost.
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PREC)
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _scores(qk, offs_m, offs_n, M, N, bias_ptrs, qk_scale, cap_scale, causal_shift,
            CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, SOFTCAP: tl.constexpr):
    """Raw ``q·kᵀ`` tile (fp32) -> final logits in log2 units, plus ``tanh`` values.

    Without softcap, ``qk_scale = scale * log2(e)``.  With softcap ``c``,
    ``qk_scale = scale / c`` and ``cap_scale = c * log2(e)``; the returned ``t`` is the
    tanh (the backward needs ``1 - t²``).  Bias (BIAS_KIND 1: float, added; 2: bool,
    False -> -inf) is loaded through strides, so broadcast dims cost nothing (stride 0).
    Keys past N and keys above the causal diagonal become -inf.
    """
    if SOFTCAP:
        t = _tanh(qk * qk_scale)
        s = t * cap_scale
    else:
        t = qk
        s = qk * qk_scale
    in_bounds = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if BIAS_KIND == 1:
        b = tl.load(bias_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
        s = s + _to_log2(b)
    elif BIAS_KIND == 2:
        keep = tl.load(bias_ptrs, mask=in_bounds, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    valid = offs_n[None, :] < N
    if CAUSAL:
        # top_left: shift = 0; bottom_right: shift = N - M (key j visible iff j <= i + shift)
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
    s = tl.where(valid, s, float("-inf"))
    return s, t


@triton.jit
def _dropout_keep(seed, off_z, off_h, offs_m, start_n, dropout_p,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Counter-based RNG (Philox, what tl.rand uses) keyed on (seed, b, h, i, j).  One
    # Philox call yields 4 numbers, used for 4 neighbouring keys: element (i, j) takes
    # output j % 4 of counter (j // 4, i, b, h).  So no two elements of one launch share
    # a random number whatever B·H·Lq·Lk is, the mask does not depend on the tiling
    # (BLOCK_N is a multiple of 4), and the backward regenerates exactly the same mask.
    # Generating 4 per call also cuts the register cost of the Philox state by 4.
    offs_c = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    c0 = (offs_c[None, :] + 0 * offs_m[:, None]).to(tl.uint32)
    c1 = (offs_m[:, None] + 0 * offs_c[None, :]).to(tl.uint32)
    c2 = c0 * 0 + off_z.to(tl.uint32)
    c3 = c0 * 0 + off_h.to(tl.uint32)
    r0, r1, r2, r3 = philox(seed, c0, c1, c2, c3)
    # (BLOCK_M, BLOCK_N // 4, 2, 2) -> (BLOCK_M, BLOCK_N): key 4t + k gets output k
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_M, BLOCK_N))
    return uint_to_uniform_float(r) >= dropout_p   # keep with probability 1 - p


# --------------------------------------------------------------------------------------
# Forward kernel
# --------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd(
    Q, K, V, Bias, Out, Lse,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_bz, stride_bh, stride_bm, stride_bn,   # 0 along broadcast (size-1) bias dims
    stride_oz, stride_oh, stride_om, stride_od,
    H, GROUP, M, N, D, DV,                         # H = query heads, GROUP = Hq // Hkv
    qk_scale, cap_scale, causal_shift, dropout_p, seed,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,   # head dims padded to a power of 2 >= 16
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_zh = tl.program_id(1)
    off_z = off_zh // H
    off_h = off_zh % H
    off_hk = off_h // GROUP            # GQA/MQA: kv head shared by GROUP query heads
    # int64 base offsets: B·H·L·D can exceed 2**31 elements
    q_base = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    k_base = K + off_z.to(tl.int64) * stride_kz + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_z.to(tl.int64) * stride_vz + off_hk.to(tl.int64) * stride_vh
    b_base = Bias + off_z.to(tl.int64) * stride_bz + off_h.to(tl.int64) * stride_bh
    o_base = Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)

    # padded head-dim columns load as 0, so they add nothing to q·kᵀ
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)   # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DV], dtype=tl.float32)

    # Causal block skipping: key blocks entirely above the diagonal for every row of this
    # query block are never loaded.  The last visible key of the block's last row is
    # (start_m + 1) * BLOCK_M - 1 + causal_shift.
    hi = N
    if CAUSAL:
        hi = tl.maximum(tl.minimum(N, (start_m + 1) * BLOCK_M + causal_shift), 0)

    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        # K loaded transposed (HEAD_D, BLOCK_N) straight from its strides
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(offs_n[None, :] < N) & (offs_d[:, None] < D), other=0.0)
        qk = _dot(q, kT, DOT_FP32, DOT_PREC)
        b_ptrs = b_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn
        s, t = _scores(qk, offs_m, offs_n, M, N, b_ptrs, qk_scale, cap_scale, causal_shift,
                       CAUSAL, BIAS_KIND, SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen only -inf, m_new = -inf and s - m_new would be NaN:
        # subtract 0 instead (exp2(-inf - 0) = 0, as wanted).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)      # rescale of the old accumulator (0 at start)
        l_i = l_i * alpha + tl.sum(p, 1)   # the normaliser ignores dropout
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _dropout_keep(seed, off_z, off_h, offs_m, start_n, dropout_p, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)     # 1 / (1 - p) is applied once, in the epilogue
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=(offs_n[:, None] < N) & (offs_dv[None, :] < DV), other=0.0)
        acc += _dot(p.to(v.dtype), v, DOT_FP32, DOT_PREC)
        m_i = m_new

    # Fully masked rows (l = 0): out = 0, lse = -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)   # natural log
    tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_dv[None, :] < DV))
    tl.store(Lse + off_zh.to(tl.int64) * M + offs_m, lse, mask=offs_m < M)
