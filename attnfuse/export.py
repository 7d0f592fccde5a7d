"""Export and AOTInductor: programs with the fused op lowered to ATen ops.

A ``torch.library.custom_op`` implemented in Python cannot run inside an AOTInductor
package without Python (``aoti_compile_and_package`` packages it, and loading fails:
"Custom operators created via torch.library.custom_op cannot be run via AOTI without
Python environment"). :func:`lower_to_aten` replaces every ``attnfuse::flash_attention``
call of an exported program by the op's semantics written as ATen ops
(:func:`attnfuse.kernels.torch_inline.inline_attention`, the code the backend already
hands Inductor for small CPU calls), through export's public ``run_decompositions``.
The lowered program has no attnfuse op left: it runs, saves and packages without
attnfuse, and Inductor compiles the attention into its own kernels (the (Lq, Lk) scores
exist there, as in the unfused graph; the op's Triton kernels are not in the package).
:func:`aoti_package` lowers and packages in one call.

Attention sinks lower as gpt-oss writes them (the sink column concatenated to the
scores, sliced off after the softmax). Refused before anything is compiled, with a ``ValueError`` naming the call: dropout
(its keep-mask comes from a seed drawn at run time, a Python-side generator).
"""
from __future__ import annotations

import os
from typing import Any, List, Optional

import torch

__all__ = ["lower_to_aten", "aoti_package", "fused_calls"]


def _fused_ops() -> tuple:
    return (torch.ops.attnfuse.flash_attention.default, torch.ops.attnfuse.flash_attention)


def fused_calls(ep: "torch.export.ExportedProgram") -> List[torch.fx.Node]:
    """The ``attnfuse::flash_attention`` calls of ``ep``'s graph (top level)."""
    targets = _fused_ops()
    return [n for n in ep.graph.nodes if n.op == "call_function" and n.target in targets]


def _check_lowerable(ep: "torch.export.ExportedProgram") -> None:
    schema = torch.ops.attnfuse.flash_attention.default._schema
    for node in fused_calls(ep):
        args = dict(zip((a.name for a in schema.arguments), node.args))
        args.update(node.kwargs)
        p = args.get("dropout_p", 0.0)
        if not isinstance(p, (int, float)) or p != 0:
            raise ValueError(
                f"attnfuse.export: the fused attention call {node.name} has dropout_p={p!r}; "
                "it cannot be lowered for export/AOTInductor (the dropout keep-mask comes from a "
                "seed drawn at run time). Export the model in eval mode (model.eval()) or with "
                "dropout 0.")


def _decomposition(q, k, v, bias=None, scale=1.0, causal="none", dropout_p=0.0, softcap=0.0,
                   seed=None, impl="auto", window=0, key_mask=None, sinks=None,
                   alibi_slopes=None, causal_offsets=None):
    from attnfuse.kernels import torch_inline

    # ALiBi slopes: the term is index arithmetic on the slopes (no (Lq, Lk) input)
    return torch_inline.inline_attention(q, k, v, bias, scale, causal, dropout_p, softcap, seed,
                                         impl, window, key_mask, sinks, alibi_slopes,
                                         causal_offsets)


def lower_to_aten(ep: "torch.export.ExportedProgram") -> "torch.export.ExportedProgram":
    """``ep`` with every fused attention call replaced by ATen ops of the same semantics
    (a new program; ``ep`` is not changed). Raises ``ValueError`` for a call with
    dropout. Only the fused op is decomposed; every other op stays as it was."""
    _check_lowerable(ep)
    if not fused_calls(ep):
        return ep
    table = {torch.ops.attnfuse.flash_attention.default: _decomposition}
    return ep.run_decompositions(table)


def aoti_package(ep: "torch.export.ExportedProgram", package_path: Optional[str] = None,
                 **inductor_configs: Any) -> str:
    """:func:`lower_to_aten`, then ``torch._inductor.aoti_compile_and_package``; returns
    the package's path. Load it anywhere with ``torch._inductor.aoti_load_package``
    (attnfuse need not be installed there)."""
    lowered = lower_to_aten(ep)
    if package_path is not None:
        package_path = os.fspath(package_path)
    return torch._inductor.aoti_compile_and_package(
        lowered, package_path=package_path, inductor_configs=inductor_configs or None)
