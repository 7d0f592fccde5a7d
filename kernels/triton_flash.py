"""Launch and tuning code for the Triton attention kernels; the public entry points
:func:`forward` and :func:`backward` called by the ``attnfuse::flash_attention`` op.

On CUDA tensors the kernels run through ``triton.autotune`` with a config list per
(padded head dim, dtype) sized for sm_80 and sm_90, checked offline without a GPU:
``benchmarks/kernel_launched.py`` compiles them as launched (specialised on the call's
strides): no register spills; ``benchmarks/kernel_resources.py`` compiles every entry with
every mask on, the plain lists under the specialisation of an :func:`aligned` launch (the
only launches that take them) and the heavy lists with nothing specialised: no register
spills, shared memory within the A100/H100 per-block limits
(``benchmarks/results/kernel_resources_aligned.txt``).  On CPU tensors they run in
Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in the environment BEFORE this
module (and the kernel
modules) are imported; there one fixed small config is used, because a multi-config
autotune fails in the interpreter ("0 active drivers").

Structural masks: ``window`` (with causal) and ``key_mask`` ((B|1, Lk) bool, True =
visible) reach the kernels as the constexprs ``WINDOW`` / ``KEY_MASK`` (the names the
decode kernel uses) plus a runtime window, a uint8 view of the key mask whose batch
stride is 0 when it broadcasts, and the per-batch key bounds of the key mask
(``triton_launch._key_bounds``, (B|1, 2) int32, same broadcast) that the forward, dQ and
decode kernels clip their key loops to; no (Lq, Lk) mask is built.

Short queries against long keys (:func:`triton_decode.decode_applicable`: no dropout,
Lq <= 16, Lk >= 256) take the flash-decoding path in :func:`forward`; the backward is
the same for both (the decode path returns the same lse).

Edge rows: a row whose logits are all ``-inf``, or that sees no key, gives
``out = 0``, ``lse = -inf`` and zero gradients (eager gives NaN); a row whose logits are
all large finite negatives (``finfo.min`` bias) gives the uniform average, as eager
softmax does.  See ``triton_fwd`` for details.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton

# this module owns the choice between the main forward and the decode path: it imports
# triton_decode, which does not import it back (both use triton_launch)
from . import triton_decode as _td
from .triton_launch import (LOG2E, _alibi_args, _bias_args, _common, _dot_precision,  # noqa: F401
                            _head_dim_class, _interpreted, _is_fp32, _key_mask_args,
                            _no_key_result, _seed, _sinks_args, _strides, _structure,
                            device_error, padded_head_dim)
from .base import sinks_grad
from .triton_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess
from .triton_fwd import _attn_fwd

__all__ = [
    "forward", "backward", "fwd_configs", "bwd_dkdv_configs", "bwd_dq_configs",
    "bwd_preprocess_configs", "KERNEL_CONFIGS", "INTERPRETER_CONFIG", "padded_head_dim",
]


# One fixed small config for the interpreter (several blocks even at L ~ 40, so block
# boundaries and causal block skipping are exercised by the CPU tests).
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}



def _cfg(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                         num_warps=warps, num_stages=stages)


# --------------------------------------------------------------------------------------
# Config lists: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, padded head dim
# class (<= 64, 128, 256; the max of D and Dv), element width (16: fp16/bf16, 32: fp32)
# and variant: "plain" (no bias, no dropout, no ALiBi) or "heavy" (a bias tile, the Philox
# dropout stream and/or the ALiBi index arithmetic per tile: many more live registers, so
# smaller tiles; :func:`_heavy`).  The 16-bit
# plain lists of every head dim class and the fp32 backward lists were retuned (issue
# 21) from the kernels AS LAUNCHED (benchmarks/kernel_launched.py: Triton's own
# specialisation of unit strides and divisibility-16 attributes, which the launched
# kernels get and which cut registers by up to a quarter): tiles no smaller than
# Triton's fused-attention tutorial's where registers and shared memory allow, a
# pipelined main loop (num_stages >= 2: cp.async) everywhere, and, on sm_90
# (_SM90_TABLE), tiles whose products run as warp-group MMA (wgmma needs 64 rows per
# warp group).  Before/after: benchmarks/results/kernel_launched_before.md / _after.md.
# The launcher takes the plain lists only for launches that get that specialisation
# (:func:`aligned`), the heavy lists for every other launch; benchmarks/kernel_resources.py
# compiles every entry with the most expensive constexprs of its variant, the plain lists
# with the aligned specialisation and nothing else (:func:`aligned_specialisation`), the
# heavy lists both with it and with nothing specialised, and fails on any spill.  Six
# plain dK/dV entries ("were ..." below) spilled there (12-188 B, with every mask on) and
# were replaced by the same family's tiles with half the keys, fewer rows or more warps;
# heavy entries that spilled with it on sm_90 (or, dQ d128, as launched at head dim 72)
# were dropped or replaced (benchmarks/results/kernel_resources_aligned.txt,
# kernel_launched_aligned.md).
# The preprocess kernel has one list (its rare recompute path always includes the bias).
# --------------------------------------------------------------------------------------

_CONFIG_TABLE = {
    "attn_fwd": {
        (64, 16, False): [(128, 64, 4, 3), (128, 64, 8, 3)],
        (64, 16, True): [(128, 32, 8, 2), (64, 32, 8, 3)],
        (128, 16, False): [(128, 64, 8, 3), (128, 32, 8, 3)],
        (128, 16, True): [(64, 16, 4, 2), (32, 16, 4, 2)],
        (256, 16, False): [(64, 64, 8, 2), (64, 32, 8, 3)],
        (256, 16, True): [(32, 16, 8, 2), (32, 16, 8, 1)],
        (64, 32, False): [(128, 32, 8, 2), (64, 32, 4, 3)],
        (64, 32, True): [(32, 32, 4, 2), (64, 16, 4, 2)],
        (128, 32, False): [(64, 32, 4, 2), (32, 32, 4, 2)],
        (128, 32, True): [(32, 32, 4, 2), (32, 16, 4, 1)],
        (256, 32, False): [(32, 16, 4, 1), (16, 16, 4, 1)],
        (256, 32, True): [(32, 16, 8, 1), (16, 16, 4, 1)],
    },
    "attn_bwd_dkdv": {
        (64, 16, False): [(32, 32, 4, 3), (64, 32, 4, 3)],    # were 32x64 w4 s3, 16x64 w8 s2
        (64, 16, True): [(32, 32, 4, 2)],      # 16x16 w4 s2 spilled 28 B (sm_90, aligned)
        (128, 16, False): [(32, 64, 8, 2), (16, 64, 8, 2)],
        (128, 16, True): [(16, 64, 8, 2), (16, 32, 4, 2)],
        (256, 16, False): [(16, 32, 8, 2), (16, 16, 4, 2)],    # were 16x32 w4, 32x32 w8
        (256, 16, True): [(16, 16, 8, 1)],     # 16x32 w8 spilled 12 B with ALiBi, 16x16 w4 68 B with causal_offsets (sm_90)
        (64, 32, False): [(16, 32, 8, 2), (16, 16, 4, 2)],    # was 16x32 w4
        (64, 32, True): [(16, 32, 8, 1), (16, 16, 8, 1)],
        (128, 32, False): [(16, 32, 4, 2)],
        (128, 32, True): [(16, 32, 4, 1), (16, 32, 8, 1)],
        (256, 32, False): [(16, 32, 8, 1)],
        (256, 32, True): [(16, 16, 4, 1)],
    },
    "attn_bwd_dq": {
        (64, 16, False): [(64, 32, 4, 2), (128, 32, 8, 2)],
        (64, 16, True): [(32, 32, 4, 2), (64, 16, 4, 2)],
        (128, 16, False): [(64, 32, 4, 3), (128, 32, 8, 3)],
        (128, 16, True): [(16, 16, 8, 2)],      # were 32x16 w4, 16x16 w4 (8 B spills)
        (256, 16, False): [(64, 32, 8, 2), (32, 32, 4, 2)],
        (256, 16, True): [(16, 16, 8, 1)],
        (64, 32, False): [(32, 16, 4, 2), (32, 32, 4, 2)],
        (64, 32, True): [(16, 16, 4, 1)],
        (128, 32, False): [(32, 16, 4, 2), (16, 16, 4, 2)],
        (128, 32, True): [(16, 16, 4, 1)],      # 16x16 w8 s1 spilled 8 B (sm_90, aligned)
        (256, 32, False): [(16, 16, 8, 1)],
        (256, 32, True): [(16, 16, 8, 1)],
    },
    "attn_bwd_preprocess": {
        (64, 16): [(64, 32, 4, 1), (32, 16, 4, 1)],
        (128, 16): [(64, 32, 4, 1), (32, 16, 4, 1)],
        (256, 16): [(32, 16, 4, 1), (16, 16, 4, 1)],
        (64, 32): [(32, 16, 4, 1), (16, 16, 4, 1)],
        (128, 32): [(32, 16, 4, 1), (16, 16, 4, 1)],
        (256, 32): [(16, 16, 4, 1), (16, 16, 8, 1)],
    },
}


# sm_90 (H100: 228 KB shared memory per block, warp-group MMA) replaces some lists with
# larger tiles that spill or exceed the A100's shared memory on sm_80
# (benchmarks/results/kernel_launched_after.md): keys as in _CONFIG_TABLE.
_SM90_TABLE = {
    "attn_fwd": {
        # the third was added for unspecialised launches (head dim 72, fused QKV), which
        # spilled 40-152 B with the first two; those now take the heavy list (aligned)
        (128, 16, False): [(128, 128, 8, 3), (128, 64, 8, 3), (128, 32, 8, 3)],
    },
    "attn_bwd_dkdv": {
        (64, 16, False): [(64, 32, 4, 3), (32, 64, 4, 3)],    # was 64x64 w4
        (128, 16, False): [(64, 32, 8, 2), (32, 64, 8, 2)],
    },
    "attn_bwd_dq": {
        (128, 16, False): [(64, 64, 8, 3), (128, 32, 8, 3)],
    },
}


def _configs(kernel: str, head_dim: int, dtype, heavy: bool, arch: int = 80) -> list:
    key = (_head_dim_class(head_dim), 32 if _is_fp32(dtype) else 16)
    if kernel != "attn_bwd_preprocess":
        key = key + (bool(heavy),)
    table = _CONFIG_TABLE[kernel]
    if arch >= 90 and key in _SM90_TABLE.get(kernel, {}):
        table = _SM90_TABLE[kernel]
    return [_cfg(*c) for c in table[key]]


def fwd_configs(head_dim: int, dtype, heavy: bool = False, arch: int = 80) -> list:
    """Autotune configs of the forward kernel for (head dim, dtype, bias/dropout/ALiBi) on
    sm_``arch`` (``_SM90_TABLE`` from 90 on)."""
    return _configs("attn_fwd", head_dim, dtype, heavy, arch)


def bwd_dkdv_configs(head_dim: int, dtype, heavy: bool = False, arch: int = 80) -> list:
    return _configs("attn_bwd_dkdv", head_dim, dtype, heavy, arch)


def bwd_dq_configs(head_dim: int, dtype, heavy: bool = False, arch: int = 80) -> list:
    return _configs("attn_bwd_dq", head_dim, dtype, heavy, arch)


def bwd_preprocess_configs(head_dim: int, dtype, heavy: bool = False, arch: int = 80) -> list:
    return _configs("attn_bwd_preprocess", head_dim, dtype, heavy, arch)


# kernel name -> (jit function, config-list function), for the benchmarks
KERNEL_CONFIGS = {
    "attn_fwd": (_attn_fwd, fwd_configs),
    "attn_bwd_preprocess": (_attn_bwd_preprocess, bwd_preprocess_configs),
    "attn_bwd_dkdv": (_attn_bwd_dkdv, bwd_dkdv_configs),
    "attn_bwd_dq": (_attn_bwd_dq, bwd_dq_configs),
}

_TUNE_KEY = ["M", "N", "HEAD_D", "HEAD_DV", "CAUSAL", "WINDOW", "BIAS_KIND", "SOFTCAP",
             "KEY_MASK", "DROPOUT", "SINKS", "ALIBI"]


@functools.lru_cache(maxsize=None)
def _tuned(name: str, head_dim: int, dtype, heavy: bool, arch: int = 80):
    fn, configs = KERNEL_CONFIGS[name]
    key = [k for k in _TUNE_KEY if k in fn.arg_names]
    return triton.autotune(configs=configs(head_dim, dtype, heavy, arch), key=key)(fn)


def _arch(device: torch.device) -> int:
    """The compute capability of ``device`` as 10·major + minor (80: A100, 90: H100)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


