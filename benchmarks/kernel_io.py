"""Global-memory traffic of the fused attention kernels, counted in Triton's interpreter,
against the minimum, FlashAttention-2's IO model for the same tiles, and unfused attention.

    .venv/bin/python benchmarks/kernel_io.py [--sizes 256,512,1024] [--dim 64] [--causal]
                                             [--padded 0.4] [--alibi]
                                             [--decode-sizes 4096,16384] [--decode-lq 1,16]
                                             [--sinks] [--static-cache]

Counting: every ``tl.load`` / ``tl.store`` executed by the interpreter is intercepted and
the bytes of its masked-in elements are added up per kernel (each program's loads are
counted, as a GPU without cache hits would issue them: K/V re-reads by different query
blocks count; nothing is deduplicated).  The kernels run with the FIRST autotune config
of the GPU config list for (d, fp16) — the tile sizes decide how often K/V are re-read —
not with the small interpreter test config; the decode path runs with its GPU launch
plan (first split-kernel config, GPU split heuristic).

Training shapes: B = H = 1, Lq = Lk = N, d = dv, no bias, no dropout, fp16 (es = 2 bytes),
causal top-left with ``--causal``.  Columns, per direction and length:

* ``minimum``: read q, k, v once and write o once (forward); read q, k, v, o, dO once
  and write dq, dk, dv once (backward).
* ``FA2 model``: what FlashAttention-2 moves with the SAME tiles as our kernels.  Br, Bc
  below are our BLOCK_M, BLOCK_N: the forward's for the forward, the dK/dV kernel's
  for the backward.  Tr = ⌈N/Br⌉ query blocks, Tc = ⌈N/Bc⌉ key blocks; "visited" pairs
  (i, j) are all Tr·Tc pairs, or with causal those whose key block starts at or before
  the block's last query row (the blocks both FA2 and our kernels skip otherwise);
  r_i, c_j the row counts of blocks (the last one may be short).

  Forward — FA2 paper, Algorithm 1: each query block reads Q_i once and every visited
  K_j, V_j; O_i and the row log-sum-exp L_i (fp32) are written once::

      fwd = es·N·d  +  Σ_visited (i,j) es·c_j·(d + dv)  +  es·N·dv  +  4·N

  Backward — FA2 paper, Algorithm 2, as the flash-attn CUDA kernels implement it for
  sm80/sm90 (non-deterministic mode): a preprocess pass D = rowsum(dO∘O); one kernel
  whose outer loop is over key blocks (K_j, V_j read once, dK_j, dV_j written once) and
  whose inner loop reads Q_i, dO_i, L_i, D_i for every visited query block and adds its
  dQ_i contribution into an fp32 accumulator in global memory with atomicAdd (a read
  and a write of 4·r_i·d bytes per visited pair); a final pass converts dQ to es::

      bwd = [es·N·dv·2 + 4·N]                                   preprocess: O, dO -> D
          + es·N·(d + dv)·2                                     K, V read; dK, dV written
          + Σ_visited (i,j) r_i·(es·(d + dv) + 8 + 8·d)         Q_i, dO_i, L_i, D_i, dQ_i RMW
          + N·d·(4 + es)                                        dQ fp32 -> es

  This variant is modelled because it is FA2's own algorithm: the alternative with
  a separate dQ pass over the keys (no atomics, what our kernels do, as Triton's
  tutorial) is our own design, so measuring against it would be circular.  Our
  backward trades FA2's fp32 dQ read-modify-write per visited pair (8·d bytes per row)
  for a second read of K and V per query block in the dQ kernel (es·(d+dv) bytes per
  key) plus the re-read of Q, dO and the row statistics there.  The target is
  measured / FA2 ≤ 1.2.
* ``unfused``: also writes and reads the N×N score and probability matrices: forward
  S = QKᵀ (write), softmax (read S, write P), P·V (read P); backward dV = Pᵀ dO (read P),
  dP = dO Vᵀ (write), dS = P∘(dP − δ) (read P, dP; write dS), dQ = dS K and dK = dSᵀ Q
  (read dS twice).

Padded shapes (``--padded F``, replaces the training table): the same shapes with a
key_mask that hides the last F of the keys (right padding, as Hugging Face batches of
different lengths).  Bytes READ by the forward and the dQ kernel are measured twice:
"after", as the kernels run (their key loops clipped to the key bounds of the mask,
``triton_launch._key_bounds``), and "before", with those bounds forced to [0, Lk): the
loops then visit every key block of the band and mask the padding element-wise, which
is what the kernels did before the bounds existed (plus the 8 bytes of bounds each
program now loads).  ``FA2 fwd read`` is the READ part
of the forward model above (Q once, the visited K_j, V_j) for the real keys only (c_j
and the visited pairs counted over the first Lk·(1 - F) keys: what a varlen FA2 reads);
our forward also reads the key mask (1 byte per key it visits) and 8 bytes of key
bounds per program.

Attention sinks (``--sinks``, replaces the other tables): the training shapes (B = 1,
Hq = 4, Hkv = 2, fp16, causal with ``--causal``) and one decode shape per
``--decode-sizes`` (Lq = 1) run twice, without and with ``sinks`` (one fp32 logit per
query head): bytes read and written per kernel.  The sink is merged once per row after
the key loop, so the kernels read 4 bytes more per program (the head's sink) and nothing
more per tile; the backward kernels are the plain ones (the sink is in the lse), except
the preprocess's rare recompute path, not taken here.  The sinks' own gradient is a torch
reduction in the launcher (``base.sinks_grad`` over the preprocess's delta and the lse:
8 bytes per row), listed as "dsinks (torch)".

Decode shapes (``--decode-sizes``): B = 1, Hq = 8, Hkv = 2 (GQA groups of 4), Lq in
``--decode-lq``, Lk = N, fp16, causal bottom-right.  The flash-decoding path
(``triton_decode``) and the main forward on the same input are compared with the
minimum: read q, k, v once, write o once and lse (fp32) once.  The decode path's excess
is the fp32 scratch of the split partial states (written by the split kernel, read by
the combine kernel): 2·4·(dv + 2) bytes per row per split.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"   # before the kernel modules are imported

import argparse
import collections
import math
import sys
import time

import numpy as np
import torch
from triton.runtime import interpreter as _interp

from attnfuse.kernels import triton_decode as td
from attnfuse.kernels import triton_flash as tf
from attnfuse.kernels import triton_launch as tl

_counts = collections.Counter()
_current = ["?"]


def _install_counters():
    builder_cls = _interp.InterpreterBuilder
    orig_load = builder_cls.create_masked_load
    orig_store = builder_cls.create_masked_store
    orig_call = _interp.GridExecutor.__call__

    def load(self, ptrs, mask, other, *a, **k):
        itemsize = np.dtype(_interp._get_np_dtype(ptrs.get_element_ty())).itemsize
        _counts[(_current[0], "read")] += int(np.count_nonzero(mask.data)) * itemsize
        return orig_load(self, ptrs, mask, other, *a, **k)

    def store(self, ptrs, value, mask, *a, **k):
        _counts[(_current[0], "write")] += int(np.count_nonzero(mask.data)) * value.data.itemsize
        return orig_store(self, ptrs, value, mask, *a, **k)

    def call(self, *a, **k):
        _current[0] = self.fn.__name__
        return orig_call(self, *a, **k)

    builder_cls.create_masked_load = load
    builder_cls.create_masked_store = store
    _interp.GridExecutor.__call__ = call


def _use_gpu_configs():
    """Run each kernel with the first config of its GPU autotune list."""
    orig = tf._launcher

    def launcher(name, device, head_dim, dt, heavy):
        fn, meta = orig(name, device, head_dim, dt, heavy)
        cfg = tf.KERNEL_CONFIGS[name][1](head_dim, dt, heavy)[0]
        return fn, dict(cfg.kwargs)

    tf._launcher = launcher


def _use_gpu_decode_plan(head_dim, dtype, block_m):
    """The decode path's GPU launch plan: first split config, GPU split heuristic."""
    cfg = td.decode_split_configs(head_dim, dtype, block_m=block_m)[0]
    td.INTERPRETER_PLAN = {"BLOCK_N": cfg.kwargs["BLOCK_N"], "align": td.SPLIT_ALIGN,
                           "min_split": None}
    return cfg


