"""What the Triton launcher (:mod:`.triton_flash`) and the decode path
(:mod:`.triton_decode`) share to launch their kernels: the padded head dim and its
config class, interpreter detection and the device error, the scalar arguments of the
softmax (:func:`_common`), the bias, key_mask and ALiBi-slope (:func:`_alibi_args`)
arguments, and the structural-mask
arguments (:func:`_structure`, with the per-batch key bounds of a key_mask from
:func:`.base.key_bounds`).

Imports only :mod:`.base` and :mod:`.triton_fwd` (for interpreter detection); imports
nothing from the CPU side. ``triton_flash`` imports ``triton_decode`` (it owns the
choice of the decode path); ``triton_decode`` does not import ``triton_flash``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from .base import add_sinks, clamped_offsets, key_bounds
from .triton_fwd import _attn_fwd

LOG2E = 1.4426950408889634
_CAUSAL = {"none": 0, "top_left": 1, "bottom_right": 1}

def padded_head_dim(d: int) -> int:
    """Head dims are padded (masked loads) to the next power of two >= 16."""
    return max(16, triton.next_power_of_2(int(d)))

def _is_fp32(dtype) -> bool:
    return dtype == torch.float32


def _head_dim_class(head_dim: int) -> int:
    hd = padded_head_dim(head_dim)
    return 64 if hd <= 64 else hd


def _interpreted() -> bool:
    # triton.jit returns an InterpretedFunction when TRITON_INTERPRET=1 at import time
    return type(_attn_fwd).__name__ == "InterpretedFunction"


def _strides(t):
    return tuple(t.stride())


def _sinks_args(sinks, q, placeholder):
    """(tensor, SINKS) for the kernels' ``Sinks`` pointer: the (Hq,) sinks as contiguous
    fp32 (Hq floats: a copy costs nothing), or ``placeholder`` (never read) without."""
    if sinks is None:
        return placeholder, False
    if sinks.dim() != 1 or sinks.size(0) != q.size(1):
        raise ValueError(f"sinks must have shape (Hq,) = ({q.size(1)},), got {tuple(sinks.shape)}")
    return sinks.detach().to(device=q.device, dtype=torch.float32).contiguous(), True


def _no_key_result(out, lse, sinks):
    """(out, lse) of a call in which no row sees a key: out 0, lse -inf, or with sinks
    each row attends only to its sink (out 0, lse = sink)."""
    out.zero_()
    lse.fill_(float("-inf"))
    return (out, lse) if sinks is None else add_sinks(out, lse, sinks)


def _bias_args(bias, q):
    """(tensor, 4 strides, BIAS_KIND) with stride 0 along every size-1 (broadcast) dim."""
    if bias is None:
        return q, (0, 0, 0, 0), 0
    if bias.dim() != 4:
        raise ValueError(f"bias must be 4-D, got shape {tuple(bias.shape)}")
    strides = tuple(0 if bias.size(i) == 1 else bias.stride(i) for i in range(4))
    if bias.dtype == torch.bool:
        return bias.view(torch.uint8), strides, 2   # same bytes; loads as 0/1
    return bias, strides, 1


def _dot_precision(dtype, head_dim: int) -> str:
    """fp32 inputs, head dim <= 64: "tf32x3" (three TF32 tensor-core passes, about fp32
    accurate).  fp32 with larger head dims: "tf32x3" (and "ieee") spill registers even at
    16x16 tiles, so plain "tf32" is used (~1e-3 relative error in q·kᵀ on GPU).
    fp16/bf16: the value is ignored."""
    if dtype == torch.float32 and _head_dim_class(head_dim) <= 64:
        return "tf32x3"
    return "tf32"


def _common(q, k, v, scale, causal, softcap, item_shift: bool = False):
    """The softmax's scalar arguments and constexprs; ``item_shift``: the causal shift is
    each batch item's ``causal_offsets`` (CAUSAL on, the scalar shift unused)."""
    if causal not in _CAUSAL:
        raise ValueError(f"causal must be one of {sorted(_CAUSAL)}, got {causal!r}")
    M, N = q.shape[2], k.shape[2]
    if softcap and softcap > 0:
        qk_scale, cap_scale, soft = scale / softcap, softcap * LOG2E, True
    else:
        qk_scale, cap_scale, soft = scale * LOG2E, 1.0, False
    shift = (N - M) if causal == "bottom_right" else 0
    interp_bf16 = _interpreted() and q.dtype == torch.bfloat16
    return dict(
        qk_scale=float(qk_scale), cap_scale=float(cap_scale), causal_shift=int(shift),
        CAUSAL=1 if item_shift else _CAUSAL[causal], SOFTCAP=soft,
        DOT_FP32=interp_bf16,
        DOT_PREC=_dot_precision(q.dtype, max(q.shape[-1], v.shape[-1])),
    )


def _seed(seed: int) -> int:
    return int(seed) & 0x7FFF_FFFF_FFFF_FFFF


