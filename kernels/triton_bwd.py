"""Triton backward kernels of the fused attention op.

Three kernels, as in Triton's fused-attention tutorial, but without atomics:

1. ``_attn_bwd_preprocess`` — one program per (query block, batch × q head):
   ``delta = rowsum(dO ∘ O)`` and the per-row softmax statistics used to rebuild P.
2. ``_attn_bwd_dkdv`` — one program per (key block, batch × kv head).  It loops over
   every query head of its GQA group and every query block and accumulates dK and dV
   in registers: each dK/dV element is written by exactly one program (deterministic).
3. ``_attn_bwd_dq`` — one program per (query block, batch × q head): dQ, and, when
   asked, dS (= dBias, see below).

Gradients (natural units, P the softmax, M the dropout keep-mask, r = 1/(1-p)):
``dV = (P∘M·r)ᵀ dO``, ``dP = (dO Vᵀ)∘M·r``, ``dS = P∘(dP − delta)``.
The bias is added AFTER softcap, so ``dBias = dS``; the raw score ``scale·q·kᵀ`` gets
``dS·(1 − tanh²)`` when softcap is on; ``dQ = scale·dS_raw K``, ``dK = scale·dS_rawᵀ Q``.

Fully masked rows (lse = -inf) get P = 0, hence zero gradients.

Attention sinks need nothing here beyond the forward's lse (it includes the sink, so P
rebuilt from it is the sink-aware P, and delta = rowsum(dO∘O) is unchanged): only the
preprocess kernel's rare recompute path merges the sink into the rebuilt statistics.
The sinks' own gradient, ``-Σ exp(sink - lse)·delta``, is a torch reduction over this delta
in the launcher (``triton_flash.backward``).

ALiBi slopes (constexpr ``ALIBI``) add ``-slope·|i + Lk - Lq - j|`` to every tile's
logits as in the forward (:func:`triton_fwd._add_alibi`); slopes are constants (no
gradient).

Structure (causal, window, key_mask) is handled as in the forward (``triton_fwd``):
the dQ kernel and the preprocess recompute visit only the key blocks of the band of
their query block (:func:`triton_fwd._key_range`), in the dQ kernel narrowed to the
batch item's key bounds (:func:`triton_fwd._clip_to_key_bounds`: no padding key is
loaded), the dK/dV kernel only the query blocks whose band reaches its key block
(:func:`triton_fwd._query_range`); only edge tiles pay for the element mask
(:func:`triton_fwd._tile_is_edge`); a key block whose keys are all masked visits no
query block in the dK/dV kernel (its dK, dV stay 0).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_fwd import (_add_alibi, _alibi_slope, _band_keep, _clip_to_key_bounds, _dot,
                         _dropout_keep, _key_mask_block, _key_range, _logits, _merge_sink,
                         _query_range, _tile_is_edge, _to_log2)

# lse (log2 units) below -HUGE_LSE2 has lost log2(l) to rounding (lse2 = m + log2(l)
# with |m| huge, e.g. rows biased by finfo.min everywhere): those rows get their
# (m, l) recomputed exactly by the preprocess kernel.  2**12: ulp = 2**-11.
HUGE_LSE2 = tl.constexpr(4096.0)


# --------------------------------------------------------------------------------------
# Preprocess: delta = rowsum(dO * O), row statistics (MRow, LRow)
# --------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess(
    Out, DO, Lse, Delta, MRow, LRow, Q, K, Bias, KeyMask, CausalOffsets, Alibi, Sinks,  # Sinks (Hq,) fp32
    stride_oz, stride_oh, stride_om, stride_od,
    stride_doz, stride_doh, stride_dom, stride_dod,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_bz, stride_bh, stride_bm, stride_bn,
    stride_mz, stride_mn,
    stride_az, stride_ah,
    H, GROUP, M, N, D, DV,
    qk_scale, cap_scale, causal_shift, window,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BIAS_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr, KEY_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
    SINKS: tl.constexpr = False,
    ALIBI: tl.constexpr = False,
    ITEM_SHIFT: tl.constexpr = False,
):
    start_m = tl.program_id(0)
    off_zh = tl.program_id(1)
    off_z = off_zh // H
    off_h = off_zh % H
    if ITEM_SHIFT:
        # causal_offsets: this batch item's own diagonal replaces the call's shift
        causal_shift = tl.load(CausalOffsets + off_z)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, HEAD_DV)
    mask_o = (offs_m[:, None] < M) & (offs_dv[None, :] < DV)
    o = tl.load(Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                mask=mask_o, other=0.0).to(tl.float32)
    do = tl.load(DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=mask_o, other=0.0).to(tl.float32)
    row = off_zh.to(tl.int64) * M + offs_m
    tl.store(Delta + row, tl.sum(o * do, 1), mask=offs_m < M)

    # P is rebuilt as exp2((s - MRow) - LRow).  Normally MRow = lse (log2 units), LRow = 0.
    # Fully masked rows: MRow = 0, LRow = +inf, so P = exp2(-inf) = 0.
    lse2 = _to_log2(tl.load(Lse + row, mask=offs_m < M, other=0.0))
    huge = (lse2 < -HUGE_LSE2) & (lse2 != float("-inf"))
    if tl.max(huge.to(tl.int32), 0) > 0:
        # Rare path: recompute the row max and sum exactly (same loop as the forward,
        # without V), so that P keeps its log2(l) even when |m| is huge.
        offs_d = tl.arange(0, HEAD_D)
        off_hk = off_h // GROUP
        q = tl.load(Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
                    + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)
        k_base = K + off_z.to(tl.int64) * stride_kz + off_hk.to(tl.int64) * stride_kh
        b_base = Bias + off_z.to(tl.int64) * stride_bz + off_h.to(tl.int64) * stride_bh
        km_base = KeyMask + off_z.to(tl.int64) * stride_mz
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_first = start_m * BLOCK_M
        m_last = tl.minimum(m_first + BLOCK_M, M) - 1
        lo, hi = _key_range(m_first, m_last, N, causal_shift, window, BLOCK_N,
                            CAUSAL, WINDOW)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=(offs_n[None, :] < N) & (offs_d[:, None] < D), other=0.0)
            qk = _dot(q, kT, DOT_FP32, DOT_PREC)
            b_ptrs = b_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn
            s, t = _logits(qk, offs_m, offs_n, M, N, b_ptrs, qk_scale, cap_scale,
                           BIAS_KIND, SOFTCAP)
            if ALIBI:
                s = _add_alibi(s, _alibi_slope(Alibi, off_z, off_h, stride_az, stride_ah),
                               offs_m, offs_n, N - M)
            # rare path: the full element mask on every tile
            if KEY_MASK:
                km, n_visible = _key_mask_block(km_base + offs_n * stride_mn, offs_n, N)
            else:
                km = offs_n < N
            s = tl.where(_band_keep(offs_m, offs_n, km, causal_shift, window, CAUSAL, WINDOW),
                         s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        if SINKS:  # the lse being rebuilt includes the head's sink, as the forward's
            m_i, l_i, _ = _merge_sink(m_i, l_i, Sinks, off_h)
        empty = l_i == 0.0
        mrow = tl.where(empty, 0.0, m_i)
        lrow = tl.where(empty, float("inf"), tl.log2(tl.where(empty, 1.0, l_i)))
    else:
        empty = lse2 == float("-inf")
        mrow = tl.where(empty, 0.0, lse2)
        lrow = tl.where(empty, float("inf"), 0.0)
    tl.store(MRow + row, mrow, mask=offs_m < M)
    tl.store(LRow + row, lrow, mask=offs_m < M)


# --------------------------------------------------------------------------------------
# dK, dV: one program per (key block, batch × kv head); loops over the GQA group
# --------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Bias, KeyMask, CausalOffsets, Alibi, DO, DK, DV_, MRow, LRow, Delta,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_bz, stride_bh, stride_bm, stride_bn,
    stride_mz, stride_mn,
    stride_az, stride_ah,
    stride_doz, stride_doh, stride_dom, stride_dod,
    stride_dkz, stride_dkh, stride_dkn, stride_dkd,
    stride_dvz, stride_dvh, stride_dvn, stride_dvd,
    H, HKV, GROUP, M, N, D, DV,
    sm_scale, qk_scale, cap_scale, causal_shift, window, dropout_p, seed,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BIAS_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr, KEY_MASK: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
    ALIBI: tl.constexpr = False,
    ITEM_SHIFT: tl.constexpr = False,
):
    start_n = tl.program_id(0)
    off_zk = tl.program_id(1)
    off_z = off_zk // HKV
    off_hk = off_zk % HKV
    if ITEM_SHIFT:
        # causal_offsets: this batch item's own diagonal replaces the call's shift
        causal_shift = tl.load(CausalOffsets + off_z)
    n_first = start_n * BLOCK_N
    n_last = tl.minimum(n_first + BLOCK_N, N) - 1      # last real key of the block
    offs_n = n_first + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)

    k_base = K + off_z.to(tl.int64) * stride_kz + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_z.to(tl.int64) * stride_vz + off_hk.to(tl.int64) * stride_vh
    # K and V tiles stay in registers for the whole program
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=(offs_n[:, None] < N) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=(offs_n[:, None] < N) & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DV], dtype=tl.float32)
    if DROPOUT:
        inv_keep = 1.0 / (1.0 - dropout_p)

    # Causal/window block skipping: only the query blocks [lo, hi) whose band reaches
    # this key block are visited (rows before the causal diagonal of n_first, and with a
    # window rows whose window has slid past n_last, never see it).
    lo, hi = _query_range(n_first, n_last, M, causal_shift, window, BLOCK_M, CAUSAL, WINDOW)
    if KEY_MASK:
        # The key mask is the same for every query row: loaded once.  A key block whose
        # keys are all masked visits no query block (its dK, dV stay 0).
        km, n_visible = _key_mask_block(KeyMask + off_z.to(tl.int64) * stride_mz
                                        + offs_n * stride_mn, offs_n, N)
        hi = tl.where(n_visible > 0, hi, lo)
        km_partial = n_visible < BLOCK_N
    else:
        km = offs_n < N
        km_partial = False

    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        q_base = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
        do_base = DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
        b_base = Bias + off_z.to(tl.int64) * stride_bz + off_h.to(tl.int64) * stride_bh
        row_base = (off_z * H + off_h).to(tl.int64) * M
        if ALIBI:
            slope2 = _alibi_slope(Alibi, off_z, off_h, stride_az, stride_ah)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                         mask=(offs_m[:, None] < M) & (offs_dv[None, :] < DV), other=0.0)
            # rows past M: LRow = +inf -> P = 0
            mrow = tl.load(MRow + row_base + offs_m, mask=offs_m < M, other=0.0)
            lrow = tl.load(LRow + row_base + offs_m, mask=offs_m < M, other=float("inf"))
            delta = tl.load(Delta + row_base + offs_m, mask=offs_m < M, other=0.0)

            qk = _dot(q, tl.trans(k), DOT_FP32, DOT_PREC)             # (BLOCK_M, BLOCK_N)
            b_ptrs = b_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn
            s, t = _logits(qk, offs_m, offs_n, M, N, b_ptrs, qk_scale, cap_scale,
                           BIAS_KIND, SOFTCAP)
            if ALIBI:
                s = _add_alibi(s, slope2, offs_m, offs_n, N - M)
            # the element mask on edge tiles only (see triton_fwd._tile_is_edge)
            edge = _tile_is_edge(start_m, tl.minimum(start_m + BLOCK_M, M) - 1, n_first, N,
                                 causal_shift, window, BLOCK_N, CAUSAL, WINDOW) | km_partial
            if edge:
                s = tl.where(_band_keep(offs_m, offs_n, km, causal_shift, window,
                                        CAUSAL, WINDOW), s, float("-inf"))
            # subtract the max first, then log2(l): exact even when |max| is huge
            p = tl.exp2((s - mrow[:, None]) - lrow[:, None])
            dp = _dot(do, tl.trans(v), DOT_FP32, DOT_PREC).to(tl.float32)
            if DROPOUT:
                keep = _dropout_keep(seed, off_z, off_h, offs_m, n_first, dropout_p,
                                     BLOCK_M, BLOCK_N)
                pd = tl.where(keep, p * inv_keep, 0.0)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            else:
                pd = p
            dv += _dot(tl.trans(pd.to(do.dtype)), do, DOT_FP32, DOT_PREC)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)     # d tanh: bias comes after softcap
            dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_FP32, DOT_PREC)

    dk = dk * sm_scale
    dk_base = DK + off_z.to(tl.int64) * stride_dkz + off_hk.to(tl.int64) * stride_dkh
    dv_base = DV_ + off_z.to(tl.int64) * stride_dvz + off_hk.to(tl.int64) * stride_dvh
    tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_d[None, :] < D))
    tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV_.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_dv[None, :] < DV))


# --------------------------------------------------------------------------------------
# dQ (and dS for dBias): one program per (query block, batch × q head)
# --------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_dq(
    Q, K, V, Bias, KeyMask, KeyBounds, CausalOffsets, Alibi, DO, DQ, DS, MRow, LRow, Delta,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_bz, stride_bh, stride_bm, stride_bn,
    stride_mz, stride_mn, stride_kbz,
    stride_az, stride_ah,
    stride_doz, stride_doh, stride_dom, stride_dod,
    stride_dqz, stride_dqh, stride_dqm, stride_dqd,
    H, GROUP, M, N, D, DV,
    sm_scale, qk_scale, cap_scale, causal_shift, window, dropout_p, seed,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BIAS_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr, KEY_MASK: tl.constexpr,
    DROPOUT: tl.constexpr, NEED_DS: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
    ALIBI: tl.constexpr = False,
    ITEM_SHIFT: tl.constexpr = False,
):
    start_m = tl.program_id(0)
    off_zh = tl.program_id(1)
    off_z = off_zh // H
    off_h = off_zh % H
    off_hk = off_h // GROUP
    if ITEM_SHIFT:
        # causal_offsets: this batch item's own diagonal replaces the call's shift
        causal_shift = tl.load(CausalOffsets + off_z)
    m_first = start_m * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, M) - 1
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)

    q = tl.load(Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=(offs_m[:, None] < M) & (offs_dv[None, :] < DV), other=0.0)
    row = off_zh.to(tl.int64) * M + offs_m
    mrow = tl.load(MRow + row, mask=offs_m < M, other=0.0)
    lrow = tl.load(LRow + row, mask=offs_m < M, other=float("inf"))
    delta = tl.load(Delta + row, mask=offs_m < M, other=0.0)
    k_base = K + off_z.to(tl.int64) * stride_kz + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_z.to(tl.int64) * stride_vz + off_hk.to(tl.int64) * stride_vh
    b_base = (Bias + off_z.to(tl.int64) * stride_bz + off_h.to(tl.int64) * stride_bh
              + offs_m[:, None] * stride_bm)      # this block's bias rows
    km_base = KeyMask + off_z.to(tl.int64) * stride_mz
    # DS: contiguous (B, Hq, M, N) fp32; this block's rows
    ds_base = DS + off_zh.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    if DROPOUT:
        inv_keep = 1.0 / (1.0 - dropout_p)
    if ALIBI:
        slope2 = _alibi_slope(Alibi, off_z, off_h, stride_az, stride_ah)

    # the forward's loop (see _attn_fwd): key blocks [lo, hi) of the band and of the
    # batch item's key bounds, counted from lo, the element mask on edge tiles only;
    # tiles never visited keep dS = 0
    lo, hi = _key_range(m_first, m_last, N, causal_shift, window, BLOCK_N, CAUSAL, WINDOW)
    if KEY_MASK:
        lo, hi = _clip_to_key_bounds(lo, hi, KeyBounds + off_z * stride_kbz, BLOCK_N)
    k_base += lo * stride_kn
    v_base += lo * stride_vn
    b_base += lo * stride_bn
    km_base += lo * stride_mn
    ds_base += lo
    n_rel = hi - lo                     # keys from hi on: past the end, as in _attn_fwd
    shift_rel = causal_shift - lo
    for rel_n in range(0, n_rel, BLOCK_N):
        offs_n = rel_n + offs_n0        # key index - lo
        edge = _tile_is_edge(m_first, m_last, rel_n, n_rel, shift_rel, window,
                             BLOCK_N, CAUSAL, WINDOW)
        if KEY_MASK:
            km, n_visible = _key_mask_block(km_base + offs_n * stride_mn, offs_n, n_rel)
            edge = edge | (n_visible < BLOCK_N)
        else:
            km = offs_n < n_rel
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(offs_n[:, None] < n_rel) & (offs_d[None, :] < D), other=0.0)
        vT = tl.load(v_base + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                     mask=(offs_n[None, :] < n_rel) & (offs_dv[:, None] < DV), other=0.0)
        qk = _dot(q, tl.trans(k), DOT_FP32, DOT_PREC)
        b_ptrs = b_base + offs_n[None, :] * stride_bn
        s, t = _logits(qk, offs_m, offs_n, M, n_rel, b_ptrs, qk_scale, cap_scale,
                       BIAS_KIND, SOFTCAP)
        if ALIBI:
            s = _add_alibi(s, slope2, offs_m, offs_n, N - M - lo)
        if edge:
            s = tl.where(_band_keep(offs_m, offs_n, km, shift_rel, window, CAUSAL, WINDOW),
                         s, float("-inf"))
        p = tl.exp2((s - mrow[:, None]) - lrow[:, None])
        dp = _dot(do, vT, DOT_FP32, DOT_PREC).to(tl.float32)
        if DROPOUT:
            keep = _dropout_keep(seed, off_z, off_h, offs_m, lo + rel_n, dropout_p,
                                 BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        if NEED_DS:
            # dBias = dS (bias is added after softcap).  Simplest correct scheme: write
            # the full (B, Hq, Lq, Lk) fp32 dS; the launcher sums the broadcast dims.
            tl.store(ds_base + offs_n[None, :], ds,
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < n_rel))
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(ds.to(k.dtype), k, DOT_FP32, DOT_PREC)

    dq = dq * sm_scale
    tl.store(DQ + off_z.to(tl.int64) * stride_dqz + off_h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_d[None, :] < D))
