"""The CPU lowering of fused-op calls for the Inductor inner compiler (the backend's
``cpu_inline`` option).

After the rewrite, each ``attnfuse::flash_attention`` call on CPU may be replaced by a form
Inductor compiles better than the custom op (:mod:`attnfuse.kernels.torch_inline`):
- a plain call without a causal band (BERT's, ViT's) that one call of PyTorch's fused
  kernel computes becomes that kernel's aten call (``fused_attention``) at every size,
  whichever CPU path the op itself would take (in bf16 on a CPU with native bf16 GEMMs, the
  dispatcher's bf16 GEMM path, ``torch_lowp``, up to 1,536 keys): what Inductor alone emits for
  such attention, so the compile and the run are Inductor's (issue 19: inlining the bf16
  ones ran faster on a CPU with native bf16 GEMMs but made a cold compile build 2-3 more C++
  kernels, ``benchmarks/results/compile_overhead_policy.txt``);
- a call small enough for Inductor's own kernels to win (``inline_applicable``) becomes the
  op's semantics as aten ops (``inline_attention``), which Inductor differentiates and fuses;
  with ``inline_plain`` (``cpu_inline="all"``) the plain calls above are inlined too;
- a larger plain call (causal included) becomes ``fused_attention`` as well.
Everything else keeps the op. The decision reads the calls' example values only.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import fx


def _example(arg: Any, compute: bool = False) -> Any:
    """The example value of a graph argument (a FakeTensor for a tensor node), or the
    argument itself when it is a constant. Nodes the rewrite emitted carry none: with
    ``compute``, theirs is computed from their inputs' under the inputs' fake mode (None
    where that fails)."""
    if not isinstance(arg, fx.Node):
        return arg
    if "example_value" in arg.meta or "val" in arg.meta:
        return arg.meta.get("example_value", arg.meta.get("val"))
    if not compute or arg.op not in ("call_function", "call_method"):
        return None
    args, kwargs = fx.node.map_arg((arg.args, arg.kwargs), lambda n: _example(n, True))
    inputs = [_example(n, True) for n in arg.all_input_nodes]  # set by map_arg above
    modes = [getattr(v, "fake_mode", None) for v in inputs if isinstance(v, torch.Tensor)]
    if None in inputs or not modes or None in modes:
        return None
    fake_mode = modes[0]  # the inputs' own mode (not the tracing context's: they may differ)
    try:
        with fake_mode:
            if arg.op == "call_method":
                value = getattr(args[0], arg.target)(*args[1:], **kwargs)
            else:
                value = arg.target(*args, **kwargs)
    except Exception:  # noqa: BLE001  (unknown shape: the call is simply not inlined)
        return None
    arg.meta["example_value"] = value
    return value


def lower_cpu_calls(gm: fx.GraphModule, inline_plain: bool = False) -> int:
    """Replace the fused-op calls on CPU that Inductor compiles best as aten ops, in ``gm``
    and in the higher-order-op bodies under it; returns how many were replaced: a plain
    call Inductor alone runs as one fused-kernel call by that call
    (:func:`~attnfuse.kernels.torch_inline.fused_attention`, unless ``inline_plain``), any
    other call small enough for Inductor's own kernels to win
    (:func:`attnfuse.kernels.torch_inline.inline_applicable`) by
    :func:`~attnfuse.kernels.torch_inline.inline_attention`, which Inductor traces and
    fuses, and a larger one-fused-kernel call by ``fused_attention``."""
    from attnfuse.passes.subgraphs import graph_modules

    return sum(_lower_cpu_calls_in(mod, inline_plain) for _, mod in graph_modules(gm))


def _lower_cpu_calls_in(gm: fx.GraphModule, inline_plain: bool = False) -> int:
    """:func:`lower_cpu_calls` for ``gm``'s own graph."""
    from attnfuse.kernels import torch_inline
    from attnfuse.op import flash_attention_op

    sig = inspect.signature(flash_attention_op._init_fn)
    ops = (torch.ops.attnfuse.flash_attention, torch.ops.attnfuse.flash_attention.default)
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ops:
            continue
        bound = sig.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        a = {name: _example(val, compute=True) for name, val in bound.arguments.items()}
        q, k = a["q"], a["k"]
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
            continue  # no recorded example value: the shapes are unknown here
        if any(isinstance(bound.arguments.get(n), fx.Node) and a.get(n) is None
               for n in ("bias", "key_mask", "sinks", "alibi_slopes", "causal_offsets")):
            continue
        training = torch.is_grad_enabled() and any(
            isinstance(a.get(n), torch.Tensor) and a[n].requires_grad
            for n in ("q", "k", "v", "bias", "sinks"))
        if a["impl"] == "triton":
            continue
        plain = _is_plain_call(a)
        if not inline_plain and a["causal"] == "none" and plain and _fused_kernel_computes(a):
            # what Inductor alone emits for this attention, whichever CPU path the op would
            # take (the fused kernel's or, in bf16, its GEMM path): inlining it would add C++
            # kernels to the cold compile (see the module docstring). Not asked of the
            # dispatcher's plan, whose bf16 key bound would be a needless guard here.
            node.target = torch_inline.fused_attention
        elif torch_inline.inline_applicable(
                tuple(q.shape), tuple(k.shape), q.dtype, q.device, dropout_p=a["dropout_p"],
                scale=a["scale"], softcap=a["softcap"], window=a["window"], causal=a["causal"],
                training=training):
            node.target = torch_inline.inline_attention
        elif plain and _dispatcher_path(a) == "fused":
            node.target = torch_inline.fused_attention
        else:
            continue
        count += 1
    if count:
        gm.recompile()
    return count


