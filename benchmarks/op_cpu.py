"""CPU benchmark: impl="torch" forward vs eager matmul-softmax-matmul.

Cases: B=1, H=8, D=64, float32, L in {1024, 2048, 4096}, and the masks of ``--masks``:
``none``; ``causal``; ``pad`` (causal with the last 40 % of the keys padded: a key_mask,
as a padded batch row of a causal LM); ``window`` (causal with a sliding window of
``--window`` keys, as Mistral). Three implementations per case:

- ``eager``:   ``softmax((q @ k^T) * scale [masked_fill mask]) @ v`` as models write it
               (the dense (L, L) bool mask is built beforehand, like a model's buffer);
- ``torch``:   ``attnfuse.kernels.torch_impl.forward`` as the op calls it (fused
               PyTorch SDPA where exact: none, causal, pad; ``window`` runs the
               banded path, that kernel per block of rows over the band's keys);
- ``blocked``: the same with the fused path switched off (``USE_FUSED_SDPA = False``):
               the blocked loop that runs for softcap, dropout, bottom-right causal, ...

Each (case, implementation) runs in a fresh subprocess. Peak memory is the peak
resident set during ONE forward call above the resident set just before it (Linux:
``/proc/self/clear_refs`` resets VmHWM; the inputs already exist), so it counts every
allocation of the call, PyTorch's own kernels included. Time is the median over
``--reps`` calls after one warm-up call. Ratios are eager / torch (higher = torch
better). Nothing asserts on these numbers.

    python benchmarks/op_cpu.py [--reps 5] [--lengths 1024 2048 4096] [--entry op]
                                [--threads N] [--masks none causal pad window] [--window 256]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

B, H, D = 1, 8, 64
IMPLS = ("eager", "torch", "blocked")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


MASKS = ("none", "causal", "pad", "window")


def _child(impl: str, length: int, mask: str, reps: int, entry: str, threads: int,
           window: int) -> dict:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, length, D) for _ in range(3))
    scale = D ** -0.5
    path = impl
    causal = mask != "none"
    key_mask = None
    if mask == "pad":
        key_mask = torch.ones(B, length, dtype=torch.bool)
        key_mask[:, int(0.6 * length):] = False
    win = window if mask == "window" else 0
    if impl == "eager":
        keep = torch.ones(length, length, dtype=torch.bool).tril() if causal else None
        if win:
            keep = keep & torch.ones(length, length, dtype=torch.bool).triu(1 - win)
        if key_mask is not None:
            keep = keep & key_mask[:, None, None, :]

        def fn():
            s = (q @ k.transpose(-1, -2)) * scale
            if keep is not None:
                s = s.masked_fill(~keep, float("-inf"))
            return torch.softmax(s, dim=-1) @ v
    else:
        from attnfuse.kernels import torch_impl as T
        from attnfuse.kernels import torch_base as TS

        if impl == "blocked":
            TS.USE_FUSED_SDPA = False
        mode = "top_left" if causal else "none"
        if entry == "op" and impl == "torch":
            import attnfuse

            def fn():
                return attnfuse.flash_attention(q, k, v, causal=mode, impl="torch", window=win,
                                                key_mask=key_mask)
        else:
            def fn():
                return T.forward(q, k, v, None, scale=scale, causal=mode, dropout_p=0.0,
                                 softcap=0.0, seed=0, window=win, key_mask=key_mask)[0]
        path = T.forward_path(q, k, v, None, causal=mode, dropout_p=0.0, softcap=0.0,
                              window=win, key_mask=key_mask)
    # peak memory of one (first) call
    base = _status_kib("VmRSS")
    ok = _reset_peak()
    out = fn()
    peak = _status_kib("VmHWM") - base if ok else float("nan")
    del out
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "L": length, "mask": mask, "path": path,
            "ms": 1e3 * statistics.median(times), "peak_mib": peak / 1024,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def _run_case(impl, length, mask, reps, entry, threads, window) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(length), mask,
           "--reps", str(reps), "--entry", entry, "--threads", str(threads),
           "--window", str(window)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--entry", choices=["direct", "op"], default="direct",
                    help="call torch_impl.forward directly or attnfuse.flash_attention")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads in each case (0: torch's default)")
    ap.add_argument("--masks", nargs="+", choices=MASKS, default=["none", "causal"])
    ap.add_argument("--window", type=int, default=256, help="window of the 'window' masks")
    ap.add_argument("--child", nargs=3, metavar=("IMPL", "L", "MASK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        impl, length, mask = args.child
        print(json.dumps(_child(impl, int(length), mask, args.reps, args.entry, args.threads,
                                args.window)))
        return

    rows = []
    info = None
    for length in args.lengths:
        for mask in args.masks:
            r = {impl: _run_case(impl, length, mask, args.reps, args.entry, args.threads,
                                 args.window)
                 for impl in IMPLS}
            info = r["eager"]
            rows.append((length, mask, r))
            print(f"  done L={length} mask={mask}", file=sys.stderr, flush=True)

    print(f"CPU forward, B={B} H={H} D={D} float32, torch {info['torch']}, "
          f"{info['threads']} threads, median of {args.reps}; peak = RSS high-water "
          f"mark of one call above the RSS before it; entry={args.entry}; "
          f"window={args.window}")
    hdr = ("|    L | mask   | eager ms | torch ms (path) | blocked ms | time eager/torch "
           "| time eager/blocked | eager MiB | torch MiB | blocked MiB | mem eager/torch "
           "| mem eager/blocked |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for length, mask, r in rows:
        e, t, b = r["eager"], r["torch"], r["blocked"]

        def ratio(x, y):
            return f"{x / y:.1f}x" if y > 0 else "inf"

        print(f"| {length:4d} | {mask:6s} | {e['ms']:8.1f} | "
              f"{t['ms']:7.1f} ({t['path']}) | {b['ms']:10.1f} | {ratio(e['ms'], t['ms']):>16s} | "
              f"{ratio(e['ms'], b['ms']):>18s} | {e['peak_mib']:9.1f} | {t['peak_mib']:9.1f} | "
              f"{b['peak_mib']:11.1f} | {ratio(e['peak_mib'], t['peak_mib']):>15s} | "
              f"{ratio(e['peak_mib'], b['peak_mib']):>17s} |")


if __name__ == "__main__":
    main()