def _key_mask_args(key_mask, B, N, q):
    """(tensor, (stride_z, stride_n), KEY_MASK) for a bool (B or 1, N) key_mask."""
    if key_mask is None:
        return q, (0, 0), False
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be a bool tensor, got "
                        f"{getattr(key_mask, 'dtype', type(key_mask).__name__)}")
    if key_mask.dim() != 2 or key_mask.size(0) not in (1, B) or key_mask.size(1) != N:
        raise ValueError(f"key_mask must have shape ({B} or 1, {N}) = (batch, Lk), got "
                         f"{tuple(key_mask.shape)}")
    if key_mask.device != q.device:
        raise ValueError(f"key_mask is on {key_mask.device}, q on {q.device}")
    sz = 0 if key_mask.size(0) == 1 else key_mask.stride(0)
    return key_mask.view(torch.uint8), (sz, key_mask.stride(1)), True   # loads as 0/1


def _alibi_args(alibi_slopes, B, H, q):
    """(tensor, (stride_z, stride_h), ALIBI) for float32 ALiBi slopes (H,) or (B, H):
    the batch stride is 0 for (H,) slopes. Without slopes, q stands in (never read)."""
    if alibi_slopes is None:
        return q, (0, 0), False
    if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be a float32 tensor, got "
                        f"{getattr(alibi_slopes, 'dtype', type(alibi_slopes).__name__)}")
    if alibi_slopes.shape not in ((H,), (B, H)):
        raise ValueError(f"alibi_slopes must have shape ({H},) or ({B}, {H}), got "
                         f"{tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device}, q on {q.device}")
    if alibi_slopes.dim() == 1:
        return alibi_slopes, (0, alibi_slopes.stride(0)), True
    sz = 0 if B == 1 else alibi_slopes.stride(0)
    return alibi_slopes, (sz, alibi_slopes.stride(1)), True


# [first visible key, last visible key + 1] per batch item, the range the kernels' key
# loops are clipped to (``triton_fwd._clip_to_key_bounds``); a module-level name so that
# benchmarks/kernel_io.py can swap it for the unclipped bounds.
_key_bounds = key_bounds


def _structure(q, k, causal: str, window: int, key_mask: Optional[torch.Tensor],
               causal_offsets: Optional[torch.Tensor] = None) -> dict:
    """Kernel arguments of the structural masks: the runtime window and WINDOW, the key
    mask (a uint8 view; batch stride 0 when it broadcasts) with its strides and KEY_MASK,
    its key bounds ``kb`` (:func:`_key_bounds`) with their batch stride ``kb_stride``
    (0 when the key mask broadcasts), and the per-item causal shifts ``offsets``
    ((B,) int32, clamped: :func:`.base.clamped_offsets`) with ITEM_SHIFT.

    A window that excludes no key of any row (``window >= Lq + off``, off the causal
    offset) is dropped: the kernels then need no window mask, and the runtime value
    always fits in int32."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0 = no window), got {window!r}")
    if window and causal == "none":
        raise ValueError("window > 0 needs causal='top_left' or 'bottom_right'")
    B, M, N = q.shape[0], q.shape[2], k.shape[2]
    shift = (N - M) if causal == "bottom_right" else 0
    if window >= M + shift:      # row M-1's window edge M-1+shift-window is below key 0
        window = 0
    km_t, km_s, has_km = _key_mask_args(key_mask, B, N, q)
    kb, kb_stride = q, 0                 # unused without a key mask (KEY_MASK False)
    if has_km:
        kb = _key_bounds(key_mask)
        kb_stride = 0 if key_mask.size(0) == 1 else kb.stride(0)
    offsets, item_shift = q, causal_offsets is not None   # q: a placeholder, never read
    if item_shift:
        if causal != "none" or window:
            raise ValueError("causal_offsets needs causal='none' and no window")
        if causal_offsets.shape != (B,) or causal_offsets.device != q.device:
            raise ValueError(f"causal_offsets must be ({B},) on {q.device}, got "
                             f"{tuple(causal_offsets.shape)} on {causal_offsets.device}")
        offsets = clamped_offsets(causal_offsets, M, N)
    return dict(window=int(window), WINDOW=bool(window), km=km_t, km_strides=km_s,
                KEY_MASK=has_km, kb=kb, kb_stride=kb_stride, offsets=offsets,
                ITEM_SHIFT=item_shift)


def device_error(device: torch.device) -> RuntimeError:
    """The error for tensors on a device the kernels cannot run on here."""
    if device.type == "cpu":
        return RuntimeError(
            "attnfuse Triton kernels got CPU tensors but TRITON_INTERPRET=1 was not set "
            "before attnfuse.kernels was imported. Use CUDA tensors, or set "
            "TRITON_INTERPRET=1 in the environment before importing (interpreter, slow).")
    return RuntimeError(f"attnfuse Triton kernels: unsupported device {device} "
                        f"(interpreter mode: {_interpreted()})")
