"""Steady-state cost of the run-time buffer witness (attnfuse/witness.py).

A nanoGPT block whose causal mask is a module buffer, compiled with
``backend="attnfuse"``: the backend proves the mask causal from the buffer's values and
checks the buffer at every call. Variants, each in its own process (``--child``):

- ``guarded``: as shipped (the check runs before every call);
- ``unguarded``: the same compiled graph without the check (``attnfuse.backend._witnessed``
  replaced by a function that returns the compiled graph as it is), the pre-witness
  behaviour;
- ``inference``: as shipped, with the buffer an inference tensor (no version counter, so its
  values are compared at every call).

Prints the median (and minimum) time per call of each and the ratios to ``unguarded``, then
the check alone (:meth:`BufferWitness.holds` on a (1, 1, 256, 256) buffer) in microseconds:
the verified tensor at its verified version, and an inference tensor (values compared).
Sizes are small on purpose: the check's cost is per call, so its share is largest there.

    python benchmarks/witness_overhead.py [--inner aot_eager|inductor] [--reps 200] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("unguarded", "guarded", "inference")
SIZES = ((1, 64, 64), (1, 256, 128))  # (batch, tokens, channels); 4 heads, block size 256


def child(variant: str, inner: str, batch: int, tokens: int, channels: int, reps: int) -> dict:
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    torch.set_num_threads(1)
    import attnfuse.backend as backend
    from tests.test_backend import NanoGPTBlock

    if variant == "unguarded":
        backend._witnessed = lambda compiled, *a, **k: compiled
    torch.manual_seed(0)
    with torch.inference_mode(variant == "inference"):
        m = NanoGPTBlock(C=channels, H=4, block_size=256, dropout=0.0).eval()
        if variant == "inference":
            m.bias = m.bias.clone()  # an inference tensor
        x = torch.randn(batch, tokens, channels)
        cm = torch.compile(m, backend="attnfuse", options={"inner": inner})
        with torch.no_grad():
            for _ in range(5):
                cm(x)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                cm(x)
                times.append(1e6 * (time.perf_counter() - t0))
    return {"variant": variant, "inner": inner, "shape": [batch, tokens, channels],
            "median_us": statistics.median(times), "min_us": min(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inner", default="aot_eager")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json")
    ap.add_argument("--child", nargs=5)
    args = ap.parse_args()
    if args.child:
        v, b, t, c, reps = args.child
        print(json.dumps(child(v, args.inner, int(b), int(t), int(c), int(reps))))
        return
    recs = []
    for b, t, c in SIZES:
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--inner", args.inner, "--child", v, str(b), str(t),
                                  str(c), str(args.reps)], capture_output=True, text=True, check=True).stdout
            recs.append(json.loads(out.strip().splitlines()[-1]))
    print(f"per-call time, nanoGPT block, inner={args.inner}, 1 thread, {args.reps} calls per variant")
    print(f"{'shape (B, T, C)':<18}{'variant':<12}{'median us':>11}{'min us':>9}{'vs unguarded':>22}")
    for b, t, c in SIZES:
        rows = {r["variant"]: r for r in recs if r["shape"] == [b, t, c]}
        base = rows["unguarded"]
        for v in VARIANTS:
            r = rows[v]
            ratio = f"{r['median_us'] / base['median_us']:.3f}x ({r['min_us'] / base['min_us']:.3f}x)"
            print(f"{str((b, t, c)):<18}{v:<12}{r['median_us']:>11.1f}{r['min_us']:>9.1f}{ratio:>22}")
    check = check_alone()
    print(f"the check alone, median of 2000: verified tensor {check['verified_us']:.2f} us, "
          f"inference tensor {check['inference_us']:.2f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"calls": recs, "check": check}, f, indent=1)


def check_alone(n: int = 2000) -> dict:
    import torch
    from attnfuse.witness import BufferWitness

    torch.set_num_threads(1)
    tril = torch.tril(torch.ones(256, 256)).view(1, 1, 256, 256)
    with torch.inference_mode():
        inf = tril.clone()
    out = {}
    for name, x in (("verified_us", tril.clone()), ("inference_us", inf)):
        w = BufferWitness(0, "bias", tril.clone())
        assert w.holds(x)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            w.holds(x)
            times.append(1e6 * (time.perf_counter() - t0))
        out[name] = statistics.median(times)
    return out


if __name__ == "__main__":
    main()
