"""Peak memory and time of ALiBi attention before and after ALiBi as structure (issue 22), on CPU.

    .venv/bin/python benchmarks/alibi_memory.py [--lengths 1024,2048,4096,8192] [--heads 8]
                                                [--models bloom,mpt,falcon,falcon-pad,bloom-pad]
                                                [--dim 64] [--out benchmarks/results/alibi_memory.txt]

Five attention layers written as the models write them (tests/test_alibi_matcher.py's modules, at
benchmark sizes), batch 1 (the padded ones batch 2), float32, inference, compiled with
``torch.compile(backend="attnfuse", options={"inner": "aot_eager"})`` (AOTAutograd retraces the
rewritten graph, so mask nodes the fused op no longer reads are dropped, as Inductor drops them):

* ``bloom``: slopes x ``arange`` repeated per batch item, through ``baddbmm``, and, as Hugging
  Face's BLOOM, an index-built causal mask added as ``where(causal, 0, finfo.min)`` on the
  (B, H, L, L) view of the scores;
* ``mpt``: ``arange(1 - L, 1)`` x slopes, added, a causal mask with ``finfo.min``;
* ``falcon``: Falcon's ``alibi=True`` path, ``bfloat16(slopes) * positions`` from the padding
  mask's ``cumsum``, filled with ``finfo.min`` where Hugging Face's (B, 1, L, L) causal &
  padding mask hides a key (``test_alibi_matcher.FalconStyle``), with an all-ones padding mask;
* ``falcon-pad``: the same at batch 2, item 0 with its first L/8 keys padded (left padding: its
  first L/8 rows see no key), item 1 unpadded;
* ``bloom-pad``: BLOOM with that batch-2 padding mask (``test_alibi_matcher.BloomPadded``):
  positions from the mask's ``cumsum``, ``baddbmm`` on B*H, scores viewed (B, H, L, L), the
  float mask added. (At batch 1 the view (1*H, L, L) -> (1, H, L, L) splits nothing, and this
  layer keeps its (H, L, L) bias: a gap of the split-frame rule, not measured here.)

Two variants each:

* ``before``: the matcher's issue-22 proofs switched off (``attnfuse.passes.alibi.prove``
  returns nothing, ``alibi.bound`` proves no bound, ``batchaxes.split_frame`` finds no split
  frame), which is what attnfuse did before issue 22: the ALiBi term and the float mask are
  fused as one bias, materialised as a (B, H, L, L) float32 tensor (BLOOM padded: (B*H, L, L)
  on its merged batch axis) that the op reads;
* ``after``: bloom / mpt: ALiBi passed as ``alibi_slopes`` and the mask as ``causal``;
  falcon / falcon-pad / bloom-pad: the ALiBi term as a (B, H, 1, L) key bias (stride 0 along
  the queries), the fill as ``causal`` + ``key_mask`` (+ the empty-row fix-up): no (L, L)
  tensor in the rewritten graph.

Each (model, variant, length) runs in its own process (``--child``): peak memory is the process's
peak resident set (``ru_maxrss``) minus its resident set just before the first call (q, k, v
allocated, nothing compiled), so it includes dynamo's compile and the first run; time is the best
of five further calls. Ratios are after / before from the same run. The machine is shared (2 cores,
other jobs running): times are inflated and noisy; the memory numbers are not affected.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = ("bloom", "mpt", "falcon", "falcon-pad", "bloom-pad")
PADDED = ("falcon-pad", "bloom-pad")   # batch 2, item 0 left-padded


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _child(model: str, variant: str, length: int, heads: int, dim: int) -> dict:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_alibi_matcher as T

    class _BloomHF(T.BloomStyle):
        """BloomStyle with Hugging Face's additive finfo.min causal mask."""

        def forward(self, q, k, v):
            b, h, n, d = q.shape
            alibi = (self.slopes[:, None, None] * torch.arange(n, device=q.device)).repeat(b, 1, 1)
            s = alibi.baddbmm(q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(1, 2),
                              beta=1.0, alpha=d ** -0.5)
            mask = torch.where(T._causal(n, q.device), 0.0, torch.finfo(q.dtype).min)
            p = torch.softmax(s.view(b, h, n, n) + mask, dim=-1).view(b * h, n, n)
            return torch.bmm(p, v.reshape(b * h, n, d)).view(b, h, n, d)

    import attnfuse  # noqa: F401
    from attnfuse.passes import alibi as AL
    from attnfuse.passes import batchaxes as BA

    if variant == "before":
        AL.prove = lambda *a, **k: (None, None)
        AL.bound = lambda *a, **k: None
        BA.split_frame = lambda *a, **k: None
    T.H, T.D = heads, dim
    mod = {"bloom": _BloomHF, "mpt": T.MptStyle, "falcon": T.FalconStyle, "falcon-pad": T.FalconStyle,
           "bloom-pad": T.BloomPadded}[model]()
    if model == "bloom":
        mod.slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads)
    g = torch.Generator().manual_seed(0)
    batch = 2 if model in PADDED else 1
    q, k, v = (torch.randn(batch, heads, length, dim, generator=g) for _ in range(3))
    extra = ()
    if model in ("falcon",) + PADDED:
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[:1, :length // 8] = 0 if model in PADDED else 1   # item 0 left-padded
        extra = (mask,)
    torch.set_num_threads(2)
    compiled = torch.compile(mod, backend="attnfuse", options={"inner": "aot_eager", "strict": True})
    base = _rss_kib()
    with torch.no_grad():
        compiled(q, k, v, *extra)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            compiled(q, k, v, *extra)
            times.append(time.perf_counter() - t0)
    rep = attnfuse.last_report()
    f = rep.fusions[0] if rep and rep.fusions else None
    return {"model": model, "variant": variant, "L": length, "B": batch, "peak_mib": (peak - base) / 1024,
            "time_s": min(times), "fused": bool(f), "bias": f.bias if f else "-",
            "structure": f.structure if f else "-"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "alibi_memory.txt"))
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "VARIANT", "L"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        m, var, n = args.child
        print(json.dumps(_child(m, var, int(n), args.heads, args.dim)))
        return 0
    models = [m for m in args.models.split(",") if m]
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        for m in models:
            for var in ("before", "after"):
                cmd = [sys.executable, os.path.abspath(__file__), "--heads", str(args.heads), "--dim",
                       str(args.dim), "--child", m, var, str(n)]
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                line = [x for x in r.stdout.splitlines() if x.startswith("{")]
                if r.returncode or not line:
                    rows.append({"model": m, "variant": var, "L": n, "error": r.stderr.strip()[-300:]})
                else:
                    rows.append(json.loads(line[-1]))
                print(rows[-1], flush=True)
    out = [f"ALiBi attention layer, batch 1 (falcon-pad, bloom-pad: batch 2, item 0's first L/8 keys padded), "
           f"{args.heads} heads, head dim {args.dim}, float32, CPU, inference "
           f"(torch {__import__('torch').__version__}); shared 2-core machine: times inflated",
           f"{'model':<10} {'L':>5} {'before MiB':>10} {'after MiB':>9} {'mem ratio':>9} {'before s':>8} "
           f"{'after s':>7} {'time ratio':>10}  after: structure / bias"]
    by = {(r["model"], r["variant"], r["L"]): r for r in rows}
    for n in sorted({r["L"] for r in rows}):
        for m in models:
            b, a = by.get((m, "before", n), {}), by.get((m, "after", n), {})
            if "peak_mib" not in b or "peak_mib" not in a:
                out.append(f"{m:<10} {n:>5}  error: {b.get('error', '')} {a.get('error', '')}")
                continue
            out.append(f"{m:<10} {n:>5} {b['peak_mib']:>10.1f} {a['peak_mib']:>9.1f} "
                       f"{a['peak_mib'] / max(b['peak_mib'], 1e-9):>9.3f} {b['time_s']:>8.2f} "
                       f"{a['time_s']:>7.2f} {a['time_s'] / b['time_s']:>10.2f}  {a['structure']} / "
                       f"{a['bias']} (before: {b['bias']})")
    text = "\n".join(out)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
