"""The fused attention op: ``attnfuse::flash_attention``.

Owns the public :func:`flash_attention` function, input validation, the
``torch.library`` custom ops (forward and backward) with their fake kernels, the
autograd formula, and the choice of implementation (Triton kernels or the CPU
path in :mod:`attnfuse.kernels.torch_impl`).

Semantics, for q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv)::

    out = dropout(softmax(mask(softcap(scale * q @ k^T) + bias), dim=-1)) @ v

- GQA / MQA: query head ``h`` reads key/value head ``h // (Hq // Hkv)``.
- ``softcap(s) = tanh(s / c) * c`` when ``c > 0``.
- ``bias`` broadcasts to (B, Hq, Lq, Lk). A float bias is added (it may hold
  ``-inf`` or ``finfo.min``); a bool bias keeps positions where it is True.
- ``causal``: ``"none"``, ``"top_left"`` (query ``i`` sees keys ``j <= i``, as
  ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``) or
  ``"bottom_right"`` (``j <= i + Lk - Lq``, as flash-attn with a KV cache).
- ``window`` (int, 0 = off; only with causal): query ``i`` sees key ``j`` only when
  ``i + off - window < j <= i + off``, ``off`` being the causal offset (0 top-left,
  ``Lk - Lq`` bottom-right): at most ``window`` keys, itself included (Hugging Face's
  ``sliding_window``).
- ``key_mask`` (bool, (B, Lk) or (1, Lk); True = visible): a key-padding mask, the same
  for every head and query; masked keys act as ``-inf`` logits.  Causal, window and
  key_mask are structure: no (Lq, Lk) mask is materialised, and key blocks outside the
  causal/window band are never visited (the Triton kernels also skip the padding: the
  keys before the first and after the last visible key of each batch item; the dK/dV
  kernel skips every key block a key_mask hides entirely).
- ``alibi_slopes`` (float32, (Hq,) or (B, Hq)): ALiBi as structure, FlashAttention-2's
  convention: the logit of (query ``i``, key ``j``) of head ``h`` gains
  ``-slope[b, h] * |i + Lk - Lq - j|`` after softcap, with the bias. It is computed
  inside every kernel (CPU: per row block; Triton: per tile), never as an (Lq, Lk)
  tensor. Under a causal mask where every visible key has ``j <= i + Lk - Lq``
  (``"bottom_right"``, or ``"top_left"`` with ``Lk >= Lq``) it equals
  ``slope * j`` up to a per-row constant, which softmax ignores: the key-position-only
  ALiBi of BLOOM, Falcon and MPT (``slope * (j + c)``, any per-batch ``c``). Slopes are
  constants: no gradient is computed for them, and slopes that require grad raise.
- A row whose logits are all ``-inf`` (or that sees no key) gives 0 (eager PyTorch gives NaN) and a
  zero gradient. A row of large finite negatives (``finfo.min`` masks) gives the
  same uniform average as eager.
- ``sinks`` (float, (Hq,)): attention sinks (gpt-oss, x-transformers' learned sink):
  one extra logit per query head in every row's softmax denominator, with no value
  row: ``p_ij = exp(s_ij) / (exp(sink_h) + Σ_j exp(s_ij))``. The lse includes it, a row
  that sees no key attends only to its sink (out = 0, lse = sink), and the sinks get a
  gradient: ``dsink_h = -Σ_{b,i} exp(sink_h - lse_bhi) · rowsum(dO·O)_bhi``.
- ``causal_offsets`` (int32/int64, (B,); only with ``causal="none"``): a causal diagonal
  per batch item, a run-time value: row ``i`` of item ``b`` sees keys
  ``j <= i + causal_offsets[b]`` (an offset >= Lk hides nothing). Structure like
  ``causal``: key blocks above an item's diagonal are never visited by the Triton
  kernels. The rewrite passes it for a mask that arrives as a graph input, from the band
  the mask's own values lie in (``passes/inputmask.py``).
- Dropout keeps each probability with chance ``1 - dropout_p`` and scales kept
  ones by ``1 / (1 - dropout_p)``; the keep-mask is a pure function of a seed
  drawn from torch's default generator, so the backward regenerates the
  forward's mask and ``torch.manual_seed`` makes results reproducible.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Optional, Union

import torch
from torch import Tensor


CAUSAL_ALIGNMENTS = ("none", "top_left", "bottom_right")
IMPLS = ("auto", "triton", "torch")
MAX_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def validate(q, k, v, bias, scale, causal, dropout_p, softcap, impl, window=0, key_mask=None,
             sinks=None, alibi_slopes=None, causal_offsets=None) -> None:
    """Raise ``TypeError`` / ``ValueError`` naming the argument for bad input."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            layout = "(B, Hq, Lq, D)" if name == "q" else f"(B, Hkv, Lk, {'Dv' if name == 'v' else 'D'})"
            raise ValueError(f"{name} must be a 4-D tensor {layout}, got shape {_shape(t)}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: q, k and v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all inputs must share one device")
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, Dk = k.shape
    Dv = v.shape[3]
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if Dk != D:
        raise ValueError(f"k's head dim {Dk} must equal q's head dim {D}: q {_shape(q)}, k {_shape(k)}")
    if v.shape[1] != Hkv or v.shape[2] != Lk:
        raise ValueError(f"v must be (B, Hkv, Lk, Dv) matching k {_shape(k)}, got {_shape(v)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's head count Hq={Hq} must be a multiple of k/v's head count Hkv={Hkv}")
    for name, d in (("q/k head dim D", D), ("v head dim Dv", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} must be in 1..{MAX_HEAD_DIM}, got {d}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype != torch.bool and not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a float (additive) or bool (True = keep) tensor, got {bias.dtype}")
        if bias.device != q.device:
            raise ValueError(f"bias is on {bias.device} but q is on {q.device}")
        full = (B, Hq, Lq, Lk)
        if bias.dim() > 4 or any(b != 1 and b != f for b, f in zip(reversed(bias.shape), reversed(full))):
            raise ValueError(f"bias of shape {_shape(bias)} does not broadcast to (B, Hq, Lq, Lk) = {full}")
    # Chained comparisons (not math.isfinite) also work on a SymFloat under dynamo; NaN fails them.
    if not isinstance(scale, (int, float, torch.SymFloat)) or not -math.inf < scale < math.inf:
        raise TypeError(f"scale must be a finite float, got {scale!r}")
    if causal not in CAUSAL_ALIGNMENTS:
        raise ValueError(f"causal must be False, True or one of {CAUSAL_ALIGNMENTS}, got {causal!r}")
    if not isinstance(dropout_p, (int, float, torch.SymFloat)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if not isinstance(softcap, (int, float, torch.SymFloat)) or not 0.0 <= softcap < math.inf:
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if isinstance(window, bool) or not isinstance(window, (int, torch.SymInt)) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0 = no window), got {window!r}")
    if window > 0 and causal == "none":
        raise ValueError("window needs causal=True, 'top_left' or 'bottom_right': the window is "
                         "counted back from the causal diagonal")
    if key_mask is not None:
        _check_tensor_arg("key_mask", key_mask, q, isinstance(key_mask, Tensor) and key_mask.dtype == torch.bool,
                          "a bool tensor (True = visible key)")
        if key_mask.dim() != 2 or key_mask.shape[0] not in (1, B) or key_mask.shape[1] != Lk:
            raise ValueError(f"key_mask must have shape (B, Lk) = ({B}, {Lk}) or (1, {Lk}), "
                             f"got {_shape(key_mask)}")
    if sinks is not None:
        _validate_sinks(sinks, q)
    if alibi_slopes is not None:
        validate_alibi_slopes(alibi_slopes, q)
    if causal_offsets is not None:
        _validate_causal_offsets(causal_offsets, q, causal, window)


def _check_tensor_arg(name: str, x, q: Tensor, dtype_ok: bool, dtype_wanted: str) -> None:
    """The checks every optional tensor argument shares: a Tensor (``TypeError``), of the
    dtype its caller tested (``dtype_ok``; ``TypeError`` saying ``dtype_wanted``), on q's
    device (``ValueError``)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if not dtype_ok:
        raise TypeError(f"{name} must be {dtype_wanted}, got {x.dtype}")
    if x.device != q.device:
        raise ValueError(f"{name} is on {x.device} but q is on {q.device}")


def _validate_sinks(sinks, q: Tensor) -> None:
    """``sinks``: a float tensor of one logit per query head, (Hq,), on q's device."""
    _check_tensor_arg("sinks", sinks, q, isinstance(sinks, Tensor) and sinks.dtype.is_floating_point,
                      "a float tensor (one logit per query head)")
    if sinks.dim() != 1 or sinks.shape[0] != q.shape[1]:
        raise ValueError(f"sinks must have shape (Hq,) = ({q.shape[1]},), one logit per query "
                         f"head, got {_shape(sinks)}")


OFFSET_DTYPES = (torch.int32, torch.int64)


def _validate_causal_offsets(causal_offsets, q: Tensor, causal: str, window) -> None:
    """``causal_offsets``: an int32/int64 (B,) tensor on q's device, with no other causal
    mask (it is the causal diagonal, one per batch item)."""
    _check_tensor_arg("causal_offsets", causal_offsets, q,
                      isinstance(causal_offsets, Tensor) and causal_offsets.dtype in OFFSET_DTYPES,
                      "int32 or int64 (one diagonal offset per batch item)")
    if causal_offsets.dim() != 1 or causal_offsets.shape[0] != q.shape[0]:
        raise ValueError(f"causal_offsets must have shape (B,) = ({q.shape[0]},), one offset per "
                         f"batch item, got {_shape(causal_offsets)}")
    if causal != "none" or window:
        raise ValueError("causal_offsets is a causal diagonal per batch item: it needs causal='none' "
                         f"and no window, got causal={causal!r}, window={window!r}")


def validate_alibi_slopes(alibi_slopes, q: Tensor) -> None:
    """ALiBi slopes: a float32 tensor (Hq,) or (B, Hq) on q's device (FlashAttention-2's
    convention); raises ``TypeError`` / ``ValueError`` naming the argument."""
    _check_tensor_arg("alibi_slopes", alibi_slopes, q,
                      isinstance(alibi_slopes, Tensor) and alibi_slopes.dtype == torch.float32,
                      "float32 (one slope per query head)")
    B, Hq = q.shape[0], q.shape[1]
    if alibi_slopes.shape not in ((Hq,), (B, Hq)):
        raise ValueError(f"alibi_slopes must have shape (Hq,) = ({Hq},) or (B, Hq) = ({B}, {Hq}), "
                         f"got {_shape(alibi_slopes)}")


def _refuse_slope_grad(alibi_slopes) -> None:
    if alibi_slopes is not None and alibi_slopes.requires_grad:
        raise ValueError("alibi_slopes must not require grad: the slopes are constants of the "
                         "op (no gradient is computed for them); pass alibi_slopes.detach() or "
                         "add the ALiBi term to a float bias to learn the slopes")


def _causal_str(causal: Union[bool, str]) -> str:
    if causal is True:
        return "top_left"
    if causal is False:
        return "none"
    return causal


# ---------------------------------------------------------------------------
# Implementation choice
# ---------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _resolved_impl(impl: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"``: what ``impl`` runs on ``device``; raises where it cannot."""
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError(
            "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before importing attnfuse "
            f"to run the kernels on CPU); got tensors on {device}. Use impl='torch' or 'auto'."
        )
    return impl


def _backend(impl: str, device: torch.device):
    """The module implementing forward/backward for ``impl`` on ``device``: for
    ``impl="auto"`` on CUDA, the Triton kernels guarded by :mod:`attnfuse.triton_guard`
    (a device where they cannot compile or launch falls back to the PyTorch path once,
    with a warning); for ``impl="triton"``, the kernels unguarded."""
    if impl == "auto" and device.type == "cuda":
        from attnfuse import triton_guard

        return triton_guard
    if _resolved_impl(impl, device) == "triton":
        from attnfuse.kernels import triton_flash

        return triton_flash
    from attnfuse.kernels import torch_impl

    return torch_impl


def _bias_4d(bias: Optional[Tensor]) -> Optional[Tensor]:
    """A view of ``bias`` with leading size-1 dims up to rank 4 (never a copy)."""
    if bias is None or bias.dim() == 4:
        return bias
    return bias[(None,) * (4 - bias.dim())]


def _seed_int(seed: Optional[Tensor], dropout_p: float) -> int:
    return 0 if dropout_p == 0.0 else int(seed.item())


SEED_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def validate_op_call(q, k, v, bias, scale, causal, dropout_p, softcap, seed, impl, window, key_mask,
                     sinks=None, alibi_slopes=None, causal_offsets=None) -> None:
    """Everything the graph-level op checks, raised before any kernel runs: :func:`validate`,
    the dropout seed, and whether ``impl`` runs on the inputs' device. The real kernel and
    the fake (tracing) kernel both run it, so a call the fake kernel accepts also runs for
    real (tests/test_op_contract.py checks this over the argument space), and a bad call
    fails when the graph is traced, not at its first run."""
    validate(q, k, v, bias, scale, causal, dropout_p, softcap, impl, window, key_mask, sinks,
             alibi_slopes, causal_offsets)
    if dropout_p > 0.0 and (not isinstance(seed, Tensor) or seed.numel() != 1 or seed.dtype not in SEED_DTYPES):
        got = type(seed).__name__ if not isinstance(seed, Tensor) else f"{seed.dtype} of shape {_shape(seed)}"
        raise ValueError(f"dropout_p > 0 needs a seed tensor (int64, 0-d), got {got}")
    _resolved_impl(impl, q.device)


def _optional_kw(**args: Optional[Tensor]) -> dict:
    """The backends' keywords for optional tensor arguments added after the first
    backends (sinks, ALiBi slopes, causal offsets), only those given: a backend written
    before one of them keeps working for calls without it."""
    return {name: t for name, t in args.items() if t is not None}


def _is_empty(q: Tensor, k: Tensor) -> bool:
    return q.numel() == 0 or k.shape[2] == 0


# ---------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------


@torch.library.custom_op("attnfuse::flash_attention", mutates_args=())
def flash_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor] = None,
    scale: float = 1.0,
    causal: str = "none",
    dropout_p: float = 0.0,
    softcap: float = 0.0,
    seed: Optional[Tensor] = None,
    impl: str = "auto",
    window: int = 0,
    key_mask: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    causal_offsets: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Fused attention; returns (out (B, Hq, Lq, Dv), lse (B, Hq, Lq) float32, natural log)."""
    validate_op_call(q, k, v, bias, scale, causal, dropout_p, softcap, seed, impl, window, key_mask,
                     sinks, alibi_slopes, causal_offsets)
    seed_int = _seed_int(seed, dropout_p)
    if _is_empty(q, k):
        out = q.new_zeros(q.shape[:3] + (v.shape[3],))
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
        if sinks is not None and q.numel():  # no key: every row attends only to its sink
            from attnfuse.kernels.base import add_sinks  # lazily: importing the op stays light

            out, lse = add_sinks(out, lse, sinks)
        return out, lse
    backend = _backend(impl, q.device)
    out, lse = backend.forward(
        q, k, v, _bias_4d(bias), scale=float(scale), causal=causal, dropout_p=float(dropout_p),
        softcap=float(softcap), seed=seed_int, window=int(window), key_mask=key_mask,
        **_optional_kw(sinks=sinks, alibi_slopes=alibi_slopes, causal_offsets=causal_offsets),
    )
    # The fake kernel promises contiguous outputs (Inductor asserts strides against it);
    # some paths (e.g. PyTorch's CPU SDPA) return other layouts.
    return out.contiguous(), lse.contiguous()


@flash_attention_op.register_fake
def _flash_attention_fake(q, k, v, bias=None, scale=1.0, causal="none", dropout_p=0.0, softcap=0.0,
                          seed=None, impl="auto", window=0, key_mask=None, sinks=None,
                          alibi_slopes=None, causal_offsets=None):
    validate_op_call(q, k, v, bias, scale, causal, dropout_p, softcap, seed, impl, window, key_mask,
                     sinks, alibi_slopes, causal_offsets)
    B, Hq, Lq, _ = q.shape
    out = q.new_empty((B, Hq, Lq, v.shape[3]))
    lse = q.new_empty((B, Hq, Lq), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("attnfuse::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    scale: float,
    causal: str,
    dropout_p: float,
    softcap: float,
    seed: Optional[Tensor],
    impl: str,
    need_dbias: bool,
    window: int = 0,
    key_mask: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    causal_offsets: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dbias, dsinks); dbias has bias's shape, or is empty unless
    ``need_dbias``; dsinks has the sinks' shape and dtype, or is empty without sinks."""
    if _is_empty(q, k):
        dbias = torch.zeros_like(bias) if need_dbias else q.new_empty((0,))
        dsinks = torch.zeros_like(sinks) if sinks is not None else q.new_empty((0,))
        return (q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape),
                dbias.contiguous(), dsinks)
    backend = _backend(impl, q.device)
    dout = dout.contiguous()
    grads = backend.backward(
        dout, q, k, v, _bias_4d(bias), out, lse, scale=float(scale), causal=causal,
        dropout_p=float(dropout_p), softcap=float(softcap), seed=_seed_int(seed, dropout_p),
        need_dbias=need_dbias, window=int(window), key_mask=key_mask,
        **_optional_kw(sinks=sinks, alibi_slopes=alibi_slopes, causal_offsets=causal_offsets),
    )
    dq, dk, dv, dbias = grads[:4]
    if dbias is None:
        dbias = q.new_empty((0,))
    else:
        dbias = dbias.reshape(bias.shape).contiguous()
    if sinks is None:
        dsinks = q.new_empty((0,))
    elif len(grads) > 4:  # the backend reduced it from its own delta (the Triton one)
        dsinks = grads[4]
    else:  # delta = rowsum(dO·O), the row term the backward kernels use too
        delta = (dout.float() * out.float()).sum(-1)
        from attnfuse.kernels.base import sinks_grad

        dsinks = sinks_grad(sinks, lse, delta)
    # contiguous, as the fake kernel promises (Inductor asserts strides against it)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dbias, dsinks


