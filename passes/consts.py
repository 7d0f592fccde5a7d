"""Constant evaluation of small graph pieces: scalars, fill values and causal masks.

Owns :func:`const_eval` (evaluate a node whose value depends only on constants:
literals, ``get_attr`` buffers, statically known sizes), :func:`scalar_value`
(a Python number for a scale or fill value, when provable), and the sizes a
size-built mask is probed at (:func:`size_assignments`, :func:`probe_sizes`; the
proofs that such a mask is a causal band live in :mod:`.bands`). Nothing is
guessed: anything not evaluable is ``None``.

Constants it may read: literals, sizes the graph is specialised to, and (dynamo graphs,
given the backend's ``example_inputs``) placeholders that dynamo lifted from registered
module buffers (:func:`is_module_buffer_placeholder`), through a :class:`BufferValues`
that records each read so that the backend can check those buffers at run time, and the
constants a tracer created (``get_attr`` ``_tensor_constant<N>``). The values of a
GraphModule's module state (``get_attr`` buffers and parameters, :func:`is_module_state`)
are never read: they can change after the rewrite and nothing would check them
(:func:`state_reads` names them for the notes). User inputs are never read. ``x.dtype`` reads the traced dtype from metadata (the
rewrite is specialised to the traced dtypes anyway); ``x.device`` evaluates on the CPU.
With ``axis_sizes`` a size query of an axis proven (by dataflow) to be the query or key
length evaluates to a chosen value: how symbolic_trace's run-time masks are proven causal.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import fx

from attnfuse.passes import axes as A

_MAX_NODES = 64
_MAX_ELEMS = 1 << 26
_RANDOM = ("rand", "randn", "randint", "dropout", "bernoulli", "normal", "uniform", "multinomial")


BUFFER_VALUES_ATTR = "_attnfuse_buffer_values"
STATE_STORAGES_ATTR = "_attnfuse_state_storages"


def is_module_buffer_placeholder(node: fx.Node) -> bool:
    """True when dynamo lifted this placeholder from a module's registered buffer.

    Decided by the placeholder's dynamo source (``node.meta["grapharg"].source``), never by
    its name: the source must be ``DictGetItemSource(base=<...>._buffers, index=name)``,
    which is how torch 2.13/2.14 dynamo (inline_inbuilt_nn_modules) reads ``module.name``
    for a registered buffer. User inputs (LocalSource) and parameters (``_parameters``)
    never qualify."""
    if node.op != "placeholder":
        return False
    ga = node.meta.get("grapharg")
    if ga is not None:
        src = getattr(ga, "source", None)
        if src is None or type(src).__name__ != "DictGetItemSource":
            return False
        base = getattr(src, "base", None)
        return getattr(base, "member", None) == "_buffers" and isinstance(getattr(src, "index", None), str)
    return _lifted_buffer_after_compile(node)


def _lifted_buffer_after_compile(node: fx.Node) -> bool:
    """Dynamo drops ``meta["grapharg"]`` once its backend returns; a graph kept past that
    still says it three ways, all required: the placeholder's name is the source's
    (``L['self']._buffers['bias']`` -> ``L_self_buffers_bias_``); dynamo marked it a static
    input (``tensor_dict['_dynamo_static_input_type']``, set for module parameters and
    buffers, not for user inputs); and the graph's ``dynamo_flat_name_to_original_fqn``
    (module parameters and buffers only) names a tensor of that buffer name."""
    target = str(node.target)
    if "_buffers_" not in target or not target.startswith("L_") or not target.endswith("_"):
        return False
    if "_dynamo_static_input_type" not in (node.meta.get("tensor_dict") or {}):
        return False
    gm = node.graph.owning_module
    fqns = getattr(gm, "meta", {}).get("dynamo_flat_name_to_original_fqn") if gm is not None else None
    if not isinstance(fqns, dict):
        return False
    name = target[target.rindex("_buffers_") + len("_buffers_"):-1]
    return bool(name) and any(isinstance(f, str) and f.split(".")[-1] == name for f in fqns.values())


class BufferValues(Dict[fx.Node, torch.Tensor]):
    """Placeholder -> value of the lifted module buffers the matcher may read, recording
    which ones it did read (``read``): a fusion proven from a buffer's values holds only
    while the buffer keeps them, so the caller must check them at run time
    (:mod:`attnfuse.witness`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set = set()
        self._outer: Optional[Tuple["BufferValues", Dict[fx.Node, List[fx.Node]]]] = None

    def __getitem__(self, n: fx.Node) -> torch.Tensor:
        self.read.add(n)
        if self._outer is not None:  # a body's placeholder: the read is of the outer buffer(s)
            outer, binding = self._outer
            for o in binding[n]:
                outer[o]
        return super().__getitem__(n)

    def for_body(self, binding: Dict[fx.Node, List[fx.Node]]) -> "BufferValues":
        """The values as a higher-order-op body sees them: ``binding`` maps each body
        placeholder to the outer nodes bound to it (all with one value); reading a body
        placeholder records those outer nodes as read here."""
        body = BufferValues({ph: dict.__getitem__(self, outs[0]) for ph, outs in binding.items()})
        body._outer = (self, binding)
        return body


def module_buffer_values(gm: fx.GraphModule, example_inputs) -> BufferValues:
    """Concrete values of the placeholders that are lifted module buffers (nanoGPT's ``tril``).

    ``example_inputs`` are what dynamo hands its backend: real tensors for lifted
    parameters and buffers. A buffer can change after compiling (``fill_``, reassignment,
    ``load_state_dict``): whoever passes these values must check the ones read
    (``.read``) at run time, as the backend does; user inputs are never read."""
    out = BufferValues()
    if example_inputs is None:
        return out
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(example_inputs):
        return out
    for n, x in zip(phs, example_inputs):
        if is_module_buffer_placeholder(n) and type(x) is torch.Tensor and not x.is_meta \
                and not x.requires_grad and x.numel() <= _MAX_ELEMS:
            out[n] = x
    return out


def is_module_state(gm, node: fx.Node, t: torch.Tensor) -> bool:
    """Whether the ``get_attr`` tensor ``node`` of ``gm`` is module state, whose values the user
    may change after the rewrite, rather than a constant of the traced program.

    Tracers name the constants they create ``_tensor_constant<N>``; any other name is a
    buffer or parameter under the user's own name (``bias``, ``blocks.0.attn.bias``). A
    constant is state too when it is the module's tensor after all: in an aten graph
    (``make_fx``) a literal reaches the graph through ``lift_fresh_copy``, so a constant
    read directly is a tensor the traced code captured (a buffer); in a ``symbolic_trace``
    graph a constant is a value computed at trace time, state only when it is a view of
    another tensor (a buffer sliced at trace time); and any constant sharing storage with
    the tensors of a module the caller traced (:data:`STATE_STORAGES_ATTR`) is state."""
    if not str(node.target).rsplit(".", 1)[-1].startswith("_tensor_constant"):
        return True
    if t.untyped_storage().data_ptr() in (getattr(gm, STATE_STORAGES_ATTR, None) or ()):
        return True
    if any(isinstance(u.target, torch._ops.OpOverload) for u in node.users):
        return any("lift_fresh" not in str(u.target) for u in node.users)
    return t._base is not None


def state_storages(module: torch.nn.Module) -> set:
    """The storages of ``module``'s parameters and buffers (see :func:`is_module_state`)."""
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}


