"""The ``torch.compile`` backend named ``"attnfuse"``.

Found by name through the ``torch_dynamo_backends`` entry point. For now it runs
the graph dynamo hands it unchanged (the rewrite is wired in by a later change).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch


def attnfuse_backend(gm: torch.fx.GraphModule, example_inputs: list, options: Optional[dict] = None,
                     **kwargs: Any) -> Callable:
    """Return a callable running ``gm`` unchanged."""
    import attnfuse  # noqa: F401  (registers torch.ops.attnfuse.*)

    return gm.forward
