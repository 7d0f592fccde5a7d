"""Keeps Inductor's own attention fusion off the graphs the ``attnfuse`` backend compiles.

Owns :func:`config_patches`: the Inductor configuration the backend compiles with when
its inner compiler is Inductor (``compile_fx(..., config_patches=config_patches())``).

Why: Inductor rewrites attention-shaped aten subgraphs into SDPA with the ``_sfdp_*``
patterns of ``torch/_inductor/fx_passes/fuse_attention.py``, which run among its
joint-graph pattern passes. Those patterns ignore integer arguments such as the softmax
``dim``, so ``softmax(q @ k.mT, dim=-2) @ v`` (softmax over the query axis) becomes SDPA
over the keys: a wrong result (torch 2.13 and 2.14.1 alike). attnfuse has already fused
what it can prove; what it declined, and whatever attnfuse hands Inductor as aten code
(:func:`attnfuse.kernels.torch_inline.inline_attention`), must reach Inductor's kernels
as written.

How: two of Inductor's public custom joint-graph passes (``CustomGraphPass``), set for
the attnfuse compile only:

- :class:`HideSoftmax` (``joint_custom_pre_pass``) runs inside ``joint_graph_passes``
  before its pattern passes, on the very graph (and every subgraph) they see. It puts an
  opaque identity op, ``attnfuse::sfdp_barrier``, between each ``exp`` (and each softmax
  Inductor left undecomposed) and its users. Every ``_sfdp_*`` pattern contains the
  softmax's ``exp`` feeding a ``sum`` and a ``div``, so none of them can match across a
  barrier. No other joint-graph pattern contains ``exp`` (the scaled-softmax rewrite ends
  at the ``sub`` before it), so every other pass still matches what it matched before.
- :class:`RestoreSoftmax` (``joint_custom_post_pass``), the last step of
  ``joint_graph_passes``, removes the barriers: the partitioner, the post-grad passes and
  the lowering see the graph exactly as they would without this module.

If the restore did not run, each barrier would stay as a copy: slower, still exact.
The patches go through ``compile_fx``'s ``config_patches`` argument, which patches
Inductor's config thread-locally around the compile and around the lazily compiled
backward, so nothing leaks to other ``torch.compile`` calls in the process. Both passes
carry a ``uuid`` (the hash of this file), which Inductor puts into its FX-graph and
AOTAutograd cache keys: an artifact compiled without the barriers (plain
``backend="inductor"`` on the same graph, e.g. one attnfuse left unchanged) is never
reused for an attnfuse compile, nor the other way round. A pass the user configured
(``joint_custom_pre_pass`` / ``joint_custom_post_pass``) still runs: ours is appended to
it (the hide after the user's pre passes, the restore before the user's post passes).
On a torch without these hooks, the backend turns Inductor's pattern matcher off instead
(exact, broader).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import Tensor, fx

aten = torch.ops.aten


@torch.library.custom_op("attnfuse::sfdp_barrier", mutates_args=())
def sfdp_barrier(x: Tensor) -> Tensor:
    """Identity (a copy) that no Inductor pattern looks through."""
    return x.clone()


@sfdp_barrier.register_fake
def _sfdp_barrier_fake(x: Tensor) -> Tensor:
    return torch.empty_like(x)


_BARRIER = torch.ops.attnfuse.sfdp_barrier.default


def _hidden_targets() -> Tuple[Any, ...]:
    """The aten ops whose outputs are hidden: ``exp`` (every decomposed softmax has one)
    and the softmax ops themselves, in case Inductor keeps one undecomposed."""
    names = (("exp", "default"), ("_softmax", "default"), ("_safe_softmax", "default"),
             ("softmax", "int"))
    return tuple(getattr(getattr(aten, op), overload) for op, overload in names
                 if hasattr(aten, op) and hasattr(getattr(aten, op), overload))


_HIDDEN = _hidden_targets()
_UUID = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

try:  # torch's public custom-pass interface (present in 2.13 and 2.14)
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_custom_graph_passes
except ImportError:  # pragma: no cover  (older or newer torch: see config_patches)
    CustomGraphPass, get_custom_graph_passes = object, None


def hide_softmax(graph: fx.Graph) -> int:
    """Put a barrier between each hidden op of ``graph`` and its users; returns how many."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _HIDDEN or not node.users:
            continue
        with graph.inserting_after(node):
            barrier = graph.call_function(_BARRIER, (node,))
        node.replace_all_uses_with(barrier, delete_user_cb=lambda user: user is not barrier)
        val = node.meta.get("val")
        if isinstance(val, Tensor):
            barrier.meta["val"] = sfdp_barrier(val)  # a fresh fake tensor, not an alias of val
        for key in ("tensor_meta", "stack_trace", "nn_module_stack"):
            if key in node.meta:
                barrier.meta[key] = node.meta[key]
        count += 1
    return count


def restore_softmax(graph: fx.Graph) -> int:
    """Remove every barrier of ``graph`` (its users read its input again); returns how many."""
    count = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is _BARRIER:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            count += 1
    return count


class HideSoftmax(CustomGraphPass):  # type: ignore[misc,valid-type]
    """``joint_custom_pre_pass``: :func:`hide_softmax`."""

    def __call__(self, graph: fx.Graph) -> None:
        hide_softmax(graph)

    def uuid(self) -> str:
        return f"attnfuse.HideSoftmax:{_UUID}"


class RestoreSoftmax(CustomGraphPass):  # type: ignore[misc,valid-type]
    """``joint_custom_post_pass``: :func:`restore_softmax`."""

    def __call__(self, graph: fx.Graph) -> None:
        restore_softmax(graph)

    def uuid(self) -> str:
        return f"attnfuse.RestoreSoftmax:{_UUID}"


def _hooks_available() -> bool:
    from torch._inductor import config

    return get_custom_graph_passes is not None and all(
        hasattr(config, key) for key in ("joint_custom_pre_pass", "joint_custom_post_pass"))


def config_patches() -> Dict[str, Any]:
    """Inductor config patches under which Inductor's attention patterns cannot rewrite
    anything and every other Inductor pass runs as usual (see the module docstring)."""
    from torch._inductor import config

    if not _hooks_available():
        return {"pattern_matcher": False}
    ours = (HideSoftmax, RestoreSoftmax)
    pre = tuple(p for p in get_custom_graph_passes(config.joint_custom_pre_pass) if not isinstance(p, ours))
    post = tuple(p for p in get_custom_graph_passes(config.joint_custom_post_pass) if not isinstance(p, ours))
    return {"joint_custom_pre_pass": (*pre, HideSoftmax()),
            "joint_custom_post_pass": (RestoreSoftmax(), *post)}
