"""Masks that arrive as run-time values: the keys no query row sees, derived at run time.

Owns :func:`plan` (which fusions get a derived key mask and causal band, and the note
saying so), :func:`derived_key_mask` and :func:`derived_causal_offsets` (the few nodes
that compute them). A mask passed to the graph as an
input (Hugging Face's 4-D mask with a static KV cache, ``generate(...,
cache_implementation="static")``), or built from an input's values (HF 5.x masks from
``position_ids``), cannot be proven causal or padded when the graph is compiled: it stays
the op's bias (:mod:`.structure` says why). Its values are known at run time, though, and
one fact about them needs no proof to be used, only computing:

    a key that the mask hides from every (head, query) row of a batch item can be hidden
    by the op's ``key_mask`` as well, without changing any result.

So the rewrite passes ``key_mask = any over (heads, queries) of "not hidden"`` beside the
bias; no data-dependent choice is made in the graph (the op cannot take one at trace
time, and none is needed). The Triton kernels clip their key loops to each batch item's
first and last visible key (:func:`attnfuse.kernels.base.key_bounds`): the empty slots of a
static cache past the current position are never visited, in prefill and decode, forward
and backward. Exactness, position by position:

- bool (keep) mask: hidden = False, which is ``-inf`` in both the graph and the op; a key
  hidden in every row has weight 0 everywhere, and its gradient (bias and scores) is 0.
- float mask: hidden = ``-inf`` or ``finfo(dtype).min`` (Hugging Face's fill). A row with a
  *live* key (value above ``finfo.min / 2``) gives each hidden key ``exp(fill + s - max) =
  0`` exactly, so hiding it is exact there, forward and backward. A row with no live key
  (left padding: a pad query that sees nothing) is, with a finite fill, eager's uniform
  average over all Lk keys: a batch item with such a row gets no derived key mask at all
  (every key visible), so the op sees the bias alone there, as before.
- a float term proven finite and bounded (:func:`.alibi.bound`: Falcon's ALiBi term left
  as a bias beside its proven causal/padding structure) hides no key: nothing is derived.

A second fact of the same kind gives the causal band (a static cache's prefill: row i sees
keys up to its own position only):

    with ``c_b`` the largest ``j - i`` over the (head, query i, key j) positions that the
    mask shows in batch item b, every key ``j > i + c_b`` is hidden from row i by the mask,
    so the op's ``causal_offsets`` (row i sees keys ``j <= i + c_b``) hides it too.

It is exact in every row with a live key (as above), and an item with a row that has none
gets an offset that hides nothing (``_NO_BAND``). The kernels then skip the key blocks
above each item's diagonal, forward and backward, as for ``causal``. Derived only for a
call with no causal mask or window of its own, whose mask varies along the queries, and
not for a single query row (decode: the key bounds already stop at its last visible key).
The bias is still added on the tiles that are visited: the values under the band are
whatever the input holds.

Cost: one pass over the (unexpanded) mask per fused call (O(B·Lq·Lk) compares for a
(B, 1, Lq, Lk) mask; Inductor's CSE shares it between layers that read one mask). On CPU
the derived mask is not emitted (:data:`DERIVE_ON_CPU`): the CPU paths fold a key mask that
comes with a bias back into it (``torch_fused.fold_key_mask``), so it would cost that pass
and skip nothing; the note says so.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import fx

from attnfuse.passes import alibi as AL
from attnfuse.passes import axes as A
from attnfuse.passes import consts as C
from attnfuse.passes.emit import Emitter
from attnfuse.passes.types import AttentionMatch, View4

aten = torch.ops.aten

#: Emit the derived key mask for fusions on CPU tensors too (tests switch it on: the CPU
#: paths fold it back into the bias, so there it costs a pass and skips nothing).
DERIVE_ON_CPU = False

_INFO = "derived_key_mask"   # m.info key: the term whose values give the key mask
_BAND = "derived_causal_band"   # m.info key: True where the causal offsets are derived too
#: The offset of an item with a row that sees no live key: hides no key (clamped to Lk).
_NO_BAND = 2 ** 30


def _eligible_term(m: AttentionMatch, gm):
    """The one input-valued mask term a key mask can be derived from, or (None, why-not)."""
    if len(m.terms) != 1:
        return None, None
    t = m.terms[0]
    if t.kind == "float" and gm is not None and AL.bound(t.view.base, gm) is not None:
        return None, None  # finite and bounded (Falcon's ALiBi under its fill): it hides no key
    base = t.view.base   # a placeholder itself counts where no fake value names it (symbolic_trace)
    inputs = C.input_reads(base) or ([str(base.target)] if base.op == "placeholder" else [])
    if not inputs:
        return None, None
    if t.pre is not None or t.pad is not None or t.view.groups != (1, 1):
        return None, "it is given on split or padded axes"
    if t.kind == "float" and (t.coef != 1.0 or t.cast is not None):
        return None, "it is scaled or cast before it is added"
    if t.kind == "fill" and not t.coef <= torch.finfo(torch.float32).min:
        return None, f"its fill {t.coef:g} does not absorb the scores (only -inf or float32's finfo.min do)"
    if t.view.axes[3] is None or t.view.expand[3] is not None:
        return None, None  # constant along the keys: it hides no key from every row
    return (t, inputs), None


def plan(m: AttentionMatch, gm=None) -> AttentionMatch:
    """``m`` with :data:`_INFO` set where a key mask is derived from its input-valued mask
    term, and a note saying which keys the op then skips (or why it does not)."""
    (found, why) = _eligible_term(m, gm)
    if found is None:
        if why is None:
            return m
        note = f"no key mask derived from the run-time mask: {why}"
        return dataclasses.replace(m, mask_notes=list(m.mask_notes) + [note])
    t, inputs = found
    why_bias = (f"{t.view.base.name}: the bias, built from the run-time values of {', '.join(inputs)} (no causal or "
                "padding structure is proven from values unknown at compile time)")
    q = A.meta_val(m.q.base)
    on_cpu = isinstance(q, torch.Tensor) and q.device.type == "cpu"
    if on_cpu and not DERIVE_ON_CPU:
        note = (f"{why_bias}; no key mask derived from it on CPU (the CPU paths fold a key mask given with a "
                "bias back into it: nothing skipped)")
        return dataclasses.replace(m, mask_notes=list(m.mask_notes) + [note])
    note = (f"{why_bias}; keys that no query row sees are hidden by a key mask derived from it at run time "
            "(skipped by the kernels; e.g. a static cache's empty slots)")
    info = dict(m.info)
    info[_INFO] = t
    band, why_not = _band_eligible(m, t, q)
    if band:
        info[_BAND] = True
        note += ("; and each batch item's causal band, as causal_offsets (the key blocks above each row's "
                 "last visible key are skipped)")
    elif why_not:
        note += f"; no causal band derived: {why_not}"
    return dataclasses.replace(m, info=info, mask_notes=list(m.mask_notes) + [note])


def _band_eligible(m: AttentionMatch, t, q) -> tuple[bool, Optional[str]]:
    """Whether :func:`derived_causal_offsets` applies to ``m`` (its mask term ``t``), or
    (False, why not) where the reason is worth a note (None: nothing to gain)."""
    if m.causal != "none" or m.window:
        return False, None            # the call has its own causal band
    if t.view.axes[2] is None or t.view.expand[2] is not None:
        return False, None            # one mask row for every query: the key mask is all of it
    if not isinstance(q, torch.Tensor):
        return False, "the device of the query is not recorded in the graph"
    if q.shape[2] == 1:
        return False, None            # one query row: the key bounds already stop at its last key
    return True, None


def _call(em: Emitter, torch_fn, aten_fn, *args) -> fx.Node:
    return em.g.call_function(aten_fn if em.aten else torch_fn, tuple(args))


def derived_key_mask(em: Emitter, m: AttentionMatch) -> Optional[fx.Node]:
    """A (B|1, Lk) bool node: True where some (head, query) row of the batch item sees the key
    by the mask term :func:`plan` chose, or where a row sees no live key (finite fill: that
    batch item keeps every key); None when :func:`plan` chose none."""
    t = m.info.get(_INFO)
    if t is None:
        return None
    km = _derive(em, t)
    # a mask that broadcasts along the keys at run time gives (B|1, 1): the op wants (B|1, Lk)
    return em.contiguous(em.expand(km, [-1, em.size(em.view4(m.k), 2, symbolic=True)]))


def _derive(em: Emitter, t) -> fx.Node:
    shown, live = _shown_and_live(em, t)
    if t.kind == "keep":   # a bool keep-mask: hidden is -inf, a row that sees nothing gives 0
        return _call(em, torch.any, aten.any.dims, shown, [1, 2])
    return _key_mask_of(em, shown, live)


def _shown_and_live(em: Emitter, t) -> tuple[fx.Node, fx.Node]:
    """Two bool (B|1, H|1, Lq, Lk) nodes over the term without its broadcast (fewer
    compares): ``shown`` (not hidden: not -inf, not the fill) and ``live`` (a value that
    absorbs no score: above ``finfo.min / 2``; for bool and fill terms, ``shown``)."""
    x = em.view4(View4(t.view.base, t.view.axes))
    if t.kind == "keep":
        seen = em.logical_not(x) if t.invert else x
        return seen, seen
    if t.kind == "fill":   # the fill (-inf or float32's finfo.min) where the (negated) condition holds
        live = x if t.invert else em.logical_not(x)
        return live, live
    dt = A.dtype(t.view.base)
    fill = torch.finfo(dt).min if isinstance(dt, torch.dtype) and dt.is_floating_point else None
    if fill is None:
        raise ValueError(f"mask {t.view.base.name} has no float dtype ({dt}) to read its fill from")
    hidden = _call(em, torch.logical_or, aten.logical_or.default,
                   _call(em, torch.eq, aten.eq.Scalar, x, float("-inf")),
                   _call(em, torch.eq, aten.eq.Scalar, x, fill))
    return em.logical_not(hidden), _call(em, torch.gt, aten.gt.Scalar, x, fill / 2)


def _anchored(em: Emitter, live: fx.Node) -> fx.Node:
    """(B|1,) bool: every (head, query) row of the item has a live key."""
    return _call(em, torch.all, aten.all.dims, _call(em, torch.any, aten.any.dims, live, [3]), [1, 2])


def _key_mask_of(em: Emitter, shown: fx.Node, live: fx.Node) -> fx.Node:
    """``any(shown over heads, queries) | (the item has a row with no live key)``, (B|1, Lk)."""
    seen = _call(em, torch.any, aten.any.dims, shown, [1, 2])                               # (B|1, Lk)
    unanchored = em.unsqueeze(em.logical_not(_anchored(em, live)), 1)                       # (B|1, 1)
    return _call(em, torch.logical_or, aten.logical_or.default, seen, unanchored)


def _arange(em: Emitter, n, device: torch.device) -> fx.Node:
    if em.aten:
        return em.g.call_function(aten.arange.default, (n,), {"dtype": torch.int32, "device": device,
                                                                "pin_memory": False})
    return em.g.call_function(torch.arange, (n,), {"dtype": torch.int32, "device": device})


def derived_causal_offsets(em: Emitter, m: AttentionMatch, q: fx.Node) -> Optional[fx.Node]:
    """The op's ``causal_offsets``, (B,) int32: per batch item the largest ``j - i`` over
    the positions its mask shows (:data:`_NO_BAND` for an item with a row that has no
    live key); None unless :func:`plan` chose a causal band for ``m``."""
    t = m.info.get(_INFO)
    if t is None or not m.info.get(_BAND):
        return None
    shown, live = _shown_and_live(em, t)
    device = A.meta_val(m.q.base).device
    j = _arange(em, em.size(shown, 3, symbolic=True), device)
    i = _arange(em, em.size(shown, 2, symbolic=True), device)
    rel = em.sub(em.unsqueeze(j, 0), em.unsqueeze(i, 1))                  # (Lq, Lk): j - i
    lowest = -_NO_BAND
    scored = _call(em, torch.where, aten.where.ScalarOther, shown, rel, lowest)
    c = _call(em, torch.amax, aten.amax.default, scored, [1, 2, 3])       # (B|1,)
    offsets = _call(em, torch.where, aten.where.ScalarOther, _anchored(em, live), c, _NO_BAND)
    return em.expand(offsets, [em.size(q, 0, symbolic=True)])


def combine(em: Emitter, key_mask: Optional[fx.Node], derived: Optional[fx.Node]) -> Optional[Any]:
    """The op's key mask: the proven one, the derived one, or both."""
    if derived is None:
        return key_mask
    return derived if key_mask is None else em.logical_and(key_mask, derived)
