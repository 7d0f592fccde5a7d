"""CPU benchmark: where the half-precision GEMM path (``kernels/torch_lowp.py``) beats
PyTorch's fused CPU flash kernel, and how both compare with the unfused graph.

For half types (bf16 by default), per length L and mask (``none``, ``causal``), one
process times, round-robin, the attention alone (B=1, H=4, D=64: the e2e models' heads)
forward (``eval``, no grad) and forward + backward (``train``):

- ``eager``:    ``softmax((q @ k^T) * scale [masked_fill]) @ v`` in the input dtype;
- ``inductor``: that function under ``torch.compile`` (what Inductor runs for GPT-2 and
                LLaMA, where its own SDPA patterns do not fire; static shapes);
- ``lowp``:     ``attnfuse.flash_attention(impl="torch")`` with the lowp path;
- ``fused``:    the same with ``USE_LOWP = False`` (PyTorch's fused flash kernel).

Ratios are X / lowp (higher = lowp faster), on medians of ``--reps`` calls after two
warm-ups (on minima in brackets: on a shared machine the minima are the steadier). ``LOWP_MAX_KEYS`` (the longest key range that takes the
lowp path) is chosen from this table. Nothing asserts on these numbers.

    python benchmarks/lowp_crossover.py [--lengths 256 512 768 1024 1536 2048]
                                        [--dtype bf16] [--reps 7] [--threads 1]
"""
from __future__ import annotations

import argparse
import json

from roundrobin import MODES, make_call, ratio, round_robin, run_children, warm_up

B, H, D = 1, 4, 64
IMPLS = ("eager", "inductor", "lowp", "fused")


def _child(length: int, mask: str, dtype_name: str, reps: int, threads: int,
           max_keys: int) -> dict:
    import torch

    import attnfuse
    from attnfuse.kernels import torch_impl as T
    from attnfuse.kernels import torch_lowp as TL

    torch.set_num_threads(threads)
    if max_keys:
        TL.LOWP_MAX_KEYS = max_keys
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype_name])
    causal = mask == "causal"
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(B, H, length, D, generator=g).to(dtype).requires_grad_()
               for _ in range(3))
    dout = torch.randn(B, H, length, D, generator=g).to(dtype)
    keep = torch.ones(length, length, dtype=torch.bool).tril() if causal else None
    scale = D ** -0.5

    def eager(q, k, v):
        s = (q @ k.transpose(-1, -2)) * scale
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        return torch.softmax(s, dim=-1) @ v

    compiled = torch.compile(eager, dynamic=False)

    def ours(lowp: bool):
        def fn(q, k, v):
            TL.USE_LOWP = lowp
            return attnfuse.flash_attention(q, k, v, causal=causal, impl="torch")
        return fn

    fns = {"eager": eager, "inductor": compiled, "lowp": ours(True), "fused": ours(False)}

    call = make_call(fns, q, k, v, dout)
    for i in IMPLS:
        warm_up(call, i)
    timing = round_robin(call, IMPLS, reps)
    TL.USE_LOWP = True
    path = T.forward_path(q, k, v, None, causal="top_left" if causal else "none",
                          dropout_p=0.0, softcap=0.0)
    return {"L": length, "lowp_ran": path == "lowp", "mask": mask, "dtype": dtype_name, "threads": torch.get_num_threads(),
            "torch": torch.__version__, **timing}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 768, 1024, 1536, 2048])
    ap.add_argument("--masks", nargs="+", choices=["none", "causal"], default=["none", "causal"])
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-keys", type=int, default=0,
                    help="LOWP_MAX_KEYS in the children (0: the library's), to time the "
                         "lowp path beyond its bound")
    ap.add_argument("--json", help="also write the raw records here")
    ap.add_argument("--child", nargs=2, metavar=("L", "MASK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(int(args.child[0]), args.child[1], args.dtype, args.reps,
                                args.threads, args.max_keys)))
        return
    opts = ["--dtype", args.dtype, "--reps", str(args.reps), "--threads", str(args.threads),
            "--max-keys", str(args.max_keys)]
    recs = run_children(__file__, [[str(length), mask, *opts] for length in args.lengths
                                   for mask in args.masks], args.json)
    r0 = recs[0]
    print(f"CPU attention alone, B={B} H={H} D={D} {args.dtype}, torch {r0['torch']}, "
          f"{r0['threads']} thread(s), {args.reps} round-robin reps; ratios X / lowp on "
          f"medians (on minima), > 1: lowp faster; lowp = the op with the lowp path allowed "
          f"(* where it did not run: the fused kernel ran)")
    print("|    L | mask   | mode  | eager ms | inductor ms | fused ms | lowp ms "
          "| eager/lowp | inductor/lowp | fused/lowp |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in recs:
        for m in MODES:
            t = {i: r["median"][f"{i}/{m}"] for i in IMPLS}
            star = " " if r["lowp_ran"] else "*"
            print(f"| {r['L']:4d} | {r['mask']:6s} | {m:5s} | {t['eager']:8.2f} | "
                  f"{t['inductor']:11.2f} | {t['fused']:8.2f} | {t['lowp']:6.2f}{star} | "
                  f"{ratio(r, 'eager', 'lowp', m)} | {ratio(r, 'inductor', 'lowp', m)} | "
                  f"{ratio(r, 'fused', 'lowp', m)} |")


if __name__ == "__main__":
    main()
