"""Checking one emitted rewrite on fake tensors before it replaces anything.

Owns :func:`check_replacement`. The nodes the rewriter inserted for one match are run
on fake tensors, and the node that is to stand for the P·V matmul must come out with
P·V's shape, dtype, device and strides. Cost: one fake-tensor call per inserted node
(no data, no kernel), so it is cheap next to the match itself.

Where the values come from, per dialect:

- dynamo (``meta["example_value"]``) and aten graphs (``meta["val"]``): the graph's own
  fake tensors, in their own fake mode (symbolic sizes stay symbolic; sizes are compared
  exactly, with :func:`~attnfuse.passes.axes.size_eq`, never by adding guards);
- ``symbolic_trace`` + ``ShapeProp`` (``meta["tensor_meta"]``: shape, dtype, strides, no
  device and no values for non-tensor nodes): fresh fake tensors built from that
  metadata in a new fake mode (device: that of any recorded tensor, else CPU), and the
  few scalar nodes the region reads (``size``, ``dim``, ``shape``, Python arithmetic on
  them) recomputed from them. Static sizes only (such graphs have no others);
- real tensors recorded as values (``make_fx(tracing_mode="real")`` gives each node a
  fake tensor of its own mode; ``get_attr`` constants): treated like ``tensor_meta``.

A region whose inputs carry none of this cannot be checked: :func:`check_replacement`
then returns False and the rewrite stands on the matcher's proof alone, as before.
Nothing here changes the graph or its metadata.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx

from attnfuse.passes import axes as A

_UNKNOWN = object()
# original nodes without a recorded value that may be recomputed (scalars from shapes)
_SCALAR_METHODS = ("size", "dim")
_SCALAR_FUNCTIONS = (getattr, operator.getitem, operator.add, operator.sub, operator.mul, operator.truediv,
                     operator.floordiv, operator.pow, operator.neg, operator.mod)


class ReplacementMismatch(Exception):
    """The emitted nodes do not compute a value like the one they replace."""


def check_replacement(inserted: Sequence[fx.Node], out: fx.Node, original: fx.Node,
                      gm: fx.GraphModule) -> bool:
    """Run ``inserted`` (in graph order, ``out`` among them) on fake tensors and compare
    ``out`` with ``original``'s recorded value. Raises what a node raises, or
    :class:`ReplacementMismatch`; returns True when checked, False when the inputs carry
    no metadata to check with (nothing was run)."""
    values = fake_values(list(inserted), gm)
    if values is None:
        return False
    expected = _recorded(original, gm)
    if expected is _UNKNOWN or not _is_tensor_like(expected):
        return True   # the region ran; there is nothing recorded to compare its result with
    problem = tensor_mismatch(values[out], expected)
    if problem:
        raise ReplacementMismatch(f"the fused result differs from {original.name}: {problem}")
    return True


def tensor_mismatch(got: Any, expected: Any) -> str:
    """"" when ``got`` (a fake tensor) has ``expected``'s shape, dtype, device (when recorded)
    and strides (on axes longer than 1; when recorded), else what differs."""
    if not isinstance(got, torch.Tensor):
        return f"got {type(got).__name__}, not a tensor"
    gs, es = tuple(got.shape), tuple(expected.shape)
    if len(gs) != len(es) or not all(A.size_eq(a, b) for a, b in zip(gs, es)):
        return f"shape {gs} instead of {es}"
    if got.dtype != expected.dtype:
        return f"dtype {got.dtype} instead of {expected.dtype}"
    device = getattr(expected, "device", None)
    if device is not None and got.device != device:
        return f"device {got.device} instead of {device}"
    stride = strides_of(expected)
    if stride is not None and not any(A.size_eq(s, 0) for s in es):
        for d, size in enumerate(es):
            if not A.is_one(size) and not _stride_eq(got.stride(d), stride[d]):
                return f"strides {tuple(got.stride())} instead of {tuple(stride)}"
    return ""


def _stride_eq(a, b) -> bool:
    """Equal strides; symbolic strides also after ``Max(1, x)`` -> ``x``. Torch computes a
    contiguous stride as a product of ``Max(1, size)`` and a view's as a plain product; they
    differ only where some size is 0, and a tensor with no element has no layout to differ."""
    if A.size_eq(a, b):
        return True
    if not isinstance(a, torch.SymInt) and not isinstance(b, torch.SymInt):
        return False
    import sympy

    def strip(x):
        e = A.expr(x)
        return e.replace(lambda t: type(t).__name__ == "Max" and len(t.args) == 2 and sympy.Integer(1) in t.args,
                         lambda t: [u for u in t.args if u != 1][0])
    try:
        return sympy.expand(strip(a) - strip(b)) == 0
    except Exception:  # noqa: BLE001
        return False


def fake_values(nodes: List[fx.Node], gm: fx.GraphModule) -> Optional[Dict[fx.Node, Any]]:
    """The value of every node in ``nodes`` (and of the inputs they read) on fake tensors,
    or None when some input has no recorded value to start from."""
    region = set(nodes)
    leaves: Dict[fx.Node, Any] = {}
    recomputed: List[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in region and not _collect(a, gm, leaves, recomputed):
                return None
    made = _fake_inputs(leaves)
    if made is None:
        return None
    mode, values = made
    with mode, torch.no_grad():
        for n in recomputed + nodes:
            values[n] = _run(n, values)
    return values


def _collect(node: fx.Node, gm: fx.GraphModule, leaves: Dict[fx.Node, Any], recomputed: List[fx.Node],
             depth: int = 0) -> bool:
    """Record where ``node``'s value comes from: its metadata (``leaves``), or recomputed from
    its inputs (``recomputed``, inputs first). False when neither is possible."""
    if node in leaves or node in recomputed:
        return True
    value = _recorded(node, gm)
    if value is not _UNKNOWN:
        leaves[node] = value
        return True
    scalar = (node.op == "call_method" and node.target in _SCALAR_METHODS) or \
        (node.op == "call_function" and node.target in _SCALAR_FUNCTIONS)
    if not scalar or depth > 8:
        return False
    if not all(_collect(a, gm, leaves, recomputed, depth + 1) for a in node.all_input_nodes):
        return False
    recomputed.append(node)
    return True


def _recorded(node: fx.Node, gm: fx.GraphModule) -> Any:
    """``node``'s value as its metadata records it (a fake or real tensor, a TensorMetadata, a
    number or SymInt), a ``get_attr``'s attribute, or ``_UNKNOWN``."""
    for key in ("val", "example_value"):
        if node.meta.get(key) is not None:
            return node.meta[key]
    if node.meta.get("tensor_meta") is not None:
        return node.meta["tensor_meta"]
    if node.op == "get_attr":
        obj: Any = gm
        try:
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
        except AttributeError:
            return _UNKNOWN
        return obj
    return _UNKNOWN