# The (B, H, L, D) operands of the kernels: pointer argument -> prefix of its stride
# arguments (prefix + "z", "h", "m" or "n", "d").  Their alignment decides whether a call
# may take the plain lists (:func:`aligned`, :func:`aligned_specialisation`).
_OPERANDS = {"Q": "stride_q", "K": "stride_k", "V": "stride_v", "Out": "stride_o",
             "DO": "stride_do", "DQ": "stride_dq", "DK": "stride_dk", "DV_": "stride_dv"}


def aligned(tensors, head_dims) -> bool:
    """Whether a launch gets the specialisation under which the plain lists are checked
    (:func:`aligned_specialisation`): every operand in ``tensors`` has a 16-byte-aligned
    address, a unit last stride and its other strides multiples of 16 (elements), and
    every head dim in ``head_dims`` is a multiple of 16.  Triton's JIT turns an int
    argument equal to 1 into a constexpr and gives ``tt.divisibility = 16`` to pointers
    whose address, and ints whose value, is a multiple of 16; the plain lists' larger
    tiles spill registers without these facts (e.g. dQ d256 fp16 64x32 w8 on sm_80:
    8020 B unspecialised, 0 B with them; benchmarks/results/kernel_resources_aligned.txt)."""
    return (all(d % 16 == 0 for d in head_dims)
            and all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1
                    and all(s % 16 == 0 for s in t.stride()[:-1]) for t in tensors))


