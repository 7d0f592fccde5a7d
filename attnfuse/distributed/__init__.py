"""attnfuse on more than one process.

- :mod:`attnfuse.distributed.sharding`: DTensor sharding rules for the fused op and its
  backward (registered when this package is imported, and lazily when the op or the
  backend first meets ``torch.distributed.tensor``).
- :func:`context_parallel_attention` (:mod:`attnfuse.distributed.context`): exact attention
  over a sequence sharded across a process group (causal with load balancing), by a ring
  that passes K/V around the ranks (:mod:`attnfuse.distributed.ring`) or by all-gathering
  them; the layout (:mod:`attnfuse.distributed.layout`) with the helpers
  :func:`shard_sequence` / :func:`unshard_sequence`.
"""
from attnfuse.distributed import sharding
from attnfuse.distributed.context import context_parallel_attention, shard_sequence, unshard_sequence

sharding.register()

__all__ = ["sharding", "context_parallel_attention", "shard_sequence", "unshard_sequence"]