def _reads(node: Any, pick) -> List[str]:
    """Names ``pick(n)`` gives for the nodes ``node`` is computed from (within a few nodes)."""
    names, seen, todo = [], set(), [node]
    while todo and len(seen) < 4 * _MAX_NODES:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        name = pick(n)
        if name:
            names.append(name)
        todo += n.all_input_nodes
    return sorted(set(names))


def state_reads(node: Any, gm) -> List[str]:
    """Names of the ``get_attr`` tensors ``node`` is computed from (within a few nodes): module
    state whose values the matcher does not read (see the module doc)."""
    def pick(n):
        t = _attr(gm, n.target) if n.op == "get_attr" else None
        return str(n.target) if isinstance(t, torch.Tensor) and is_module_state(gm, n, t) else None
    return _reads(node, pick)


def input_reads(node: Any) -> List[str]:
    """Names of the graph's tensor inputs ``node`` is computed from (within a few nodes), module
    buffers lifted by dynamo excepted: values known only at run time (Hugging Face's masks built
    from ``position_ids``, a mask passed in)."""
    def pick(n):
        if n.op != "placeholder" or is_module_buffer_placeholder(n):
            return None
        v = n.meta.get("example_value", n.meta.get("val"))
        return str(n.target) if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter) else None
    return _reads(node, pick)


def _attr(gm, target: str) -> Any:
    obj = gm
    try:
        for part in target.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        return None
    return obj


class _NotConst(Exception):
    pass


def _is_random(node: fx.Node) -> bool:
    name = str(getattr(node.target, "__name__", node.target))
    return any(r in name for r in _RANDOM)


_AXES = "__attnfuse_axis_sizes__"  # memo key (never an fx.Node): the axis-size assignment


class _Unknown:
    """A size nobody may read: any use of it makes the evaluation fail (never a silent value)."""

    def _fail(self, *a, **k):
        raise _NotConst

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __index__ = __int__ = _fail
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __floordiv__ = __rfloordiv__ = _fail
    __truediv__ = __rtruediv__ = __mod__ = __rmod__ = __neg__ = __float__ = __hash__ = _fail