def aligned_specialisation(arg_names) -> tuple:
    """``(unit, div16)``: the arguments of a kernel (``arg_names``) that an
    :func:`aligned` launch specialises, unit strides (constexpr 1) and arguments with
    ``tt.divisibility = 16`` (the operands' pointers and other strides, ``D`` and
    ``DV``); every other argument may be anything.  benchmarks/kernel_resources.py
    compiles the plain lists with exactly these facts."""
    names = set(arg_names)
    unit = {p + "d" for p in _OPERANDS.values()} & names
    div16 = ({a for p in _OPERANDS.values() for a in (p + "z", p + "h", p + "m", p + "n")}
             | set(_OPERANDS) | {"D", "DV"}) & names
    return unit, div16


def _heavy(bias_kind: int, dropout: bool, alibi: bool, is_aligned: bool = True,
           item_shift: bool = False) -> bool:
    """The "heavy" config lists (smaller tiles) serve a bias tile, the dropout stream,
    ALiBi, per-item causal offsets, and every launch that is not :func:`aligned`: the
    per-tile position arithmetic of ALiBi spills registers with the plain lists' tiles
    (e.g. forward d64 fp16 128x64 w4: 8 B on sm_80, 16 B on sm_90), so does a run-time
    causal shift (the same config: 8 B on sm_90), and so do the plain lists without the
    aligned specialisation (benchmarks/kernel_resources.py).  Sinks stay plain: they
    touch only the epilogue."""
    return bool(bias_kind or dropout or alibi or item_shift or not is_aligned)