# --------------------------------------------------------------------------------------
# FlashAttention-2 IO model (see the module docstring)
# --------------------------------------------------------------------------------------

def _visited(n_q, n_k, block_q, block_k, causal):
    """[(rows of query block i, keys of key block j)] for every pair the algorithm visits
    (top-left causal: key block j is visited iff it starts at or before the last row
    of query block i)."""
    pairs = []
    for i0 in range(0, n_q, block_q):
        r = min(block_q, n_q - i0)
        for j0 in range(0, n_k, block_k):
            if causal and j0 > i0 + r - 1:
                break
            pairs.append((r, min(block_k, n_k - j0)))
    return pairs


def fa2_forward_bytes(n, d, dv, es, block_m, block_n, causal=False, n_keys=None):
    """``n`` queries against ``n_keys`` keys (default ``n``)."""
    kv = sum(c * (d + dv) * es
             for _, c in _visited(n, n if n_keys is None else n_keys, block_m, block_n, causal))
    return es * n * d + kv + es * n * dv + 4 * n


def fa2_backward_bytes(n, d, dv, es, block_m, block_n, causal=False):
    pre = es * n * dv * 2 + 4 * n
    kv = es * n * (d + dv) * 2
    inner = sum(r * (es * (d + dv) + 8 + 8 * d)
                for r, _ in _visited(n, n, block_m, block_n, causal))
    convert = n * d * (4 + es)
    return pre + kv + inner + convert


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------

