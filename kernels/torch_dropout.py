"""Dropout keep-masks of the CPU implementation (``impl="torch"``).

A counter-based hash (splitmix64 finaliser) of (seed, linear index
((b*Hq + h)*Lq + i)*Lk + j): the keep mask is a pure function of (seed, b, h, i, j), so
the backward regenerates the forward's mask block by block and the same seed
reproduces the same result. (It does not match the Triton kernels' Philox RNG.)
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["block_keep", "dropout_keep_mask"]

_M64 = (1 << 64) - 1


def _i64(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >= (1 << 63) else x


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)
_RNG_BITS = 24


def _seed_key(seed: int) -> int:
    """splitmix64 of the seed, in Python integers: the per-call stream key."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return _i64(z ^ (z >> 31))


def _srl(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _keep_from_index(idx: Tensor, seed: int, p: float) -> Tensor:
    """Bool keep-mask, a pure function of (seed, linear index); int64 ops wrap."""
    z = idx * _GOLDEN + _seed_key(seed)
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    z = z ^ _srl(z, 31)
    thr = int(round((1.0 - p) * (1 << _RNG_BITS)))
    return _srl(z, 64 - _RNG_BITS) < thr


def block_keep(seed, p, b0, b1, hq, lq, lk, i0, i1, kmin, kmax, hkv, g) -> Tensor:
    """Keep-mask of batch items [b0, b1), rows [i0, i1) and keys [kmin, kmax) as
    (b1 - b0, Hkv, G, rows, kmax - kmin)."""
    bh = torch.arange(b0 * hq, b1 * hq, dtype=torch.int64).view(b1 - b0, hkv, g, 1, 1)
    bh = bh * (lq * lk)
    rows = torch.arange(i0, i1, dtype=torch.int64).view(-1, 1) * lk
    cols = torch.arange(kmin, kmax, dtype=torch.int64).view(1, -1)
    return _keep_from_index(bh + (rows + cols), seed, p)


def dropout_keep_mask(seed: int, dropout_p: float, shape) -> Tensor:
    """The full (B, Hq, Lq, Lk) bool keep-mask the blocked path uses (for tests)."""
    b, hq, lq, lk = shape
    return block_keep(seed, dropout_p, 0, b, hq, lq, lk, 0, lq, 0, lk, hq, 1).view(b, hq, lq, lk)
