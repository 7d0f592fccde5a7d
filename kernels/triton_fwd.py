"""Triton forward kernel of the fused attention op, and the helpers it shares with
the backward kernels (``triton_bwd``).

Semantics (per batch ``z``, query head ``h``, query row ``i``, key ``j``)::

    logit[i, j] = softcap(scale * q[i]·k[j]) + bias[i, j]      (softcap(s) = c·tanh(s/c))
    logit[i, j] = -inf where the structure hides key j from query i:
                  causal   j > i + off            (off = 0 top-left, Lk - Lq bottom-right)
                  window   j <= i + off - window  (only with causal; WINDOW constexpr)
                  key_mask key_mask[z, j] False   (a (B|1, Lk) key-padding mask; KEY_MASK)
    logit[i, j] -= slope[z, h] * |i + Lk - Lq - j|    (ALiBi slopes (Hq,)|(B, Hq); ALIBI)
    p = softmax(logit, over j); p = dropout(p); out[i] = Σ_j p[i, j] v[j]

Structure is never materialised as an (Lq, Lk) mask: the causal/window band becomes
loop bounds (:func:`_key_range`, :func:`_query_range`: key blocks outside the band of a
whole query block are never visited), the element mask is applied only on tiles that
cross the band's edge or the end of the keys (:func:`_tile_is_edge`, the tutorial's
diagonal-block trick), and the key mask is loaded once per key block
(:func:`_key_mask_block`).  ALiBi is computed per tile from the row and key indices
and one slope per program (:func:`_alibi_slope`, :func:`_add_alibi`): it reads no
(Lq, Lk) tensor.  Key blocks that the key mask hides entirely are skipped
where that is cheap.  The key loops of the forward, dQ and decode kernels are
narrowed to each batch item's key bounds, [first visible key, last visible key]
(:func:`_clip_to_key_bounds`, bounds computed by the launcher): padding at the end
(right padding) or the start (left padding) of the keys is never loaded.  The dK/dV
kernel skips every fully masked key block whole.  A fully masked block BETWEEN visible
keys (a hole) is still loaded, computed and masked in the forward and dQ loops: a
per-tile branch around the dots cost up to ~450 B of register spills and broke the
software pipelining of the K/V loads (benchmarks/kernel_resources.py).  (The backward
preprocess kernel's rare recompute path, taken only for rows of huge negative logits,
masks every tile of the band and is not clipped.)

The kernel works in base 2: every logit is kept in "log2 units" (``logit * log2(e)``),
so the softmax uses ``exp2`` and the factor log2(e) is folded into the q·kᵀ scale.

Edge rows (documented contract):

* A row whose logits are ALL ``-inf`` (fully masked by a bool/-inf bias, or seeing no
  key through causal/window/key_mask, e.g. bottom-right causal with Lq > Lk) has no
  defined softmax (eager gives NaN).  Here it gives ``out = 0``, ``lse = -inf`` and
  zero gradients.
* Attention sinks (``SINKS``: one logit per query head, gpt-oss) join each row's
  online-softmax state once, after its key loop (:func:`_merge_sink`): the loop is the
  plain kernel's, no extra load per tile.  A row that sees no key then gives
  ``out = 0``, ``lse = sink``.
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
def _logits(qk, offs_m, offs_n, M, N, bias_ptrs, qk_scale, cap_scale,
            BIAS_KIND: tl.constexpr, SOFTCAP: tl.constexpr):
    """Raw ``q·kᵀ`` tile (fp32) -> logits in log2 units before any structural mask,
    plus the ``tanh`` values.

    Without softcap, ``qk_scale = scale * log2(e)``.  With softcap ``c``,
    ``qk_scale = scale / c`` and ``cap_scale = c * log2(e)``; the returned ``t`` is the
    tanh (the backward needs ``1 - t²``).  Bias (BIAS_KIND 1: float, added; 2: bool,
    False -> -inf) is loaded through strides, so broadcast dims cost nothing (stride 0).
    Keys past N are NOT masked here (see :func:`_band_keep`).
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
    return s, t


@triton.jit
def _alibi_slope(Alibi, off_z, off_h, stride_az, stride_ah):
    """This program's ALiBi slope in log2 units (stride_az 0 for (Hq,) slopes)."""
    return tl.load(Alibi + off_z.to(tl.int64) * stride_az + off_h * stride_ah) * LOG2E


