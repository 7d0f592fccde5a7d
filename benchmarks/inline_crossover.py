"""CPU benchmark: where inlining the fused op into Inductor's own code
(``kernels/torch_inline.py``) beats the op's runtime kernels, against Inductor alone.

Per dtype, length L and mask (``none``, ``causal``), one child process times,
round-robin, attention alone (B=1, H=4, D=64: the e2e models' heads) forward (``eval``,
no grad) and forward + backward (``train``), all under ``torch.compile`` with static
shapes:

- ``inductor``: ``softmax((q @ k^T) * scale [masked by an in-graph tril]) @ v`` compiled
                by Inductor (what it runs for GPT-2 and LLaMA, where its SDPA patterns do
                not fire);
- ``runtime``:  the same function with ``backend="attnfuse"`` and ``cpu_inline=False``
                (the fused op's CPU path: PyTorch's flash kernel or our lowp path);
- ``inline``:   ``backend="attnfuse"`` with the call inlined for Inductor (forced at
                every size by this script: ``INLINE_MAX_SCORES`` is raised in the child,
                and ``cpu_inline="all"``, without which a ``none`` call gets the fused
                kernel's call as Inductor alone emits it, not the inline).

Ratios are X / inline (higher = inline faster), on medians of ``--reps`` rounds after
two warm-ups (minima in brackets). ``INLINE_MAX_SCORES`` is chosen from this table.
Nothing asserts on these numbers.

    python benchmarks/inline_crossover.py [--lengths 256 512 1024 2048]
                                          [--dtypes fp32 bf16] [--reps 9] [--threads 0]
"""
from __future__ import annotations

import argparse
import json

from roundrobin import MODES, make_call, ratio, round_robin, run_children, warm_up

B, H, D = 1, 4, 64
IMPLS = ("inductor", "runtime", "inline")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _child(length: int, mask: str, dtype_name: str, reps: int, threads: int) -> dict:
    import torch

    from attnfuse.backend import collect_reports
    from attnfuse.kernels import torch_inline as TI

    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, DTYPES[dtype_name])
    # inline at every size: this table picks the bounds
    TI.INLINE_MAX_SCORES = {kind: {dtype: 1 << 40} for kind in TI.INLINE_MAX_SCORES}
    causal = mask == "causal"
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(B, H, length, D, generator=g).to(dtype).requires_grad_()
               for _ in range(3))
    dout = torch.randn(B, H, length, D, generator=g).to(dtype)
    scale = D ** -0.5

    def attention(q, k, v):
        s = (q @ k.transpose(-1, -2)) * scale
        if causal:
            keep = torch.ones(length, length, dtype=torch.bool).tril()
            s = s.masked_fill(~keep, float("-inf"))
        return torch.softmax(s, dim=-1) @ v

    fns = {"inductor": torch.compile(attention, dynamic=False),
           "runtime": torch.compile(attention, dynamic=False, backend="attnfuse",
                                    options={"cpu_inline": False, "strict": True}),
           "inline": torch.compile(attention, dynamic=False, backend="attnfuse",
                                   options={"cpu_inline": "all", "strict": True})}
    inlined = {}

    call = make_call(fns, q, k, v, dout)
    for i in IMPLS:
        with collect_reports() as reports:
            warm_up(call, i)
        inlined[i] = sum(r.inlined for r in reports)
    return {"L": length, "mask": mask, "dtype": dtype_name, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "inlined": inlined, **round_robin(call, IMPLS, reps)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--masks", nargs="+", choices=["none", "causal"], default=["none", "causal"])
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="also write the raw records here")
    ap.add_argument("--child", nargs=3, metavar=("DTYPE", "L", "MASK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(int(args.child[1]), args.child[2], args.child[0], args.reps,
                                args.threads)))
        return
    opts = ["--reps", str(args.reps), "--threads", str(args.threads)]
    recs = run_children(__file__, [[dtype, str(length), mask, *opts] for dtype in args.dtypes
                                   for length in args.lengths for mask in args.masks], args.json)
    r0 = recs[0]
    print(f"CPU attention alone under torch.compile, B={B} H={H} D={D}, torch {r0['torch']}, "
          f"{r0['threads']} thread(s), {args.reps} round-robin reps; ratios X / inline on "
          f"medians (on minima), > 1: inline faster (* where the call was not inlined)")
    print("| dtype |    L | mask   | mode  | inductor ms | runtime ms | inline ms "
          "| inductor/inline | runtime/inline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in recs:
        for m in MODES:
            t = {i: r["median"][f"{i}/{m}"] for i in IMPLS}
            star = " " if r["inlined"]["inline"] and not r["inlined"]["runtime"] else "*"
            print(f"| {r['dtype']:5s} | {r['L']:4d} | {r['mask']:6s} | {m:5s} | "
                  f"{t['inductor']:11.2f} | {t['runtime']:10.2f} | {t['inline']:8.2f}{star} | "
                  f"{ratio(r, 'inductor', 'inline', m)} | {ratio(r, 'runtime', 'inline', m)} |")


if __name__ == "__main__":
    main()
