"""What a rewrite did: fusions and near misses, each with a source location.

Owns :class:`Fusion`, :class:`Report` and a plain-text rendering. (Issue 4 extends
the rendering; the fields here are the stable data.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from attnfuse.passes.types import NearMiss


@dataclass
class Fusion:
    location: Optional[str]
    scale: str                 # "1.0", "0.125", "0.125 * tensor(s) folded into q"
    causal: str                # "none" | "top_left" | "bottom_right"
    bias: str                  # "none" or a description of the terms
    gqa: str                   # "" or e.g. "expand+reshape Hq=8 Hkv=2"
    dropout_p: float
    softcap: float
    nodes_removed: List[str]
    node_inserted: str
    softmax: str = ""
    window: int = 0            # sliding window with causal; 0 = none
    key_mask: str = ""         # "" or the graph node(s) passed as key_mask (B, Lk), "~" = negated
    masks: List[str] = field(default_factory=list)   # per mask term: its structure, or why it stayed a tensor
    empty_row_fixup: bool = False  # rows that see no key get eager's finite-fill uniform average
    sinks: str = ""            # "" or the graph node passed as sinks (one logit per head, passes/sinks.py)
    alibi: str = ""            # "" or the graph's slope tensor passed as alibi_slopes (ALiBi as structure)

    @property
    def structure(self) -> str:
        """"causal=…, window=…, key_mask=…" (what the op gets as structure), or "none"."""
        parts = []
        if self.causal != "none":
            parts.append(f"causal={self.causal}")
        if self.window:
            parts.append(f"window={self.window}")
        if self.key_mask:
            parts.append(f"key_mask={self.key_mask}")
        if self.alibi:
            parts.append(f"alibi_slopes={self.alibi}")
        return ", ".join(parts) or "none"


@dataclass
class Report:
    fusions: List[Fusion] = field(default_factory=list)
    near_misses: List[NearMiss] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)

    def extend(self, other: "Report") -> None:
        self.fusions += other.fusions
        self.near_misses += other.near_misses
        self.errors += other.errors

    def to_text(self) -> str:
        lines = [f"attnfuse: {len(self.fusions)} fused, {len(self.near_misses)} near miss(es)"]
        for f in self.fusions:
            extra = [f"scale={f.scale}", f"causal={f.causal}", f"bias={f.bias}"]
            if f.gqa:
                extra.append(f"gqa={f.gqa}")
            if f.dropout_p:
                extra.append(f"dropout_p={f.dropout_p}")
            if f.softcap:
                extra.append(f"softcap={f.softcap}")
            if f.window:
                extra.append(f"window={f.window}")
            if f.key_mask:
                extra.append(f"key_mask={f.key_mask}")
            if f.sinks:
                extra.append(f"sinks={f.sinks}")
            if f.empty_row_fixup:
                extra.append("empty-row fix-up")
            lines.append(f"  FUSED {f.location or '<unknown>'}: {f.node_inserted} "
                         f"({', '.join(extra)}) replaces {len(f.nodes_removed)} nodes")
            for note in f.masks:
                lines.append(f"    mask {note}")
        for m in self.near_misses:
            lines.append(f"  NEAR MISS [{m.kind}] {m.location or '<unknown>'} at {m.node}: {m.reason}")
        for e in self.errors:
            lines.append(f"  ERROR {e}")
        return "\n".join(lines)
