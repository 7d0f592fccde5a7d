"""The custom op's own cost around PyTorch's fused CPU kernel (issue 20 part 2).

    python benchmarks/op_boundary.py

Times ``torch.ops.attnfuse.flash_attention`` against the bare
``aten._scaled_dot_product_flash_attention_for_cpu`` call it makes on its fused path, for
(1, 4, L, 64) fp32 q/k/v in the (B, L, H, D) memory layout models give, one torch thread,
as this process's CPU time (``time.process_time``: less sensitive to other jobs than wall
time); min and median of 7 rounds. Recorded in ``results/e2e_parity.md``.
"""
import time

import torch

import attnfuse  # noqa: F401  (registers the op)
torch.set_num_threads(1)
aten = torch.ops.aten
def bench(f, n):
    for _ in range(20): f()
    ts=[]
    for _ in range(7):
        t0=time.process_time()
        for _ in range(n): f()
        ts.append((time.process_time()-t0)/n*1e6)
    return min(ts), sorted(ts)[3]
for L in (16, 512):
    q = torch.randn(1, L, 4, 64).transpose(1,2); k = torch.randn_like(q); v = torch.randn_like(q)
    n = 1000 if L < 100 else 20
    a = bench(lambda: aten._scaled_dot_product_flash_attention_for_cpu(q,k,v,0.0,False,scale=0.125), n)
    b = bench(lambda: torch.ops.attnfuse.flash_attention(q,k,v,None,0.125,"none",0.0,0.0,None,"auto",0,None), n)
    print(f"(1, 4, {L}, 64) BLHD-strided q/k/v, fp32, 1 thread, CPU us per call min/median of 7x{n}: aten {a[0]:.1f}/{a[1]:.1f}  attnfuse op {b[0]:.1f}/{b[1]:.1f}  op - aten {b[0]-a[0]:.1f}/{b[1]-a[1]:.1f}")
