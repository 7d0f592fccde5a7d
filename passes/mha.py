"""``nn.MultiheadAttention``: the attention inside ``F.multi_head_attention_forward``, written out.

Owns :func:`inline_mha` and :func:`undo_inlines`. Dynamo keeps a call of
``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention.forward`` calls) as one node
of its graph, so its attention is invisible to the matcher. With ``need_weights=True`` (the
module's default) torch computes that attention explicitly: ``baddbmm(mask, q·scale, kᵀ)``,
softmax, dropout, ``bmm`` with V, and then averages the weights. Where the weights output is
read by nothing, the call is replaced by that path written out with torch-level ops, in
(batch, head, seq, dim) views and without the weights, which the matcher then proves and fuses
like any other attention; the masks reach it as float biases computed by torch's own
``F._canonical_mask``, the projections by torch's own ``F._in_projection_packed`` /
``F._in_projection``. A written-out call whose softmax is then not fused is put back as it was
(:func:`undo_inlines`), so a declined call leaves the graph unchanged.

Declined with a near miss: weights that are read (``need_weights=True`` and the second output
used: they are the probabilities); ``bias_k``/``bias_v``, ``add_zero_attn``, ``static_k``/
``static_v``, ``is_causal``, unbatched (2-D) inputs. ``need_weights=False`` is left alone and
not reported: torch already runs it as ``scaled_dot_product_attention``. In ``symbolic_trace``
graphs ``nn.MultiheadAttention`` is a leaf module; that is reported too.
"""
from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes.types import NearMiss, location_of
from attnfuse.passes.validate import fake_values

_SIG = inspect.signature(F.multi_head_attention_forward)
UNSUPPORTED = (("bias_k", "bias_k/bias_v"), ("bias_v", "bias_k/bias_v"), ("add_zero_attn", "add_zero_attn=True"),
               ("static_k", "static_k"), ("static_v", "static_v"), ("is_causal", "is_causal=True"))


@dataclass
class Inlined:
    """One written-out call: the original node, the nodes put in its place, its softmax, and
    the users of its output that now read ``out`` instead."""
    call: fx.Node
    nodes: List[fx.Node]
    softmax: fx.Node
    out: fx.Node
    getitem: fx.Node
    moved: List[fx.Node] = field(default_factory=list)


def _miss(node: fx.Node, kind: str, reason: str) -> NearMiss:
    return NearMiss(kind, f"{node.name}: {reason}", location_of(node), node.name, softmax="")


def _bound(node: fx.Node) -> Optional[Dict[str, Any]]:
    try:
        b = _SIG.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    b.apply_defaults()
    return dict(b.arguments)


def _declined(node: fx.Node, a: Dict[str, Any]) -> Optional[NearMiss]:
    if not a["need_weights"] is True:
        return None if a["need_weights"] is False else _miss(node, "unsupported_op",
                                                               "F.multi_head_attention_forward: need_weights is traced")
    gets = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem]
    if len(gets) != len(node.users) or any(not isinstance(g.args[1], int) for g in gets):
        return _miss(node, "probs_other_users", "F.multi_head_attention_forward: its outputs are read as a tuple")
    used = [u.name for g in gets if g.args[1] == 1 for u in g.users]
    if used:
        return _miss(node, "probs_other_users", "F.multi_head_attention_forward(need_weights=True): the attention "
                                                f"weights it returns are used by {', '.join(used)}")
    for key, what in UNSUPPORTED:
        if a[key] not in (None, False):
            return _miss(node, "unsupported_op", f"F.multi_head_attention_forward with {what}")
    for key in ("training", "dropout_p", "embed_dim_to_check", "num_heads"):
        if key == "dropout_p" and a["training"] is False:
            continue  # no dropout in eval, whatever p is (dynamo traces it as a float under dynamic=True)
        if isinstance(a[key], fx.Node):
            return _miss(node, "unsupported_op", f"F.multi_head_attention_forward: {key} is traced")
    if A.rank(a["query"]) != 3 or A.rank(a["key"]) != 3 or A.rank(a["value"]) != 3:
        return _miss(node, "unsupported_op", "F.multi_head_attention_forward with unbatched (2-D) inputs")
    if not any(g.args[1] == 0 for g in gets):
        return _miss(node, "no_pv_matmul", "F.multi_head_attention_forward: its output is not used")
    return None


class _Builder:
    def __init__(self, graph: fx.Graph):
        self.g, self.nodes = graph, []

    def f(self, target, *args, **kwargs) -> fx.Node:
        n = self.g.call_function(target, args, kwargs)
        self.nodes.append(n)
        return n

    def m(self, name, *args, **kwargs) -> fx.Node:
        n = self.g.call_method(name, args, kwargs)
        self.nodes.append(n)
        return n