@triton.jit
def _add_alibi(s, slope2, offs_m, offs_n, alibi_shift):
    """``s - slope2 * |i + alibi_shift - j|`` on a tile (log2 units).  alibi_shift is
    Lk - Lq when keys are counted from 0 (less the loop's key origin when they are
    counted from it); slope2 a scalar or a (BLOCK_M, 1) column."""
    dist = (offs_m[:, None] + alibi_shift) - offs_n[None, :]
    return s - slope2 * tl.abs(dist).to(tl.float32)


@triton.jit
def _band_keep(offs_m, offs_n, col_ok, causal_shift, window,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Bool tile: the key's column is usable (``col_ok``: j < N, and the key mask) and
    the key lies in the causal/window band of row i, ``i + shift - window < j <= i + shift``
    (shift = 0 top-left, N - M bottom-right)."""
    keep = col_ok[None, :]
    if CAUSAL:
        if WINDOW:
            # dist = how far key j lies back from row i's diagonal; visible iff
            # 0 <= dist < window.  As one unsigned compare: a negative dist (above the
            # diagonal) wraps to a huge value.  One compare per element, like causal alone.
            dist = (offs_m[:, None] + causal_shift) - offs_n[None, :]
            keep = keep & (dist.to(tl.uint32) < window.to(tl.uint32))
        else:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
    return keep


@triton.jit
def _scores(qk, offs_m, offs_n, M, N, bias_ptrs, qk_scale, cap_scale, causal_shift,
            CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, SOFTCAP: tl.constexpr):
    """:func:`_logits` with keys past N and keys above the causal diagonal set to -inf
    on every tile (the decode kernel's entry point)."""
    s, t = _logits(qk, offs_m, offs_n, M, N, bias_ptrs, qk_scale, cap_scale,
                   BIAS_KIND, SOFTCAP)
    keep = _band_keep(offs_m, offs_n, offs_n < N, causal_shift, 0, CAUSAL, False)
    return tl.where(keep, s, float("-inf")), t


@triton.jit
def _key_range(m_first, m_last, N, causal_shift, window, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[lo, hi): the keys some row of m_first..m_last can see, lo aligned to BLOCK_N.

    Causal block skipping: no row sees a key above the last row's diagonal
    (m_last + shift).  Window: no row sees a key at or below the first row's window
    edge (m_first + shift - window), so the loop starts at the key block holding the
    first key inside it.  Blocks outside [lo, hi) are never loaded."""
    lo = 0
    hi = N
    if CAUSAL:
        hi = tl.maximum(tl.minimum(N, m_last + causal_shift + 1), 0)
        if WINDOW:
            lo = (tl.maximum(m_first + causal_shift - window + 1, 0) // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _query_range(n_first, n_last, M, causal_shift, window, BLOCK_M: tl.constexpr,
                 CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[lo, hi): the query rows that can see some key of n_first..n_last, lo aligned to
    BLOCK_M (the dK/dV kernel's loop bounds; the transpose of :func:`_key_range`).

    Causal: rows i < n_first - shift see none of these keys.  Window: row i sees key j
    only if j > i + shift - window, so rows i >= n_last - shift + window see none."""
    lo = 0
    hi = M
    if CAUSAL:
        lo = (tl.maximum(n_first - causal_shift, 0) // BLOCK_M) * BLOCK_M
        if WINDOW:
            hi = tl.maximum(tl.minimum(M, n_last - causal_shift + window), 0)
    return lo, hi


@triton.jit
def _tile_is_edge(m_first, m_last, start_n, N, causal_shift, window,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """True when the tile (rows m_first..m_last, keys start_n..start_n + BLOCK_N - 1)
    needs the element mask of :func:`_band_keep`: it runs past N, or crosses the band's
    edge.  The band is monotone in the row, so checking the corners is enough: the
    first row must see the last key (causal diagonal), the last row the first key
    (window edge).  Tiles strictly inside the band skip the mask, like the tutorial's
    off-diagonal blocks.  (Rows past M are never stored, and get P = 0 in the backward,
    so they need no mask.)  Only differences of key and row indices matter, so keys
    may be counted from any origin, shifting N and causal_shift by the same amount."""
    edge = start_n + BLOCK_N > N
    if CAUSAL:
        edge = edge | (start_n + BLOCK_N - 1 > m_first + causal_shift)
        if WINDOW:
            edge = edge | (start_n <= m_last + causal_shift - window)
    return edge


@triton.jit
def _key_mask_block(km_ptrs, offs_n, N):
    """The key_mask of one key block as a bool vector (keys past N: False) and the
    number of visible keys in it (0: the tile can be skipped; < BLOCK_N: masked)."""
    km = tl.load(km_ptrs, mask=offs_n < N, other=0) != 0
    return km, tl.sum(km.to(tl.int32), 0)


@triton.jit
def _clip_to_key_bounds(lo, hi, kb_ptr, BLOCK_N: tl.constexpr):
    """[lo, hi) narrowed to this batch item's key bounds [kv_lo, kv_hi) = [first visible
    key, last visible key + 1], two int32 at ``kb_ptr`` (``triton_launch._key_bounds``;
    kv_hi <= kv_lo when no key is visible, and then hi <= lo: the loop runs no
    iteration).  Key blocks wholly before kv_lo or from kv_hi on are hidden by the key
    mask: never loaded.  lo stays a multiple of BLOCK_N, kv_lo is rounded DOWN: the
    loops, the edge-tile test and the dropout counters (start_n % 4 == 0) assume
    block-aligned starts; the keys before kv_lo in that first block are masked as now."""
    kv_lo = tl.load(kb_ptr)
    kv_hi = tl.load(kb_ptr + 1)
    lo = tl.maximum(lo, (kv_lo // BLOCK_N) * BLOCK_N)
    hi = tl.minimum(hi, kv_hi)
    return lo, hi


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


@triton.jit
def _merge_sink(m_i, l_i, Sinks, off_h):
    """Online-softmax state (m_i, l_i) (log2 units) of a row after its sink joined it:
    the sink is one more logit of its query head, with no value row, so it adds
    ``exp2(sink - m)`` to the sum and nothing to the accumulator.  Returns
    (m, l, alpha), alpha the rescale of the accumulator (the max may have grown).
    Done once per row, after the key loop (the loop itself is the plain kernel's).
    A row that saw no key (m_i = -inf, l_i = 0) ends with m = sink, l = 1: out 0,
    lse = sink."""
    sink = _to_log2(tl.load(Sinks + off_h).to(tl.float32))
    m_new = tl.maximum(m_i, sink)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a -inf sink on an empty row
    alpha = tl.exp2(m_i - m_safe)
    l_new = l_i * alpha + tl.exp2(sink - m_safe)
    return m_new, l_new, alpha


# --------------------------------------------------------------------------------------
# Forward kernel
# --------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd(
    Q, K, V, Bias, KeyMask, KeyBounds, CausalOffsets, Alibi, Out, Lse, Sinks,  # Sinks (Hq,) fp32
    # CausalOffsets (B,) int32, if ITEM_SHIFT: the causal shift of each batch item
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_bz, stride_bh, stride_bm, stride_bn,   # 0 along broadcast (size-1) bias dims
    stride_mz, stride_mn,                          # key_mask; stride_mz 0 when broadcast
    stride_kbz,                                    # KeyBounds (B|1, 2); 0 when broadcast
    stride_az, stride_ah,                          # ALiBi slopes; stride_az 0 for (Hq,)
    stride_oz, stride_oh, stride_om, stride_od,
    H, GROUP, M, N, D, DV,                         # H = query heads, GROUP = Hq // Hkv
    qk_scale, cap_scale, causal_shift, window, dropout_p, seed,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,   # head dims padded to a power of 2 >= 16
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BIAS_KIND: tl.constexpr,
    SOFTCAP: tl.constexpr, KEY_MASK: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
    SINKS: tl.constexpr = False,
    ALIBI: tl.constexpr = False,
    ITEM_SHIFT: tl.constexpr = False,
):
    start_m = tl.program_id(0)
    off_zh = tl.program_id(1)
    off_z = off_zh // H
    off_h = off_zh % H
    off_hk = off_h // GROUP            # GQA/MQA: kv head shared by GROUP query heads
    if ITEM_SHIFT:
        # causal_offsets: this batch item's own diagonal replaces the call's shift
        causal_shift = tl.load(CausalOffsets + off_z)
    if ALIBI:
        slope2 = _alibi_slope(Alibi, off_z, off_h, stride_az, stride_ah)
    m_first = start_m * BLOCK_M
    m_last = tl.minimum(m_first + BLOCK_M, M) - 1      # last real row of the block
    offs_m = m_first + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    # int64 base offsets: B·H·L·D can exceed 2**31 elements
    q_base = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    k_base = K + off_z.to(tl.int64) * stride_kz + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_z.to(tl.int64) * stride_vz + off_hk.to(tl.int64) * stride_vh
    b_base = (Bias + off_z.to(tl.int64) * stride_bz + off_h.to(tl.int64) * stride_bh
              + offs_m[:, None] * stride_bm)      # this block's bias rows
    km_base = KeyMask + off_z.to(tl.int64) * stride_mz
    o_base = Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh

    # padded head-dim columns load as 0, so they add nothing to q·kᵀ
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < M) & (offs_d[None, :] < D), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)   # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                  # running sum of exp2
    acc = tl.zeros([BLOCK_M, HEAD_DV], dtype=tl.float32)

    # Causal/window block skipping: only the key blocks [lo, hi) that intersect the band
    # of some row of this query block are visited.  The loop counts keys from lo: the
    # base pointers and the bounds are shifted once here (absolute key offsets built
    # from a runtime lo cost ~250 B of register spills in the loop, compiled offline).
    # (int32 products, like the per-key offsets below.)
    lo, hi = _key_range(m_first, m_last, N, causal_shift, window, BLOCK_N, CAUSAL, WINDOW)
    if KEY_MASK:
        # padding skipping: no key before this batch item's first visible key or after
        # its last one is visited (rows of an item that sees no key: no iteration)
        lo, hi = _clip_to_key_bounds(lo, hi, KeyBounds + off_z * stride_kbz, BLOCK_N)
    k_base += lo * stride_kn
    v_base += lo * stride_vn
    b_base += lo * stride_bn
    km_base += lo * stride_mn
    # Keys from hi on are hidden from every row of the block (above the causal band, or
    # after the batch item's last visible key): they count as past the end, so the
    # last tile neither loads nor stores them.
    n_rel = hi - lo                     # keys the loop sees, counted from lo
    shift_rel = causal_shift - lo       # row i's diagonal, counted from lo
    for rel_n in range(0, n_rel, BLOCK_N):
        offs_n = rel_n + offs_n0        # key index - lo
        # Only tiles on the band's edges (the causal diagonal, the window's lower edge,
        # the ragged end of the keys) or with masked keys pay for the element mask.
        edge = _tile_is_edge(m_first, m_last, rel_n, n_rel, shift_rel, window,
                             BLOCK_N, CAUSAL, WINDOW)
        if KEY_MASK:
            km, n_visible = _key_mask_block(km_base + offs_n * stride_mn, offs_n, n_rel)
            edge = edge | (n_visible < BLOCK_N)
        else:
            km = offs_n < n_rel
        # K loaded transposed (HEAD_D, BLOCK_N) straight from its strides
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(offs_n[None, :] < n_rel) & (offs_d[:, None] < D), other=0.0)
        qk = _dot(q, kT, DOT_FP32, DOT_PREC)
        b_ptrs = b_base + offs_n[None, :] * stride_bn     # b_base: the block's bias rows
        s, t = _logits(qk, offs_m, offs_n, M, n_rel, b_ptrs, qk_scale, cap_scale,
                       BIAS_KIND, SOFTCAP)
        if ALIBI:
            s = _add_alibi(s, slope2, offs_m, offs_n, N - M - lo)
        if edge:
            s = tl.where(_band_keep(offs_m, offs_n, km, shift_rel, window, CAUSAL, WINDOW),
                         s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen only -inf, m_new = -inf and s - m_new would be NaN:
        # subtract 0 instead (exp2(-inf - 0) = 0, as wanted).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)      # rescale of the old accumulator (0 at start)
        l_i = l_i * alpha + tl.sum(p, 1)   # the normaliser ignores dropout
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = _dropout_keep(seed, off_z, off_h, offs_m, lo + rel_n, dropout_p,
                                 BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)     # 1 / (1 - p) is applied once, in the epilogue
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=(offs_n[:, None] < n_rel) & (offs_dv[None, :] < DV), other=0.0)
        acc += _dot(p.to(v.dtype), v, DOT_FP32, DOT_PREC)
        m_i = m_new

    if SINKS:
        # the head's sink joins the denominator once, after the loop (no value row)
        m_i, l_i, alpha = _merge_sink(m_i, l_i, Sinks, off_h)
        acc = acc * alpha[:, None]
    # Rows that saw no key (l = 0; with a finite sink l >= 1): out = 0, lse = -inf.
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