def const_eval(node: Any, gm: Optional[torch.nn.Module], subs: Optional[Dict] = None,
               axis_sizes: Optional[Dict] = None) -> Any:
    """The concrete value of ``node`` if it depends only on constants, else None.

    ``subs`` maps the graph's size symbols to integers: symbolic sizes are then
    evaluated at those values (the caller proves a property at several of them).
    ``axis_sizes`` maps ``(node, axis)`` to an integer: a size query of that axis
    (``x.size(d)``, ``x.shape[d]``, ``sym_size``) evaluates to it, whatever the graph's
    metadata says (a dataflow proof: the caller knows the axis is the query/key length)."""
    try:
        return _eval(node, gm, {} if axis_sizes is None else {_AXES: axis_sizes}, [0], subs)
    except _NotConst:
        return None
    except Exception:  # noqa: BLE001 - evaluation of user code may fail in any way
        return None


def _sym(a, subs):
    v = A.static_int(a)
    if v is None and subs:
        e = A.expr(a).subs(subs)
        v = int(e) if e.is_Integer else None
    if v is None:
        raise _NotConst
    return v


def _eval(a: Any, gm, memo: Dict, budget, subs=None) -> Any:
    if isinstance(a, (list, tuple)):
        return type(a)(_eval(x, gm, memo, budget, subs) for x in a)
    if isinstance(a, dict):
        return {k: _eval(v, gm, memo, budget, subs) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_eval(a.start, gm, memo, budget, subs), _eval(a.stop, gm, memo, budget, subs),
                     _eval(a.step, gm, memo, budget, subs))
    if isinstance(a, torch.SymInt):
        return _sym(a, subs)
    if not isinstance(a, fx.Node):
        return a
    if a in memo:
        return memo[a]
    budget[0] += 1
    if budget[0] > _MAX_NODES:
        raise _NotConst
    n = a
    if n.op == "get_attr":
        if gm is None:
            raise _NotConst
        obj = gm
        for part in n.target.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor) and is_module_state(gm, n, obj):
            raise _NotConst  # its values may change after the rewrite (see the module doc)
        val = obj
    elif n.op == "placeholder" and n in (getattr(gm, BUFFER_VALUES_ATTR, None) or {}):
        val = getattr(gm, BUFFER_VALUES_ATTR)[n]  # a lifted module buffer (see module_buffer_values)
    elif n.op == "placeholder" and isinstance(n.meta.get("val", n.meta.get("example_value")), torch.SymInt):
        val = _sym(n.meta.get("val", n.meta.get("example_value")), subs)
    elif _AXES in memo and _size_source(n) is not None:
        x, d = _size_source(n)
        val = _axis_size(x, d, memo[_AXES], subs)
    elif n.op == "call_function" and n.target is getattr and len(n.args) == 2 and n.args[1] == "device":
        val = torch.device("cpu")  # the device never changes a value; evaluate on the CPU
    elif n.op == "call_function" and n.target is getattr and len(n.args) == 2 and n.args[1] == "dtype" \
            and isinstance(A.dtype(n.args[0]), torch.dtype):
        val = A.dtype(n.args[0])  # from metadata: the rewrite is specialised to the traced dtypes
    elif n.op == "call_method" and n.target == "size":
        s = _specialized_shape(n.args[0])
        if s is None:
            raise _NotConst
        sizes = [_sym(x, subs) for x in s]
        val = torch.Size(sizes) if len(n.args) == 1 else sizes[n.args[1]]
    elif n.op == "call_function" and n.target is getattr and n.args[1] == "shape":
        s = _specialized_shape(n.args[0])
        if s is None:
            raise _NotConst
        val = torch.Size([_sym(x, subs) for x in s])
    elif n.op == "call_function" and "sym_size" in str(n.target):
        s = _specialized_shape(n.args[0])
        if s is None:
            raise _NotConst
        val = _sym(s[n.args[1]], subs)
    elif n.op in ("call_function", "call_method"):
        if _is_random(n) or str(n.target).endswith("_") and n.op == "call_method":
            raise _NotConst
        args = _eval(n.args, gm, memo, budget, subs)
        kwargs = _eval(dict(n.kwargs), gm, memo, budget, subs)
        for t in list(args) + list(kwargs.values()):
            if isinstance(t, torch.Tensor) and t.numel() > _MAX_ELEMS:
                raise _NotConst
        with torch.no_grad():
            if n.op == "call_method":
                val = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                val = n.target(*args, **kwargs)
    else:
        raise _NotConst
    if isinstance(val, torch.Tensor) and (val.is_meta or type(val) is not torch.Tensor and
                                          not isinstance(val, torch.nn.Parameter)):
        raise _NotConst
    memo[n] = val
    return val