def _split(cnt):
    rd = sum(v for (_, kind), v in cnt.items() if kind == "read")
    wr = sum(v for (_, kind), v in cnt.items() if kind == "write")
    return rd, wr


def _measure(n, d, dtype, causal, key_mask=None, alibi_slopes=None, bias=None):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, d, generator=g).to(dtype) for _ in range(3))
    scale = 1 / math.sqrt(d)
    mode = "top_left" if causal else "none"
    kw = dict(scale=scale, causal=mode, dropout_p=0.0, softcap=0.0, seed=0, key_mask=key_mask)
    if alibi_slopes is not None:
        kw["alibi_slopes"] = alibi_slopes
    _counts.clear()
    t0 = time.time()
    out, lse = tf.forward(q, k, v, bias, **kw)
    fwd = dict(_counts)
    _counts.clear()
    tf.backward(torch.randn_like(out), q, k, v, bias, out, lse, need_dbias=False, **kw)
    bwd = dict(_counts)
    return fwd, bwd, time.time() - t0


def _training_table(sizes, d, dtype, es, causal):
    cf = {n: tf.KERNEL_CONFIGS[n][1](d, dtype, False)[0].kwargs for n in tf.KERNEL_CONFIGS}
    print(f"configs (first of each autotune list, d={d}, fp16): {cf}")
    fbm, fbn = cf["attn_fwd"]["BLOCK_M"], cf["attn_fwd"]["BLOCK_N"]
    bbm, bbn = cf["attn_bwd_dkdv"]["BLOCK_M"], cf["attn_bwd_dkdv"]["BLOCK_N"]
    print(f"FA2 model tiles: forward Br={fbm} Bc={fbn}; backward Br={bbm} Bc={bbn}"
          f"{'; causal top-left' if causal else ''}")
    hdr = (f"{'N':>5} {'pass':<4} {'kernel bytes':>13} {'read':>11} {'write':>11} "
           f"{'minimum':>11} {'FA2 model':>11} {'unfused':>11} {'x min':>6} {'x FA2':>6} "
           f"{'/ unfused':>9}")
    print(hdr)
    print("-" * len(hdr))
    worst = 0.0
    for n in sizes:
        fwd, bwd, secs = _measure(n, d, dtype, causal)
        nd, nn = n * d * es, n * n * es
        rows = {
            "fwd": (fwd, 4 * nd, fa2_forward_bytes(n, d, d, es, fbm, fbn, causal),
                    4 * nd + 4 * nn),
            "bwd": (bwd, 8 * nd, fa2_backward_bytes(n, d, d, es, bbm, bbn, causal),
                    7 * nd + 7 * nn),
        }
        for name, (cnt, minimum, fa2, unfused) in rows.items():
            rd, wr = _split(cnt)
            tot = rd + wr
            worst = max(worst, tot / fa2)
            print(f"{n:>5} {name:<4} {tot:>13,} {rd:>11,} {wr:>11,} {minimum:>11,} "
                  f"{fa2:>11,} {unfused:>11,} {tot / minimum:>6.2f} {tot / fa2:>6.2f} "
                  f"{tot / unfused:>9.3f}")
        per = ", ".join(f"{kn} {kind} {v:,}" for (kn, kind), v in sorted({**fwd, **bwd}.items()))
        print(f"      per kernel/kind: {per}  ({secs:.1f}s in the interpreter)")
    print(f"worst measured / FA2 model: {worst:.2f} (target <= 1.2)")
    return worst


