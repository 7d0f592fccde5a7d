"""DTensor sharding rules for ``attnfuse::flash_attention`` and its backward.

Registered through PyTorch's public DTensor extension point,
``torch.distributed.tensor.experimental.register_sharding`` (same code in torch 2.13 and
2.14), so the fused op runs on DTensors (tensor parallelism that keeps DTensors through
attention, ``parallelize_module`` with ``use_local_output=False``) and AOTAutograd traces
the backward through DTensor too. One mesh dimension's rules (DTensor expands them to
every mesh dimension), as (outputs, inputs) placements:

- **replicate**: everything ``Replicate()``.
- **batch**: q, k, v, out, lse ``Shard(0)``; a bias or key_mask with a batch axis of
  size B ``Shard`` on it, else ``Replicate()``; the backward's dbias ``Partial()`` where
  the bias is broadcast over the batch (each rank sums its own batch items).
- **heads**: q, k, v, out, lse ``Shard(1)`` when every rank's query heads read only its
  own key/value heads: Hq == Hkv, or Hkv divisible by the mesh size (GQA groups stay
  whole); a bias with a head axis of size Hq ``Shard`` on it; key_mask ``Replicate()``;
  ALiBi slopes (Hq,) ``Shard(0)``, (B, Hq) ``Shard(1)`` (and ``Shard(0)`` with the batch).
- **query heads only** (MQA, Hkv == 1): q, out, lse ``Shard(1)``, k and v
  ``Replicate()``; the backward's dk, dv ``Partial()``.
- **sinks** ((Hq,), one logit per query head) follow the heads: ``Shard(0)`` where q is
  sharded over heads, else ``Replicate()``; the backward's dsinks ``Partial()`` under
  batch sharding (each rank sums the rows of its own batch items).

Refused with an error naming the way out (rather than silently gathering; DTensor
re-raises the rule's ``ValueError`` as a ``RuntimeError`` with the same message):
q, k or v sharded along the sequence or feature axis (exact attention over a sharded
sequence is context parallelism: :func:`attnfuse.distributed.context_parallel_attention`),
and dropout on sharded inputs (the keep-mask is a function of the *local* batch and head
index, so shards would repeat one another's masks).

DTensor caches a sharding decision per op under a key that, for an op registered this
way, ignores the non-tensor arguments before the first ``int`` one (``scale``, ``causal``,
``dropout_p``, ``need_dbias``...); :func:`register` widens the key to all of them (the
rules read ``dropout_p`` and ``need_dbias``).
"""
from __future__ import annotations

import threading
from typing import Any, List, Optional, Sequence, Tuple

import torch

__all__ = ["register"]

_lock = threading.Lock()
_registered = False


def _placements():
    from torch.distributed.tensor import Partial, Replicate, Shard

    return Replicate, Shard, Partial


def _shape(spec: Any) -> Tuple[int, ...]:
    return tuple(spec.tensor_meta.shape)


def _check_sharded_axes(specs: Sequence[Tuple[str, Any]]) -> None:
    for name, spec in specs:
        for p in spec.placements:
            if p.is_shard() and p.dim % 4 in (2, 3):
                axis = "sequence" if p.dim % 4 == 2 else "feature"
                raise ValueError(
                    f"attnfuse.flash_attention: {name} is a DTensor sharded along its {axis} axis "
                    f"(placements {tuple(spec.placements)}); the fused op can split attention over "
                    "batch or heads only. For a sequence sharded over ranks use "
                    "attnfuse.distributed.context_parallel_attention (context parallelism), or "
                    "redistribute to Replicate()/Shard(0)/Shard(1) first.")


def _axis_placement(t: Any, axis_from_right: int, size: int, Replicate, Shard):
    """``Shard`` on the axis of ``t`` (a spec or None) that lines up with the attention
    axis ``axis_from_right`` places before the last (4 = batch, 3 = heads) when it is
    full-size there; ``Replicate()`` when it broadcasts; None when ``t`` is None."""
    if t is None:
        return None
    shape = _shape(t)
    d = len(shape) - axis_from_right
    if d >= 0 and shape[d] == size and size != 1:
        return Shard(d)
    return Replicate()


def _heads_split_whole(hq: int, hkv: int, mesh) -> bool:
    """Whether sharding q over Hq and k/v over Hkv keeps each query head with its kv head."""
    return hq == hkv or (hkv % mesh.size() == 0)


