"""Where in the user's code a graph node comes from: file:line, source text and module path.

Owns three things, so that every route into :func:`attnfuse.rewrite` and the backend
reports the user's own file, line, code and module path:

- :func:`module_path`: the module a node belongs to, as the user wrote it
  (``blocks.0.attn``): the innermost entry of ``node.meta["nn_module_stack"]`` whose class is
  not one of torch's own ``nn`` modules (an ``nn.Softmax`` leaf belongs to the attention
  module that calls it), with dynamo's ``L['self']`` root dropped and ``G['model']`` /
  ``[0]`` spelled ``model`` / ``.0``. ``""`` is the root module; None where the graph recorded
  no module stack (dynamo records none for the compiled module's own ``forward``).
- :func:`trace_module`: ``make_fx`` of a plain module with stack traces and the module
  stack recorded (the route ``rewrite(module, example_inputs)`` takes).
- :func:`recover_stack_traces`: for a graph traced without stack traces
  (``torch.fx.symbolic_trace``), a ``stack_trace`` per call node recovered from the module
  hierarchy: the node's module class (from ``nn_module_stack``; the root class for nodes of
  the top-level ``forward``) and the k-th call of the same name (``softmax``, ``matmul``,
  ``@``, ``self.<submodule>``) in that class's ``forward`` source for the k-th such node of
  that module. Where the counts disagree (a call made in a helper function, a loop), the
  ``def forward`` line stands for the node: the right file and function, not the exact line.

The frame a location names is the last frame of the stack trace outside torch's own
installation (:func:`attnfuse.passes.types.user_frame`).
"""
from __future__ import annotations

import inspect
import io
import re
import sys
import tokenize
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx

_ROOT = re.compile(r"^([LG])\['([^']+)'\]((?:\[(?:\d+|'[^']+')\])*)")   # L['self'], L['args'][0]
_INDEX = re.compile(r"\[(?:'([^']+)'|(\d+))\]")


def normalize_module_path(path: str, compiled_root: bool = False) -> str:
    """``L['self'].blocks[0].attn`` -> ``blocks.0.attn``; ``G['model'].blocks.0`` ->
    ``model.blocks.0``; an export / make_fx / symbolic_trace path is returned as it is.
    ``compiled_root``: the ``L[...]`` / ``G[...]`` root is the module ``torch.compile`` was
    given (dynamo names it after ``forward``'s first parameter, ``L['args'][0]`` under a
    ``*args`` wrapper such as Hugging Face's), so it is dropped."""
    m = _ROOT.match(path)
    if m:
        root = "" if compiled_root or (m.group(1) == "L" and m.group(2) == "self" and not m.group(3)) \
            else m.group(2) + m.group(3)
        path = root + path[m.end():]
    path = _INDEX.sub(lambda x: "." + (x.group(1) or x.group(2)), path)
    path = path.replace("._modules.", ".")
    return path.lstrip(".")


def _type_name(cls: Any) -> str:
    if isinstance(cls, type):
        return f"{cls.__module__}.{cls.__qualname__}"
    return str(cls)


def _is_torch_module(cls: Any) -> bool:
    return _type_name(cls).startswith("torch.nn.")


def _entries(node: fx.Node) -> List[Tuple[str, Any]]:
    """``node.meta["nn_module_stack"]`` as (raw path, class or class name), outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(str(v[0]), v[1]) if isinstance(v, tuple) else (str(v), None) for v in stack.values()]


def _owner(entries: List[Tuple[str, Any]]) -> Optional[Tuple[str, Any]]:
    """(raw path, class) of the innermost entry that is not torch's own ``nn`` module; where
    all are, the module that holds the outermost one, with class None; None without entries."""
    if not entries:
        return None
    for path, cls in reversed(entries):
        if cls is None or not _is_torch_module(cls):
            return path, cls
    outer = entries[0][0]
    return (outer.rsplit(".", 1)[0] if "." in outer else ""), None


def _user_entry(node: fx.Node) -> Optional[Tuple[str, Any]]:
    return _owner(_entries(node))


def module_path(node: fx.Node) -> Optional[str]:
    """The user's module path of ``node`` (see the module doc); ``""`` is the root module;
    None where the graph recorded no module stack."""
    entry = _user_entry(node)
    if entry is None:
        return None
    # dynamo records the module it was given (it traces its forward, not its __call__) with no
    # entry of its own; a module reached through a local or global has one (G['model'])
    root = _ROOT.match(entry[0])
    paths = {str(v[0] if isinstance(v, tuple) else v) for v in node.meta["nn_module_stack"].values()}
    return normalize_module_path(entry[0], compiled_root=root is not None and root.group(0) not in paths)


# ---------------------------------------------------------------------------
# make_fx with locations
# ---------------------------------------------------------------------------

class _Scoped:
    """A callable wrapper that ``make_fx(record_module_stack=True)`` recognises by its
    ``_orig_mod`` attribute (as for a compiled module): it then records
    ``nn_module_stack`` and the forward stack traces of ``_orig_mod``'s submodules."""

    def __init__(self, module: torch.nn.Module):
        self._orig_mod = module

    def __call__(self, *args: Any) -> Any:
        return self._orig_mod(*args)


