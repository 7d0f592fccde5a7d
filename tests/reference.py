"""Eager float64 reference for the semantics of ``attnfuse::flash_attention``.

Independent of the library: it materialises the full score matrix exactly as a
hand-written model would, so tests compare the fused op against it.
"""
from __future__ import annotations

import math

import torch


def causal_keep(lq: int, lk: int, align: str, device=None) -> torch.Tensor:
    """Bool (lq, lk) mask, True where a query may see a key.

    top_left: query i sees keys j <= i (torch's ``is_causal``).
    bottom_right: query i sees keys j <= i + (lk - lq) (flash-attn, KV cache).
    """
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    if align == "top_left":
        return j <= i
    if align == "bottom_right":
        return j <= i + (lk - lq)
    raise ValueError(align)


def window_keep(lq: int, lk: int, align: str, window: int, device=None) -> torch.Tensor:
    """Bool (lq, lk): the causal mask of ``align`` narrowed to the last ``window`` keys
    of each row (Hugging Face's sliding window: j > i + off - window)."""
    off = lk - lq if align == "bottom_right" else 0
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return causal_keep(lq, lk, align, device) & (j > i + off - window)


def visible_keys(b: int, lq: int, lk: int, causal: str = "none", window: int = 0,
                 key_mask=None) -> torch.Tensor:
    """Bool (b, 1, lq, lk) from the op's definition: what causal (with its alignment),
    window and a (b|1, lk) key_mask leave visible."""
    keep = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    if causal != "none":
        keep = keep & (window_keep(lq, lk, causal, window) if window else causal_keep(lq, lk, causal))
    if key_mask is not None:
        keep = keep & key_mask[:, None, None, :]
    return keep


def dense_logit_bias(bias, keep, shape) -> torch.Tensor:
    """Everything that masks or biases the logits as one float64 tensor of ``shape``
    (B, H, Lq, Lk): the bias (bool: False -> -inf; float: added), then -inf where
    ``keep`` is False."""
    fb = torch.zeros(shape, dtype=torch.float64)
    if bias is not None:
        if bias.dtype == torch.bool:
            fb = fb.masked_fill(~bias.expand(shape), float("-inf"))
        else:
            fb = fb + bias.double()
    return fb.masked_fill(~keep.expand(shape), float("-inf"))


def attention_reference(q, k, v, bias=None, *, scale=None, causal="none",
                        softcap=0.0, dropout_mask=None, dropout_p=0.0,
                        dtype=torch.float64, window=0, key_mask=None, dead_rows="nan"):
    """softmax(mask(softcap(scale * q k^T) + bias)) [dropout] @ v in ``dtype``.

    ``causal`` is "none", "top_left" or "bottom_right"; ``window`` (> 0) narrows it to
    a sliding window; ``key_mask`` is a bool (B|1, Lk) key-padding mask (True =
    visible). All masks are dense -inf fills here. ``dropout_mask`` is a bool
    keep-mask broadcastable to (B, Hq, Lq, Lk); kept probabilities are scaled by
    1 / (1 - dropout_p). Rows masked entirely with -inf give NaN, as eager does, or with
    ``dead_rows="zero"`` 0 and zero gradients (the op's documented convention).
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        if bias.dtype == torch.bool:
            s = s.masked_fill(~bias, float("-inf"))
        else:
            s = s + bias.to(dtype)
    if causal != "none" or key_mask is not None:
        keep = visible_keys(1 if key_mask is None else key_mask.shape[0], q.shape[2], k.shape[2],
                            causal, window, key_mask)
        s = s.masked_fill(~keep.to(s.device), float("-inf"))
    dead = None
    if dead_rows == "zero":
        dead = torch.isneginf(s).all(-1, keepdim=True)
        s = s.masked_fill(dead, 0.0)
    p = torch.softmax(s, dim=-1)
    if dead is not None:
        p = p.masked_fill(dead, 0.0)
    if dropout_mask is not None:
        p = p * dropout_mask.to(dtype) / (1.0 - dropout_p)
    return p @ v


def assert_close_rel(actual, expected, tol, what) -> None:
    """Max |actual - expected| within ``tol`` times the reference's max magnitude (at
    least 1), with matching shapes and finite values; ``what`` names the quantity."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    ref = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    assert err <= tol * ref, f"{what}: max abs err {err:.3g} > {tol:g} * {ref:.3g}"


def rel_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| (Frobenius, in float64; the norm floored at
    1e-30 so an all-zero reference compares absolute error)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_within_eager_rounding(actual, eager, exact, factor, what) -> None:
    """``actual``'s error against the float64 ``exact`` is at most ``factor`` times the
    error of ``eager`` (the unfused graph run in the low-precision dtype, the same
    inputs) against it: a tolerance that follows the dtype's own rounding, not a flat
    number. Both errors are relative Frobenius norms (:func:`rel_error`)."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    ours, theirs = rel_error(actual, exact), rel_error(eager, exact)
    assert ours <= factor * theirs, (
        f"{what}: relative error {ours:.3g} > {factor:g} x eager's {theirs:.3g}")


def keep_mask_from_identity_v(out, lk: int):
    """The dropout keep-mask an op call used, read back from its output for
    v = identity (Dv >= Lk): out[..., j] = P[..., j] * keep[..., j] / (1 - p), nonzero
    exactly where a key with P > 0 was kept. Where P = 0 the mask is irrelevant (and
    read as dropped). Independent of the library's mask generator."""
    return out[..., :lk] != 0


def assert_keep_rate(keep, visible, dropout_p: float, what="dropout keep-mask") -> None:
    """The fraction of ``visible`` positions kept is 1 - p within 5 binomial standard
    deviations (plus 0.01): a mask that keeps everything, or nothing, fails."""
    n = int(visible.sum())
    assert n >= 100, f"{what}: too few visible positions ({n}) to test the keep rate"
    rate = keep[visible.expand_as(keep)].double().mean().item()
    sd = math.sqrt(dropout_p * (1 - dropout_p) / n)
    assert abs(rate - (1 - dropout_p)) <= 5 * sd + 0.01, (what, rate, 1 - dropout_p, n)