def _rules(q, k, v, bias, seed, key_mask, dropout_p, *, backward_of: Optional[dict] = None,
           sinks=None, alibi_slopes=None, causal_offsets=None) -> List[Tuple[list, list]]:
    """(outputs, inputs) placement lists for one mesh dimension.

    ``backward_of`` is None for the forward; for the backward it holds ``need_dbias``
    (and the inputs list gets dout first and out, lse after bias, as in its schema)."""
    Replicate, Shard, Partial = _placements()
    _check_sharded_axes([("q", q), ("k", k), ("v", v)])
    sharded = any(p.is_shard() for s in (q, k, v) for p in s.placements)
    if dropout_p and sharded:
        raise ValueError(
            "attnfuse.flash_attention: dropout on sharded DTensors is not supported (each shard "
            "would draw the same keep-mask, the mask being a function of the local batch and head "
            "index); replicate q, k and v, or use dropout_p=0.")
    B, Hq, _, _ = _shape(q)
    Hkv = _shape(k)[1]
    mesh = q.mesh
    R = Replicate()
    seed_p = None if seed is None else R

    def rule(qp, kvp, outp, bias_p, mask_p, dkv_p=None, alibi_p=None):
        # the sinks follow q's head axis (their only axis): Shard(0) under head sharding
        heads_sharded = qp.is_shard() and qp.dim == 1
        sinks_p = None if sinks is None else (Shard(0) if heads_sharded else R)
        # causal offsets (B,) follow q's batch axis (their only axis)
        offsets_p = None if causal_offsets is None else (
            Shard(0) if (qp.is_shard() and qp.dim == 0) else R)
        if backward_of is None:
            return [outp, outp], [qp, kvp, kvp, bias_p, seed_p, mask_p, sinks_p, alibi_p, offsets_p]
        need_dbias = backward_of["need_dbias"]
        if bias_p is None or not need_dbias:
            dbias_p = R  # an empty (0,) tensor
        else:
            dbias_p = bias_p if (bias_p.is_shard() or qp == R) else Partial()
        if sinks is None:
            dsinks_p = R  # an empty (0,) tensor
        else:  # batch sharding: each rank's dsinks sums its own batch items only
            dsinks_p = sinks_p if (heads_sharded or qp == R) else Partial()
        dkv = kvp if dkv_p is None else dkv_p
        return ([qp, dkv, dkv, dbias_p, dsinks_p],
                [outp, qp, kvp, kvp, bias_p, outp, outp, seed_p, mask_p, sinks_p, alibi_p, offsets_p])

    # ALiBi slopes (Hq,) or (B, Hq): sharded with the heads (and a (B, Hq) one with the batch)
    alibi_r = None if alibi_slopes is None else R
    alibi_b = alibi_h = alibi_r
    if alibi_slopes is not None:
        two_d = len(_shape(alibi_slopes)) == 2
        alibi_b = Shard(0) if two_d else R
        alibi_h = Shard(1) if two_d else Shard(0)
    rules = [rule(R, R, R, None if bias is None else R, None if key_mask is None else R,
                  alibi_p=alibi_r)]
    if B > 1:
        S0 = Shard(0)
        rules.append(rule(S0, S0, S0, _axis_placement(bias, 4, B, Replicate, Shard),
                          _axis_placement(key_mask, 2, B, Replicate, Shard), alibi_p=alibi_b))
    mask_r = None if key_mask is None else R
    bias_heads = _axis_placement(bias, 3, Hq, Replicate, Shard)
    if Hq > 1 and _heads_split_whole(Hq, Hkv, mesh):
        S1 = Shard(1)
        rules.append(rule(S1, S1, S1, bias_heads, mask_r, alibi_p=alibi_h))
    if Hq > 1 and Hkv == 1:
        S1 = Shard(1)
        rules.append(rule(S1, R, S1, bias_heads, mask_r, dkv_p=Partial(), alibi_p=alibi_h))
    return rules


def _forward_rules(q, k, v, bias=None, scale=1.0, causal="none", dropout_p=0.0, softcap=0.0,
                   seed=None, impl="auto", window=0, key_mask=None, sinks=None,
                   alibi_slopes=None, causal_offsets=None):
    return _rules(q, k, v, bias, seed, key_mask, dropout_p, sinks=sinks,
                  alibi_slopes=alibi_slopes, causal_offsets=causal_offsets)


def _backward_rules(dout, q, k, v, bias, out, lse, scale, causal, dropout_p, softcap, seed, impl,
                    need_dbias, window=0, key_mask=None, sinks=None, alibi_slopes=None,
                    causal_offsets=None):
    return _rules(q, k, v, bias, seed, key_mask, dropout_p,
                  backward_of={"need_dbias": bool(need_dbias)}, sinks=sinks,
                  alibi_slopes=alibi_slopes, causal_offsets=causal_offsets)


def _widen_cache_key(op) -> None:
    """Make DTensor's sharding cache key read every argument from ``scale`` on (see the
    module docstring). A private table, guarded: without it the rules still register."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo

    prop = getattr(getattr(DTensor, "_op_dispatcher", None), "sharding_propagator", None)
    table = getattr(prop, "op_to_schema_info", None)
    if isinstance(table, dict) and op in table:
        table[op] = RuntimeSchemaInfo(static_argnum=4, needs_pytree=True)


def register() -> bool:
    """Register the rules with DTensor (idempotent, thread-safe). Returns False where this
    torch has no DTensor extension point (then DTensors raise DTensor's own error)."""
    global _registered
    if _registered:
        return True
    with _lock:
        if _registered:
            return True
        try:
            from torch.distributed.tensor.experimental import register_sharding
        except ImportError:
            return False
        fwd = torch.ops.attnfuse.flash_attention.default
        bwd = torch.ops.attnfuse.flash_attention_backward.default
        register_sharding(fwd)(_forward_rules)
        register_sharding(bwd)(_backward_rules)
        for op in (fwd, bwd):
            _widen_cache_key(op)
        _registered = True
    return True