def trace_module(module: torch.nn.Module, example_inputs: Sequence) -> fx.GraphModule:
    """``make_fx`` of ``module`` on ``example_inputs`` with stack traces and module paths
    recorded; where torch's module-stack tracer fails on the model, stack traces only."""
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        return make_fx(_Scoped(module), record_module_stack=True, record_stack_traces=True)(*example_inputs)
    except Exception:  # noqa: BLE001  (a torch-internal tracer: retrace without the module stack)
        return make_fx(module, record_stack_traces=True)(*example_inputs)


# ---------------------------------------------------------------------------
# symbolic_trace graphs: stack traces from the module hierarchy
# ---------------------------------------------------------------------------

_OPERATOR_SPELLING = {"matmul": "@"}


def _spelling(node: fx.Node, owner_path: str) -> Optional[str]:
    """The name a node's call is spelled with in its module's forward: a function or method
    name (``softmax``), ``@`` for ``operator.matmul``, ``self.<attr>`` for a submodule call."""
    if node.op == "call_module":
        target = str(node.target)
        rel = target[len(owner_path) + 1:] if owner_path and target.startswith(owner_path + ".") else \
            (target if not owner_path else None)
        return None if not rel else "self." + rel.split(".")[0]
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        name = getattr(node.target, "__name__", None)
        if getattr(node.target, "__module__", None) in ("_operator", "operator"):
            return _OPERATOR_SPELLING.get(name or "")
        return name
    return None


def _forward_calls(cls: type) -> Optional[Tuple[str, int, str, Dict[str, List[int]]]]:
    """(file, line of ``def forward``, that line, {spelling: [line of each call, in source
    order]}) for ``cls.forward``; None where its source is not available."""
    fwd = getattr(cls, "forward", None)
    try:
        lines, start = inspect.getsourcelines(fwd)
        path = inspect.getsourcefile(fwd)
    except (OSError, TypeError):
        return None
    if path is None:
        return None
    calls: Dict[str, List[int]] = {}
    try:
        toks = [t for t in tokenize.generate_tokens(io.StringIO("".join(lines)).readline)
                if t.type not in (tokenize.NL, tokenize.COMMENT)]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return None
    starts = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    for i, t in enumerate(toks):
        line = start + t.start[0] - 1
        prev = [x.string if x.type not in starts else "" for x in toks[max(0, i - 2):i]]
        prev = [""] * (2 - len(prev)) + prev
        nxt = toks[i + 1].string if i + 1 < len(toks) else ""
        if t.type == tokenize.OP and t.string == "@" and prev[1] != "":   # not a decorator
            calls.setdefault("@", []).append(line)
        elif t.type == tokenize.NAME and prev == ["self", "."] and nxt in ("(", "["):
            calls.setdefault("self." + t.string, []).append(line)       # self.sm(x), self.layers[0](x)
        elif t.type == tokenize.NAME and nxt == "(":
            calls.setdefault(t.string, []).append(line)                 # softmax(, F.softmax(, x.softmax(
    return path, start, lines[0].strip(), calls


def _root_class(gm: fx.GraphModule) -> Optional[type]:
    """The class ``symbolic_trace`` traced ``gm`` from (GraphModule keeps only its name): the
    one loaded ``nn.Module`` subclass of that name, or None when there is not exactly one."""
    name = type(gm).__name__
    found = set()
    for mod in list(sys.modules.values()):
        cls = getattr(mod, name, None) if mod is not None else None
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module) and not issubclass(cls, fx.GraphModule):
            found.add(cls)
    return found.pop() if len(found) == 1 else None


def _frame(path: str, line: int, code: str) -> str:
    return f'  File "{path}", line {line}, in forward\n    {code}\n'


def recover_stack_traces(gm: fx.GraphModule) -> int:
    """Give every call node of ``gm`` without a ``stack_trace`` one recovered from the module
    hierarchy (module doc); returns how many nodes got one. Nodes whose module class has no
    readable source keep none."""
    import linecache

    sources: Dict[Any, Any] = {}
    root_cls = None
    groups: Dict[Tuple[str, str], List[fx.Node]] = {}
    owners: Dict[fx.Node, Tuple[str, Any]] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or node.meta.get("stack_trace"):
            continue
        entries = _entries(node)
        if node.op == "call_module" and entries and entries[-1][0] == str(node.target):
            entries = entries[:-1]   # a leaf call: the owner is the module that calls it
        entry = _owner(entries)
        if entry is None or not isinstance(entry[1], type):
            if entry is not None and entry[0] != "":
                continue   # a module below the root whose class is unknown
            if root_cls is None:
                root_cls = _root_class(gm) or False
            if not root_cls:
                continue
            if entry is None:
                node.meta["nn_module_stack"] = {"": ("", root_cls)}   # the root module
            entry = ("", root_cls)
        owners[node] = entry
        spelling = _spelling(node, entry[0])
        if spelling:
            groups.setdefault((entry[0], spelling), []).append(node)
    index = {n: i for nodes in groups.values() for i, n in enumerate(nodes)}
    count = 0
    for node, (path, cls) in owners.items():
        if cls not in sources:
            sources[cls] = _forward_calls(cls)
        src = sources[cls]
        if src is None:
            continue
        file, def_line, def_code, calls = src
        line, code = def_line, def_code
        spelling = _spelling(node, path)
        if spelling:
            nodes = groups[(path, spelling)]
            occurrences = calls.get(spelling, [])
            if occurrences and len(nodes) % len(occurrences) == 0:
                line = occurrences[index[node] % len(occurrences)]
                code = linecache.getline(file, line).strip() or code
        node.meta["stack_trace"] = _frame(file, line, code)
        count += 1
    return count