def _size_source(n: fx.Node):
    """``(x, d)`` for a size query of axis d of x (d None: the whole shape), else None."""
    if not isinstance(n.args[0] if n.args else None, fx.Node):
        return None
    if n.op == "call_method" and n.target == "size":
        d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        return (n.args[0], d) if d is None or isinstance(d, int) else None
    if n.op == "call_function" and n.target is getattr and len(n.args) == 2 and n.args[1] == "shape":
        return n.args[0], None
    if n.op == "call_function" and "sym_size" in str(n.target) and len(n.args) > 1 and isinstance(n.args[1], int):
        return n.args[0], n.args[1]
    return None


def _axis_size(x: fx.Node, d, axis_sizes: Dict, subs):
    r = A.rank(x)
    if r is None:
        raise _NotConst

    def one(i):
        if (x, i) in axis_sizes:
            return axis_sizes[(x, i)]
        s = _specialized_shape(x)
        if s is not None:
            try:
                return _sym(s[i], subs)
            except _NotConst:
                pass
        return _Unknown()

    if d is None:
        return tuple(one(i) for i in range(r))
    if not -r <= d < r:
        raise _NotConst
    v = one(d % r)
    if isinstance(v, _Unknown):
        raise _NotConst
    return v


def _specialized_shape(node):
    """A shape the graph is specialised to: dynamo/make_fx/export metadata (static sizes
    there are guarded or baked in). ShapeProp's ``tensor_meta`` describes one example
    only (a symbolic_trace graph runs at any shape), so it never counts as constant."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val", node.meta.get("example_value"))
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def scalar_value(a: Any, gm) -> Optional[float]:
    """A Python float for a number, or a one-element constant tensor node; else None."""
    if isinstance(a, bool):
        return None
    if isinstance(a, (int, float)):
        return float(a)
    if isinstance(a, fx.Node):
        v = const_eval(a, gm)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point():
            return float(v.reshape(()).item())
    return None


def size_assignments(sizes) -> Optional[list]:
    """Values of the size symbols in ``sizes`` to prove a property at: the traced example
    and smaller ones (each symbol moved on its own and all together). None if unknown."""
    syms, env = set(), None
    for x in sizes:
        if isinstance(x, torch.SymInt):
            syms |= A.expr(x).free_symbols
            env = env or x.node.shape_env
    if env is None or not syms:
        return None
    try:
        vals = getattr(env, "backed_var_to_val", None) or env.var_to_val
        base = {s: int(vals[s]) for s in syms}
    except (KeyError, AttributeError, TypeError):
        return None
    out = [base, {s: max(2, v - 1) for s, v in base.items()}, {s: max(2, v - 2) for s, v in base.items()}]
    for s in syms:
        out.append({**base, s: max(2, base[s] - 1)})
    return out


_PROBE_MAX = 4096  # largest size a mask is probed at (a 4096 x 4096 bool mask)


def probe_sizes(node: Any, gm) -> Optional[List[int]]:
    """Sizes to probe a size-built mask at beyond small ones: around every number in its
    subgraph and every dimension of a buffer it reads (a sliding window ``j > i - W`` or a
    buffer that stops being triangular at row W looks causal below W only). None when
    such a number is too large to probe (the caller then proves nothing)."""
    out, seen, todo = set(), set(), [node]
    tensors = []

    def num(x):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isinf(x) or math.isnan(x):
            return True
        c = abs(x)
        if c >= 2 ** 31:  # "to the end" slice bounds (INT64_MAX): beyond any (L, L) mask
            return True
        if c > _PROBE_MAX:
            return False
        c = int(math.ceil(c))
        out.update(v for v in (c - 1, c, c + 1, c + 2) if v >= 1)
        return True

    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if len(seen) > 4 * _MAX_NODES:
            return None
        if n.op == "get_attr":
            try:
                obj = gm
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                tensors.append(obj)
            except AttributeError:
                return None
        elif n.op == "placeholder" and n in (getattr(gm, BUFFER_VALUES_ATTR, None) or {}):
            tensors.append(getattr(gm, BUFFER_VALUES_ATTR)[n])
        flat = []
        fx.node.map_aggregate((n.args, dict(n.kwargs)), flat.append)
        for a in flat:
            if isinstance(a, fx.Node):
                todo.append(a)
            elif not num(a):
                return None
    for t in tensors:
        if isinstance(t, torch.Tensor):
            for d in t.shape:
                if d > _PROBE_MAX:
                    return None
                out.update(v for v in (d - 1, d) if v >= 1)
    return sorted(out)


def is_neg_inf(v: Optional[float]) -> bool:
    return v is not None and math.isinf(v) and v < 0


FILL_LIMIT = -1e30  # a finite fill at or below this is absorbed: s + fill == fill in fp32


def absorbing_fill(v: Optional[float]) -> bool:
    return v is not None and math.isfinite(v) and v <= FILL_LIMIT

