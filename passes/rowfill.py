"""Row fills after the softmax: zeroing whole query rows of P commutes with P·V.

Owns :func:`row_fill`, which reads a fill of the probabilities between the softmax and
P·V — ``p.masked_fill(rows, 0.0)``, ``torch.where(rows, 0.0, p)``, ``torch.where(keep, p, 0)``
— as a *row mask*: when the condition is constant along the key axis (its key axis has
size 1: ``~mask.any(-1, keepdim=True)``, the rows that see no key; a query-padding mask
``qpad[:, None, :, None]``), zeroing those rows of P zeroes the same rows of P·V and
nothing else, so the rewriter applies the fill to the op's output instead (and eager's
zero gradient on those rows follows from it). Reference implementations that kernel
tests compare against (flash-attn's ``attention_ref``) write both fills.

A fill whose condition varies along the keys, or whose value is not 0 (a row of P set
to c is c·ΣV, not a row of zeros), is not a row mask: :class:`~.types.Miss` says which.
Nothing here changes a graph.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes import consts as C
from attnfuse.passes import ops as O
from attnfuse.passes.types import Miss


def _zero(x: Any, gm) -> Optional[bool]:
    """True for a constant 0, False for another constant, None when not a constant."""
    if isinstance(x, bool):
        return None
    val = C.scalar_value(x, gm)
    return None if val is None else val == 0


def row_fill(u: fx.Node, op: O.Op, cur: fx.Node, tags: List, gm) -> Tuple[fx.Node, List, bool]:
    """``(cond, cond_tags, zero_when)`` when the MASK node ``u`` zeroes whole query rows of
    the probabilities ``cur`` (tagged ``tags``): rows where ``cond == zero_when`` become 0.
    ``cond_tags`` are ``cond``'s axes as tags of ``cur`` (None for unit axes). Raises Miss."""
    if op.inplace:
        raise Miss("after_softmax", f"{u.name}: an in-place fill of the probabilities", u)
    if op.sub == "masked_fill":
        if op["x"] is not cur:
            raise Miss("after_softmax", f"{u.name}: the probabilities are the mask of a fill", u)
        cond, value, zero_when = op["mask"], op["value"], True
    else:
        if op["a"] is cur and op["b"] is not cur:
            cond, value, zero_when = op["cond"], op["b"], False
        elif op["b"] is cur and op["a"] is not cur:
            cond, value, zero_when = op["cond"], op["a"], True
        else:
            raise Miss("after_softmax", f"{u.name}: the probabilities are the condition of a where", u)
    if not isinstance(cond, fx.Node) or A.dtype(cond) != torch.bool:
        raise Miss("after_softmax", f"{u.name}: a fill of the probabilities whose condition is not a bool tensor", u)
    zero = _zero(value, gm)
    if not zero:
        raise Miss("after_softmax", f"{u.name} fills rows of the probabilities with "
                                    f"{'a tensor' if zero is None else C.scalar_value(value, gm)}, not 0 "
                                    f"(only a zero row of P is a zero row of P·V)", u)
    if any(isinstance(t, tuple) and t[0] == "split" for t in tags):
        raise Miss("after_softmax", f"{u.name}: a fill of the probabilities while their batch axes are split", u)
    cs, ps = A.shape(cond), A.shape(cur)
    if cs is None or ps is None or len(cs) > len(ps) or A.shape(u) is None or len(A.shape(u)) != len(ps):
        raise Miss("after_softmax", f"{u.name}: the fill's condition does not broadcast to the probabilities", u)
    r = len(ps)
    ctags = []
    for j, size in enumerate(cs):
        t = tags[r - len(cs) + j]
        if A.is_one(size):
            ctags.append(None)
        elif not A.size_eq(size, ps[r - len(cs) + j]):
            raise Miss("after_softmax", f"{u.name}: the fill's condition does not broadcast to the probabilities", u)
        elif t == "k":
            raise Miss("after_softmax", f"{u.name}: the fill of the probabilities varies along the key axis "
                                        f"(only a fill of whole query rows commutes with P·V)", u)
        else:
            ctags.append(t)
    return cond, ctags, zero_when