def _alibi_table(sizes, d, dtype, causal):
    """Bytes of the ALiBi variant (slopes (1,), the term computed per tile) against the
    plain kernels and against ALiBi as a materialised (1, 1, N, N) bias (before)."""
    print(f"ALiBi: bytes moved per pass, d={d}, fp16{', causal top-left' if causal else ''}")
    hdr = (f"{'N':>5} {'pass':<4} {'plain':>12} {'alibi':>12} {'alibi-plain':>11} "
           f"{'materialised bias':>17} {'alibi/plain':>11}")
    print(hdr)
    print("-" * len(hdr))
    worst = 0
    for n in sizes:
        slopes = torch.tensor([0.25])
        i = torch.arange(n, dtype=torch.float32)
        dense = (-(0.25 * (i[:, None] - i[None, :]).abs())).to(dtype)[None, None]
        runs = [_measure(n, d, dtype, causal),
                _measure(n, d, dtype, causal, alibi_slopes=slopes),
                _measure(n, d, dtype, causal, bias=dense)]
        for p, name in enumerate(("fwd", "bwd")):
            plain, alibi, mat = (sum(r[p].values()) for r in runs)
            worst = max(worst, alibi - plain)
            print(f"{n:>5} {name:<4} {plain:>12,} {alibi:>12,} {alibi - plain:>11,} "
                  f"{mat:>17,} {alibi / plain:>11.4f}")
    print(f"largest extra bytes of the ALiBi variant over the plain kernels: {worst:,} "
          "(4 B per program: its slope)")
    return worst


def _full_key_bounds(key_mask):
    """[0, Lk) for every row: the key loops are not clipped ("before")."""
    rows, n = key_mask.shape
    return torch.tensor([[0, n]] * rows, dtype=torch.int32, device=key_mask.device)