@flash_attention_backward_op.register_fake
def _flash_attention_backward_fake(dout, q, k, v, bias, out, lse, scale, causal, dropout_p, softcap, seed,
                                   impl, need_dbias, window=0, key_mask=None, sinks=None,
                                   alibi_slopes=None, causal_offsets=None):
    dbias = bias.new_empty(bias.shape) if need_dbias else q.new_empty((0,))
    dsinks = sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias, dsinks


def _savable(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t``, or a copy of it where ``t`` is an inference tensor (made under
    ``torch.inference_mode()``): autograd cannot save one for backward, while eager
    accepts it wherever its own ops need not save it (a padding mask behind ``~``, an
    added bias, q and k when only v needs a gradient)."""
    return t.clone() if t is not None and t.is_inference() else t


def _setup_context(ctx, inputs, output):
    (q, k, v, bias, scale, causal, dropout_p, softcap, seed, impl, window, key_mask, sinks,
     alibi_slopes, causal_offsets) = inputs
    out, lse = output
    _refuse_slope_grad(alibi_slopes)
    ctx.save_for_backward(*map(_savable, (q, k, v, bias)), out, lse,
                          *map(_savable, (seed, key_mask, sinks, alibi_slopes, causal_offsets)))
    ctx.args = (scale, causal, dropout_p, softcap, impl, window)
    ctx.bias_is_float = bias is not None and bias.dtype.is_floating_point
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    # lse is marked non-differentiable: only ``out`` carries a gradient.
    q, k, v, bias, out, lse, seed, key_mask, sinks, alibi_slopes, causal_offsets = ctx.saved_tensors
    scale, causal, dropout_p, softcap, impl, window = ctx.args
    need_dbias = bool(ctx.bias_is_float and ctx.needs_input_grad[3])
    dq, dk, dv, dbias, dsinks = flash_attention_backward_op(
        dout, q, k, v, bias, out, lse, scale, causal, dropout_p, softcap, seed, impl, need_dbias,
        window, key_mask, sinks, alibi_slopes, causal_offsets,
    )
    need_dsinks = sinks is not None and ctx.needs_input_grad[12]
    return ((dq, dk, dv, (dbias if need_dbias else None)) + (None,) * 8
            + ((dsinks if need_dsinks else None), None, None))


flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


def register_dtensor_rules_if_loaded() -> None:
    """Register the op's DTensor sharding rules (:mod:`attnfuse.distributed.sharding`) once
    ``torch.distributed.tensor`` is loaded; a no-op (no import) before that, so importing
    attnfuse stays light. Called at import, by :func:`flash_attention` on a tensor
    subclass and by the backend."""
    if "torch.distributed.tensor" in sys.modules:
        from attnfuse.distributed import sharding

        sharding.register()


register_dtensor_rules_if_loaded()

# ---------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    causal: Union[bool, str] = False,
    dropout_p: float = 0.0,
    softcap: float = 0.0,
    impl: str = "auto",
    window: int = 0,
    key_mask: Optional[Tensor] = None,
    sinks: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    causal_offsets: Optional[Tensor] = None,
) -> Tensor:
    """Fused attention ``dropout(softmax(mask(softcap(scale·q·kᵀ) + bias))) · v``.

    Args:
        q: (B, Hq, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv). Any strides; Hq a
            multiple of Hkv (GQA/MQA without materialised repeats); D, Dv in 1..256;
            float32, float16 or bfloat16, one dtype and device for all three.
        bias: None, an additive float tensor, or a bool keep-mask (True = attend),
            of any shape that broadcasts to (B, Hq, Lq, Lk). Never expanded in memory.
        scale: multiplies q·kᵀ; default ``1 / sqrt(D)``.
        causal: False (default), True (= ``"top_left"``, like torch's ``is_causal``),
            ``"top_left"`` or ``"bottom_right"`` (query i sees keys j <= i + Lk - Lq).
        dropout_p: dropout on the probabilities, in [0, 1). Pass 0 in eval.
        softcap: ``tanh(s / softcap) * softcap`` on the scaled scores, before bias and
            masking (Gemma 2); 0 turns it off.
        impl: ``"triton"`` (our kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``),
            ``"torch"`` (PyTorch ops: fused CPU SDPA where exact, else a blocked
            online softmax), ``"auto"`` (triton on CUDA, torch elsewhere).
        window: sliding window (needs ``causal``): query i sees at most ``window``
            keys, ``i + off - window < j <= i + off``; 0 (default) turns it off.
        key_mask: None or a bool (B, Lk) / (1, Lk) key-padding mask, True = visible.
        sinks: None or a float (Hq,) tensor of attention-sink logits (gpt-oss): each
            joins its head's softmax denominators and has no value row; differentiable.
        alibi_slopes: None or float32 (Hq,) / (B, Hq) ALiBi slopes (FlashAttention-2's
            convention): logit (i, j) of head h gains ``-slope * |i + Lk - Lq - j|``,
            computed per block/tile, never as an (Lq, Lk) tensor. Constants: slopes
            that require grad raise ``ValueError``.
        causal_offsets: None or an int32/int64 (B,) tensor (with ``causal=False``): row
            i of batch item b sees only keys ``j <= i + causal_offsets[b]``, a causal
            diagonal per item given at run time (e.g. a static KV cache filled to a
            different position per item).

    Returns:
        (B, Hq, Lq, Dv) in q's dtype. Rows whose logits are all ``-inf``, or that see
        no key, give 0 (with sinks too: such a row attends only to its sink).
    """
    if scale is None and isinstance(q, Tensor) and q.dim() == 4:
        scale = 1.0 / math.sqrt(q.shape[-1])
    causal = _causal_str(causal)
    validate(q, k, v, bias, scale, causal, dropout_p, softcap, impl, window, key_mask, sinks,
             alibi_slopes, causal_offsets)
    if torch.is_grad_enabled():
        _refuse_slope_grad(alibi_slopes)
    if type(q) is not Tensor:  # a DTensor needs the op's sharding rules
        register_dtensor_rules_if_loaded()
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    out, _ = torch.ops.attnfuse.flash_attention(
        q, k, v, bias, scale, causal, dropout_p, softcap, seed, impl, window, key_mask, sinks,
        alibi_slopes, causal_offsets,
    )
    return out
