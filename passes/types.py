"""The values the matcher returns and the rewriter consumes.

Owns :class:`View4` (a tensor seen as (batch, head, seq, dim) through view ops only),
:class:`Term` (one bias/mask term), :class:`AttentionMatch` (a proven attention),
:class:`NearMiss` (why a softmax was not fused), and :func:`location_of` /
:func:`user_frame` (the user's frame of a node's stack trace).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import fx


@dataclass(frozen=True)
class View4:
    """``base`` viewed in op order: ``axes[i]`` is the base axis for op axis i, or None
    for a new unit axis; base axes not named are size 1 (squeezed). ``expand[i]`` is
    ``(node, axis)`` whose size op axis i is expanded to (a stride-0 view), or None.
    With ``groups`` other than (1, 1) the indices are slots, not op axes (see ``groups``)."""

    base: fx.Node
    axes: Tuple[Optional[int], ...]
    expand: Tuple[Optional[Tuple[fx.Node, int]], ...] = (None, None, None, None)
    gqa_from: Optional[str] = None   # how a repeat was undone ("expand+reshape", ...)
    # more than two batch axes (:mod:`.batchaxes`): ``axes``/``expand`` then have one slot per
    # score batch axis, and the first ``groups[0]`` slots merge (row-major) into the op's batch
    # axis, the next ``groups[1]`` into its head axis; (1, 1) is the plain 4-slot view
    groups: Tuple[int, int] = (1, 1)


@dataclass(frozen=True)
class NearMiss:
    """Why a softmax was not fused: ``kind`` (a code), ``reason`` (a sentence), ``location``
    ("file:line" of the softmax), ``node`` (the node the reason is about) and ``softmax``
    (the softmax node it is about; "" where unknown). Inside a higher-order op's body both
    names are qualified with the body's attribute path (``wrap_body_0.softmax``)."""
    kind: str
    reason: str
    location: Optional[str]
    node: str
    softmax: str = ""


@dataclass
class Term:
    """One bias/mask term as a 4-D op-order view.

    kind "float": ``coef * view`` is added; where ``cast`` is set (an integer or bool
    term), the view is first converted to that dtype, the scores' dtype at the addition
    (eager's type promotion). kind "keep": a bool view, True = keep (negated first when
    ``invert``). kind "fill": positions where the (possibly negated) bool view is True
    get ``coef`` added (an absorbing finite fill).
    """

    kind: str
    view: View4
    coef: float = 1.0
    invert: bool = False
    pre: Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]] = None  # expand to [0], reshape to [1] first
    cast: Optional[torch.dtype] = None
    # float: zeros padded before these base axes first, (axis, count) (an add into a slice, sliceadd.py)
    pad: Optional[Tuple[Tuple[int, int], ...]] = None


@dataclass
class AttentionMatch:
    softmax: fx.Node
    qk: fx.Node
    pv: fx.Node
    q: View4
    k: View4
    v: View4
    scale: float
    q_factors: List[Tuple[View4, str]]
    terms: List[Term]
    causal: str
    softcap: float
    dropout_p: float
    removed: List[fx.Node]
    out_squeeze: Tuple[int, ...]     # op output axes (unit, added for q) to squeeze, descending
    out_perm: Tuple[int, ...]        # then permute with these dims to the P·V output layout
    out_dtype: Any
    gqa: str = ""
    location: Optional[str] = None
    info: Dict[str, Any] = field(default_factory=dict)
    window: int = 0                  # sliding window (with causal); 0 = none
    key_masks: List[Tuple[View4, bool]] = field(default_factory=list)  # (B, 1, 1, Lk) bool views, negate
    fixup: bool = False              # rows that see no key get eager's finite-fill uniform average
    fixup_scores_grad: bool = False  # ... and eager's softmax gradient to q, k (an added fill; a
                                     # masked_fill / where fill replaces the scores: none)
    mask_notes: List[str] = field(default_factory=list)  # per mask term: the structure, or why a tensor
    row_zero: List[Tuple[View4, bool]] = field(default_factory=list)  # (B, H, Lq, 1) bool views: output rows
                                     # where the view equals the flag are 0 (a row fill of P, rowfill.py)
    sinks: Optional[View4] = None    # (1, H|1, 1, 1) float view: one sink logit per head (sinks.py)
    alibi: Any = None                # a proven ALiBi term (passes/alibi.py AlibiTerm): the op's alibi_slopes


Result = Union[AttentionMatch, NearMiss]


class Miss(Exception):
    """Raised inside the matcher; becomes a :class:`NearMiss`."""

    def __init__(self, kind: str, reason: str, node: Optional[fx.Node] = None):
        super().__init__(reason)
        self.kind, self.reason, self.node = kind, reason, node


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def user_frame(stack_trace: Optional[str]) -> Optional[Tuple[str, int, Optional[str]]]:
    """(file, line, source text or None) of the frame a stack trace names in the user's code:
    the last frame outside torch's own installation (a softmax inside ``nn.Softmax.forward``
    is reported where the user calls the module), else the last frame; None without one."""
    if not stack_trace:
        return None
    lines = stack_trace.rstrip().splitlines()
    frames = []
    for i, text in enumerate(lines):
        m = _FRAME.search(text)
        if m:
            code = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME.search(lines[i + 1]) else None
            frames.append((m.group(1), int(m.group(2)), code or None))
    if not frames:
        return None
    users = [f for f in frames if not os.path.abspath(f[0]).startswith(_TORCH_DIR)]
    return (users or frames)[-1]


def location_of(node: fx.Node) -> Optional[str]:
    """"file:line" of ``node.meta["stack_trace"]``'s frame in the user's code
    (:func:`user_frame`), or None."""
    st = node.meta.get("stack_trace") if isinstance(node, fx.Node) else None
    frame = user_frame(st)
    return None if frame is None else f"{frame[0]}:{frame[1]}"
