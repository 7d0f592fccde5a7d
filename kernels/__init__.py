"""attnfuse.kernels: implementations of the fused attention op.

Owns the Triton forward/backward kernels with their launch and tuning code
(``triton_flash``), and the CPU implementation built from PyTorch ops
(``torch_impl``). Knows nothing about FX graphs or the matcher.
"""