def _padded_table(sizes, d, dtype, es, causal, padded):
    cf = {n: tf.KERNEL_CONFIGS[n][1](d, dtype, False)[0].kwargs for n in tf.KERNEL_CONFIGS}
    print(f"configs (first of each autotune list, d={d}, fp16): {cf}")
    fbm, fbn = cf["attn_fwd"]["BLOCK_M"], cf["attn_fwd"]["BLOCK_N"]
    print(f"right padding: the last {padded:.0%} of the keys masked by a (1, Lk) key_mask; "
          f"bytes READ per kernel, before = key bounds forced to [0, Lk), after = clipped"
          f"{'; causal top-left' if causal else ''}")
    hdr = (f"{'N':>5} {'real':>5} {'kernel':<8} {'read before':>12} {'read after':>12} "
           f"{'after/before':>12} {'FA2 fwd read':>13} {'after x FA2':>11}")
    print(hdr)
    print("-" * len(hdr))
    for n in sizes:
        real = n - int(round(n * padded))
        key_mask = torch.zeros(1, n, dtype=torch.bool)
        key_mask[:, :real] = True
        real_bounds = tl._key_bounds
        tl._key_bounds = _full_key_bounds
        try:
            fwd_b, bwd_b, _ = _measure(n, d, dtype, causal, key_mask)
        finally:
            tl._key_bounds = real_bounds
        fwd_a, bwd_a, secs = _measure(n, d, dtype, causal, key_mask)
        # the model's reads: all of it but the writes of O (es·N·dv) and L (4·N)
        fa2 = fa2_forward_bytes(n, d, d, es, fbm, fbn, causal, n_keys=real) - es * n * d - 4 * n
        for kname, before, after in (("fwd", fwd_b, fwd_a), ("dQ", bwd_b, bwd_a)):
            kn = "_attn_fwd" if kname == "fwd" else "_attn_bwd_dq"
            rb, ra = before.get((kn, "read"), 0), after.get((kn, "read"), 0)
            model = f"{fa2:>13,} {ra / fa2:>11.2f}" if kname == "fwd" else f"{'-':>13} {'-':>11}"
            print(f"{n:>5} {real:>5} {kname:<8} {rb:>12,} {ra:>12,} {ra / rb:>12.3f} {model}")
        per = ", ".join(f"{kn} {kind} {v:,}"
                        for (kn, kind), v in sorted({**fwd_a, **bwd_a}.items()))
        print(f"      after, per kernel/kind: {per}  ({secs:.1f}s in the interpreter)")


def _static_cache_table(sizes, d, dtype):
    """A static KV cache's prefill from position 0 (issue 18, category 10): N queries, a
    cache of 2N slots (the last N empty), its (1, 1, N, 2N) fp16 mask given as the bias
    (0 / finfo.min), as the rewrite emits it on GPU: the bias plus the key mask derived from
    the mask (before), and also plus the causal band derived from it (after:
    ``causal_offsets`` = 0). Bytes READ per pass; same results (max |out diff| printed)."""
    print(f"static-cache prefill: N queries, 2N cache slots, (1, 1, N, 2N) mask as the bias, "
          f"d={d}, fp16; bytes READ per pass")
    hdr = (f"{'N':>5} {'pass':<4} {'bias+key mask':>14} {'+causal offsets':>16} {'after/before':>12}")
    print(hdr)
    print("-" * len(hdr))
    for n in sizes:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 1, n, d, generator=g).to(dtype)
        k, v = (torch.randn(1, 1, 2 * n, d, generator=g).to(dtype) for _ in range(2))
        keep = torch.arange(2 * n)[None, :] <= torch.arange(n)[:, None]
        bias = torch.zeros(1, 1, n, 2 * n).masked_fill(~keep, torch.finfo(dtype).min).to(dtype)
        key_mask = keep.any(0)[None]
        reads, outs = [], []
        for offsets in (None, torch.zeros(1, dtype=torch.int32)):
            kw = dict(scale=1 / math.sqrt(d), causal="none", dropout_p=0.0, softcap=0.0, seed=0,
                      key_mask=key_mask, causal_offsets=offsets)
            _counts.clear()
            out, lse = tf.forward(q, k, v, bias, **kw)
            fwd = _split(_counts)[0]
            _counts.clear()
            tf.backward(torch.ones_like(out), q, k, v, bias, out, lse, need_dbias=False, **kw)
            reads.append((fwd, _split(_counts)[0]))
            outs.append(out.float())
        for p, name in enumerate(("fwd", "bwd")):
            before, after = reads[0][p], reads[1][p]
            print(f"{n:>5} {name:<4} {before:>14,} {after:>16,} {after / before:>12.3f}")
        print(f"      max |out diff| {float((outs[0] - outs[1]).abs().max()):.2e}")


