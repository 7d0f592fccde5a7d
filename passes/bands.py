"""Proving that masks built from sizes are causal bands, at every size that matters.

Owns :class:`Sampler` (the sizes a size-built mask is evaluated at: the graph's own
sizes when it is specialised to them; several sizes, including every size near a
constant of the mask's subgraph, when they are symbolic; and in ``symbolic_trace``
graphs, the run-time query/key lengths found by dataflow, :func:`length_axes`),
:func:`classify_band` (the one causal band — alignment and sliding-window width —
that every sampled mask equals, or None) and :func:`band_of` (both, for an AND of
mask factors). Used by :mod:`.structure`; nothing here changes a graph.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes import consts as C
from attnfuse.passes.views import axis_at


# ---------------------------------------------------------------------------
# band classification of sampled masks
# ---------------------------------------------------------------------------

def _matrix(val: torch.Tensor, vq: int, vk: int, q_axis: int, k_axis: int) -> Optional[torch.Tensor]:
    """The (Lq, Lk) matrix of a bool mask right-aligned with the scores, if it is the same
    for every other index (batch, head); else None."""
    r = max(val.dim(), -q_axis, -k_axis)
    v = val.reshape((1,) * (r - val.dim()) + tuple(val.shape))
    sq, sk = v.shape[q_axis], v.shape[k_axis]
    if sq not in (1, vq) or sk not in (1, vk):
        return None
    qa, ka = q_axis % r, k_axis % r
    others = [d for d in range(r) if d not in (qa, ka)]
    v = v.permute(others + [qa, ka]).reshape(-1, sq, sk)
    if v.shape[0] > 1 and not bool((v == v[:1]).all()):
        return None
    return v[0].expand(vq, vk)


def classify_band(samples: Iterator, q_axis: int, k_axis: int) -> Optional[Tuple[str, int, bool]]:
    """``(causal, window, empty_rows)`` that every sampled keep-mask equals, or None.

    ``samples`` yields ``(mask, Lq, Lk)`` (mask None: not evaluable, nothing is proven).
    causal is "none" (all True), "top_left" or "bottom_right"; window 0 = unbounded.
    Hypotheses come from the samples themselves (a band's width shows in a row cut on
    the left) and must then hold at every sample; square samples cannot tell top-left
    from bottom-right (top-left is chosen when no sample is non-square). ``empty_rows``:
    at some sample a query row sees no key."""
    mats = []
    for val, vq, vk in samples:
        if not isinstance(val, torch.Tensor) or val.dtype != torch.bool:
            return None
        m = _matrix(val, vq, vk, q_axis, k_axis)
        if m is None:
            return None
        mats.append((m, vq, vk))
    if not mats:
        return None
    hyps = {("none", 0), ("top_left", 0), ("bottom_right", 0)}
    for m, vq, vk in mats:
        seen = m.any(dim=1)
        cut = (seen & ~m[:, 0]).nonzero()  # rows cut on the left: a band's width shows there
        empty = (~seen).nonzero()          # or a row past the keys that a window empties
        for name, off in (("top_left", 0), ("bottom_right", vk - vq)):
            if len(cut):
                i = int(cut[0])
                w = i + off - int(m[i].to(torch.int8).argmax()) + 1
                if w >= 1:
                    hyps.add((name, w))
            past = [i for i in map(int, empty) if i + off >= vk]  # the first row a window empties
            if past and past[0] + off - vk + 1 >= 1:
                hyps.add((name, past[0] + off - vk + 1))

    # each row of a band is one run of True: compare (count, first, last) per row, not matrices
    rows = []
    for m, vq, vk in mats:
        cols = torch.arange(vk)
        count = m.sum(dim=1)
        first = torch.where(m, cols, vk).amin(dim=1)
        last = torch.where(m, cols, -1).amax(dim=1)
        rows.append((count, first, last, vq, vk))

    def holds(h) -> bool:
        name, w = h
        for count, first, last, vq, vk in rows:
            if name == "none":
                if not bool((count == vk).all()):
                    return False
                continue
            i = torch.arange(vq) + (0 if name == "top_left" else vk - vq)
            hi = i.clamp(max=vk - 1)
            lo = (i - w + 1).clamp(min=0) if w else torch.zeros_like(i)
            n = (hi - lo + 1).clamp(min=0)
            if not bool((count == n).all()):
                return False
            some = n > 0
            if not bool(((first == lo) & (last == hi))[some].all()):
                return False
        return True

    good = sorted((h for h in hyps if holds(h)), key=lambda h: (h[0] != "none", h[0] != "top_left", h[1]))
    if not good:
        return None
    name, w = good[0]
    if len({g[1] for g in good if g[0] == name}) > 1:
        return None  # two widths agree with every sample: the width is not proven
    if name != "none" and any(g[0] != name for g in good) and any(vq != vk for _, vq, vk in mats):
        return None  # pragma: no cover - a non-square sample separates the alignments
    empty = any(not bool(m.any(dim=1).all()) for m, _, _ in mats)
    return name, w, empty


_LINEAR = (torch.nn.functional.linear, torch._C._nn.linear)


def length_axes(qk, stags, tagmap, *seeds_and_views) -> Dict:
    """``(node, axis) -> "q" | "k" | "qk"``: axes whose size is, in every run, the op's
    query length Lq, key length Lk, or both (one axis feeding both proves Lq == Lk).

    Found by dataflow only: the scores' own axes, every chain node's tagged axes, the
    Q·Kᵀ / P·V operands' query/key axes, the peeled q/k/v bases' sequence axes, and the
    input of a ``Linear`` / ``F.linear`` producing one of those (it keeps leading axes)."""
    *seeds, views, gm = seeds_and_views
    out: Dict = {}

    def add(node, axis, t):
        if not isinstance(node, fx.Node) or axis is None:
            return
        r = A.rank(node)
        if r is None:
            return
        key = (node, A.norm_dim(axis, r))
        old = out.get(key)
        out[key] = t if old in (None, t) else "qk"

    for i, t in enumerate(stags):
        if t in ("q", "k"):
            add(qk, i, t)
    for node, tags in tagmap.items():
        if tags is not None:
            for i, t in enumerate(tags):
                if t in ("q", "k"):
                    add(node, i, t)
    for node, tags, t in seeds:
        if tags is not None and tags.count(t) == 1:
            add(node, tags.index(t), t)
    qv, kv, vv = views
    add(qv.base, axis_at(qv, 2), "q")
    add(kv.base, axis_at(kv, 2), "k")
    add(vv.base, axis_at(vv, 2), "k")
    todo = list(out.items())
    while todo:  # up through linear layers: x (…, T, C) -> linear -> (…, T, C')
        (node, axis), t = todo.pop()
        src = None
        if node.op == "call_module" and gm is not None:
            try:
                mod = gm.get_submodule(node.target)
            except AttributeError:
                mod = None
            if isinstance(mod, torch.nn.Linear) and node.args:
                src = node.args[0]
        elif node.op == "call_function" and node.target in _LINEAR and node.args:
            src = node.args[0]
        r = A.rank(node)
        if isinstance(src, fx.Node) and r is not None and axis < r - 1 and A.rank(src) == r:
            before = out.get((src, axis))
            add(src, axis, t)
            if out[(src, axis)] != before:
                todo.append(((src, axis), out[(src, axis)]))
    # an axis proven to be both lengths makes every axis of either length "qk"
    if "qk" in out.values():
        out = {key: "qk" for key in out}
    return out


# ---------------------------------------------------------------------------
# sampling sizes
# ---------------------------------------------------------------------------

class Sampler:
    """Evaluates size-built masks at the sizes a proof needs.

    ``mode`` "sizes": the graph's sizes (static: once; symbolic: the traced example,
    smaller ones and sizes near every constant of the mask, :func:`consts.size_assignments`
    and :func:`consts.probe_sizes`). ``mode`` "dataflow": every size query of an axis
    proven to be the query/key length (``axmap``) evaluates to a chosen length, at many
    (Lq, Lk) pairs (only Lq == Lk ones when one axis carries both)."""

    def __init__(self, gm, sshape, stags, mode: str, axmap: Optional[Dict] = None,
                 pre: Optional[Tuple] = None):
        self.gm, self.sshape, self.mode, self.axmap, self.pre = gm, sshape, mode, axmap, pre
        self.iq, self.ik = stags.index("q"), stags.index("k")
        self.r = len(stags)

    def points(self, nodes: Sequence[fx.Node]) -> Optional[List[Tuple[Any, int, int]]]:
        """``[(subs or axis sizes, Lq, Lk)]`` to evaluate ``nodes`` at; None if unprovable."""
        if self.pre is not None and not all(isinstance(x, int) for x in tuple(self.pre[0]) + tuple(self.pre[1])):
            return None   # a reshape with sizes read at run time (batchaxes.split_term): no sample
        sq, sk = self.sshape[self.iq], self.sshape[self.ik]
        lq, lk = A.static_int(sq), A.static_int(sk)
        if self.mode == "sizes" and lq is not None and lk is not None:
            return [(None, lq, lk)]  # the graph is specialised to these sizes: one evaluation is exact
        if self.mode == "sizes" and self.pre is not None:
            return None
        extra: set = set()
        for n in nodes:
            e = C.probe_sizes(n, self.gm)
            if e is None:
                return None
            extra |= set(e)
        if self.mode == "sizes":
            assignments = C.size_assignments(list(self.sshape))  # batch/head symbols too
            if not assignments:
                return None
            syms = sorted(set().union(*(a.keys() for a in assignments)), key=str)
            assignments = assignments + [{s_: c for s_ in syms} for c in sorted(extra) if c >= 2]
            pts = []
            for subs in assignments:
                eq, ek = A.expr(sq).subs(subs), A.expr(sk).subs(subs)
                if not (eq.is_Integer and ek.is_Integer):
                    return None
                pts.append((subs, int(eq), int(ek)))
            return pts
        if not self.axmap:
            return None
        square = "qk" in self.axmap.values()
        pairs = [(1, 1), (2, 2), (3, 3), (5, 5), (8, 8), (13, 13)] + [(c, c) for c in sorted(extra)]
        if not square:
            pairs += [(1, 2), (1, 5), (2, 1), (2, 5), (5, 2), (3, 7), (7, 3), (4, 9), (9, 4)]
            pairs += [p for c in sorted(extra) for p in ((c, c + 1), (c + 1, c), (1, c))]
        if lq is not None and lk is not None and (not square or lq == lk):
            pairs.append((lq, lk))
        return [({key: (vq if t in ("q", "qk") else vk) for key, t in self.axmap.items()}, vq, vk)
                for vq, vk in pairs]

    def value(self, n: fx.Node, point) -> Any:
        at = point[0]
        if self.mode == "sizes":
            val = C.const_eval(n, self.gm, at)
        else:
            val = C.const_eval(n, self.gm, None, at)
        if isinstance(val, torch.Tensor) and self.pre is not None:
            try:
                val = val.expand(self.pre[0]).reshape(self.pre[1])
            except RuntimeError:
                return None
        return val


def band_of(factors: Sequence[Tuple[fx.Node, bool]], sampler: Sampler, points) -> Optional[Tuple[str, int, bool]]:
    """:func:`classify_band` of the AND of constant ``factors`` at ``points``."""
    r = sampler.r

    def samples():
        for p in points:
            acc = None
            for n, neg in factors:
                v = sampler.value(n, p)
                if not isinstance(v, torch.Tensor) or v.dtype != torch.bool or v.dim() > r:
                    yield None, p[1], p[2]
                    return
                v = ~v if neg else v
                try:
                    acc = v if acc is None else acc & v
                except RuntimeError:
                    yield None, p[1], p[2]
                    return
            yield acc, p[1], p[2]

    return classify_band(samples(), sampler.iq - r, sampler.ik - r)
