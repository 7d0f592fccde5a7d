"""ALiBi proven from the graph: a float term ``slope[b, h] * (j + c)`` becomes ``alibi_slopes``.

Owns :func:`find` (which float term of the scores is an ALiBi term, and how to build the
op's (B, Hq) slopes from the graph's own slope tensor) and :func:`causal_allows` (when the
op's FlashAttention-2 term ``-slope * |i + Lk - Lq - j|`` equals it).

BLOOM (``slopes[:, None, None] * arange(Lk)``, repeated per batch item, added through
``baddbmm``), MPT (``arange(1 - L, 1) * slopes``, sliced to the keys) and x-transformers
write ALiBi as a *product* ``A * P`` followed by layout ops (views, ``repeat``, slices,
unsqueezes), possibly a constant factor and a cast, and add it to the scores. Proven here:

- the product: a multiplication of two tensors ``A`` (the slopes) and ``P`` (the key
  positions), followed by layout ops only (each output element IS one element of the
  product, so the term is ``A_T * P_T``, the same layout ops applied to each broadcast
  factor), constant factors (folded into the slopes) and casts (the product must be
  computed in float32/float64 or in the scores' own dtype: a product rounded to a coarser
  dtype than the scores, Falcon's bfloat16 ALiBi in a float32 model, stays a bias);
- the slopes: the layout ops applied to an *index* tensor of ``A`` (element ids, broadcast
  as ``A`` is) give, at each score position, which element of ``A`` it reads: it must be
  the same along the query and key axes, so the slope depends on the batch and head only.
  Their values are never read: the op gets the slope tensor itself (any values, computed
  by the graph at run time), gathered to (B, Hq) through the same layout ops;
- the positions: ``P`` must be a constant of the graph (literals and sizes,
  :func:`.consts.const_eval`; ``arange``-built), integer-valued, and ``P_T - j`` constant
  along the key axis: ``P_T = j + c`` with ``c`` any row constant (a per-batch or per-row
  shift). Positions from a graph input (BLOOM's and Falcon's ``cumsum`` of a padding mask)
  are not constants: equal to ``j + c`` only where each row's visible keys are one run,
  which the graph does not show; they stay a bias, with a note;
- the slopes do not require grad (the op's slopes are constants).

:func:`bound` proves less, for terms that stay a bias: a product of a constant finite
tensor and an *integer* tensor (any values, so ``|P| <= 2**64``), through the same
layout ops, constant factors and casts to a dtype with float32's range, is finite and
bounded (Falcon's ``bfloat16(slopes) * cumsum_positions / sqrt(d)``). Such a term masks
nothing: :mod:`.structure` may then take a finite-fill ``masked_fill`` of it apart.

Shapes must be static (the index and position checks run at the traced sizes). The
equivalence with the op's ``-slope * |i + Lk - Lq - j|`` needs every visible key to satisfy
``j <= i + Lk - Lq`` (:func:`causal_allows`): then ``|i + Lk - Lq - j| = i + Lk - Lq - j`` and
the op's term is ``slope * j`` minus a row constant, which softmax ignores. Beside a sink
column it does not: the sink's logit does not move with the row, so there the positions
must be the op's own, ``P_T = j - i - (Lk - Lq)`` (``sink_rows``), or the term stays a bias.
Nothing here changes a graph.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes import consts as C
from attnfuse.passes import ops as O
from attnfuse.passes.types import View4

_PRODUCT_DTYPES = (torch.float32, torch.float64)
_MAX_POSITION = 1 << 24   # integer positions exact in float32


@dataclasses.dataclass(frozen=True)
class AlibiTerm:
    """A proven ALiBi term: ``term`` (the raw term it replaces) is ``coef * A_T * P_T``.
    ``slopes`` is ``A`` (the graph's slope tensor), ``expand_to`` the product's shape
    (``A`` is broadcast to it), ``chain`` the layout ops from the product to the term
    (product first), ``view`` the term's op-order view (its base is the term node)."""

    term: Any
    product: fx.Node
    slopes: fx.Node
    expand_to: Tuple[int, ...]
    chain: Tuple[fx.Node, ...]
    coef: float
    view: View4
    note: str


_aten = torch.ops.aten
# Pure indexing ops the canonical table (ops.py) does not list as LAYOUT: each output
# element is one element of the input, so they commute with an elementwise product.
_INDEXING_METHODS = {"squeeze", "narrow", "select", "flatten", "unflatten", "view_as", "reshape_as"}
_INDEXING_FUNCTIONS = {torch.squeeze, torch.narrow, torch.select, torch.flatten, torch.unflatten}
_INDEXING_ATEN = {_aten.squeeze, _aten.slice, _aten.select, _aten.narrow, _aten.alias, _aten.flatten,
                  _aten.unflatten, _aten._unsafe_view, _aten.clone, _aten.permute, _aten.transpose}


def _indexing(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in _INDEXING_METHODS
    if n.op == "call_function":
        return n.target in _INDEXING_FUNCTIONS or getattr(n.target, "overloadpacket", None) in _INDEXING_ATEN
    return False


def _tensor_arg(x: Any) -> bool:
    return isinstance(x, fx.Node) and A.shape(x) is not None and len(A.shape(x)) > 0


def _peel(n: fx.Node, gm) -> Optional[Tuple[fx.Node, List[fx.Node], float, List[torch.dtype]]]:
    """(product, layout chain from the term down to it, constant factor, cast dtypes) of the
    term ``n``, or None where ``n`` is not such a chain."""
    chain, coef, casts = [], 1.0, []
    while isinstance(n, fx.Node):
        op = O.classify(n, gm)
        if op is None and _indexing(n):
            if any(_tensor_arg(a) for a in list(n.args[1:]) + list(n.kwargs.values())):
                return None
            chain.append(n)
            n = n.args[0]
            continue
        if op is None:
            return None
        if op.kind == O.SCALE and op.sub in ("mul", "div") and not op.inplace:
            a, b = op["a"], op["b"]
            if _tensor_arg(a) and _tensor_arg(b):
                return (n, chain, coef, casts) if op.sub == "mul" else None
            x, c = (a, b) if _tensor_arg(a) else (b, a)
            c = C.scalar_value(c, gm)
            if c is None or not _tensor_arg(x) or (op.sub == "div" and x is b) or c == 0:
                return None
            coef = coef * c if op.sub == "mul" else coef / c
            n = x
            continue
        if op.kind == O.CAST:
            casts.append(A.dtype(n))
            n = n.args[0]
            continue
        if op.kind in (O.LAYOUT, O.GETITEM) and not op.inplace and n.op != "call_module":
            if any(_tensor_arg(a) for a in list(n.args[1:]) + list(n.kwargs.values())):
                return None  # an index tensor, or another tensor operand: not a layout op
            chain.append(n)
            n = n.args[0]
            continue
        return None
    return None


def _replay(chain: Sequence[fx.Node], x: torch.Tensor, gm) -> Optional[torch.Tensor]:
    """The layout ops of ``chain`` (product first) applied to the tensor ``x``."""
    for c in chain:
        args = C.const_eval(tuple(c.args[1:]), gm)
        kwargs = C.const_eval(dict(c.kwargs), gm)
        if args is None or kwargs is None:
            return None
        try:
            if c.op == "call_method":
                x = getattr(x, c.target)(*args, **kwargs)
            else:
                x = c.target(x, *args, **kwargs)
        except Exception:  # noqa: BLE001 - a spelling this replay cannot run: not proven
            return None
    return x if isinstance(x, torch.Tensor) else None


def _static(shape) -> Optional[Tuple[int, ...]]:
    if shape is None:
        return None
    out = tuple(A.static_int(s) for s in shape)
    return None if any(s is None for s in out) else out


def _positions_ok(p_t: torch.Tensor, tags: Sequence[Any]) -> bool:
    """``p_t`` (the term's shape) is ``j + c``: integer-valued, exact in float32, and minus
    the key index constant along the key axis."""
    if not p_t.is_floating_point() and p_t.dtype not in (torch.int64, torch.int32, torch.int16,
                                                        torch.int8, torch.uint8):
        return False
    p = p_t.double()
    if not torch.isfinite(p).all() or (p != p.round()).any() or p.abs().max() >= _MAX_POSITION:
        return False
    kax = tags.index("k")
    shape = [1] * p.dim()
    shape[kax] = p.shape[kax]
    d = p - torch.arange(p.shape[kax], dtype=torch.float64).view(shape)
    return bool((d == d.narrow(kax, 0, 1)).all())


def _no_row_shift(p_t: torch.Tensor, tags: Sequence[Any], lq: Any, lk: Any) -> bool:
    """``p_t`` (already ``j + c``) is exactly ``j - i - (Lk - Lq)``: the op's own term, with
    no row constant to drop (static sizes only)."""
    sq, sk = A.static_int(lq), A.static_int(lk)
    if sq is None or sk is None:
        return False
    kax = tags.index("k")
    d = p_t.double().narrow(kax, 0, 1)             # c: the position of key 0, per row
    shape = [1] * d.dim()
    if "q" in tags:
        qax = tags.index("q")
        if d.shape[qax] != sq:
            return False
        shape[qax] = sq
    elif sq != 1:
        return False
    want = -(torch.arange(sq, dtype=torch.float64) + (sk - sq)).view(shape)
    return bool((d == want).all())


def _slope_ids_ok(ids: torch.Tensor, tags: Sequence[Any]) -> bool:
    """The element of ``A`` each term position reads is the same along the query/key axes."""
    for ax, t in enumerate(tags):
        if t in ("q", "k") and not bool((ids == ids.narrow(ax, 0, 1)).all()):
            return False
    return True


def prove(term: Any, node: fx.Node, tags: Sequence[Any], view: View4, coef: float,
          scores_dtype, gm, sink_rows: Optional[Tuple[Any, Any]] = None
          ) -> Tuple[Optional[AlibiTerm], Optional[str]]:
    """(AlibiTerm, None) where the float term ``node`` (``coef`` times it added to the
    scores; ``tags`` its axes' score tags) is ALiBi; else (None, a note for a term that
    looks like ALiBi but is not proven, or None for any other term). ``sink_rows``: the
    scores' (Lq, Lk) where a sink column joins their softmax (the positions must then be
    the op's own, with no row constant)."""
    if "k" not in tags:
        return None, None
    peeled = _peel(node, gm)
    if peeled is None:
        return None, None
    prod, chain, k, casts = peeled
    chain = list(reversed(chain))  # product first
    coef = coef * k
    a0, b0 = O.classify(prod, gm)["a"], O.classify(prod, gm)["b"]
    shape_t, shape_p = _static(A.shape(node)), _static(A.shape(prod))
    if shape_t is None or shape_p is None:
        return None, f"{node.name}: a product term (ALiBi?) with dynamic shapes stays a bias"
    why = None
    for a, p in ((a0, b0), (b0, a0)):
        pv = C.const_eval(p, gm)
        if not isinstance(pv, torch.Tensor):
            if C.input_reads(p):
                why = (f"{node.name}: ALiBi-like term whose key positions come from a graph input "
                       f"({', '.join(C.input_reads(p))}): equal to j + c only where the visible keys are "
                       f"one run per row, which the graph does not show; stays a bias")
            continue
        sa = _static(A.shape(a))
        if sa is None or pv.dim() > len(shape_p):
            continue
        try:
            p_t = _replay(chain, torch.broadcast_to(pv, shape_p), gm)
            ids = torch.arange(max(1, int(torch.Size(sa).numel()))).view(sa) if sa else torch.tensor(0)
            ids_t = _replay(chain, torch.broadcast_to(ids, shape_p), gm)
        except RuntimeError:
            continue
        if p_t is None or ids_t is None or tuple(p_t.shape) != shape_t or tuple(ids_t.shape) != shape_t:
            continue
        if not _positions_ok(p_t, tags) or not _slope_ids_ok(ids_t, tags):
            continue
        if sink_rows is not None and not _no_row_shift(p_t, tags, *sink_rows):
            return None, (f"{node.name}: ALiBi term slope*(j + c) beside a sink column: the op's "
                          f"-slope*|i + Lk - Lq - j| differs from it by a row constant, which would move "
                          f"the scores against the sink; stays a bias")
        dt = A.dtype(prod)
        if dt is None or not dt.is_floating_point or (dt not in _PRODUCT_DTYPES and dt != scores_dtype):
            return None, (f"{node.name}: ALiBi term computed in {dt} for {scores_dtype} scores (the eager "
                          f"product is rounded to {dt}); stays a bias")
        if any(c is None or not c.is_floating_point for c in casts):
            return None, f"{node.name}: ALiBi term cast to a non-float dtype; stays a bias"
        val = A.meta_val(a)
        if isinstance(val, torch.Tensor) and val.requires_grad:
            return None, (f"{node.name}: ALiBi slopes {a.name} require grad (learned slopes); the op's "
                          f"slopes are constants; stays a bias")
        note = (f"{node.name}: ALiBi (slopes {a.name} x key positions {p.name}), passed as alibi_slopes "
                f"(no (Lq, Lk) tensor)")
        return AlibiTerm(term, prod, a, shape_p, tuple(chain), float(coef), view, note), None
    return None, why


_WIDE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)   # float32's range or more
BOUND_LIMIT = 2.0 ** 90   # far above any logit, far below an absorbing fill (consts.FILL_LIMIT)


def bound(n: Any, gm) -> Optional[float]:
    """A bound on ``|n|`` below :data:`BOUND_LIMIT` where ``n`` is proven a product of a
    constant finite float tensor and an integer tensor followed by layout ops, constant
    factors and casts to float32/bfloat16/float64 (each rounding at most doubles the
    bound); else None."""
    peeled = _peel(n, gm) if isinstance(n, fx.Node) else None
    if peeled is None:
        return None
    prod, _, coef, casts = peeled
    op = O.classify(prod, gm)
    if any(c not in _WIDE_DTYPES for c in casts + [A.dtype(prod)]):
        return None
    for a, p in ((op["a"], op["b"]), (op["b"], op["a"])):
        av = C.const_eval(a, gm)
        pd = A.dtype(p)
        if not isinstance(av, torch.Tensor) or not av.is_floating_point() or av.numel() == 0 or \
                not isinstance(pd, torch.dtype) or pd.is_floating_point or pd.is_complex or pd == torch.bool:
            continue
        av = av.double()
        if not bool(torch.isfinite(av).all()):
            return None
        b = abs(coef) * float(av.abs().max()) * 2.0 ** 64 * 2.0 ** (len(casts) + 1)
        return b if b < BOUND_LIMIT else None
    return None


def causal_allows(causal: str, lq: Any, lk: Any) -> bool:
    """Every visible key has ``j <= i + Lk - Lq``: bottom-right causal, or top-left with
    Lk >= Lq (static sizes, or proven equal)."""
    if causal == "bottom_right":
        return True
    if causal != "top_left":
        return False
    if A.size_eq(lq, lk):
        return True
    sq, sk = A.static_int(lq), A.static_int(lk)
    return sq is not None and sk is not None and sk >= sq