def _launcher(name: str, device: torch.device, head_dim: int, dtype, heavy: bool):
    """(kernel, fixed meta) for this device: autotuned on CUDA, fixed config on CPU."""
    if device.type == "cuda" and not _interpreted():
        return _tuned(name, padded_head_dim(head_dim), dtype, bool(heavy), _arch(device)), {}
    if device.type == "cpu" and _interpreted():
        return KERNEL_CONFIGS[name][0], dict(INTERPRETER_CONFIG)
    raise device_error(device)


def forward(q, k, v, bias, *, scale: float, causal: str, dropout_p: float,
            softcap: float, seed: int, window: int = 0,
            key_mask: Optional[torch.Tensor] = None, decode: bool = True,
            sinks: Optional[torch.Tensor] = None,
            alibi_slopes: Optional[torch.Tensor] = None,
            causal_offsets: Optional[torch.Tensor] = None):
    """Fused attention forward.

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), any strides; bias None or
    4-D broadcastable to (B, Hq, Lq, Lk) (float: added; bool: True = keep); ``window``
    (int >= 0, only with causal): query i sees keys ``i + off - window < j <= i + off``;
    ``key_mask`` None or bool (B or 1, Lk), True = visible; ``alibi_slopes`` None or
    float32 (Hq,) / (B, Hq): logits gain ``-slope * |i + Lk - Lq - j|`` per tile.
    Returns ``(out, lse)``: out (B, Hq, Lq, Dv) in q's dtype, contiguous; lse
    (B, Hq, Lq) float32, the natural log-sum-exp of the final logits of each row.
    Rows that see no key (all logits -inf) give out = 0 and lse = -inf.  Logits below
    -2.35e38 (e.g. a finfo.min bias) are clamped there (the kernel works in
    log2 units, where finfo.min·log2(e) would overflow to -inf), so such a row's lse is
    ≈ -2.35e38 rather than ≈ finfo.min; its output is exact (the uniform average, as
    eager), and :func:`backward` recomputes its statistics exactly.
    Shapes where :func:`triton_decode.decode_applicable` holds run the flash-decoding
    kernels (same result); ``decode=False`` forces the main kernel (benchmarks, tests).
    ``sinks`` None or (Hq,) float: one more logit per query head in each row's softmax,
    with no value row (merged after the key loop); the lse includes it, and a row that
    sees no key gives out = 0, lse = sink.  ``causal_offsets`` None or int (B,) (with
    causal "none"): row i of item b sees keys ``j <= i + causal_offsets[b]``, each
    program loading its item's shift (the band's key blocks are skipped as for causal).
    """
    B, Hq, M, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[3]
    if decode and _td.decode_applicable(q, k, v, dropout_p=dropout_p):
        # validates window/key_mask through _structure itself (one set of key bounds)
        return _td.decode_forward(q, k, v, bias, scale=scale, causal=causal, softcap=softcap,
                                  window=window, key_mask=key_mask, sinks=sinks,
                                  alibi_slopes=alibi_slopes, causal_offsets=causal_offsets)
    st = _structure(q, k, causal, window, key_mask, causal_offsets)
    out = torch.empty((B, Hq, M, Dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, M), device=q.device, dtype=torch.float32)
    if B * Hq * M == 0:
        return out, lse
    if N == 0:
        return _no_key_result(out, lse, sinks)
    b_t, b_s, bias_kind = _bias_args(bias, q)
    sk_t, has_sinks = _sinks_args(sinks, q, lse)
    a_t, a_s, alibi = _alibi_args(alibi_slopes, B, Hq, q)
    c = _common(q, k, v, scale, causal, softcap, st["ITEM_SHIFT"])
    dropout = dropout_p > 0.0
    kern, meta = _launcher("attn_fwd", q.device, max(D, Dv), q.dtype,
                           _heavy(bias_kind, dropout, alibi, aligned((q, k, v, out), (D, Dv)),
                                  item_shift=st["ITEM_SHIFT"]))
    grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]), B * Hq)
    kern[grid](
        q, k, v, b_t, st["km"], st["kb"], st["offsets"], a_t, out, lse, sk_t,
        *_strides(q), *_strides(k), *_strides(v), *b_s, *st["km_strides"], st["kb_stride"],
        *a_s, *_strides(out),
        Hq, Hq // Hkv, M, N, D, Dv,
        c["qk_scale"], c["cap_scale"], c["causal_shift"], st["window"], float(dropout_p),
        _seed(seed),
        HEAD_D=padded_head_dim(D), HEAD_DV=padded_head_dim(Dv),
        CAUSAL=c["CAUSAL"], WINDOW=st["WINDOW"], BIAS_KIND=bias_kind, SOFTCAP=c["SOFTCAP"],
        KEY_MASK=st["KEY_MASK"], DROPOUT=dropout, SINKS=has_sinks,
        DOT_FP32=c["DOT_FP32"], DOT_PREC=c["DOT_PREC"], ALIBI=alibi,
        ITEM_SHIFT=st["ITEM_SHIFT"], **meta,
    )
    return out, lse


