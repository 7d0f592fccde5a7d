"""attnfuse.passes: finding hand-written attention in FX graphs and rewriting it.

Knows nothing about Triton: the only thing it knows of the kernels is the op it
emits, ``torch.ops.attnfuse.flash_attention``, and its schema.
"""
