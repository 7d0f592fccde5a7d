"""Long sequences on CPU: one forward of a whole model at lengths far past what eager
attention fits in a memory budget, with attnfuse's peak memory MEASURED there (the
e2e benchmark extrapolates the longest length from a fit; this runs it).

Per length, each variant runs in its own child process (`e2e.py`'s models and memory
method: the RSS high-water mark of one call above the RSS before it, glibc's mmap
threshold fixed low so freed blocks show). A variant whose unfused attention needs at
least ``--budget-gib`` by arithmetic alone (one layer's (B, H, L, L) fp32 scores,
``B * H * L^2 * 4`` bytes: a lower bound, eager holds more than one such tensor) is NOT
run (on this machine it would meet the kernel's OOM killer, not a Python error); the
table prints that lower bound instead. attnfuse always runs. Nothing asserts on these
numbers.

    python benchmarks/long_context.py [--models gpt2 llama] [--lengths 16384 32768 65536]
                                      [--budget-gib 16] [--variants eager inductor attnfuse]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402  (the models, inputs and memory method of the e2e benchmark)

VARIANTS = ("eager", "inductor", "attnfuse")


def quadratic_gib(length: int, itemsize: int = 4) -> float:
    """One layer's (B=1, H, L, L) scores, in GiB: a lower bound on unfused attention."""
    return e2e.HEADS * length * length * itemsize / 2 ** 30


def _child(model: str, variant: str, length: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    e2e._malloc_mode(measure_memory=False)
    torch.manual_seed(0)
    e2e.POSITIONS = max(e2e.POSITIONS, length)   # position tables long enough for L
    eager, _ = e2e.build_model(model, 2, False)
    fn = eager
    if variant == "inductor":
        fn = torch.compile(copy.deepcopy(eager))
    elif variant == "attnfuse":
        fn = torch.compile(copy.deepcopy(eager), backend="attnfuse")
    small, _ = e2e.make_inputs(model, None, 256, torch.float32)
    inputs, _ = e2e.make_inputs(model, None, length, torch.float32)
    for t in (*small, *inputs):   # one dynamic-length compile, on the short input
        torch._dynamo.maybe_mark_dynamic(t, 1)
    e2e._step(fn, small, False)
    gc.collect()
    e2e._malloc_mode(measure_memory=True)
    base = e2e._status_kib("VmRSS")
    e2e._reset_peak()
    t0 = time.perf_counter()
    out = e2e._step(fn, inputs, False)
    secs = time.perf_counter() - t0
    peak = (e2e._status_kib("VmHWM") - base) / 1024
    return {"model": model, "variant": variant, "L": length, "peak_mib": round(peak, 1),
            "s": round(secs, 1), "finite": bool(torch.isfinite(out).all()),
            "torch": torch.__version__}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["gpt2", "llama"],
                    choices=["gpt2", "llama", "bert"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--budget-gib", type=float, default=16.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "VARIANT", "L"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        m, v, n = args.child
        print(json.dumps(_child(m, v, int(n), args.threads)))
        return
    print(f"fp32 inference, batch 1, 2 layers, hidden {e2e.HIDDEN}, {e2e.HEADS} heads; budget "
          f"{args.budget_gib:g} GiB; peak = RSS high-water mark of one call above the RSS "
          f"before it; 'not run: >= X GiB' = one layer's (L, L) fp32 scores alone need X GiB")
    print("| model | L | variant | peak MiB | seconds | output finite |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        for length in args.lengths:
            for v in args.variants:
                need = quadratic_gib(length)
                if v != "attnfuse" and need >= args.budget_gib:
                    print(f"| {model} | {length} | {v} | not run: >= {need:.1f} GiB | - | - |",
                          flush=True)
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), "--child", model, v,
                       str(length), "--threads", str(args.threads)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
                if res.returncode or not lines:
                    tail = " | ".join(res.stderr.strip().splitlines()[-2:])
                    print(f"| {model} | {length} | {v} | failed (exit {res.returncode}: "
                          f"{tail[:120]}) | - | - |", flush=True)
                    continue
                r = json.loads(lines[-1])
                print(f"| {model} | {length} | {v} | {r['peak_mib']:,.0f} | {r['s']} | "
                      f"{r['finite']} |", flush=True)


if __name__ == "__main__":
    main()