def backward(dout, q, k, v, bias, out, lse, *, scale: float, causal: str,
             dropout_p: float, softcap: float, seed: int, need_dbias: bool,
             window: int = 0, key_mask: Optional[torch.Tensor] = None,
             sinks: Optional[torch.Tensor] = None,
             alibi_slopes: Optional[torch.Tensor] = None,
             causal_offsets: Optional[torch.Tensor] = None):
    """Fused attention backward: ``(dq, dk, dv, dbias or None)``.

    dq/dk/dv have the shapes and dtypes of q/k/v.  dbias (only when ``need_dbias``) has
    the 4-D shape of ``bias`` (summed over its size-1 dims) and its dtype.  The dropout
    mask is regenerated from ``seed`` exactly as in :func:`forward`; ``window`` and
    ``key_mask`` must be the forward's.  Rows that saw no key (lse = -inf) contribute
    zero gradients, and so do masked keys.  With ``sinks``, ``out`` and ``lse`` are the
    forward's (the sink included) and the kernels are the plain ones (P rebuilt from that
    lse is the sink-aware P); only the preprocess's rare recompute path merges the sink.
    With ``sinks`` a fifth value is returned, the sinks' gradient (``base.sinks_grad``),
    reduced in torch from the preprocess's delta and the lse (8 bytes per row, not another
    pass over dO and O).
    """
    B, Hq, M, D = q.shape
    Hkv, N, Dv = k.shape[1], k.shape[2], v.shape[3]
    st = _structure(q, k, causal, window, key_mask, causal_offsets)
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    want_ds = bool(need_dbias and bias is not None and bias.dtype != torch.bool)
    # dBias: the dQ kernel writes the full (B, Hq, Lq, Lk) fp32 dS (simplest correct
    # scheme); the broadcast dims are summed here in torch.  Zero-initialised: tiles
    # the dQ kernel skips (outside the band, every key masked) have dS = 0.
    ds = (torch.zeros((B, Hq, M, N), device=q.device, dtype=torch.float32)
          if want_ds else None)
    if B * Hq * M == 0 or N == 0:
        return dq, dk, dv, (_reduce_dbias(ds, bias) if want_ds else None)
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    hd = max(D, Dv)
    b_t, b_s, bias_kind = _bias_args(bias, q)
    a_t, a_s, alibi = _alibi_args(alibi_slopes, B, Hq, q)
    c = _common(q, k, v, scale, causal, softcap, st["ITEM_SHIFT"])
    dropout = dropout_p > 0.0
    heavy = _heavy(bias_kind, dropout, alibi, aligned((q, k, v, out, dout, dq, dk, dv), (D, Dv)),
                   item_shift=st["ITEM_SHIFT"])
    consts = dict(HEAD_D=padded_head_dim(D), HEAD_DV=padded_head_dim(Dv),
                  CAUSAL=c["CAUSAL"], WINDOW=st["WINDOW"], BIAS_KIND=bias_kind,
                  SOFTCAP=c["SOFTCAP"], KEY_MASK=st["KEY_MASK"],
                  DOT_FP32=c["DOT_FP32"], DOT_PREC=c["DOT_PREC"], ALIBI=alibi,
                  ITEM_SHIFT=st["ITEM_SHIFT"])
    off_t = st["offsets"]
    seed = _seed(seed)
    km_t, km_s, window = st["km"], st["km_strides"], st["window"]
    kb_t, kb_s = st["kb"], st["kb_stride"]

    delta = torch.empty((B, Hq, M), device=q.device, dtype=torch.float32)
    mrow = torch.empty_like(delta)
    lrow = torch.empty_like(delta)
    sk_t, has_sinks = _sinks_args(sinks, q, delta)
    kern, meta = _launcher("attn_bwd_preprocess", q.device, hd, q.dtype, heavy)
    grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]), B * Hq)
    kern[grid](
        out, dout, lse.contiguous(), delta, mrow, lrow, q, k, b_t, km_t, off_t, a_t, sk_t,
        *_strides(out), *_strides(dout), *_strides(q), *_strides(k), *b_s, *km_s, *a_s,
        Hq, Hq // Hkv, M, N, D, Dv,
        c["qk_scale"], c["cap_scale"], c["causal_shift"], window, SINKS=has_sinks,
        **consts, **meta,
    )

    kern, meta = _launcher("attn_bwd_dkdv", q.device, hd, q.dtype, heavy)
    grid = lambda m: (triton.cdiv(N, m["BLOCK_N"]), B * Hkv)
    kern[grid](
        q, k, v, b_t, km_t, off_t, a_t, dout, dk, dv, mrow, lrow, delta,
        *_strides(q), *_strides(k), *_strides(v), *b_s, *km_s, *a_s, *_strides(dout),
        *_strides(dk), *_strides(dv),
        Hq, Hkv, Hq // Hkv, M, N, D, Dv,
        float(scale), c["qk_scale"], c["cap_scale"], c["causal_shift"], window,
        float(dropout_p), seed, DROPOUT=dropout, **consts, **meta,
    )

    kern, meta = _launcher("attn_bwd_dq", q.device, hd, q.dtype, heavy)
    grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]), B * Hq)
    kern[grid](
        q, k, v, b_t, km_t, kb_t, off_t, a_t, dout, dq, ds if want_ds else q, mrow, lrow, delta,
        *_strides(q), *_strides(k), *_strides(v), *b_s, *km_s, kb_s, *a_s, *_strides(dout),
        *_strides(dq),
        Hq, Hq // Hkv, M, N, D, Dv,
        float(scale), c["qk_scale"], c["cap_scale"], c["causal_shift"], window,
        float(dropout_p), seed, DROPOUT=dropout, NEED_DS=want_ds, **consts, **meta,
    )
    dbias = _reduce_dbias(ds, bias) if want_ds else None
    if has_sinks:  # delta = rowsum(dO·O) from the preprocess: no second pass over dO, O
        return dq, dk, dv, dbias, sinks_grad(sinks, lse, delta)
    return dq, dk, dv, dbias


def _reduce_dbias(ds, bias):
    dims = [i for i in range(4) if bias.size(i) == 1 and ds.size(i) != 1]
    if dims:
        ds = ds.sum(dim=dims, keepdim=True)
    return ds.reshape(bias.shape).to(bias.dtype)