def _sinks_table(sizes, decode_sizes, d, dtype, es, causal):
    B, Hq, Hkv = 1, 4, 2
    mode = "top_left" if causal else "none"
    print(f"sinks: B={B} Hq={Hq} Hkv={Hkv} d=dv={d} fp16{', causal top-left' if causal else ''}; "
          f"bytes counted in the interpreter with the first GPU config of each list")
    hdr = f"{'Lq':>6} {'Lk':>6} {'pass':<6} {'plain read':>12} {'sinks read':>12} {'plain write':>12} " \
          f"{'sinks write':>12} {'extra read':>10} {'programs':>8}"
    print(hdr)
    print("-" * len(hdr))
    worst = 0
    shapes = [(n, n, False) for n in sizes] + [(1, n, True) for n in decode_sizes]
    for lq, lk, decode in shapes:
        g = torch.Generator().manual_seed(2)
        q = torch.randn(B, Hq, lq, d, generator=g).to(dtype)
        k = torch.randn(B, Hkv, lk, d, generator=g).to(dtype)
        v = torch.randn(B, Hkv, lk, d, generator=g).to(dtype)
        sinks = torch.randn(Hq, generator=g)
        causal_mode = "bottom_right" if decode else mode
        if decode:
            _use_gpu_decode_plan(d, dtype, td.decode_block_m((Hq // Hkv) * lq, d, dtype))
        kw = dict(scale=d ** -0.5, causal=causal_mode, dropout_p=0.0, softcap=0.0, seed=0)
        res = {}
        for name, sk in (("plain", None), ("sinks", sinks)):
            _counts.clear()
            extra = {} if sk is None else {"sinks": sk}
            out, lse = tf.forward(q, k, v, None, **kw, **extra)
            fwd = dict(_counts)
            bwd = {}
            if not decode:
                _counts.clear()
                tf.backward(torch.randn_like(out), q, k, v, None, out, lse, need_dbias=False,
                            **kw, **extra)
                bwd = dict(_counts)
            res[name] = (fwd, bwd)
        for p, idx in (("fwd", 0), ("bwd", 1)):
            if decode and p == "bwd":
                continue
            (pr, pw), (sr, sw) = _split(res["plain"][idx]), _split(res["sinks"][idx])
            programs = (sr - pr) // 4
            worst = max(worst, sr - pr)
            print(f"{lq:>6} {lk:>6} {p + ('(dec)' if decode else ''):<6} {pr:>12,} {sr:>12,} "
                  f"{pw:>12,} {sw:>12,} {sr - pr:>10,} {programs:>8,}")
        if not decode:  # the launcher's torch reduction for dsinks: delta and lse (fp32 each)
            print(f"{lq:>6} {lk:>6} {'dsinks (torch)':<14} reads {B * Hq * lq * 8:,} "
                  f"bytes (the preprocess's delta, lse), writes {4 * Hq:,}")
    print(f"largest extra read of a sink kernel: {worst:,} bytes (4 per program: the head's sink)")
    return worst


def _decode_table(sizes, lqs, d, dtype, es):
    B, Hq, Hkv = 1, 8, 2
    G = Hq // Hkv
    print()
    print(f"decode: B={B} Hq={Hq} Hkv={Hkv} d=dv={d} fp16, causal bottom-right; "
          f"minimum = q, k, v read once + o, lse written once")
    hdr = (f"{'Lk':>6} {'Lq':>3} {'BM':>3} {'BN':>4} {'splits':>6} {'decode bytes':>13} "
           f"{'scratch':>10} {'main fwd bytes':>15} {'minimum':>11} {'decode x min':>12} "
           f"{'main x min':>10}")
    print(hdr)
    print("-" * len(hdr))
    worst = 0.0
    for n in sizes:
        for lq in lqs:
            g = torch.Generator().manual_seed(1)
            q = torch.randn(B, Hq, lq, d, generator=g).to(dtype)
            k = torch.randn(B, Hkv, n, d, generator=g).to(dtype)
            v = torch.randn(B, Hkv, n, d, generator=g).to(dtype)
            bm = td.decode_block_m(G * lq, d, dtype)
            cfg = _use_gpu_decode_plan(d, dtype, bm)
            rb = math.ceil(G * lq / bm)
            splits, _ = td.num_splits(n, B * Hkv * rb, packed_rows=G * lq)
            _counts.clear()
            out, lse = td.decode_forward(q, k, v, None, scale=d ** -0.5,
                                         causal="bottom_right", softcap=0.0)
            dec = dict(_counts)
            _counts.clear()
            tf.forward(q, k, v, None, scale=d ** -0.5, causal="bottom_right", dropout_p=0.0,
                       softcap=0.0, seed=0, decode=False)  # the main kernel, not decode
            main = dict(_counts)
            minimum = es * (B * Hq * lq * d * 2 + B * Hkv * n * d * 2) + 4 * B * Hq * lq
            dtot, mtot = sum(_split(dec)), sum(_split(main))
            # the partial states: all the split kernel writes, all the combine kernel reads
            scratch = sum(v for (kn, kind), v in dec.items()
                          if (kn, kind) in {("_attn_decode_split", "write"),
                                            ("_attn_decode_combine", "read")})
            worst = max(worst, dtot / minimum)
            print(f"{n:>6} {lq:>3} {bm:>3} {cfg.kwargs['BLOCK_N']:>4} {splits:>6} "
                  f"{dtot:>13,} {scratch:>10,} {mtot:>15,} {minimum:>11,} "
                  f"{dtot / minimum:>12.3f} {mtot / minimum:>10.3f}")
    print(f"worst decode / minimum: {worst:.3f}")
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,512,1024")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--causal", action="store_true", help="top-left causal training shapes")
    ap.add_argument("--padded", type=float, default=0.0,
                    help="fraction of the keys right-padded (key_mask): replaces the "
                         "training table by the padded before/after table")
    ap.add_argument("--alibi", action="store_true",
                    help="replace the training table by plain vs ALiBi vs materialised bias")
    ap.add_argument("--decode-sizes", default="4096,16384",
                    help="KV lengths for the decode comparison ('' to skip)")
    ap.add_argument("--decode-lq", default="1,16")
    ap.add_argument("--static-cache", action="store_true",
                    help="a static KV cache's prefill: bytes read with and without causal_offsets")
    ap.add_argument("--sinks", action="store_true",
                    help="compare the kernels without and with attention sinks (only that table)")
    args = ap.parse_args(argv)
    dtype, es = torch.float16, 2
    d = args.dim
    _install_counters()
    _use_gpu_configs()
    if args.static_cache:
        _static_cache_table([int(x) for x in args.sizes.split(",") if x], d, dtype)
        return 0
    if args.sinks:
        _sinks_table([int(x) for x in args.sizes.split(",") if x],
                     [int(x) for x in args.decode_sizes.split(",") if x], d, dtype, es, args.causal)
        return 0
    if args.sizes and args.alibi:
        _alibi_table([int(x) for x in args.sizes.split(",")], d, dtype, args.causal)
    elif args.sizes and args.padded:
        _padded_table([int(x) for x in args.sizes.split(",")], d, dtype, es, args.causal,
                      args.padded)
    elif args.sizes:
        _training_table([int(x) for x in args.sizes.split(",")], d, dtype, es, args.causal)
    if args.decode_sizes:
        _decode_table([int(x) for x in args.decode_sizes.split(",")],
                      [int(x) for x in args.decode_lq.split(",")], d, dtype, es)
    return 0


if __name__ == "__main__":
    sys.exit(main())
