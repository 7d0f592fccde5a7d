"""Registering the op in every process that imports torch.

Owns :func:`register`, the target of attnfuse's entry point in torch's ``torch.backends``
group, which ``import torch`` loads at its end in every process (torch's extension
autoload, on unless ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``). Loading it imports
:mod:`attnfuse`, which registers ``attnfuse::flash_attention`` and its backward; so a
graph that calls them loads in a fresh process without ``import attnfuse``: a program
saved with ``torch.export.save`` (its deserializer looks the op up by name) and a
pickled or ``torch.save``'d GraphModule that ``attnfuse.rewrite`` returned (its code
names ``torch.ops.attnfuse.flash_attention``).

Nothing heavy happens here: importing attnfuse imports neither the kernels (so
``TRITON_INTERPRET`` can still be set after ``import torch``) nor sympy.
"""
from __future__ import annotations


def register() -> None:
    """Make sure the op is registered. When ``import attnfuse`` itself started the
    ``import torch`` that loads this, :mod:`attnfuse.op` is still being imported and
    registers the op once torch is in; importing it here is then a no-op.

    Never raises: torch turns an autoload error into a failed ``import torch`` for every
    program in the environment, so a broken attnfuse only warns here (and loading a saved
    graph then needs ``import attnfuse``, which shows the error itself)."""
    try:
        import attnfuse.op  # noqa: F401
    except Exception as e:  # noqa: BLE001
        import warnings

        warnings.warn(f"attnfuse: could not register attnfuse::flash_attention at import torch "
                      f"({type(e).__name__}: {e}); import attnfuse to see the error", RuntimeWarning)
