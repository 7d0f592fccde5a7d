"""Global-memory traffic of the fused attention kernels, counted in Triton's interpreter.

    .venv/bin/python benchmarks/kernel_io.py [--sizes 256,512,1024] [--dim 64]

Every ``tl.load`` / ``tl.store`` executed by the interpreter is intercepted and the bytes
of its masked-in elements are added up per kernel (each program's loads are counted, as
a GPU without cache hits would issue them: K/V re-reads by different query blocks
count; nothing is deduplicated).  The kernels run with the FIRST autotune config of the
GPU config list for (d, fp16) — the tile sizes decide how often K/V are re-read — not
with the small interpreter test config.

Printed ratios:
  * to the minimum: read q, k, v once and write o once (forward); read q, k, v, o, dO
    once and write dq, dk, dv once (backward);
  * to unfused attention, which also writes and reads the N×N score and probability
    matrices: forward S = QKᵀ (write), softmax (read S, write P), P·V (read P);
    backward dV = Pᵀ dO (read P), dP = dO Vᵀ (write), dS = P∘(dP − δ) (read P, dP;
    write dS), dQ = dS K and dK = dSᵀ Q (read dS twice).
Shape: B = H = 1, non-causal, no bias, no dropout, fp16.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"   # before the kernel modules are imported

import argparse
import collections
import math
import sys
import time

import numpy as np
import torch
from triton.runtime import interpreter as _interp

from attnfuse.kernels import triton_flash as tf

_counts = collections.Counter()
_current = ["?"]


def _install_counters():
    builder_cls = _interp.InterpreterBuilder
    orig_load = builder_cls.create_masked_load
    orig_store = builder_cls.create_masked_store
    orig_call = _interp.GridExecutor.__call__

    def load(self, ptrs, mask, other, *a, **k):
        itemsize = np.dtype(_interp._get_np_dtype(ptrs.get_element_ty())).itemsize
        _counts[(_current[0], "read")] += int(np.count_nonzero(mask.data)) * itemsize
        return orig_load(self, ptrs, mask, other, *a, **k)

    def store(self, ptrs, value, mask, *a, **k):
        _counts[(_current[0], "write")] += int(np.count_nonzero(mask.data)) * value.data.itemsize
        return orig_store(self, ptrs, value, mask, *a, **k)

    def call(self, *a, **k):
        _current[0] = self.fn.__name__
        return orig_call(self, *a, **k)

    builder_cls.create_masked_load = load
    builder_cls.create_masked_store = store
    _interp.GridExecutor.__call__ = call


def _use_gpu_configs(dim, dtype):
    """Run each kernel with the first config of its GPU autotune list."""
    orig = tf._launcher

    def launcher(name, device, head_dim, dt, heavy):
        fn, meta = orig(name, device, head_dim, dt, heavy)
        cfg = tf.KERNEL_CONFIGS[name][1](head_dim, dt, heavy)[0]
        return fn, dict(cfg.kwargs)

    tf._launcher = launcher


def _measure(n, d, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, d, generator=g).to(dtype) for _ in range(3))
    scale = 1 / math.sqrt(d)
    _counts.clear()
    t0 = time.time()
    out, lse = tf.forward(q, k, v, None, scale=scale, causal="none", dropout_p=0.0,
                          softcap=0.0, seed=0)
    fwd = dict(_counts)
    _counts.clear()
    tf.backward(torch.randn_like(out), q, k, v, None, out, lse, scale=scale, causal="none",
                dropout_p=0.0, softcap=0.0, seed=0, need_dbias=False)
    bwd = dict(_counts)
    return fwd, bwd, time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="256,512,1024")
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args(argv)
    dtype, es = torch.float16, 2
    d = args.dim
    _install_counters()
    _use_gpu_configs(d, dtype)
    cf = {n: tf.KERNEL_CONFIGS[n][1](d, dtype, False)[0].kwargs for n in tf.KERNEL_CONFIGS}
    print(f"configs (first of each autotune list, d={d}, fp16): {cf}")
    hdr = (f"{'N':>5} {'pass':<4} {'kernel bytes':>13} {'read':>11} {'write':>11} "
           f"{'minimum':>11} {'unfused':>11} {'x min':>7} {'/ unfused':>9}")
    print(hdr)
    print("-" * len(hdr))
    for n in [int(x) for x in args.sizes.split(",")]:
        fwd, bwd, secs = _measure(n, d, dtype)
        nd, nn = n * d * es, n * n * es
        rows = {
            # minimum: q, k, v read + o written
            "fwd": (fwd, 4 * nd, 4 * nd + 4 * nn),
            # minimum: q, k, v, o, dO read + dq, dk, dv written
            "bwd": (bwd, 8 * nd, 7 * nd + 7 * nn),
        }
        for name, (cnt, minimum, unfused) in rows.items():
            rd = sum(v for (kname, kind), v in cnt.items() if kind == "read")
            wr = sum(v for (kname, kind), v in cnt.items() if kind == "write")
            tot = rd + wr
            print(f"{n:>5} {name:<4} {tot:>13,} {rd:>11,} {wr:>11,} {minimum:>11,} "
                  f"{unfused:>11,} {tot / minimum:>7.2f} {tot / unfused:>9.3f}")
        per = ", ".join(f"{kn} {kind} {v:,}" for (kn, kind), v in sorted({**fwd, **bwd}.items()))
        print(f"      per kernel/kind: {per}  ({secs:.1f}s in the interpreter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
