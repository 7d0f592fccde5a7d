"""CPU benchmark: can causal attention at long lengths beat PyTorch's fused flash kernel
(the op's runtime path for causal fp32/bf16 on CPU) by handing it less masked work?

PyTorch's CPU kernel walks query blocks of 256 rows against key blocks of 512, so on the
diagonal it computes (and masks) up to a key block past the causal edge. Here the same
causal attention also runs split into query blocks of ``--blocks`` rows: each block
calls the kernel twice, non-causal over the keys left of its diagonal square and causal
(top-left) over the square itself, and the two partial results are merged by their
log-sum-exps: exactly the causal triangle, no key block past the edge. One process,
round-robin, B=1, H=4, D=64 (the e2e models' heads), forward only; ratios are
split / fused on medians (minima in brackets): above 1, the single fused call is faster.
The max |difference| from the fused call is printed as a check. Nothing asserts on it.

    python benchmarks/causal_split.py [--lengths 2048 4096] [--blocks 256 512 1024]
                                      [--dtype fp32] [--reps 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

B, H, D = 1, 4, 64


def split_causal(q, k, v, rows: int):
    """Causal attention of (B, H, L, D) inputs as per-block fused calls merged by lse."""
    import torch

    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    n = q.shape[2]
    out = torch.empty_like(q)
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        qb = q[:, :, i0:i1]
        o_diag, l_diag = fused(qb, k[:, :, i0:i1], v[:, :, i0:i1], 0.0, True)
        if i0 == 0:
            out[:, :, i0:i1] = o_diag
            continue
        o_left, l_left = fused(qb, k[:, :, :i0], v[:, :, :i0], 0.0, False)
        # lse comes back (B, L, H) or (B, H, L) depending on the version: index it as (B, H, L)
        l_diag, l_left = (x.transpose(1, 2) if x.shape[1] != H else x for x in (l_diag, l_left))
        m = torch.maximum(l_diag, l_left)
        w_diag = torch.exp(l_diag - m).unsqueeze(-1)
        w_left = torch.exp(l_left - m).unsqueeze(-1)
        out[:, :, i0:i1] = ((o_diag.float() * w_diag + o_left.float() * w_left)
                            / (w_diag + w_left)).to(q.dtype)
    return out


def main(argv=None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--blocks", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    print(f"CPU causal attention forward, B={B} H={H} D={D} {args.dtype}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s), {args.reps} round-robin "
          f"reps; ratio = split / fused on medians (minima)")
    print("|    L | rows/block | fused ms | split ms | split/fused | max abs diff |")
    print("|---|---|---|---|---|---|")
    for n in args.lengths:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype) for _ in range(3))
        fns = {"fused": lambda: fused(q, k, v, 0.0, True)[0]}
        for rows in args.blocks:
            fns[rows] = (lambda r: lambda: split_causal(q, k, v, r))(rows)
        ref = fns["fused"]()
        diff = {r: (fns[r]().float() - ref.float()).abs().max().item() for r in args.blocks}
        times = {name: [] for name in fns}
        names = list(fns)
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(1e3 * (time.perf_counter() - t0))
        f_med, f_min = statistics.median(times["fused"]), min(times["fused"])
        for rows in args.blocks:
            s_med, s_min = statistics.median(times[rows]), min(times[rows])
            print(f"| {n:4d} | {rows:10d} | {f_med:8.1f} | {s_med:8.1f} | "
                  f"{s_med / f_med:.2f}x ({s_min / f_min:.2f}x) | {diff[rows]:.1e} |")


if __name__ == "__main__":
    main()
