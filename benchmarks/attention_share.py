"""CPU benchmark: the share of attention in a whole causal model's time at long lengths,
and the eager / attnfuse ratio the model could reach if attention ran at this core's
fp32 GEMM peak (the bound behind issue 6's ">= 5x eager at 4096 causal tokens").

Per model (``e2e.py``'s GPT-2 and LLaMA, fp32 inference, batch 1, one torch thread):

1. eager and attnfuse (``torch.compile(model, backend="attnfuse")``, inner Inductor)
   called round-robin ``--reps`` times after a warm-up (min and median);
2. one more attnfuse call under ``torch.profiler``: the time inside the
   ``attnfuse::flash_attention`` ops is ``attention``, the median minus it ``rest``;
3. this core's fp32 GEMM speed: ``torch.mm`` of two 2048 x 2048 matrices, best of 5;
4. attention's FLOPs: two GEMMs over the visible (query, key) pairs, 2 * (D + Dv) per
   pair per query head (L (L + 1) / 2 pairs for causal attention); at GEMM speed they
   take ``ideal`` ms. ``bound = eager / (rest + ideal)``: the ratio with a perfect
   attention kernel and Inductor's code for everything else.

Nothing asserts on these numbers.

    python benchmarks/attention_share.py [--models gpt2 llama] [--length 4096] [--reps 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

LAYERS = 2  # as e2e.py's default
sys.path[:0] = [str(Path(__file__).resolve().parent),
                str(Path(__file__).resolve().parent.parent / "tests")]


def gemm_gflops() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(5))
    return 2 * 2048 ** 3 / best / 1e9


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(name: str, length: int, reps: int) -> dict:
    import torch

    import e2e

    model, layers = e2e.build_model(name, LAYERS, train=False)
    inputs, _ = e2e.make_inputs(name, None, length, torch.float32)
    fused = torch.compile(model, backend="attnfuse")
    variants = {"eager": model, "attnfuse": fused}

    def call(m):
        with torch.no_grad():
            m(*inputs)

    for m in variants.values():
        call(m)
    times = {v: [] for v in variants}
    for r in range(reps):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for v in order:
            times[v].append(1e3 * _time(lambda: call(variants[v])))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call(fused)
    attn = [e for e in prof.key_averages() if e.key == "attnfuse::flash_attention"]
    attention_ms = sum(e.cpu_time_total for e in attn) / 1e3
    calls = sum(e.count for e in attn)
    if not calls:
        raise SystemExit(f"{name} at {length}: no attnfuse::flash_attention op ran (calls this "
                         "small are inlined for Inductor); use a longer --length")
    cfg = model.model.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    pairs = length * (length + 1) // 2  # causal: key j <= query i
    flops = layers * heads * pairs * 2 * (2 * head_dim)
    return dict(model=name, L=length, calls=calls, flops=flops,
                median={v: statistics.median(t) for v, t in times.items()},
                min={v: min(t) for v, t in times.items()}, attention_ms=attention_ms)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=["gpt2", "llama"], default=["gpt2", "llama"])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    peak = gemm_gflops()
    print(f"fp32 inference, batch 1, 1 thread, torch {torch.__version__}, {args.reps} "
          f"round-robin reps (medians; minima in brackets); this core's fp32 GEMM: "
          f"{peak:.1f} GFLOP/s (torch.mm 2048^3, best of 5)")
    print("| model | L | eager ms | attnfuse ms | eager/attnfuse | attention ms (calls) "
          "| attention GFLOP/s | rest ms | ideal attention ms | bound eager/attnfuse |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = measure(name, args.length, args.reps)
        med, lo = r["median"], r["min"]
        rest = med["attnfuse"] - r["attention_ms"]
        ideal = r["flops"] / peak / 1e6
        print(f"| {name} | {r['L']} | {med['eager']:.0f} ({lo['eager']:.0f}) | "
              f"{med['attnfuse']:.0f} ({lo['attnfuse']:.0f}) | "
              f"{med['eager'] / med['attnfuse']:.2f}x ({lo['eager'] / lo['attnfuse']:.2f}x) | "
              f"{r['attention_ms']:.0f} ({r['calls']}) | "
              f"{r['flops'] / r['attention_ms'] / 1e6:.1f} | {rest:.0f} | {ideal:.0f} | "
              f"{med['eager'] / (rest + ideal):.2f}x ({lo['eager'] / (rest + ideal):.2f}x) |",
              flush=True)


if __name__ == "__main__":
    main()
