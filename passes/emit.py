"""Emitting nodes in the graph's own dialect (torch-level or aten).

Owns :class:`Emitter`: the handful of node constructors the rewriter needs (view
ops, elementwise helpers for the bias, the seed, the fused op call), each spelled
for a torch-level graph (dynamo, symbolic_trace) or an aten graph (make_fx, export).
"""
from __future__ import annotations

import operator
from typing import Any, List, Optional, Sequence

import torch
from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes.types import View4

aten = torch.ops.aten
prims = torch.ops.prims


def is_aten_graph(graph: fx.Graph) -> bool:
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and
               n.target.namespace in ("aten", "prims") for n in graph.nodes)


class Emitter:
    """Creates nodes at the graph's current insertion point."""

    def __init__(self, graph: fx.Graph, aten_dialect: bool):
        self.g, self.aten = graph, aten_dialect

    def _f(self, target, args, kwargs=None):
        return self.g.call_function(target, tuple(args), kwargs or {})

    def _m(self, name, args, kwargs=None):
        return self.g.call_method(name, tuple(args), kwargs or {})

    # -- views ---------------------------------------------------------------
    def permute(self, x, dims):
        return self._f(aten.permute.default, (x, list(dims))) if self.aten else self._m("permute", (x, *dims))

    def squeeze(self, x, d):
        return self._f(aten.squeeze.dim, (x, d)) if self.aten else self._m("squeeze", (x, d))

    def unsqueeze(self, x, d):
        return self._f(aten.unsqueeze.default, (x, d)) if self.aten else self._m("unsqueeze", (x, d))

    def size(self, x, d, symbolic: bool = False):
        # a static size is baked in only where the graph is specialised to it (dynamo,
        # make_fx, export); ShapeProp metadata of a symbolic_trace graph is one example
        v = x.meta.get("val", x.meta.get("example_value")) if isinstance(x, fx.Node) else None
        s = tuple(v.shape) if isinstance(v, torch.Tensor) else None
        if s is not None and not symbolic:
            st = A.static_int(s[d])
            if st is not None:
                return st
        return self._f(aten.sym_size.int, (x, d)) if self.aten else self._m("size", (x, d))

    def select(self, x, d, i):
        return self._f(aten.select.int, (x, d, i)) if self.aten else self._m("select", (x, d, i))

    def replay(self, nodes, x):
        """Copies of the single-input layout nodes ``nodes`` (first applied first), the
        first reading ``x`` instead of its own input; returns the last copy."""
        for n in nodes:
            src = n.args[0]
            x = self.g.node_copy(n, lambda a, src=src, x=x: x if a is src else a)
        return x

    def expand(self, x, sizes):
        return self._f(aten.expand.default, (x, list(sizes))) if self.aten else self._m("expand", (x, *sizes))

    def reshape(self, x, sizes):
        return self._f(aten.reshape.default, (x, list(sizes))) if self.aten else self._m("reshape", (x, *sizes))

    def contiguous(self, x):
        if self.aten:
            return self._f(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
        return self._m("contiguous", (x,))

    def cast(self, x, dtype):
        return self._f(prims.convert_element_type.default, (x, dtype)) if self.aten else self._m("to", (x, dtype))

    # -- elementwise ------------------------------------------------------------
    def mul(self, a, b):
        return self._f(aten.mul.Tensor, (a, b)) if self.aten else self._f(operator.mul, (a, b))

    def div(self, a, b):
        return self._f(aten.div.Tensor, (a, b)) if self.aten else self._f(operator.truediv, (a, b))

    def add(self, a, b):
        return self._f(aten.add.Tensor, (a, b)) if self.aten else self._f(operator.add, (a, b))

    def logical_not(self, x):
        return self._f(aten.logical_not.default, (x,)) if self.aten else self._f(torch.logical_not, (x,))

    def logical_and(self, a, b):
        return self._f(aten.logical_and.default, (a, b)) if self.aten else self._f(torch.logical_and, (a, b))

    def where_neg_inf(self, keep, fb):
        if self.aten:
            return self._f(aten.where.ScalarOther, (keep, fb, float("-inf")))
        return self._f(torch.where, (keep, fb, float("-inf")))

    def scalar(self, fn, a, b):
        """Python-number arithmetic (a run-time scale)."""
        return self._f(fn, (a, b))

    def seed(self):
        if self.aten:
            return self._f(aten.randint.low, (0, 2 ** 62, []), {"dtype": torch.int64,
                                                                  "device": torch.device("cpu")})
        return self._f(torch.randint, (0, 2 ** 62, ()), {"dtype": torch.int64})

    def fused(self, q, k, v, bias, scale, causal, dropout_p, softcap, seed, window=0, key_mask=None,
              sinks=None, alibi_slopes=None, causal_offsets=None):
        kw = {"bias": bias, "scale": scale, "causal": causal, "dropout_p": dropout_p,
              "softcap": softcap, "seed": seed}
        if window:  # the structural arguments only when used: graphs without them read as before
            kw["window"] = int(window)
        if key_mask is not None:
            kw["key_mask"] = key_mask
        if sinks is not None:
            kw["sinks"] = sinks
        if alibi_slopes is not None:
            kw["alibi_slopes"] = alibi_slopes
        if causal_offsets is not None:
            kw["causal_offsets"] = causal_offsets
        target = torch.ops.attnfuse.flash_attention
        call = self._f(target.default if self.aten else target, (q, k, v), kw)
        return self._f(operator.getitem, (call, 0)), call

    def zero_pad_before(self, x, pads, rank: int):
        """``x`` with ``count`` zeros inserted before each ``(axis, count)``."""
        lo = min(ax for ax, _ in pads)
        widths = dict(pads)
        amounts: List[int] = []
        for ax in range(rank - 1, lo - 1, -1):  # F.pad / constant_pad_nd: last axis first
            amounts += [widths.get(ax, 0), 0]
        if self.aten:
            return self._f(aten.constant_pad_nd.default, (x, amounts, 0.0))
        return self._f(torch.nn.functional.pad, (x, amounts))

    def item(self, x, i):
        return self._f(operator.getitem, (x, i))

    # -- the empty-row fix-up (see passes/structure.py) ----------------------------
    def is_neg_inf(self, x):
        if self.aten:
            return self._f(aten.eq.Scalar, (x, float("-inf")))
        return self._f(torch.eq, (x, float("-inf")))

    def mean_keys(self, x):
        """Mean over axis 2 (keys), kept as a unit axis."""
        if self.aten:
            return self._f(aten.mean.dim, (x, [2], True))
        return self._m("mean", (x, 2), {"keepdim": True})

    def sub(self, a, b):
        return self._f(aten.sub.Tensor, (a, b)) if self.aten else self._f(operator.sub, (a, b))

    def matmul(self, a, b):
        return self._f(aten.matmul.default, (a, b)) if self.aten else self._f(torch.matmul, (a, b))

    def transpose_last(self, x):
        return self._f(aten.transpose.int, (x, -2, -1)) if self.aten else self._m("transpose", (x, -2, -1))

    def detach(self, x):
        return self._f(aten.detach.default, (x,)) if self.aten else self._m("detach", (x,))

    def zero_where(self, x, cond):
        """``x`` with 0 where ``cond`` (bool, broadcast to x) is True."""
        if self.aten:
            return self._f(aten.masked_fill.Scalar, (x, cond, 0.0))
        return self._m("masked_fill", (x, cond, 0.0))

    def where(self, c, a, b):
        return self._f(aten.where.self, (c, a, b)) if self.aten else self._f(torch.where, (c, a, b))

    def repeat_heads(self, x, reps):
        """``repeat_interleave`` on the head axis (query head h reads kv head h // reps)."""
        if self.aten:
            return self._f(aten.repeat_interleave.self_int, (x, reps, 1))
        return self._f(torch.repeat_interleave, (x, reps), {"dim": 1})

    def floordiv(self, a, b):
        if isinstance(a, int) and isinstance(b, int):
            return a // b
        return self._f(operator.floordiv, (a, b))

    # -- composite ------------------------------------------------------------------
    def view4(self, v: View4, pre=None, pad=None):
        """Emit ``v`` as view ops: squeeze unnamed unit axes, permute, unsqueeze, expand.

        ``pre = (shape, merged)``: first broadcast the base to ``shape`` and reshape it to
        ``merged`` (a bias given on split batch axes; a size of ``merged`` may be a
        ``(node, axis)`` pair, that node's size read at run time). ``pad``: pad with zeros before the given
        axes, ``((axis, count), ...)`` (a bias added into a slice), of the base, or of the
        reshaped base with ``pre``."""
        x = v.base
        r = len(pre[1]) if pre is not None else len(A.shape(x))
        if pad and pre is None:
            x = self.zero_pad_before(x, pad, r)
        if pre is not None:   # sizes: ints, or (node, axis) read at run time (symbolic)
            x = self.reshape(self.expand(x, list(pre[0])), [self._size_of(e) for e in pre[1]])
            if pad:
                x = self.zero_pad_before(x, pad, r)
        used = [a for a in v.axes if a is not None]
        for d in sorted(set(range(r)) - set(used), reverse=True):
            x = self.squeeze(x, d)
        order = sorted(used)
        perm = [order.index(a) for a in v.axes if a is not None]
        if perm != list(range(len(perm))):
            x = self.permute(x, perm)
        for i, a in enumerate(v.axes):
            if a is None:
                x = self.unsqueeze(x, i)
        if any(e is not None for e in v.expand):
            sizes = [-1 if e is None else self.size(e[0], e[1]) for e in v.expand]
            x = self.expand(x, sizes)
        if v.groups != (1, 1):  # several score batch axes: merge them into the op's batch and head
            g0, g1 = v.groups
            sizes = [self._slot_size(v, s) for s in range(len(v.axes))]
            x = self.reshape(x, [-1, self.product(sizes[g0:g0 + g1])] + sizes[g0 + g1:])
        return x

    def _size_of(self, e):
        return self.size(e[0], e[1]) if isinstance(e, tuple) else e

    def _slot_size(self, v: View4, s: int):
        e = v.expand[s]
        if e is not None:
            return self.size(e[0], e[1])
        return 1 if v.axes[s] is None else self.size(v.base, v.axes[s])

    def product(self, sizes: Sequence):
        """The product of sizes (ints or size nodes), folded where static."""
        out: Any = 1
        for x in sizes:
            if isinstance(out, int) and isinstance(x, int):
                out *= x
            elif not (isinstance(x, int) and x == 1):
                out = x if (isinstance(out, int) and out == 1) else self._f(operator.mul, (out, x))
        return out
