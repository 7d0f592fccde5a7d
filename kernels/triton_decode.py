"""Flash-decoding: the forward of the fused attention op for a few query rows against a
long key/value sequence (a KV cache), split over the key axis and then combined.

The main forward (``triton_fwd._attn_fwd``) runs one program per (query block, batch ×
query head).  With Lq <= 16 that is only B·Hq programs, each walking the whole KV
sequence alone — a few dozen programs on a 132-SM GPU — and every query head of a GQA
group re-reads the same K/V.  This module owns the decode path that fixes both:

1. ``_attn_decode_split`` — one program per (key split, batch × kv head, row block).
   The G = Hq / Hkv query heads that share a kv head and their Lq query rows are packed
   into the M dimension of one tile (row ``r`` = head ``r // Lq`` of the group, query
   ``r % Lq``): G·Lq rows fill the MMA tile that Lq alone would leave mostly empty, and
   K/V are read once per kv head instead of once per query head.  Each program runs the
   online softmax over one contiguous chunk of keys and writes its un-normalised
   partial state — row max ``m`` (log2 units), row sum ``l`` and accumulator ``acc`` —
   in fp32 to a scratch buffer.
2. ``_attn_decode_combine`` — one program per block of (batch, query head, query row)
   rows: rescales the partial states of all splits to their common max, sums them, and
   writes ``out`` (q's dtype) and ``lse`` (fp32, natural log).  Attention sinks
   (``SINKS``: one logit per query head) join each row's merged state here, once
   (``triton_fwd._merge_sink``): the split kernel is the plain one.

The contract is exactly that of :func:`triton_flash.forward` (same logits, same lse
convention, rows that see no key give ``out = 0`` and ``lse = -inf``, finite huge
negatives clamped as in ``triton_fwd._to_log2``), so the backward kernels use the lse
returned here unchanged.  Masks: bias (any broadcast, stride 0), ``causal``
(top_left / bottom_right), ``window`` (query i sees key j iff
``i + off - window < j <= i + off``) and ``key_mask`` (B or 1, Lk), True = visible.
Key blocks that lie outside the causal/window band of every row of a program, or
outside the batch item's key bounds [first visible key, last visible key]
(``triton_fwd._clip_to_key_bounds``: a split wholly in the padding runs no iteration
and writes the empty state), are never visited, and a key block whose key_mask is all
False is skipped before K/V are loaded.
ALiBi slopes (``ALIBI``) add ``-slope·|i + Lk - Lq - j|`` per tile, one slope per packed
row (its query head), as in ``triton_fwd._add_alibi``.
No dropout: :func:`decode_applicable` is False then and the caller uses the main kernel.

Why the partial state is (m, l, acc) and not (normalised out, lse) as in some
flash-decoding implementations: with a ``finfo.min`` bias, ``lse = m + log2(l)`` has
lost ``log2(l)`` to rounding, so combining splits by their lse alone would weigh them
wrongly; ``exp2(m_s - m) · l_s`` keeps every split's weight exact.

Number of splits (:func:`num_splits`): enough programs to give each of the ~132 SMs of an
H100 two of them (``TARGET_PROGRAMS``), but never a split shorter than
``max(MIN_SPLIT_KEYS, 16 · packed rows)`` keys: the scratch traffic of a split is
about 8·rows·Dv bytes against ≥ 2·split·Dv·itemsize bytes of K/V, so this bounds it to
~1/8 of the K/V traffic (fp16).  Splits cover only the keys some row can see
(the causal/window band), in chunks that are multiples of 128 keys; the last split is
ragged.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import triton_launch as _tl   # shared with triton_flash, which imports this module
from .triton_fwd import LN2, LOG2E, _add_alibi, _clip_to_key_bounds, _dot, _merge_sink, _scores

__all__ = [
    "decode_applicable", "decode_forward", "num_splits", "decode_block_m", "decode_block_ms",
    "decode_split_configs", "decode_combine_configs", "DECODE_KERNEL_CONFIGS",
    "DECODE_MAX_LQ", "DECODE_MIN_LK",
]

DECODE_MAX_LQ = 16        # query rows per head handled by the decode path
DECODE_MIN_LK = 256       # below this the main forward walks <= 4 key blocks per program
TARGET_PROGRAMS = 2 * 132        # two resident programs per H100 SM
MAX_SPLITS = 128
MIN_SPLIT_KEYS = 256
SPLIT_ALIGN = 128         # split length is a multiple of this (of every BLOCK_N in the table)
COMBINE_BLOCK_R = 16      # rows per combine program

# Interpreter (CPU tests): small blocks and short splits, so several splits and a
# ragged last split are exercised at Lk ~ 100-300.  benchmarks/kernel_io.py replaces
# this plan with the GPU one (BLOCK_N of the first config, GPU split heuristic) to count
# the GPU launch's memory traffic in the interpreter.
INTERPRETER_PLAN = {"BLOCK_N": 16, "align": 16, "min_split": 32}


# --------------------------------------------------------------------------------------
# Phase 1: one chunk of keys for all packed rows of one kv head
# --------------------------------------------------------------------------------------

@triton.jit
def _attn_decode_split(
    Q, K, V, Bias, KeyMask, KeyBounds, CausalOffsets, Alibi, PartM, PartL, PartAcc,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_bz, stride_bh, stride_bm, stride_bn,   # 0 along broadcast (size-1) bias dims
    stride_mz, stride_mn,                          # key_mask; stride_mz 0 when broadcast
    stride_kbz,                                    # KeyBounds (B|1, 2); 0 when broadcast
    stride_az, stride_ah,                          # ALiBi slopes; stride_az 0 for (Hq,)
    HKV, GROUP, M, N, D, DV,                       # GROUP = Hq // Hkv, M = Lq, N = Lk
    kv_lo, split_len, n_splits,                    # split s covers [kv_lo + s·len, +len)
    qk_scale, cap_scale, causal_shift, window,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BIAS_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr, KEY_MASK: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
    ALIBI: tl.constexpr = False,
    ITEM_SHIFT: tl.constexpr = False,
):
    split = tl.program_id(0)
    off_zk = tl.program_id(1)          # batch × kv head
    start_r = tl.program_id(2) * BLOCK_M
    off_z = off_zk // HKV
    off_hk = off_zk % HKV
    if ITEM_SHIFT:
        # causal_offsets: this batch item's own diagonal replaces the call's shift
        causal_shift = tl.load(CausalOffsets + off_z)

    # Packed rows: row r of this kv head is query head off_hk·GROUP + r // M, query r % M.
    # Padding rows (r >= GROUP·M) get query index M: _scores then treats them like rows
    # past the end (bias not loaded), and they are never stored.
    rows = start_r + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * M
    offs_i = tl.where(row_ok, rows % M, M)
    offs_g = tl.where(row_ok, rows // M, 0)        # query head within the group
    off_h0 = (off_hk * GROUP).to(tl.int64)         # first query head of the group
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)

    # Per-row offsets are int32 from an int64 scalar base (the group's first head): a
    # (BLOCK_M, BLOCK_N) tile of 64-bit pointers built from per-row int64 bases costs
    # twice the registers and spilled.
    q_rows = offs_g * stride_qh + offs_i * stride_qm
    q = tl.load(Q + off_z.to(tl.int64) * stride_qz + off_h0 * stride_qh
                + q_rows[:, None] + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + off_z.to(tl.int64) * stride_kz + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_z.to(tl.int64) * stride_vz + off_hk.to(tl.int64) * stride_vh
    # each packed row has its own (head, query) bias row
    b_base = Bias + off_z.to(tl.int64) * stride_bz + off_h0 * stride_bh
    b_rows = offs_g * stride_bh + offs_i * stride_bm
    km_base = KeyMask + off_z.to(tl.int64) * stride_mz
    if ALIBI:   # one slope per packed row: the row's query head
        slopes2 = tl.load(Alibi + off_z.to(tl.int64) * stride_az
                          + (off_h0 + offs_g) * stride_ah) * LOG2E

    # Keys of this split, narrowed to the batch item's key bounds (a split that lies in
    # the padding does no work) and to the causal/window band of the rows of this block:
    # no row sees a key above i_max + shift, nor (window) at or below i_min + shift - window.
    lo = kv_lo + split * split_len
    hi = tl.minimum(lo + split_len, N)
    if KEY_MASK:
        lo, hi = _clip_to_key_bounds(lo, hi, KeyBounds + off_z * stride_kbz, BLOCK_N)
    if CAUSAL:
        i_max = tl.max(tl.where(row_ok, offs_i, 0), 0)
        hi = tl.minimum(hi, i_max + causal_shift + 1)
        if WINDOW:
            i_min = tl.min(offs_i, 0)        # padding rows hold M > every real row
            lo = tl.maximum(lo, i_min + causal_shift - window + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)   # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DV], dtype=tl.float32)

    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        # keys past hi belong to the next split (or do not exist): passing hi as the
        # key count makes _scores mask them and skip their bias loads
        if KEY_MASK:
            km = tl.load(km_base + offs_n * stride_mn, mask=offs_n < hi, other=0)
            visit = tl.max(km.to(tl.int32), 0) > 0    # skip blocks with no visible key
        else:
            visit = True
        if visit:
            kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=(offs_n[None, :] < hi) & (offs_d[:, None] < D), other=0.0)
            qk = _dot(q, kT, DOT_FP32, DOT_PREC)
            b_ptrs = b_base + (b_rows[:, None] + offs_n[None, :] * stride_bn)
            s, t = _scores(qk, offs_i, offs_n, M, hi, b_ptrs, qk_scale, cap_scale,
                           causal_shift, CAUSAL, BIAS_KIND, SOFTCAP)
            if ALIBI:
                s = _add_alibi(s, slopes2[:, None], offs_i, offs_n, N - M)
            if WINDOW:
                s = tl.where(offs_n[None, :] > offs_i[:, None] + causal_shift - window,
                             s, float("-inf"))
            if KEY_MASK:
                s = tl.where(km[None, :] != 0, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows that have seen only -inf: subtract 0, not -inf (no NaN)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=(offs_n[:, None] < hi) & (offs_dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32, DOT_PREC)
            m_i = m_new

    # Scratch row of packed row r: (z·Hkv + hk)·GROUP·M + r == (z·Hq + h)·M + i, the row
    # of lse.  A split that saw no key writes m = -inf, l = 0, acc = 0.  Again an int64
    # scalar base plus int32 offsets: an int64 (BLOCK_M, HEAD_DV) pointer tile, hoisted
    # above the loop by the compiler, stays live across it and spills.
    p_base = (off_zk.to(tl.int64) * GROUP * M + start_r) * n_splits + split
    p_rows = (rows - start_r) * n_splits
    tl.store(PartM + p_base + p_rows, m_i, mask=row_ok)
    tl.store(PartL + p_base + p_rows, l_i, mask=row_ok)
    tl.store(PartAcc + p_base * DV + (p_rows[:, None] * DV + offs_dv[None, :]), acc,
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))


# --------------------------------------------------------------------------------------
# Phase 2: merge the splits of each row
# --------------------------------------------------------------------------------------

@triton.jit
def _attn_decode_combine(
    PartM, PartL, PartAcc, Out, Lse, Sinks,        # Sinks (Hq,) fp32, read if SINKS
    R, DV, n_splits,                               # R = B·Hq·Lq rows; Out contiguous
    H, M,                                          # row r is query head (r // M) % H
    HEAD_DV: tl.constexpr, BLOCK_R: tl.constexpr,
    SINKS: tl.constexpr = False,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    offs_dv = tl.arange(0, HEAD_DV)
    mask_o = row_ok[:, None] & (offs_dv[None, :] < DV)
    prow = rows.to(tl.int64) * n_splits

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DV], dtype=tl.float32)
    for s in range(0, n_splits):
        # online merge, as between key blocks: rescale both sides to the new max
        m_s = tl.load(PartM + prow + s, mask=row_ok, other=float("-inf"))
        l_s = tl.load(PartL + prow + s, mask=row_ok, other=0.0)
        a_s = tl.load(PartAcc + (prow + s)[:, None] * DV + offs_dv[None, :], mask=mask_o,
                      other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        beta = tl.exp2(m_s - m_safe)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m_i = m_new

    if SINKS:  # the row's head sink joins the merged state (no value row)
        m_i, l_i, alpha = _merge_sink(m_i, l_i, Sinks, (rows // M) % H)
        acc = acc * alpha[:, None]
    # rows that saw no key in any split (l = 0; with a finite sink l >= 1): out = 0,
    # lse = -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)   # natural log
    tl.store(Out + rows.to(tl.int64)[:, None] * DV + offs_dv[None, :],
             out.to(Out.dtype.element_ty), mask=mask_o)
    tl.store(Lse + rows, lse, mask=row_ok)


# --------------------------------------------------------------------------------------
# Configs.  Split kernel: (BLOCK_N, num_warps, num_stages) per (padded head-dim class,
# element width) and tile height BLOCK_M, which is not tuned but set by the packed row
# count (decode_block_m) up to the largest height listed.  Every entry compiles for
# sm_80 and sm_90 with no register spills and shared memory within the per-block
# limits, with every feature on (causal, window, float bias, softcap, key_mask, ALiBi):
# benchmarks/kernel_resources.py.  The heights and tiles that spilled there are left
# out (e.g. BLOCK_M 64 beyond head dim 64 fp16; BLOCK_M 32 with fp32 "tf32x3" dots).
# --------------------------------------------------------------------------------------

_SPLIT_TABLE = {
    (64, 16): {16: [(64, 8, 2), (32, 4, 2)], 32: [(64, 8, 2), (32, 4, 2)],
               64: [(32, 8, 2), (16, 4, 2)]},
    (128, 16): {16: [(64, 8, 2), (32, 8, 2)], 32: [(32, 8, 2), (16, 4, 2)]},
    (256, 16): {16: [(32, 8, 2), (16, 4, 2)], 32: [(16, 8, 1)]},
    (64, 32): {16: [(32, 8, 2)]},     # 64 w8 spilled 12 B on sm_80 with ALiBi (issue 22)
    (128, 32): {16: [(32, 8, 2), (16, 4, 2)],  # 32 w4 spilled 12 B (ALiBi)
                32: [(32, 8, 2), (16, 4, 2)]},
    (256, 32): {16: [(32, 8, 2), (16, 4, 2)], 32: [(16, 8, 1)]},
}
_COMBINE_WARPS = 4


def _split_key(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    return _tl._head_dim_class(head_dim), 32 if dtype == torch.float32 else 16


def decode_block_ms(head_dim: int, dtype: torch.dtype) -> list:
    """The tile heights the split kernel has configs for at (head dim, dtype)."""
    return sorted(_SPLIT_TABLE[_split_key(head_dim, dtype)])


def decode_split_configs(head_dim: int, dtype: torch.dtype, heavy: bool = False, *,
                         block_m: int) -> list:
    """Autotune configs of the split kernel for (head dim, dtype, BLOCK_M); one list for
    every mask variant (``heavy`` is accepted for symmetry with ``triton_flash``)."""
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in _SPLIT_TABLE[_split_key(head_dim, dtype)][block_m]]


def decode_combine_configs(head_dim: int, dtype: torch.dtype, heavy: bool = False) -> list:
    """The combine kernel's one config (it is light: BLOCK_R x HEAD_DV fp32 values)."""
    return [triton.Config({"BLOCK_R": COMBINE_BLOCK_R}, num_warps=_COMBINE_WARPS, num_stages=1)]


