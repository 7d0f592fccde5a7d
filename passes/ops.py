"""Canonical ops: one table that says what an FX node *means*, whatever the dialect.

Owns the classification of nodes from three graph dialects into a small set of
canonical ops, and how to read each one's arguments:

- dynamo torch-level graphs (torch functions, ``operator`` functions, ``call_method``),
- ``torch.fx.symbolic_trace`` graphs (``call_module`` ``nn.Softmax`` / ``nn.Dropout`` ...),
- aten graphs from ``make_fx`` / ``torch.export`` (``aten.bmm``, ``aten._softmax`` ...).

:func:`classify` returns an :class:`Op` (kind, sub-kind, normalised arguments) or
``None``. The table is data; the readers below only normalise argument positions.
In-place forms (``masked_fill_``, ``add_``, dropout ``inplace=True``) are marked with
``inplace=True``. Nothing here looks at graph structure beyond one node.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten
prims = torch.ops.prims

# canonical kinds
MATMUL = "MATMUL"
LAYOUT = "LAYOUT"
SCALE = "SCALE"
ADD = "ADD"
MASK = "MASK"
CAST = "CAST"
SOFTMAX = "SOFTMAX"
LOG_SOFTMAX = "LOG_SOFTMAX"
DROPOUT = "DROPOUT"
ELEMENTWISE = "ELEMENTWISE"
GETITEM = "GETITEM"
COMPARE = "COMPARE"
FATTN = "FATTN"  # our own fused op (already rewritten)


@dataclass(frozen=True)
class Op:
    """A node's meaning: ``kind`` (canonical), ``sub`` (variant) and its arguments."""

    kind: str
    sub: str
    args: Dict[str, Any] = field(default_factory=dict)
    inplace: bool = False

    def __getitem__(self, key):
        return self.args[key]

    def get(self, key, default=None):
        return self.args.get(key, default)


