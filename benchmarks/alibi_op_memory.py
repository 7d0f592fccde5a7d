"""Peak memory of the fused op alone, plain causal against causal + ALiBi slopes (issue 22), on CPU.

    .venv/bin/python benchmarks/alibi_op_memory.py [--lengths 2048,4096,8192] \
        [--out benchmarks/results/alibi_op_memory.txt]

``attnfuse.flash_attention(q, k, v, causal=True, impl="torch")`` with and without
``alibi_slopes`` (B=1, H=8, D=64, float32, no_grad). Each (variant, length) runs in its own
process: the figure is the process's peak resident set (``ru_maxrss``) minus its resident set
just before the call (q, k, v and the slopes allocated). ALiBi as structure must add no
(L, L) term: the two columns should differ by a constant, not by 4·H·L² bytes (the
materialised bias would be 128 MiB per head group at 8192 tokens in float32).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _child(variant: str, length: int) -> float:
    import torch

    import attnfuse

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, length, 64) for _ in range(3))
    slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(8)])
    kw = {"alibi_slopes": slopes} if variant == "alibi" else {}
    base = _rss_kib()
    with torch.no_grad():
        attnfuse.flash_attention(q, k, v, causal=True, impl="torch", **kw)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(f"{_child(args.child[0], int(args.child[1])):.1f}")
        return 0
    lines = ["# benchmarks/alibi_op_memory.py: the op alone, causal, B=1 H=8 D=64 fp32, no_grad, "
             "impl='torch'; one process per line; peak RSS over the RSS before the call (MiB)"]
    for n in (int(x) for x in args.lengths.split(",")):
        for variant in ("plain", "alibi"):
            res = subprocess.run([sys.executable, __file__, "--child", variant, str(n)],
                                 capture_output=True, text=True, check=True)
            lines.append(f"{variant} {n} peak MiB over base {res.stdout.strip().splitlines()[-1]}")
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