# kernel name -> (jit function, config-list function), for the benchmarks
DECODE_KERNEL_CONFIGS = {
    "attn_decode_split": (_attn_decode_split, decode_split_configs),
    "attn_decode_combine": (_attn_decode_combine, decode_combine_configs),
}

# N is deliberately not a tuning key: it grows by one every decoding step
_TUNE_KEY = ["HEAD_D", "HEAD_DV", "BLOCK_M", "CAUSAL", "WINDOW", "BIAS_KIND", "SOFTCAP",
             "KEY_MASK", "ALIBI"]


@functools.lru_cache(maxsize=None)
def _tuned_split(head_dim: int, dtype: torch.dtype, block_m: int):
    return triton.autotune(configs=decode_split_configs(head_dim, dtype, block_m=block_m),
                           key=_TUNE_KEY)(_attn_decode_split)


def decode_block_m(packed_rows: int, head_dim: int, dtype: torch.dtype) -> int:
    """Tile height for ``packed_rows`` = G·Lq rows: the next power of two >= 16, capped
    at the largest height with configs for (head dim, dtype); more rows are spread over
    several row blocks, each re-reading its split of K/V."""
    want = max(16, triton.next_power_of_2(int(packed_rows)))
    return min(want, decode_block_ms(head_dim, dtype)[-1])


