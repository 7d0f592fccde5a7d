"""Run-time witnesses for fusions proven from a module buffer's values.

A causal mask kept in a module buffer (nanoGPT's ``register_buffer("bias", torch.tril(...))``)
is proven causal from its values when the graph is compiled. The buffer can change
afterwards without a recompile (``m.bias.fill_(1)``, ``m.bias = torch.ones(...)``,
``load_state_dict``): dynamo passes it to the compiled graph as an input and guards
neither its identity nor its values. This module owns the check that keeps such a fusion
exact:

- :class:`BufferWitness`: one buffer the proof read (the graph input's position and name)
  and a copy of the values the proof saw.
- :class:`WitnessedGraph`: the compiled callable the backend returns. Each call checks
  every witnessed input: the very tensor last verified, at the same version counter, costs
  two comparisons; any other tensor or version is compared with the copy (``torch.equal``)
  and, when equal, remembered as verified. Inference tensors have no version counter: their
  values are compared at every call. While every witness holds, the fused graph runs;
  otherwise the fallback graph, which the backend builds by rewriting the graph without
  reading any buffer value (so the mask reaches the op as a bias, or stays unfused), and
  compiles once, on the first call that needs it. No recompile storm: at most one extra
  compile per graph, whatever the buffer does afterwards.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch


@dataclass
class BufferWitness:
    """A module buffer a fusion's proof read: graph input ``index`` (named ``name``) must still
    hold ``values`` for the fused graph to be exact."""

    index: int
    name: str
    values: torch.Tensor
    _verified: Optional[weakref.ref] = field(default=None, repr=False)
    _version: int = field(default=-1, repr=False)

    def holds(self, x: Any) -> bool:
        """True when ``x`` (the input this call got) has the values the proof saw."""
        if not isinstance(x, torch.Tensor):
            return False
        inference = x.is_inference()
        if not inference and self._verified is not None and self._verified() is x \
                and x._version == self._version:
            return True  # the tensor verified last, not written since
        v = self.values
        same = x.shape == v.shape and x.dtype == v.dtype and torch.equal(x.detach().to(v.device), v)
        if same and not inference:
            self._verified, self._version = weakref.ref(x), x._version
        return same


def snapshot(x: torch.Tensor, kept: List[torch.Tensor]) -> torch.Tensor:
    """A copy of ``x``'s values that later writes to ``x`` cannot reach; equal buffers (every
    layer's ``tril``) share one copy (``kept``: the copies made so far)."""
    for v in kept:
        if v.shape == x.shape and v.dtype == x.dtype and v.device == x.device and torch.equal(v, x):
            return v
    v = x.detach().clone()
    kept.append(v)
    return v


class WitnessedGraph:
    """The fused graph's compiled callable, guarded by ``witnesses``; ``fallback()`` compiles
    the graph that reads no buffer value (called at most once, on the first call whose inputs
    break a witness)."""

    def __init__(self, fused: Callable, witnesses: List[BufferWitness], fallback: Callable[[], Callable],
                 graph_name: str):
        self.fused = fused
        self.witnesses = witnesses
        self._make_fallback = fallback
        self._fallback: Optional[Callable] = None
        self._lock = threading.Lock()
        self.graph_name = graph_name
        self.fallback_calls = 0

    def __call__(self, *args: Any) -> Any:
        if all(w.holds(args[w.index]) for w in self.witnesses):
            return self.fused(*args)
        return self._fallback_fn(args)(*args)

    def _fallback_fn(self, args) -> Callable:
        with self._lock:
            if self._fallback is None:
                broken = [w.name for w in self.witnesses if not w.holds(args[w.index])]
                warnings.warn(
                    f"attnfuse: buffer(s) {', '.join(broken)} no longer hold the values {self.graph_name} was "
                    "fused for (changed after compiling); it runs its fallback, which treats them as "
                    "ordinary tensors (compiled once, now)", RuntimeWarning, stacklevel=3)
                self._fallback = self._make_fallback()
            self.fallback_calls += 1
            return self._fallback