def _a(node: fx.Node, i: int, name: str, default=None):
    """Argument ``i`` (positional) or ``name`` (keyword) of ``node``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


# ---------------------------------------------------------------------------
# argument readers: node -> dict (positions already include ``self`` for methods)
# ---------------------------------------------------------------------------

def _r_ab(n):
    return {"a": _a(n, 0, "input"), "b": _a(n, 1, "other")}


def _r_einsum(n):
    ops = list(n.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    return {"eq": n.args[0], "operands": ops}


def _r_baddbmm(n):
    return {"bias": _a(n, 0, "input"), "a": _a(n, 1, "batch1"), "b": _a(n, 2, "batch2"),
            "beta": n.kwargs.get("beta", 1), "alpha": n.kwargs.get("alpha", 1)}


def _r_x(n):
    return {"x": _a(n, 0, "input")}


def _r_permute(n):
    dims = n.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    if not dims:
        dims = n.kwargs.get("dims", ())
    return {"x": n.args[0], "dims": tuple(dims)}


def _r_transpose(n):
    return {"x": n.args[0], "d0": _a(n, 1, "dim0"), "d1": _a(n, 2, "dim1")}


def _r_unsqueeze(n):
    return {"x": n.args[0], "dim": _a(n, 1, "dim")}


def _r_rep_inter(n):
    return {"x": n.args[0], "repeats": _a(n, 1, "repeats"), "dim": _a(n, 2, "dim")}


def _r_repeat(n):
    reps = n.args[1:]
    if len(reps) == 1 and isinstance(reps[0], (list, tuple)):
        reps = reps[0]
    return {"x": n.args[0], "repeats": tuple(reps)}


def _r_add(n):
    return {"a": _a(n, 0, "input"), "b": _a(n, 1, "other"), "alpha": n.kwargs.get("alpha", 1)}


def _r_masked_fill(n):
    return {"x": n.args[0], "mask": _a(n, 1, "mask"), "value": _a(n, 2, "value")}


def _r_where(n):
    return {"cond": _a(n, 0, "condition"), "a": _a(n, 1, "input"), "b": _a(n, 2, "other")}


def _r_softmax_fn(n):  # F.softmax(input, dim, _stacklevel, dtype) / torch.softmax(input, dim, dtype)
    dtype = n.kwargs.get("dtype")
    if n.target in (F.softmax, F.log_softmax) and len(n.args) > 3:
        dtype = n.args[3]
    elif n.target not in (F.softmax, F.log_softmax) and len(n.args) > 2:
        dtype = n.args[2]
    return {"x": _a(n, 0, "input"), "dim": _a(n, 1, "dim"), "dtype": dtype}


def _r_aten_softmax(n):  # aten._softmax(x, dim, half_to_float)
    return {"x": n.args[0], "dim": n.args[1], "dtype": None, "half_to_float": n.args[2]}


def _r_aten_softmax_int(n):
    return {"x": n.args[0], "dim": n.args[1], "dtype": _a(n, 2, "dtype")}


def _r_cast_to(n):
    """Tensor.to(dtype) / .to(device, dtype) / .to(other) -> dtype or None (not a pure cast)."""
    dtype = n.kwargs.get("dtype")
    for a in n.args[1:]:
        if isinstance(a, torch.dtype):
            dtype = a
    if dtype is None and "device" not in n.kwargs and len(n.args) == 2 and isinstance(n.args[1], fx.Node):
        return {"x": n.args[0], "dtype": None, "like": n.args[1]}
    return {"x": n.args[0], "dtype": dtype}


def _cast_fixed(dtype):
    return lambda n: {"x": n.args[0], "dtype": dtype}


def _r_type_as(n):
    return {"x": n.args[0], "dtype": None, "like": n.args[1]}


def _r_convert(n):
    return {"x": n.args[0], "dtype": _a(n, 1, "dtype")}


def _r_to_copy(n):
    return {"x": n.args[0], "dtype": n.kwargs.get("dtype")}


def _r_dropout_fn(n):  # F.dropout(input, p=0.5, training=True, inplace=False)
    return {"x": _a(n, 0, "input"), "p": _a(n, 1, "p", 0.5), "train": _a(n, 2, "training", True),
            "inplace_flag": _a(n, 3, "inplace", False)}


def _r_dropout_torch(n):  # torch.dropout(input, p, train) / aten.dropout / aten.native_dropout
    return {"x": _a(n, 0, "input"), "p": _a(n, 1, "p"), "train": _a(n, 2, "train")}


def _r_getitem(n):
    return {"x": n.args[0], "idx": n.args[1]}


def _r_cmp(n):
    return {"a": n.args[0], "b": n.args[1]}


# ---------------------------------------------------------------------------
# THE TABLE
# ---------------------------------------------------------------------------

# (kind, sub, reader, inplace)
_T = tuple

FUNCTIONS: Dict[Any, _T] = {
    operator.matmul: (MATMUL, "matmul", _r_ab, False),
    torch.matmul: (MATMUL, "matmul", _r_ab, False),
    torch.bmm: (MATMUL, "bmm", _r_ab, False),
    torch.mm: (MATMUL, "mm", _r_ab, False),
    torch.einsum: (MATMUL, "einsum", _r_einsum, False),
    torch.baddbmm: (MATMUL, "baddbmm", _r_baddbmm, False),
    torch.permute: (LAYOUT, "permute", _r_permute, False),
    torch.transpose: (LAYOUT, "transpose", _r_transpose, False),
    torch.swapaxes: (LAYOUT, "transpose", _r_transpose, False),
    torch.reshape: (LAYOUT, "view", _r_x, False),
    torch.unsqueeze: (LAYOUT, "unsqueeze", _r_unsqueeze, False),
    torch.repeat_interleave: (LAYOUT, "repeat_interleave", _r_rep_inter, False),
    torch.t: (LAYOUT, "t", _r_x, False),
    operator.mul: (SCALE, "mul", _r_ab, False),
    operator.imul: (SCALE, "mul", _r_ab, False),
    torch.mul: (SCALE, "mul", _r_ab, False),
    operator.truediv: (SCALE, "div", _r_ab, False),
    operator.itruediv: (SCALE, "div", _r_ab, False),
    torch.div: (SCALE, "div", _r_ab, False),
    torch.true_divide: (SCALE, "div", _r_ab, False),
    operator.add: (ADD, "add", _r_add, False),
    operator.iadd: (ADD, "add", _r_add, False),
    torch.add: (ADD, "add", _r_add, False),
    operator.sub: (ADD, "sub", _r_add, False),
    torch.sub: (ADD, "sub", _r_add, False),
    torch.masked_fill: (MASK, "masked_fill", _r_masked_fill, False),
    torch.where: (MASK, "where", _r_where, False),
    F.softmax: (SOFTMAX, "softmax", _r_softmax_fn, False),
    torch.softmax: (SOFTMAX, "softmax", _r_softmax_fn, False),
    torch.nn.functional.log_softmax: (LOG_SOFTMAX, "log_softmax", _r_softmax_fn, False),
    torch.log_softmax: (LOG_SOFTMAX, "log_softmax", _r_softmax_fn, False),
    F.dropout: (DROPOUT, "dropout", _r_dropout_fn, False),
    torch.dropout: (DROPOUT, "dropout", _r_dropout_torch, False),
    torch.tanh: (ELEMENTWISE, "tanh", _r_x, False),
    operator.getitem: (GETITEM, "getitem", _r_getitem, False),
    operator.eq: (COMPARE, "eq", _r_cmp, False),
    operator.ne: (COMPARE, "ne", _r_cmp, False),
    operator.invert: (COMPARE, "not", _r_x, False),
    torch.logical_not: (COMPARE, "not", _r_x, False),
}

METHODS: Dict[str, _T] = {
    "matmul": (MATMUL, "matmul", _r_ab, False),
    "__matmul__": (MATMUL, "matmul", _r_ab, False),
    "bmm": (MATMUL, "bmm", _r_ab, False),
    "mm": (MATMUL, "mm", _r_ab, False),
    "baddbmm": (MATMUL, "baddbmm", _r_baddbmm, False),
    "permute": (LAYOUT, "permute", _r_permute, False),
    "transpose": (LAYOUT, "transpose", _r_transpose, False),
    "swapaxes": (LAYOUT, "transpose", _r_transpose, False),
    "view": (LAYOUT, "view", _r_x, False),
    "reshape": (LAYOUT, "view", _r_x, False),
    "expand": (LAYOUT, "expand", _r_x, False),
    "expand_as": (LAYOUT, "expand", _r_x, False),
    "unsqueeze": (LAYOUT, "unsqueeze", _r_unsqueeze, False),
    "contiguous": (LAYOUT, "identity", _r_x, False),
    "clone": (LAYOUT, "identity", _r_x, False),
    "repeat_interleave": (LAYOUT, "repeat_interleave", _r_rep_inter, False),
    "repeat": (LAYOUT, "repeat", _r_repeat, False),
    "t": (LAYOUT, "t", _r_x, False),
    "mul": (SCALE, "mul", _r_ab, False),
    "mul_": (SCALE, "mul", _r_ab, True),
    "__mul__": (SCALE, "mul", _r_ab, False),
    "div": (SCALE, "div", _r_ab, False),
    "div_": (SCALE, "div", _r_ab, True),
    "true_divide": (SCALE, "div", _r_ab, False),
    "__truediv__": (SCALE, "div", _r_ab, False),
    "add": (ADD, "add", _r_add, False),
    "add_": (ADD, "add", _r_add, True),
    "__add__": (ADD, "add", _r_add, False),
    "sub": (ADD, "sub", _r_add, False),
    "sub_": (ADD, "sub", _r_add, True),
    "masked_fill": (MASK, "masked_fill", _r_masked_fill, False),
    "masked_fill_": (MASK, "masked_fill", _r_masked_fill, True),
    "softmax": (SOFTMAX, "softmax", _r_softmax_fn, False),
    "log_softmax": (LOG_SOFTMAX, "log_softmax", _r_softmax_fn, False),
    "to": (CAST, "to", _r_cast_to, False),
    "type_as": (CAST, "to", _r_type_as, False),
    "type": (CAST, "to", _r_cast_to, False),
    "float": (CAST, "to", _cast_fixed(torch.float32), False),
    "half": (CAST, "to", _cast_fixed(torch.float16), False),
    "bfloat16": (CAST, "to", _cast_fixed(torch.bfloat16), False),
    "double": (CAST, "to", _cast_fixed(torch.float64), False),
    "tanh": (ELEMENTWISE, "tanh", _r_x, False),
    "eq": (COMPARE, "eq", _r_cmp, False),
    "ne": (COMPARE, "ne", _r_cmp, False),
    "__eq__": (COMPARE, "eq", _r_cmp, False),
    "logical_not": (COMPARE, "not", _r_x, False),
    "__invert__": (COMPARE, "not", _r_x, False),
}
METHODS["mT"] = (LAYOUT, "mT", _r_x, False)  # attribute access in dynamo shows as getattr

ATEN: Dict[Any, _T] = {  # keyed by OpOverloadPacket
    aten.matmul: (MATMUL, "matmul", _r_ab, False),
    aten.bmm: (MATMUL, "bmm", _r_ab, False),
    aten.mm: (MATMUL, "mm", _r_ab, False),
    aten.einsum: (MATMUL, "einsum", lambda n: {"eq": n.args[0], "operands": list(n.args[1])}, False),
    aten.baddbmm: (MATMUL, "baddbmm", _r_baddbmm, False),
    aten.permute: (LAYOUT, "permute", _r_permute, False),
    aten.transpose: (LAYOUT, "transpose", _r_transpose, False),
    aten.t: (LAYOUT, "t", _r_x, False),
    aten.mT: (LAYOUT, "mT", _r_x, False),
    aten.adjoint: (LAYOUT, "mT", _r_x, False),
    aten.view: (LAYOUT, "view", _r_x, False),
    aten._unsafe_view: (LAYOUT, "view", _r_x, False),
    aten.reshape: (LAYOUT, "view", _r_x, False),
    aten.expand: (LAYOUT, "expand", _r_x, False),
    aten.unsqueeze: (LAYOUT, "unsqueeze", _r_unsqueeze, False),
    aten.clone: (LAYOUT, "identity", _r_x, False),
    aten.contiguous: (LAYOUT, "identity", _r_x, False),
    aten.alias: (LAYOUT, "identity", _r_x, False),
    aten.repeat_interleave: (LAYOUT, "repeat_interleave", _r_rep_inter, False),
    aten.repeat: (LAYOUT, "repeat", _r_repeat, False),
    aten.mul: (SCALE, "mul", _r_ab, False),
    aten.mul_: (SCALE, "mul", _r_ab, True),
    aten.div: (SCALE, "div", _r_ab, False),
    aten.div_: (SCALE, "div", _r_ab, True),
    aten.add: (ADD, "add", _r_add, False),
    aten.add_: (ADD, "add", _r_add, True),
    aten.sub: (ADD, "sub", _r_add, False),
    aten.masked_fill: (MASK, "masked_fill", _r_masked_fill, False),
    aten.masked_fill_: (MASK, "masked_fill", _r_masked_fill, True),
    aten.where: (MASK, "where", _r_where, False),
    aten._softmax: (SOFTMAX, "softmax", _r_aten_softmax, False),
    aten.softmax: (SOFTMAX, "softmax", _r_aten_softmax_int, False),
    aten._log_softmax: (LOG_SOFTMAX, "log_softmax", _r_aten_softmax, False),
    aten.log_softmax: (LOG_SOFTMAX, "log_softmax", _r_aten_softmax_int, False),
    prims.convert_element_type: (CAST, "to", _r_convert, False),
    aten._to_copy: (CAST, "to", _r_to_copy, False),
    aten.to: (CAST, "to", _r_cast_to, False),
    aten.type_as: (CAST, "to", _r_type_as, False),
    aten.dropout: (DROPOUT, "dropout", _r_dropout_torch, False),
    aten.native_dropout: (DROPOUT, "native_dropout", _r_dropout_torch, False),
    aten.tanh: (ELEMENTWISE, "tanh", _r_x, False),
    aten.eq: (COMPARE, "eq", _r_cmp, False),
    aten.ne: (COMPARE, "ne", _r_cmp, False),
    aten.logical_not: (COMPARE, "not", _r_x, False),
    aten.bitwise_not: (COMPARE, "not", _r_x, False),
}


def _module_op(mod: torch.nn.Module, node: fx.Node) -> Optional[Op]:
    x = node.args[0] if node.args else node.kwargs.get("input")
    if isinstance(mod, torch.nn.Softmax):
        return Op(SOFTMAX, "softmax", {"x": x, "dim": mod.dim, "dtype": None})
    if isinstance(mod, torch.nn.LogSoftmax):
        return Op(LOG_SOFTMAX, "log_softmax", {"x": x, "dim": mod.dim, "dtype": None})
    if isinstance(mod, torch.nn.Dropout):
        return Op(DROPOUT, "dropout", {"x": x, "p": mod.p, "train": mod.training,
                                        "inplace_flag": mod.inplace})
    if isinstance(mod, torch.nn.Identity):
        return Op(LAYOUT, "identity", {"x": x})
    if isinstance(mod, torch.nn.Tanh):
        return Op(ELEMENTWISE, "tanh", {"x": x})
    return None


def is_fused_op(node: fx.Node) -> bool:
    t = node.target
    try:
        return getattr(t, "_qualified_op_name", None) == "attnfuse::flash_attention" or \
            getattr(getattr(t, "overloadpacket", None), "_qualified_op_name", None) == "attnfuse::flash_attention"
    except Exception:  # pragma: no cover
        return False


def classify(node: fx.Node, gm: Optional[torch.nn.Module] = None) -> Optional[Op]:
    """The canonical :class:`Op` of ``node`` or ``None`` when it is none of ours."""
    entry: Optional[_T] = None
    if node.op == "call_function":
        if is_fused_op(node):
            return Op(FATTN, "flash_attention", {})
        packet = getattr(node.target, "overloadpacket", None)
        if packet is None and isinstance(node.target, torch._ops.OpOverloadPacket):
            packet = node.target
        if packet is not None:
            entry = ATEN.get(packet)
        else:
            try:
                entry = FUNCTIONS.get(node.target)
            except TypeError:
                entry = None
            if entry is None and node.target is getattr and len(node.args) == 2 and node.args[1] == "mT":
                return Op(LAYOUT, "mT", {"x": node.args[0]})
    elif node.op == "call_method":
        entry = METHODS.get(node.target)
    elif node.op == "call_module" and gm is not None:
        try:
            mod = gm.get_submodule(node.target)
        except AttributeError:
            return None
        return _module_op(mod, node)
    if entry is None:
        return None
    kind, sub, reader, inplace = entry
    try:
        args = reader(node)
    except (IndexError, KeyError, TypeError):
        return None
    if args.get("inplace_flag"):
        inplace = True
    return Op(kind, sub, args, inplace)

