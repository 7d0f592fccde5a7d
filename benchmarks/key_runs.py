"""CPU benchmark: the key-run path (``kernels/torch_runs.py``) against one fused call with
the key_mask folded into a (B, 1, 1, Lk) mask, for padded batches.

Per dtype, length L, batch B and mask (``none``, ``causal``: top-left), one child
process times, round-robin, the op (``impl="torch"``, H=4, D=64) forward (``eval``, no
grad) and forward + backward (``train``) on a Hugging Face-style padded batch: every
other row keeps a prefix of 60 % of the keys (right padding), the others all of them
(``--keep`` changes the 60 %; ``--keep 1`` = no padding at all):

- ``masked``: PyTorch's fused CPU kernel once, the key_mask as a broadcast additive mask
              (the path taken below ``RUNS_MIN_SCORES``, forced here by raising it);
- ``runs``:   the key-run path, one or two kernel calls per batch row on the visible
              keys only (forced at every size by setting ``RUNS_MIN_SCORES`` to 0).

Ratios are masked / runs (higher = runs faster), on medians of ``--reps`` rounds after
two warm-ups (minima in brackets). ``RUNS_MIN_SCORES`` is chosen from this table.
Nothing asserts on these numbers.

    python benchmarks/key_runs.py [--lengths 256 1024] [--batches 1 2 4 8 16 32]
                                  [--dtypes fp32 bf16] [--masks none causal] [--keep 0.6]
                                  [--reps 7] [--threads 1]
"""
from __future__ import annotations

import argparse
import json

from roundrobin import MODES, make_call, ratio, round_robin, run_children, warm_up

H, D = 4, 64
IMPLS = ("masked", "runs")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _child(dtype_name: str, length: int, batch: int, mask: str, keep: float, reps: int,
           threads: int) -> dict:
    import torch

    import attnfuse
    from attnfuse.kernels import torch_impl as T
    from attnfuse.kernels import torch_runs as TR

    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, DTYPES[dtype_name])
    causal = mask == "causal"
    g = torch.Generator().manual_seed(length + batch)
    q, k, v = (torch.randn(batch, H, length, D, generator=g).to(dtype).requires_grad_()
               for _ in range(3))
    dout = torch.randn(batch, H, length, D, generator=g).to(dtype)
    key_mask = torch.ones(batch, length, dtype=torch.bool)
    key_mask[1::2, max(1, round(keep * length)):] = False

    def op_with(min_scores: int):
        def fn(q, k, v):
            TR.RUNS_MIN_SCORES = dict.fromkeys(TR.RUNS_MIN_SCORES, min_scores)
            return attnfuse.flash_attention(q, k, v, causal=causal, key_mask=key_mask,
                                            impl="torch")
        return fn

    fns = {"masked": op_with(1 << 62), "runs": op_with(0)}
    paths = {}
    for impl, fn in fns.items():
        fn(q, k, v)  # sets RUNS_MIN_SCORES for the path query
        paths[impl] = T.forward_path(q, k, v, None, causal="top_left" if causal else "none",
                                     dropout_p=0.0, softcap=0.0, key_mask=key_mask)
    call = make_call(fns, q, k, v, dout)
    for impl in IMPLS:
        warm_up(call, impl)
    rec = round_robin(call, IMPLS, reps)
    rec.update(dtype=dtype_name, L=length, B=batch, mask=mask, keep=keep, paths=paths,
               torch=torch.__version__, threads=torch.get_num_threads())
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--masks", nargs="+", choices=["none", "causal"], default=["none", "causal"])
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32"])
    ap.add_argument("--keep", type=float, default=0.6,
                    help="share of the keys the padded rows keep (1: no padding)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="also write the raw records here")
    ap.add_argument("--child", nargs=6, metavar=("DTYPE", "L", "B", "MASK", "KEEP", "REPS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        dt, length, batch, mask, keep, reps = args.child
        print(json.dumps(_child(dt, int(length), int(batch), mask, float(keep), int(reps),
                                args.threads)))
        return
    cases = [[dt, str(length), str(b), mask, str(args.keep), str(args.reps),
              "--threads", str(args.threads)]
             for dt in args.dtypes for mask in args.masks for length in args.lengths
             for b in args.batches]
    recs = run_children(__file__, cases, args.json)
    r0 = recs[0]
    print(f"CPU op (impl=torch) on padded batches, H={H} D={D}, every other row keeps "
          f"{args.keep:.0%} of the keys, torch {r0['torch']}, {r0['threads']} thread(s), "
          f"{args.reps} round-robin reps; ratios masked / runs on medians (on minima), "
          f"> 1: the key-run path faster")
    print("| dtype |    L |  B | mask   | mode  | masked ms | runs ms | masked/runs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in recs:
        for m in MODES:
            t = {i: r["median"][f"{i}/{m}"] for i in IMPLS}
            print(f"| {r['dtype']:5s} | {r['L']:4d} | {r['B']:2d} | {r['mask']:6s} | {m:5s} | "
                  f"{t['masked']:9.2f} | {t['runs']:7.2f} | {ratio(r, 'masked', 'runs', m)} |")
    odd = [r for r in recs if r["paths"] != {"masked": "fused", "runs": "runs"}]
    for r in odd:
        print(f"note: {r['dtype']} L={r['L']} B={r['B']} {r['mask']} took paths {r['paths']}")


if __name__ == "__main__":
    main()