def _is_plain_call(a: dict) -> bool:
    """Whether a call (its arguments' example values) is plain: on CPU, with no bias,
    key_mask, dropout, softcap, window, sinks, ALiBi, causal offsets or GQA, D == Dv and
    every scalar a constant, so that :func:`attnfuse.kernels.torch_inline.fused_attention`
    can stand for it wherever PyTorch's fused kernel computes it."""
    from attnfuse.kernels import torch_inline

    q, k, v = a["q"], a["k"], a["v"]
    if not (torch_inline.USE_INLINE and torch_inline.USE_FUSED_LOWERING) or not isinstance(v, torch.Tensor):
        return False
    if a["bias"] is not None or a["key_mask"] is not None or q.device.type != "cpu":
        return False
    if any(a.get(n) is not None for n in ("sinks", "alibi_slopes", "causal_offsets")):
        return False
    if not all(type(a[n]) in (int, float) for n in ("dropout_p", "scale", "softcap", "window")):
        return False  # a run-time value (a graph node or a SymFloat)
    if a["dropout_p"] or a["softcap"] or a["window"] or a["causal"] not in ("none", "top_left", "bottom_right"):
        return False
    return q.shape[1] == k.shape[1] and q.shape[-1] == v.shape[-1]  # no query groups, D == Dv


def _fused_kernel_computes(a: dict) -> bool:
    """Whether one call of PyTorch's fused kernel computes this plain call exactly (the
    fused path's own test, without the dispatcher's preference between paths)."""
    from attnfuse.kernels import torch_impl

    return torch_impl.uses_fused_sdpa(a["q"], a["k"], a["v"], None, causal=a["causal"],
                                      dropout_p=0.0, softcap=0.0)


def _dispatcher_path(a: dict) -> str:
    """The CPU dispatcher's path for a plain call: "fused" where the op itself would run
    one plain fused-kernel call. Under dynamic shapes its size tests (the bf16 GEMM path's
    key bound) become guards."""
    from attnfuse.kernels import torch_impl

    return torch_impl.forward_plan(a["q"], a["k"], a["v"], None, causal=a["causal"],
                                   dropout_p=0.0, softcap=0.0).path
