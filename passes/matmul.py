"""Every MATMUL spelling as one einsum-like description.

Owns :func:`mm_spec`: for ``@``/matmul, bmm, mm, baddbmm and einsum (any letters,
any layout, ``...``), the index letters of each operand's axes and of the output,
so the matcher reasons about contraction and batch axes the same way for all of
them. Broadcast batch axes get the same letter on both operands (sizes of 1 are
handled by the caller).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from torch import fx

from attnfuse.passes import axes as A
from attnfuse.passes import ops as O

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class MMSpec:
    a: fx.Node
    b: fx.Node
    la: Tuple[str, ...]
    lb: Tuple[str, ...]
    lo: Tuple[str, ...]
    bias: Any = None        # baddbmm input (added, times beta)
    alpha: float = 1.0
    beta: float = 1.0
    hints: Tuple[Optional[str], Optional[str]] = (None, None)  # (query, key) letters when known
    alpha_node: Any = None  # baddbmm alpha computed at run time (a SymFloat node): scale = alpha * that


def _symbolic_number(n: fx.Node) -> bool:
    """A node whose value is a Python number (dynamo/make_fx metadata: SymFloat, SymInt)."""
    v = n.meta.get("val", n.meta.get("example_value"))
    return isinstance(v, (torch.SymFloat, torch.SymInt, float, int)) and not isinstance(v, bool)


def _matmul_letters(ra: int, rb: int):
    if ra < 2 or rb < 2:
        return None
    ro = max(ra, rb)
    batch = [f"b{i}" for i in range(ro - 2)]
    la = tuple(batch[len(batch) - (ra - 2):]) + ("i", "c")
    lb = tuple(batch[len(batch) - (rb - 2):]) + ("c", "j")
    return la, lb, tuple(batch) + ("i", "j")


def _parse_einsum(eq: str, ra: int, rb: int):
    eq = eq.replace(" ", "")
    if "->" in eq:
        lhs, out = eq.split("->")
    else:
        lhs, out = eq, None
    parts = lhs.split(",")
    if len(parts) != 2:
        return None
    ell_n = None
    res = []
    for p, r in zip(parts, (ra, rb)):
        if "..." in p:
            n = r - (len(p) - 3)
            ell_n = n if ell_n is None else max(ell_n, n)
            ell = _LETTERS[-n:] if n > 0 else ""
            # right-align the ellipsis letters across operands
            p = p.replace("...", ell)
        if len(p) != r:
            return None
        res.append(tuple(p))
    if out is None:
        counts = {}
        for p in res:
            for c in p:
                counts[c] = counts.get(c, 0) + 1
        out = "".join(sorted(c for c, k in counts.items() if k == 1))
    elif "..." in out:
        out = out.replace("...", _LETTERS[-ell_n:] if ell_n else "")
    for p in res:
        if len(set(p)) != len(p):
            return None  # diagonals
    if len(set(out)) != len(out):
        return None
    return res[0], res[1], tuple(out)


def mm_spec(node: fx.Node, op: O.Op) -> Optional[MMSpec]:
    """The einsum-like spec of a MATMUL node, or None when not a 2-operand product."""
    if op.sub == "einsum":
        ops = op["operands"]
        eq = op["eq"]
        if len(ops) != 2 or not isinstance(eq, str) or not all(isinstance(x, fx.Node) for x in ops):
            return None
        ra, rb = A.rank(ops[0]), A.rank(ops[1])
        if ra is None or rb is None:
            return None
        # ellipsis letters must line up right-aligned: use a shared tail of the alphabet
        parsed = _parse_einsum(eq, ra, rb)
        if parsed is None:
            return None
        return MMSpec(ops[0], ops[1], *parsed)
    a, b = op.get("a"), op.get("b")
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return None
    ra, rb = A.rank(a), A.rank(b)
    if ra is None or rb is None:
        return None
    if op.sub in ("bmm", "baddbmm") and (ra != 3 or rb != 3):
        return None
    if op.sub == "mm" and (ra != 2 or rb != 2):
        return None
    letters = _matmul_letters(ra, rb)
    if letters is None:
        return None
    if op.sub == "baddbmm":
        alpha, beta = op.get("alpha", 1), op.get("beta", 1)
        alpha_node = None
        if isinstance(alpha, fx.Node) and _symbolic_number(alpha):
            alpha_node, alpha = alpha, 1.0  # a run-time scale (BLOOM's inv_norm_factor under dynamic shapes)
        if isinstance(alpha, bool) or isinstance(beta, bool) or \
                not isinstance(alpha, (int, float)) or not isinstance(beta, (int, float)):
            return None
        return MMSpec(a, b, *letters, bias=op.get("bias"), alpha=float(alpha), beta=float(beta),
                      alpha_node=alpha_node)
    return MMSpec(a, b, *letters)


def _below_view(n: Any, gm):
    """For ``view(clone?(expand?(X)))``: (the node under the view and identities, X)."""
    op = O.classify(n, gm) if isinstance(n, fx.Node) else None
    if op is None or op.kind != O.LAYOUT or op.sub != "view" or not isinstance(op["x"], fx.Node):
        return None
    x = op["x"]
    for _ in range(4):
        xop = O.classify(x, gm)
        if xop is not None and xop.kind == O.LAYOUT and xop.sub == "identity" and isinstance(xop["x"], fx.Node):
            x = xop["x"]
    ex = x
    xop = O.classify(x, gm)
    if xop is not None and xop.kind == O.LAYOUT and xop.sub == "expand" and isinstance(xop["x"], fx.Node):
        x = xop["x"]
    return ex, x


def decomposed_matmul(out_view: fx.Node, gm) -> Optional[MMSpec]:
    """aten's matmul decomposition, read back as one batched matmul.

    ``_unsafe_view(bmm(view(expand(A)), view(expand(B))), (*batch, i, j))`` is
    ``A @ B`` when the views merge exactly the batch axes of both (sizes proven
    symbolically) and the output view splits them back in the same order.
    """
    op = O.classify(out_view, gm)
    if op is None or op.kind != O.LAYOUT or op.sub != "view" or not isinstance(op["x"], fx.Node):
        return None
    bmm = op["x"]
    bop = O.classify(bmm, gm)
    if bop is None or bop.kind != O.MATMUL or bop.sub != "bmm" or len(A.data_users(bmm)) != 1:
        return None
    a0, b0 = bop["a"], bop["b"]
    ra, rb = _below_view(a0, gm), _below_view(b0, gm)
    if ra is None or rb is None:
        return None
    (exa, a), (exb, b) = ra, rb
    sa, sb, so = A.shape(a), A.shape(b), A.shape(out_view)
    sa0, sb0, sm = A.shape(a0), A.shape(b0), A.shape(bmm)
    if None in (sa, sb, so, sa0, sb0, sm) or len(sa) < 2 or len(sb) < 2 or len(so) < 2:
        return None
    ex_a, ex_b = A.shape(exa), A.shape(exb)
    if ex_a is None or ex_b is None:
        return None
    nb = len(so) - 2
    # the expanded operands have the output's batch shape; the views merge exactly that
    for ex, m in ((ex_a, sa0), (ex_b, sb0)):
        if len(ex) != nb + 2 or any(not A.size_eq(x, y) for x, y in zip(ex[:nb], so[:nb])):
            return None
        if len(m) != len(sm) or not A.size_eq(A.prod(ex[:nb]), A.prod(m[:-2])) \
                or not A.size_eq(ex[-2], m[-2]) or not A.size_eq(ex[-1], m[-1]):
            return None
    if not A.size_eq(A.prod(so[:nb]), A.prod(sm[:-2])) or not A.size_eq(so[-2], sm[-2]) \
            or not A.size_eq(so[-1], sm[-1]):
        return None
    letters = _matmul_letters(len(sa), len(sb))
    if letters is None or len(letters[2]) != len(so):
        return None
    return MMSpec(a, b, *letters)
