"""Masks as structure: causal alignment, sliding window and key-padding mask, proven.

Owns the decision of how a mask term of the scores reaches the fused op. A keep-mask
(True = attend) is split into an AND of factors (:func:`split_and`, through ``&``,
``logical_and``, negated ``|``, ``expand`` and casts of bools). Each factor is

- an *index* factor: its value depends only on constants and sizes (``arange``
  comparisons, ``tril`` buffers, Hugging Face's ``kv_idx <= q_idx`` and
  ``kv_idx > q_idx - sliding_window``). All index factors together are evaluated at
  sampled sizes (:class:`.bands.Sampler`: the traced sizes when static; several sizes
  when symbolic, including every size near a constant of the mask's subgraph; run-time
  lengths by dataflow in ``symbolic_trace`` graphs) and must be, at every sample, all
  True, or one causal band ``i + off - W < j <= i + off`` with the same alignment
  (``off`` = 0 top-left, Lk - Lq bottom-right) and the same width W
  (:func:`.bands.classify_band`); otherwise they stay a mask tensor;
- a *key-mask* factor: any other bool tensor whose only non-unit axes are the batch
  and key axes (HF's ``padding_mask[batch_idx, kv_idx]``, ``mask[:, None, None, :] != 0``):
  it is passed as ``key_mask`` (B, Lk), computed by the graph itself;
- anything else (a mask varying along the query or head axis through a tensor) stays
  a residual bool mask.

Fill values. A mask with ``-inf`` fill may be split freely: every masked position is
``-inf`` whatever carries it. A finite fill (``finfo.min``, Hugging Face) is exact in
eager only through absorption (``s + fill == fill`` for ``|s| < 2**103`` in fp32), and a
row whose every key is masked is then a *uniform* average of V over all keys, not 0.
So a finite-fill mask becomes structure only when it is the only term on the scores,
or every other term is proven finite and bounded (:func:`.alibi.bound`, far below the fill:
absorbed with the scores; BLOOM's padded ALiBi), and nothing of it is residual; if a
row can see no key (a key mask, or a band with empty rows), :mod:`.rewrite` emits an
exact fix-up from the op's ``lse`` (``-inf`` on exactly those rows): the mean of V, with
eager's gradient (softmax at a uniform row), and this needs no softcap, no dropout and no
other unbounded term; else the mask stays a bias.

A finite fill *over* a term, ``masked_fill(x, cond, fill)`` or ``where(cond, fill, x)``
added to the scores (Falcon folds its ALiBi term and its causal/padding mask into one
(B, H, Lq, Lk) tensor so), is taken apart when ``x`` is proven finite and bounded
(:func:`.alibi.bound`): eager's logit is ``s + x`` where the fill is not, and the fill
(absorbed) where it is, which is ``x`` as a bias of its own shape (Falcon's (B, H, 1, Lk):
no (Lq, Lk) tensor) plus the fill as a mask, the fill being the only term that can mask
(a bounded ``x`` masks nothing). The fill is then chosen as any other fill.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx

from attnfuse.passes import alibi as AL
from attnfuse.passes import axes as A
from attnfuse.passes import consts as C
from attnfuse.passes import ops as O
from attnfuse.passes.bands import Sampler, band_of, classify_band, length_axes  # noqa: F401 (re-exported)
from attnfuse.passes.lift import bool_negation, lower
from attnfuse.passes.types import Miss, Term, View4
from attnfuse.passes.views import build_view

_MAX_FACTORS = 16

_AND_FUNCS = (operator.and_, operator.iand, torch.logical_and, torch.bitwise_and)
_OR_FUNCS = (operator.or_, operator.ior, torch.logical_or, torch.bitwise_or)
_AND_METHODS = ("__and__", "logical_and", "bitwise_and")
_OR_METHODS = ("__or__", "logical_or", "bitwise_or")
_AND_ATEN = ("logical_and", "bitwise_and")
_OR_ATEN = ("logical_or", "bitwise_or")


def _aten_name(n: fx.Node) -> Optional[str]:
    packet = getattr(n.target, "overloadpacket", None)
    if packet is None and isinstance(n.target, torch._ops.OpOverloadPacket):
        packet = n.target
    return getattr(packet, "__name__", None) if packet is not None else None


def _binary_kind(n: fx.Node) -> Optional[str]:
    """"and" / "or" for a logical/bitwise and/or node of two tensors, else None."""
    if n.op == "call_function":
        if n.target in _AND_FUNCS:
            return "and"
        if n.target in _OR_FUNCS:
            return "or"
        name = _aten_name(n)
        if name in _AND_ATEN:
            return "and"
        if name in _OR_ATEN:
            return "or"
    elif n.op == "call_method":
        if n.target in _AND_METHODS:
            return "and"
        if n.target in _OR_METHODS:
            return "or"
    return None


def _is_bool(x: Any) -> bool:
    return isinstance(x, fx.Node) and A.dtype(x) == torch.bool


def split_and(n: fx.Node, negate: bool, gm) -> List[Tuple[fx.Node, bool]]:
    """Factors ``(leaf, neg)`` whose AND is ``n`` (``~n`` when ``negate``); a leaf's value
    is ``~leaf`` when ``neg``. Factors are right-aligned with ``n`` (broadcasting)."""
    out: List[Tuple[fx.Node, bool]] = []
    todo = [(n, negate)]
    while todo:
        x, neg = todo.pop()
        if len(out) + len(todo) > _MAX_FACTORS or not _is_bool(x):
            out.append((x, neg))
            continue
        kind = _binary_kind(x)
        args = [a for a in x.args[:2]] if kind else []
        if kind and len(args) == 2 and all(_is_bool(a) for a in args) and \
                (kind == "and") != neg:  # a & b, or ~(a | b) == ~a & ~b
            todo += [(args[1], neg), (args[0], neg)]
            continue
        op = O.classify(x, gm)
        if op is not None and op.kind == O.COMPARE and op.sub == "not" and _is_bool(op["x"]):
            todo.append((op["x"], not neg))
            continue
        eq = bool_negation(x, gm)  # m == 0 of a bool m is ~m (lift.py)
        if eq is not None:
            todo.append((eq[0], neg != eq[1]))
            continue
        if op is not None and (op.kind == O.CAST or (op.kind == O.LAYOUT and op.sub in ("expand", "identity"))) \
                and _is_bool(op.get("x")):
            # casts of a bool to bool (``.to(device)``) and broadcasts keep every value
            if op.kind == O.LAYOUT and op.sub == "expand" and x.op == "call_method" and x.target == "expand_as":
                out.append((x, neg))
                continue
            todo.append((op["x"], neg))
            continue
        out.append((x, neg))
    return out


# ---------------------------------------------------------------------------
# float terms that are masks: where(cond, 0, fill)
# ---------------------------------------------------------------------------

def _is_zero(a, gm) -> bool:
    if isinstance(a, bool):
        return False
    if isinstance(a, (int, float)):
        return a == 0
    if isinstance(a, fx.Node):
        v = C.const_eval(a, gm)
        if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point():
            return bool(v.reshape(()) == 0)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v == 0
    return False


def float_term_as_mask(n: Any, coef: float, gm) -> Optional[Tuple[str, fx.Node, bool, float]]:
    """``(kind, cond, masked_when, fill)`` when the float bias ``coef * n`` is a mask:
    ``where(cond, 0, fill)`` (or ``where(cond, fill, 0)``) with ``fill`` -inf ("keep")
    or an absorbing finite value ("fill"), as Hugging Face builds its eager masks."""
    if not isinstance(n, fx.Node) or coef <= 0:
        return None
    op = O.classify(n, gm)
    if op is None or op.kind != O.MASK or op.sub != "where" or not _is_bool(op["cond"]):
        return None
    for zero, fill, masked_when in ((op["a"], op["b"], False), (op["b"], op["a"], True)):
        if not _is_zero(zero, gm):
            continue
        val = C.scalar_value(fill, gm)
        if val is None:
            return None
        val *= coef
        if C.is_neg_inf(val):
            return ("keep", op["cond"], masked_when, val)
        if C.absorbing_fill(val):
            return ("fill", op["cond"], masked_when, val)
        return None
    return None


def float_term_as_filled(n: Any, coef: float, gm) -> Optional[Tuple[fx.Node, fx.Node, bool, float]]:
    """``(x, cond, masked_when, fill)`` when the float bias ``coef * n`` is a finite fill
    over a bounded term (:func:`.alibi.bound`): ``masked_fill(x, cond, fill)``,
    ``where(cond, fill, x)`` or ``where(cond, x, fill)``, ``coef * fill`` absorbing."""
    if not isinstance(n, fx.Node) or coef <= 0:
        return None
    op = O.classify(n, gm)
    if op is None or op.kind != O.MASK or op.inplace:
        return None
    if op.sub == "masked_fill":
        cands = [(op["x"], op["mask"], True, op["value"])]
    elif op.sub == "where":
        cands = [(op["b"], op["cond"], True, op["a"]), (op["a"], op["cond"], False, op["b"])]
    else:
        return None
    for x, cond, masked_when, fill in cands:
        val = C.scalar_value(fill, gm)
        if val is None or not _is_bool(cond) or not isinstance(x, fx.Node) or A.dtype(x) != A.dtype(n):
            continue
        if C.absorbing_fill(val * coef) and AL.bound(x, gm) is not None:
            return x, cond, masked_when, val * coef
    return None


# ---------------------------------------------------------------------------
# one mask term
# ---------------------------------------------------------------------------

@dataclass
class TermStructure:
    """What one keep-mask term becomes: causal/window from its index factors, key masks,
    and residual factors that stay a bool mask."""

    causal: str = "none"
    window: int = 0
    empty_rows: bool = False                  # the band alone leaves some row without keys
    key_masks: List[Tuple[fx.Node, bool]] = field(default_factory=list)
    residual: List[Tuple[fx.Node, bool]] = field(default_factory=list)
    dropped: List[fx.Node] = field(default_factory=list)   # index factors proven all True
    frame: Optional[List] = None   # the score tags the leaves align with (fewer when lowered, lift.py)

    @property
    def useful(self) -> bool:
        return self.causal != "none" or bool(self.key_masks) or (bool(self.dropped) and not self.residual)


def key_mask_tags(leaf: fx.Node, stags: List, ob: List) -> Optional[List]:
    """The leaf's tags (right-aligned with the scores) when it varies along the batch and
    key axes only (a key-padding mask), else None."""
    s = A.shape(leaf)
    if s is None or A.dtype(leaf) != torch.bool or len(s) > len(stags) or ob[0] is None:
        return None
    tags = [None if A.is_one(x) else stags[len(stags) - len(s) + j] for j, x in enumerate(s)]
    if "k" not in tags or any(t not in (None, "k", ob[0]) for t in tags):
        return None
    return tags


def analyse_term(n: fx.Node, negate: bool, pre, gm, sshape, stags, ob,
                 axmap_fn: Callable[[], Optional[Dict]]) -> Optional[TermStructure]:
    """How the keep-mask ``n`` (``~n`` when ``negate``) splits into structure, or None
    when no part of it is proven structure."""
    if pre is None:  # (pad & causal)[:, None]: analysed without the axes it only inserts (lift.py)
        n, negate, sshape, stags = lower(n, negate, gm, sshape, stags, lambda x: _binary_kind(x) is not None)
    factors = [(n, negate)] if pre is not None else split_and(n, negate, gm)
    best = None
    for mode in ("sizes", "dataflow"):
        axmap = None
        if mode == "dataflow":
            rest = [f for f in factors if best is None or f not in best[1]]
            if pre is not None or all(key_mask_tags(f, stags, ob) is not None for f, _ in rest):
                break  # nothing a run-time length could make constant
            axmap = axmap_fn()
            if not axmap:
                break
        sampler = Sampler(gm, sshape, stags, mode, axmap, pre)
        base = sampler.points([])
        if not base:
            continue
        const = [f for f in factors if isinstance(sampler.value(f[0], base[0]), torch.Tensor)]
        points = sampler.points([f for f, _ in const]) if const else None
        if points and (best is None or len(const) > len(best[1])):
            best = (sampler, const, points)
    ts = TermStructure(frame=list(stags))
    const: List = []
    if best is not None and best[1]:
        sampler, const, points = best
        band = band_of(const, sampler, points)
        if band is None:
            ts.residual += const
        else:
            ts.causal, ts.window, ts.empty_rows = band
            ts.dropped = [f for f, _ in const]
    for f in factors:
        if f in const:
            continue
        if pre is None and key_mask_tags(f[0], stags, ob) is not None:
            ts.key_masks.append(f)
        else:
            ts.residual.append(f)
    return ts if ts.useful else None


def describe(causal: str, window: int, key_masks: Sequence[Any]) -> str:
    parts = []
    if causal != "none":
        parts.append(f"causal={causal}")
    if window:
        parts.append(f"window={window}")
    if key_masks:
        parts.append("key_mask=" + "&".join(("~" if neg else "") + n.name for n, neg in key_masks))
    return ", ".join(parts) or "none"


def check_view(leaf: fx.Node, stags: List, what: str) -> List:
    """Right-aligned tags of ``leaf``; Miss when it does not broadcast to the scores."""
    s = A.shape(leaf)
    if s is None or len(s) > len(stags):
        raise Miss("unsupported_op", f"{what} {getattr(leaf, 'name', leaf)} does not broadcast to the scores", leaf)
    return [None if A.is_one(x) else stags[len(stags) - len(s) + j] for j, x in enumerate(s)]


# ---------------------------------------------------------------------------
# all terms of one attention
# ---------------------------------------------------------------------------

@dataclass
class RawTerm:
    """A bias/mask term as the matcher found it (see :class:`types.Term` for the kinds)."""

    kind: str                 # "float" | "keep" | "fill"
    node: fx.Node
    coef: float
    flag: Any                 # keep/fill: the condition value that masks
    view: View4
    pre: Optional[Tuple] = None
    cast: Optional[torch.dtype] = None   # float: the dtype an integer/bool term is promoted to
    pad: Optional[Tuple] = None          # float: zeros before these axes of the node (types.Term)

    def as_term(self) -> Term:
        if self.kind == "float":
            return Term("float", self.view, self.coef, pre=self.pre, cast=self.cast, pad=self.pad)
        if self.kind == "keep":
            return Term("keep", self.view, 0.0, invert=bool(self.flag), pre=self.pre)
        return Term("fill", self.view, self.coef, invert=not self.flag, pre=self.pre)


@dataclass
class MaskStructure:
    """What the op receives for the masks: terms left as bias, causal, window, key masks
    ``(view in op order (B, H, Lq, Lk), negate)``, whether the empty-row fix-up is needed,
    and one note per mask term (what it became, or why it stayed a tensor)."""

    terms: List[Term] = field(default_factory=list)
    causal: str = "none"
    window: int = 0
    key_masks: List[Tuple[View4, bool]] = field(default_factory=list)
    fixup: bool = False
    fixup_scores_grad: bool = False   # the fill was added: the scores keep a gradient on empty rows
    notes: List[str] = field(default_factory=list)
    roots: List[fx.Node] = field(default_factory=list)   # mask tensors no longer read by the op


def _bounded(t: RawTerm, gm) -> bool:
    """A float term proven finite and bounded (:func:`.alibi.bound`, times its coefficient):
    beside a finite fill it masks nothing and is absorbed where the fill is."""
    b = AL.bound(t.node, gm) if t.kind == "float" and t.cast is None else None
    return b is not None and abs(t.coef) * b < AL.BOUND_LIMIT


def _why_kept(t: RawTerm, mkind: str, fill: float, ts: TermStructure, others: Sequence[RawTerm], gm,
              have_band: bool, softcap: float, dropout_p: float) -> Tuple[Optional[str], bool]:
    """(reason the term must stay a tensor or None, whether the empty-row fix-up is needed)."""
    if ts.causal != "none" and have_band:
        return "a second causal/window mask", False
    if mkind != "fill":
        return None, False
    # finite fill: eager averages V over all keys on a row it masks entirely
    unbounded = [o for o in others if not _bounded(o, gm)]   # (a bounded term: BLOOM's padded ALiBi)
    if unbounded:
        state = sorted({s for o in unbounded for s in C.state_reads(o.node, gm)})
        why = (f"; it reads module state ({', '.join(state)}), whose values the rewrite does not read"
               if state else "")
        return (f"finite fill {fill:g} beside score term(s) {', '.join(o.node.name for o in unbounded)} not "
                f"proven finite and bounded (alibi.bound){why}: a row masked by all of them together is not "
                f"reproducible as structure"), False
    if ts.residual:
        return f"finite fill {fill:g} and a part that is not structure", False
    if ts.key_masks or ts.empty_rows:
        if softcap:
            return f"finite fill {fill:g}, rows that may see no key, and a softcap", False
        if dropout_p:   # the fix-up's uniform average of V has no dropout mask
            return (f"finite fill {fill:g}, rows that may see no key, and dropout (eager drops out the uniform "
                    f"row such a row gets, key by key; the empty-row fix-up computes that average outside the "
                    f"op, without the op's dropout mask)"), False
        return None, True
    return None, False


def _analyse_cached(cond, masked_when, pre, gm, sshape, stags, ob, axmap_fn, memo: Optional[Dict]):
    """:func:`analyse_term`, once per mask and score layout (a model's layers share one mask).
    Results that needed the per-attention dataflow (``axmap_fn``) are not shared."""
    key = ("structure", cond, masked_when, pre, tuple(map(str, sshape)), tuple(map(str, stags)),
           tuple(map(str, ob)))
    if memo is not None and key in memo:
        return memo[key]
    used = []

    def tracked():
        used.append(True)
        return axmap_fn()

    ts = analyse_term(cond, masked_when, pre, gm, sshape, stags, ob, tracked)
    if memo is not None and not used:
        memo[key] = ts
    return ts


def choose(raw: Sequence[RawTerm], gm, sshape, stags, ob, axmap_fn, *, softcap: float,
           dropout_p: float, memo: Optional[Dict] = None) -> MaskStructure:
    """Turn the mask terms that are provably structure into causal/window/key_mask."""
    out = MaskStructure()
    for t in raw:
        mask, under = None, None   # under: the bounded term a fill is over (float_term_as_filled)
        if t.kind == "float":
            if t.cast is None:  # an integer fill changes in the promotion (fp16: -inf)
                mask = float_term_as_mask(t.node, t.coef, gm)
            if mask is None and t.cast is None and t.pre is None and t.pad is None:
                filled = float_term_as_filled(t.node, t.coef, gm)
                if filled is not None:
                    under, mask = filled[0], ("fill",) + filled[1:]
        else:
            mask = (t.kind, t.node, bool(t.flag), t.coef)
        if mask is None:
            out.terms.append(t.as_term())
            continue
        mkind, cond, masked_when, fill = mask
        ts = _analyse_cached(cond, masked_when, t.pre, gm, sshape, stags, ob, axmap_fn, memo)
        if ts is None:
            out.terms.append(t.as_term())
            state, inputs = C.state_reads(cond, gm), C.input_reads(cond)
            why = (f"built from the values of {', '.join(state)}, module state that may change after the "
                   "rewrite (torch.compile(backend='attnfuse') checks such buffers at run time)") if state else \
                (f"no causal band or key-padding part proven: built from the run-time values of the graph "
                 f"input(s) {', '.join(inputs)} (e.g. Hugging Face compares position_ids[b, kv] <= "
                 f"position_ids[b, q], causal only when the positions rise by one along each row)") if inputs else \
                "no causal band or key-padding part proven"
            out.notes.append(f"{t.node.name}: kept as a tensor ({why})")
            continue
        others = [o for o in raw if o is not t]
        reason, fixup = _why_kept(t, mkind, fill, ts, others, gm, out.causal != "none", softcap, dropout_p)
        resid, kms = [], []
        if reason is None:
            try:
                frame = ts.frame if ts.frame is not None else stags
                for leaf, neg in ts.residual:
                    tags = check_view(leaf, frame, "mask")
                    resid.append(Term("keep", build_view(leaf, tags, ob + ["q", "k"], "mask"), 0.0, invert=neg))
                for leaf, neg in ts.key_masks:
                    kms.append((build_view(leaf, key_mask_tags(leaf, frame, ob), ob + ["q", "k"], "key mask"), neg))
                if under is not None:
                    resid.append(Term("float", build_view(under, check_view(under, stags, "bias"), ob + ["q", "k"],
                                                          "bias"), t.coef))
            except Miss as e:
                reason = e.reason
        if reason is not None:
            out.terms.append(t.as_term())
            out.notes.append(f"{t.node.name}: kept as a tensor: {reason}")
            continue
        if ts.causal != "none":
            out.causal, out.window = ts.causal, ts.window
        out.terms += resid
        out.key_masks += kms
        if fixup:  # one term only (see _why_kept): its kind says how eager's gradient flows
            out.fixup, out.fixup_scores_grad = True, t.kind == "float"
        out.roots.append(t.node)
        note = describe(ts.causal, ts.window, ts.key_masks)
        if ts.residual:
            note += "; residual mask " + "&".join(("~" if neg else "") + n.name for n, neg in ts.residual)
        if fixup:
            note += "; rows that see no key get eager's uniform average (finite fill)"
        if under is not None:
            note += (f"; the bounded term {under.name} it fills over is a bias of shape "
                     f"{tuple(A.shape(under))} (no (Lq, Lk) tensor)")
        out.notes.append(f"{t.node.name}: {note}")
    return out