def num_splits(n_keys: int, programs_per_split: int, *, packed_rows: int = 1,
               align: int = SPLIT_ALIGN, min_split: Optional[int] = None) -> tuple[int, int]:
    """``(splits, split_len)`` for ``n_keys`` keys when each split launches
    ``programs_per_split`` programs (B·Hkv·row blocks).

    Enough splits to reach ``TARGET_PROGRAMS`` programs (two per H100 SM), at most
    ``MAX_SPLITS``, and none shorter than ``min_split`` keys (default
    ``max(MIN_SPLIT_KEYS, 16 · packed_rows)``, which keeps the scratch traffic of the
    partial states under ~1/8 of the K/V traffic).  ``split_len`` is a multiple of
    ``align``; ``splits = cdiv(n_keys, split_len)``, so no split is empty and the last
    one may be short.
    """
    if n_keys <= 0:
        return 1, align
    if min_split is None:
        min_split = max(MIN_SPLIT_KEYS, 16 * int(packed_rows))
    want = triton.cdiv(TARGET_PROGRAMS, max(1, int(programs_per_split)))
    splits = max(1, min(want, n_keys // min_split, MAX_SPLITS))
    split_len = triton.cdiv(triton.cdiv(n_keys, splits), align) * align
    return triton.cdiv(n_keys, split_len), split_len


def decode_applicable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      dropout_p: float) -> bool:
    """True when :func:`decode_forward` should replace the main forward: no dropout,
    at most ``DECODE_MAX_LQ`` query rows, at least ``DECODE_MIN_LK`` keys, head dims
    the kernels support (1..256)."""
    if dropout_p != 0.0 or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    return (1 <= q.shape[2] <= DECODE_MAX_LQ and k.shape[2] >= DECODE_MIN_LK
            and 1 <= q.shape[3] <= 256 and 1 <= v.shape[3] <= 256)



def decode_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   bias: Optional[torch.Tensor], *, scale: float, causal: str,
                   softcap: float, window: int = 0, key_mask: Optional[torch.Tensor] = None,
                   splits: Optional[int] = None,
                   sinks: Optional[torch.Tensor] = None,
                   alibi_slopes: Optional[torch.Tensor] = None,
                   causal_offsets: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV attention forward; same arguments and result as
    :func:`triton_flash.forward` without dropout, plus ``window`` and ``key_mask``.

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), any strides; bias None or
    4-D broadcastable to (B, Hq, Lq, Lk) (float: added; bool: True = keep).  Returns
    ``(out, lse)``: out (B, Hq, Lq, Dv) contiguous in q's dtype, lse (B, Hq, Lq) fp32
    natural log; rows that see no key give out = 0, lse = -inf.  ``splits`` overrides
    the number of key splits (tests); by default :func:`num_splits` decides.  ``sinks``
    None or (Hq,) float: attention sinks, merged by the combine kernel.
    On CPU tensors it runs in Triton's interpreter (``TRITON_INTERPRET=1`` before
    import) with one small fixed config.
    """
    B, Hq, M, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[3]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    st = _tl._structure(q, k, causal, window, key_mask, causal_offsets)   # validates; drops a no-op window
    c = _tl._common(q, k, v, scale, causal, softcap, st["ITEM_SHIFT"])
    window, km_t, km_s, has_km = st["window"], st["km"], st["km_strides"], st["KEY_MASK"]
    kb_t, kb_s = st["kb"], st["kb_stride"]
    out = torch.empty((B, Hq, M, Dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, M), device=q.device, dtype=torch.float32)
    if B * Hq * M == 0:
        return out, lse
    # keys that some row may see: (off - window, M - 1 + off] with off the causal shift
    shift = c["causal_shift"]
    kv_lo, kv_hi = 0, N
    if c["CAUSAL"] and not st["ITEM_SHIFT"]:   # per-item shifts: each program clips its own
        kv_hi = min(N, M + shift)
        if window:
            kv_lo = max(0, shift - window + 1)
    if kv_hi <= kv_lo:
        return _tl._no_key_result(out, lse, sinks)

    interp = _tl._interpreted()
    if q.device.type != ("cpu" if interp else "cuda"):
        raise _tl.device_error(q.device)
    group = Hq // Hkv
    hd = max(D, Dv)
    block_m = decode_block_m(group * M, hd, q.dtype)
    row_blocks = triton.cdiv(group * M, block_m)
    align = INTERPRETER_PLAN["align"] if interp else SPLIT_ALIGN
    kv_lo = (kv_lo // align) * align          # aligned start: whole blocks per split
    n_keys = kv_hi - kv_lo
    if splits is None:
        n_splits, split_len = num_splits(
            n_keys, B * Hkv * row_blocks, packed_rows=group * M, align=align,
            min_split=INTERPRETER_PLAN["min_split"] if interp else None)
    else:
        if not isinstance(splits, int) or splits < 1:
            raise ValueError(f"splits must be an int >= 1, got {splits!r}")
        split_len = triton.cdiv(triton.cdiv(n_keys, splits), align) * align
        n_splits = triton.cdiv(n_keys, split_len)

    R = B * Hq * M
    part_m = torch.empty((R, n_splits), device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((R, n_splits, Dv), device=q.device, dtype=torch.float32)
    b_t, b_s, bias_kind = _tl._bias_args(bias, q)
    a_t, a_s, alibi = _tl._alibi_args(alibi_slopes, B, Hq, q)
    if interp:
        kern, meta = _attn_decode_split, {"BLOCK_N": INTERPRETER_PLAN["BLOCK_N"]}
    else:
        kern, meta = _tuned_split(_tl.padded_head_dim(hd), q.dtype, block_m), {}
    kern[(n_splits, B * Hkv, row_blocks)](
        q, k, v, b_t, km_t, kb_t, st["offsets"], a_t, part_m, part_l, part_acc,
        *q.stride(), *k.stride(), *v.stride(), *b_s, *km_s, kb_s, *a_s,
        Hkv, group, M, N, D, Dv,
        kv_lo, split_len, n_splits,
        c["qk_scale"], c["cap_scale"], shift, int(window),
        HEAD_D=_tl.padded_head_dim(D), HEAD_DV=_tl.padded_head_dim(Dv),
        BLOCK_M=block_m, CAUSAL=c["CAUSAL"], WINDOW=bool(window), BIAS_KIND=bias_kind,
        SOFTCAP=c["SOFTCAP"], KEY_MASK=has_km,
        DOT_FP32=c["DOT_FP32"], DOT_PREC=c["DOT_PREC"], ALIBI=alibi,
        ITEM_SHIFT=st["ITEM_SHIFT"], **meta,
    )
    extra = {} if interp else {"num_warps": _COMBINE_WARPS}
    sk_t, has_sinks = _tl._sinks_args(sinks, q, lse)
    _attn_decode_combine[(triton.cdiv(R, COMBINE_BLOCK_R),)](
        part_m, part_l, part_acc, out, lse, sk_t, R, Dv, n_splits, Hq, M,
        HEAD_DV=_tl.padded_head_dim(Dv), BLOCK_R=COMBINE_BLOCK_R, SINKS=has_sinks, **extra,
    )
    return out, lse
