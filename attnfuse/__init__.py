"""attnfuse: finds hand-written attention in PyTorch FX graphs and fuses it.

Public surface:

- :func:`flash_attention` — the fused op (``torch.ops.attnfuse.flash_attention``).
- :func:`rewrite` — the standalone graph rewrite (see :mod:`attnfuse.rewrite`).
- ``torch.compile(model, backend="attnfuse")`` — the dynamo backend
  (:mod:`attnfuse.backend`, registered through the ``torch_dynamo_backends`` entry point).
- :func:`last_report` — the report of the last graph the backend compiled
  (renderers in :mod:`attnfuse.reporting`).
"""
from attnfuse import _layout

_layout.mount_subpackages(__name__, __path__[0])  # attnfuse.kernels / .passes in an editable install

from attnfuse.op import flash_attention  # noqa: E402
from attnfuse.rewrite import RewriteResult, rewrite  # noqa: E402
from attnfuse.backend import last_report  # noqa: E402

__version__ = "0.1.0"

__all__ = ["flash_attention", "rewrite", "RewriteResult", "last_report", "__version__"]