def _write_out(graph: fx.Graph, node: fx.Node, a: Dict[str, Any]) -> Tuple[List[fx.Node], fx.Node, fx.Node]:
    """The explicit path of ``F.multi_head_attention_forward`` (torch 2.x, need_weights=True)
    without the weights, as nodes before ``node``; returns (nodes, softmax, output)."""
    b = _Builder(graph)
    E, H = int(a["embed_dim_to_check"]), int(a["num_heads"])
    hd = E // H
    query, key, value = a["query"], a["key"], a["value"]
    if a["use_separate_proj_weight"]:
        bias = a["in_proj_bias"]
        bq = bk = bv = None
        if bias is not None:
            parts = b.m("chunk", bias, 3)
            bq, bk, bv = (b.f(operator.getitem, parts, i) for i in range(3))
        proj = b.f(F._in_projection, query, key, value, a["q_proj_weight"], a["k_proj_weight"],
                   a["v_proj_weight"], bq, bk, bv)
    else:
        proj = b.f(F._in_projection_packed, query, key, value, a["in_proj_weight"], a["in_proj_bias"])
    q, k, v = (b.f(operator.getitem, proj, i) for i in range(3))
    tgt, bsz = b.m("size", query, 0), b.m("size", query, 1)
    src = b.m("size", key, 0)

    def heads(x, length):  # (L, N, E) -> (N, H, L, hd)
        return b.m("permute", b.m("view", x, length, bsz, H, hd), 1, 2, 0, 3)
    q4, k4, v4 = heads(q, tgt), heads(k, src), heads(v, src)
    s = b.f(torch.matmul, b.f(operator.mul, q4, math.sqrt(1.0 / float(hd))), b.m("transpose", k4, -2, -1))
    dtype = b.f(getattr, q, "dtype")
    mask = b.f(F._canonical_mask, a["attn_mask"], "attn_mask", None, "", dtype) \
        if a["attn_mask"] is not None else None
    if mask is not None:  # (L, S) broadcasts; (N·H, L, S) is (N, H, L, S)
        if A.rank(a["attn_mask"]) == 3:
            mask = b.m("view", mask, bsz, H, tgt, src)
        s = b.f(operator.add, s, mask)
    kpm = a["key_padding_mask"]
    if kpm is not None:
        kpm = b.f(F._canonical_mask, kpm, "key_padding_mask", None, "attn_mask", dtype)
        s = b.f(operator.add, s, b.m("view", kpm, bsz, 1, 1, src))
    p = b.f(F.softmax, s, dim=-1)
    softmax = p
    if a["training"] is True and float(a["dropout_p"]) > 0.0:
        p = b.f(F.dropout, p, p=float(a["dropout_p"]))
    o = b.f(torch.matmul, p, v4)                                        # (N, H, L, hd)
    o = b.m("reshape", b.m("permute", o, 2, 0, 1, 3), -1, E)           # (L·N, E), as torch does
    o = b.f(F.linear, o, a["out_proj_weight"], a["out_proj_bias"])
    o = b.m("view", o, tgt, bsz, b.m("size", o, 1))
    return b.nodes, softmax, o


def _set_meta(nodes: List[fx.Node], gm: fx.GraphModule) -> bool:
    """Record a value for every written-out node, as the graph's dialect does."""
    values = fake_values(nodes, gm)
    if values is None:
        return False
    for n in nodes:
        n.meta["example_value"] = values[n]
    return True


def inline_mha(gm: fx.GraphModule) -> Tuple[List[Inlined], List[NearMiss]]:
    """Write out every ``F.multi_head_attention_forward`` call whose weights are not read;
    near misses for the calls declined (and for leaf ``nn.MultiheadAttention`` modules)."""
    done: List[Inlined] = []
    misses: List[NearMiss] = []
    graph = gm.graph
    dynamo = any("example_value" in n.meta for n in graph.nodes)
    for node in list(graph.nodes):
        if node.op == "call_module":
            try:
                mod = gm.get_submodule(node.target)
            except AttributeError:
                continue
            if isinstance(mod, torch.nn.MultiheadAttention):
                misses.append(_miss(node, "unsupported_op", "nn.MultiheadAttention is a leaf module of this graph "
                                    "(symbolic_trace): its attention is not in the graph (torch.compile or make_fx "
                                    "trace into it)"))
            continue
        if node.op != "call_function" or node.target is not F.multi_head_attention_forward:
            continue
        a = _bound(node)
        if a is None:
            misses.append(_miss(node, "unsupported_op", "F.multi_head_attention_forward: unreadable arguments"))
            continue
        why = _declined(node, a)
        if why is not None or a["need_weights"] is False:
            if why is not None:
                misses.append(why)
            continue
        if not dynamo:
            misses.append(_miss(node, "unsupported_op", "F.multi_head_attention_forward in a graph without "
                                                        "dynamo's metadata"))
            continue
        with graph.inserting_before(node):
            nodes, sm, out = _write_out(graph, node, a)
        try:
            ok = _set_meta(nodes, gm)
        except Exception as e:  # noqa: BLE001  (a call this rule cannot write out: as it was)
            ok, err = False, e
        else:
            err = None
        if not ok:
            for n in reversed(nodes):
                graph.erase_node(n)
            misses.append(_miss(node, "unsupported_op", "F.multi_head_attention_forward: could not be written out"
                                + (f" ({type(err).__name__}: {err})" if err else "")))
            continue
        get0 = next(g for g in node.users if g.args[1] == 0)
        sm.meta["stack_trace"] = node.meta.get("stack_trace")
        get0.replace_all_uses_with(out)
        done.append(Inlined(node, nodes, sm, out, get0))
    return done, misses


def undo_inlines(gm: fx.GraphModule, done: List[Inlined], fused: Set[fx.Node]) -> List[Inlined]:
    """Put back every written-out call whose softmax is not in ``fused``; returns the others,
    whose original call (now unread but for its unused weights) the caller erases."""
    kept = []
    for d in done:
        if d.softmax in fused:
            kept.append(d)
            continue
        d.out.replace_all_uses_with(d.getitem)
        for n in reversed(d.nodes):
            gm.graph.erase_node(n)
    return kept


def erase_calls(gm: fx.GraphModule, kept: List[Inlined]) -> None:
    """Erase the original calls of fused written-out attentions (their outputs are unread)."""
    for d in kept:
        for g in list(d.call.users):
            if not g.users:
                gm.graph.erase_node(g)
        if not d.call.users:
            gm.graph.erase_node(d.call)
