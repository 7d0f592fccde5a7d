"""attnfuse on more than one process.

- :mod:`attnfuse.distributed.sharding`: DTensor sharding rules for the fused op and its
  backward (registered when this package is imported, and lazily when the op or the
  backend first meets ``torch.distributed.tensor``).
"""
from attnfuse.distributed import sharding

sharding.register()

__all__ = ["sharding"]