def _is_tensor_like(v: Any) -> bool:
    return isinstance(v, torch.Tensor) or (hasattr(v, "shape") and hasattr(v, "dtype") and hasattr(v, "stride"))


def strides_of(v: Any) -> Optional[Tuple]:
    """The strides a recorded value (tensor or TensorMetadata) gives, or None."""
    if isinstance(v, torch.Tensor):
        return None if v.layout != torch.strided else tuple(v.stride())
    s = getattr(v, "stride", None)
    return tuple(s) if isinstance(s, (tuple, list)) else None


def _fake_mode_of(v: Any):
    from torch._subclasses.fake_tensor import FakeTensor
    return v.fake_mode if isinstance(v, FakeTensor) else None


def _is_symbolic(v: Any) -> bool:
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    if _is_tensor_like(v):
        return any(not isinstance(s, int) for s in tuple(v.shape) + (strides_of(v) or ()))
    if isinstance(v, (tuple, list)):
        return any(_is_symbolic(x) for x in v)
    return False


def _fake_inputs(leaves: Dict[fx.Node, Any]) -> Optional[Tuple[Any, Dict[fx.Node, Any]]]:
    """A fake mode and the leaves' values in it: the graph's own mode when every recorded fake
    tensor shares one, else a fresh mode with tensors rebuilt from their metadata (static
    sizes only). None when neither applies."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    modes = {id(m): m for m in map(_fake_mode_of, leaves.values()) if m is not None}
    others = [v for v in leaves.values() if _is_tensor_like(v) and _fake_mode_of(v) is None]
    if len(modes) == 1 and not any(not isinstance(v, torch.Tensor) for v in others):
        mode = next(iter(modes.values()))
        values = {}
        for n, v in leaves.items():
            values[n] = mode.from_tensor(v, static_shapes=True) \
                if isinstance(v, torch.Tensor) and _fake_mode_of(v) is None else v
        return mode, values
    if any(_is_symbolic(v) for v in leaves.values()):
        return None
    devices = [v.device for v in leaves.values() if isinstance(v, torch.Tensor)]
    device = devices[0] if devices else torch.device("cpu")
    mode = FakeTensorMode()
    values = {}
    with mode:
        for n, v in leaves.items():
            if _is_tensor_like(v):
                stride = strides_of(v)
                values[n] = torch.empty_strided(tuple(v.shape), stride if stride is not None else
                                                _contiguous_strides(tuple(v.shape)),
                                                dtype=v.dtype, device=getattr(v, "device", device))
            else:
                values[n] = v
    return mode, values


def _contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def _run(n: fx.Node, values: Dict[fx.Node, Any]) -> Any:
    args, kwargs = fx.node.map_arg((n.args, n.kwargs), values.__getitem__)
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    raise ReplacementMismatch(f"{n.name}: cannot run a {n.op} node on fake tensors")
