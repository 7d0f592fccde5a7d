"""One command for the first machine with a GPU: correctness and speed of the Triton path.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.md] [--budget-s 420]

Needs only the project installed (``pip install --no-deps --no-build-isolation -e .``
on a machine with its own torch and triton): no downloads, no test files.  Prints a
markdown report:

1. **Correctness** of ``attnfuse.flash_attention(impl="triton")`` forward and backward
   against PyTorch's SDPA: each case is also run through SDPA in its own dtype, and both
   are compared with an fp32 SDPA (math) reference on the same inputs; a case passes
   when our max error is within ``2 × SDPA's own + 2 ulp`` of the dtype (forward output
   and each gradient).  Cases: fp16/bf16; head dims 64, 128 and 72 (odd: masked loads);
   causal and not; GQA; a float bias with its gradient; window; key_mask; decode
   (Lq = 1 and 16 against a long KV cache).  Dropout is checked by its statistics (keep
   rate and the unbiased mean, with v = 1) and by its gradients against the reference
   given the keep-mask the kernel used (read back with v = identity).
2. **Speed**: forward and forward+backward TFLOP/s of ours and of SDPA's flash backend
   at 1k–16k tokens per sequence with the tokens per batch held constant (16k), head dims
   64 and 128, causal and not.
3. **Decode latency** (µs) of ours and SDPA (efficient or flash backend, whichever runs)
   for one new token against 4k–64k cached keys, GQA.

Each section stops once its share of the time budget (``--budget-s``, default 420 s:
correctness until 50 %, dropout until 55 %, speed until 85 %, decode until 100 %) is
spent, so the whole stays within 8 minutes on an H100 including Triton's compiles and
autotuning (a row that has started finishes); the rows left out are listed.  Without a CUDA GPU it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

NO_GPU_LINE = "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to check."


# --------------------------------------------------------------------------------------
# Table code (no GPU needed: tests/test_gpu_check.py runs it on CPU)
# --------------------------------------------------------------------------------------

def markdown_table(header: list, rows: list) -> str:
    """A markdown table; floats with 3 significant digits, None as an empty cell."""
    def cell(x):
        if x is None:
            return ""
        if isinstance(x, float):
            if math.isnan(x):
                return "nan"
            return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.0f}"
        return str(x)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23}


def verdict(ours: float, sdpa: float, dtype: torch.dtype, scale: float = 1.0) -> bool:
    """Our error passes when within twice SDPA's own error plus two ulp of the dtype at
    the magnitude ``scale`` of the reference values."""
    return bool(ours <= 2.0 * sdpa + 2.0 * ULP[dtype] * max(scale, 1.0))


def dropout_stats(ones_out: torch.Tensor, p: float, n_keys: int) -> tuple:
    """(mean, expected std of the mean, row std, expected row std) of the outputs of
    uniform attention over ``n_keys`` keys with v = 1 and dropout ``p``: each row is
    (1/n)·Σ keep_j/(1-p), mean 1, variance p / ((1-p)·n)."""
    x = ones_out.float().flatten()
    row_sd = math.sqrt(p / ((1 - p) * n_keys))
    return (x.mean().item(), row_sd / math.sqrt(x.numel()), x.std().item(), row_sd)


def dropout_ok(mean: float, sd_mean: float, row_sd: float, want_row_sd: float) -> bool:
    return abs(mean - 1.0) <= 6 * sd_mean + 1e-3 and abs(row_sd / want_row_sd - 1) <= 0.1


def attention_flops(b: int, h: int, lq: int, lk: int, d: int, causal: bool,
                    backward: bool = False) -> float:
    """FLOPs of the forward (two matmuls: 4·B·H·Lq·Lk·D) or of forward+backward (the
    backward counted as 2.5 × the forward, as FlashAttention's benchmark counts it);
    causal halves them."""
    f = 4.0 * b * h * lq * lk * d
    if causal:
        f /= 2
    return f * (3.5 if backward else 1.0)


@dataclass
class Budget:
    seconds: float
    start: float = field(default_factory=time.perf_counter)
    skipped: list = field(default_factory=list)

    def take(self, name: str, until: float = 1.0) -> bool:
        """True while less than the fraction ``until`` of the budget is spent (each
        section has its share, so a slow one cannot starve the next); else records
        ``name`` as skipped."""
        if time.perf_counter() - self.start < until * self.seconds:
            return True
        self.skipped.append(name)
        return False


# --------------------------------------------------------------------------------------
# References (SDPA)
# --------------------------------------------------------------------------------------

def _dense_mask(lq, lk, causal, window, key_mask, device):
    """Bool (B|1, 1, Lq, Lk) mask, True = visible, or None."""
    if causal == "none" and key_mask is None:
        return None
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal != "none":
        off = lk - lq if causal == "bottom_right" else 0
        keep = j <= i + off
        if window:
            keep &= j > i + off - window
    keep = keep[None, None]
    if key_mask is not None:
        keep = keep & key_mask[:, None, None, :]
    return keep


def sdpa(q, k, v, bias=None, *, scale, causal="none", window=0, key_mask=None,
         dropout_mask=None, dropout_p=0.0):
    """Our semantics through PyTorch's SDPA (GQA by repeating k/v; masks as an additive
    float mask), in the inputs' dtype.  With ``dropout_mask`` the math is spelled out
    (SDPA draws its own mask)."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    keep = _dense_mask(q.shape[2], k.shape[2], causal, window, key_mask, q.device)
    mask = bias
    if keep is not None:
        neg = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        mask = neg if mask is None else mask + neg
    if dropout_mask is not None:
        s = (q @ k.transpose(-1, -2)) * scale
        if mask is not None:
            s = s + mask
        p = torch.softmax(s.float(), -1).to(q.dtype)
        return (p * dropout_mask / (1 - dropout_p)) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _errors(got, ref):
    return (got.float() - ref.float()).abs().max().item()


# --------------------------------------------------------------------------------------
# 1. Correctness
# --------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    dtype: torch.dtype
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int
    causal: str = "none"
    bias: bool = False
    window: int = 0
    key_mask: bool = False
    backward: bool = True


def correctness_cases() -> list:
    cases = []
    for dt in (torch.float16, torch.bfloat16):
        n = "fp16" if dt == torch.float16 else "bf16"
        for d in (64, 128, 72):
            for causal in ("none", "top_left"):
                cases.append(Case(f"{n} d{d} {causal}", dt, 2, 4, 4, 1000, 1000, d, causal))
        cases += [
            Case(f"{n} d128 GQA 8/2 causal", dt, 2, 8, 2, 777, 777, 128, "top_left"),
            Case(f"{n} d64 bias+grad", dt, 2, 4, 4, 512, 640, 64, bias=True),
            Case(f"{n} d64 window 128", dt, 2, 4, 4, 1024, 1024, 64, "top_left", window=128),
            Case(f"{n} d128 key_mask", dt, 2, 4, 4, 600, 600, 128, key_mask=True),
            Case(f"{n} d128 bottom_right 300/900", dt, 2, 4, 4, 300, 900, 128, "bottom_right"),
            Case(f"{n} decode d128 Lq=1 GQA", dt, 4, 32, 8, 1, 4100, 128, "bottom_right",
                 backward=False),
            Case(f"{n} decode d64 Lq=16 key_mask", dt, 2, 8, 8, 16, 3000, 64, "bottom_right",
                 key_mask=True, backward=False),
        ]
    return cases


def run_case(c: Case, attnfuse, *, device: str = "cuda", impl: str = "triton") -> list:
    """Rows (case, quantity, ours err, SDPA err, ok) for one case (``device`` and
    ``impl`` let the CPU test run the same code)."""
    dev = device
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=torch.float32, generator=g)
    q, k, v = mk(c.b, c.hq, c.lq, c.d), mk(c.b, c.hkv, c.lk, c.d), mk(c.b, c.hkv, c.lk, c.d)
    bias = mk(c.b, 1, c.lq, c.lk) if c.bias else None
    key_mask = None
    if c.key_mask:
        lens = torch.randint(c.lk // 2, c.lk + 1, (c.b,), device=dev, generator=g)
        key_mask = torch.arange(c.lk, device=dev)[None] < lens[:, None]
    scale = c.d ** -0.5
    kw = dict(scale=scale, causal=c.causal, window=c.window, key_mask=key_mask)
    leaves = [q, k, v] + ([bias] if bias is not None else [])
    names = ["dq", "dk", "dv"] + (["dbias"] if bias is not None else [])

    def run(fn, dtype):
        xs = [t.detach().to(dtype).requires_grad_(c.backward) for t in leaves]
        out = fn(*xs[:3], xs[3] if bias is not None else None)
        grads = []
        if c.backward:
            dout = torch.randn(out.shape, device=dev, generator=torch.Generator(device=dev)
                               .manual_seed(1)).to(out.dtype)
            grads = torch.autograd.grad(out, xs, dout)
        return out, grads

    ours = lambda q_, k_, v_, b_: attnfuse.flash_attention(q_, k_, v_, b_, impl=impl, **kw)
    theirs = lambda q_, k_, v_, b_: sdpa(q_, k_, v_, b_, **kw)
    o_ref, g_ref = run(theirs, torch.float32)
    o_sd, g_sd = run(theirs, c.dtype)
    o_us, g_us = run(ours, c.dtype)
    rows = []
    valid = torch.ones_like(o_ref, dtype=torch.bool)
    if key_mask is not None or c.causal == "bottom_right":  # rows seeing no key: ours 0, SDPA nan
        valid = torch.isfinite(o_ref)
    for name, a, s_, r in [("out", o_us, o_sd, o_ref)] + list(zip(names, g_us, g_sd, g_ref)):
        vmask = valid if name == "out" or name == "dq" else torch.ones_like(r, dtype=torch.bool)
        a, s_, r = (x.float().nan_to_num(0.0) * vmask for x in (a, s_, r))
        e_us, e_sd = _errors(a, r), _errors(s_, r)
        mag = r.abs().max().item()
        rows.append((c.name, name, e_us, e_sd, "ok" if verdict(e_us, e_sd, c.dtype, mag) else "FAIL"))
    return rows


def dropout_rows(attnfuse, dtype) -> list:
    """Keep rate / unbiased mean (v = 1), then gradients given the kernel's own mask."""
    dev, p, n = "cuda", 0.2, 2048
    q = torch.zeros(4, 8, 256, 64, device=dev, dtype=dtype)
    k = torch.randn(4, 8, n, 64, device=dev, dtype=dtype)
    v = torch.ones(4, 8, n, 64, device=dev, dtype=dtype)
    out = attnfuse.flash_attention(q, k, v, dropout_p=p, impl="triton")
    mean, sd_mean, row_sd, want = dropout_stats(out[..., 0], p, n)
    name = f"{'fp16' if dtype == torch.float16 else 'bf16'} dropout p=0.2"
    rows = [(name, "mean (want 1)", mean, None, "ok" if dropout_ok(mean, sd_mean, row_sd, want)
             else "FAIL"), (name, f"row std (want {want:.3g})", row_sd, None, "")]
    # gradients: v = identity (Lk <= Dv) reveals p·keep/(1-p); rerun with the same seed
    lk, d = 64, 64
    g = torch.Generator(device=dev).manual_seed(3)
    q = torch.randn(2, 4, 100, d, device=dev, generator=g).to(dtype).requires_grad_()
    k = torch.randn(2, 4, lk, d, device=dev, generator=g).to(dtype).requires_grad_()
    eye = torch.eye(lk, d, device=dev, dtype=dtype).expand(2, 4, lk, d).contiguous()
    torch.manual_seed(11)
    probe = attnfuse.flash_attention(q, k, eye, dropout_p=p, impl="triton", scale=0.125)
    keep = probe.detach() != 0
    vr = torch.randn(2, 4, lk, d, device=dev, generator=g).to(dtype).requires_grad_()
    torch.manual_seed(11)
    out = attnfuse.flash_attention(q, k, vr, dropout_p=p, impl="triton", scale=0.125)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, vr), dout)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, vr)]
    ref = sdpa(*leaves, scale=0.125, dropout_mask=keep[..., :lk].float(), dropout_p=p)
    want_g = torch.autograd.grad(ref, leaves, dout.float())
    for nm, a, r in zip(("dq", "dk", "dv"), got, want_g):
        e = _errors(a, r)
        tol = 8 * ULP[dtype] * max(r.abs().max().item(), 1.0)
        rows.append((name, nm + " (kernel's mask)", e, None, "ok" if e <= tol else "FAIL"))
    return rows


# --------------------------------------------------------------------------------------
# 2. Speed
# --------------------------------------------------------------------------------------

def cuda_time_ms(fn: Callable, *, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event-timed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def _flash_backend():
    """A context manager running SDPA with its flash backend only (torch >= 2.3)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def speed_rows(attnfuse, budget: Budget, tokens: int = 16384) -> list:
    rows = []
    for dtype, d in ((torch.bfloat16, 128), (torch.float16, 64)):
        h = 2048 // d
        for causal in (False, True):
            for L in (1024, 2048, 4096, 8192, 16384):
                name = f"{str(dtype)[6:]} d{d} L={L} {'causal' if causal else 'full'}"
                if not budget.take(name, 0.85):
                    continue
                b = max(1, tokens // L)
                q, k, v = (torch.randn(b, h, L, d, device="cuda", dtype=dtype, requires_grad=True)
                           for _ in range(3))
                dout = torch.randn(b, h, L, d, device="cuda", dtype=dtype)
                cz = "top_left" if causal else "none"
                ours = lambda: attnfuse.flash_attention(q, k, v, causal=cz, impl="triton")
                def theirs():
                    with _flash_backend():
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                res = []
                for fn in (ours, theirs):
                    try:
                        f_ms = cuda_time_ms(lambda: fn())
                        fb_ms = cuda_time_ms(lambda: torch.autograd.grad(fn(), (q, k, v), dout))
                        res += [attention_flops(b, h, L, L, d, causal) / f_ms / 1e9,
                                attention_flops(b, h, L, L, d, causal, True) / fb_ms / 1e9]
                    except Exception as e:   # e.g. no flash backend on this GPU / dtype
                        print(f"  {name}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                        res += [float("nan"), float("nan")]
                rows.append((name, b, *res, res[0] / res[2] if res[2] == res[2] else None,
                             res[1] / res[3] if res[3] == res[3] else None))
    return rows


def decode_rows(attnfuse, budget: Budget) -> list:
    rows = []
    dtype, hq, hkv, d, b = torch.bfloat16, 32, 8, 128, 8
    for lk in (4096, 16384, 65536):
        name = f"bf16 B={b} Hq={hq} Hkv={hkv} d={d} Lk={lk}"
        if not budget.take(name):
            continue
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=dtype)
        k = torch.randn(b, hkv, lk, d, device="cuda", dtype=dtype)
        v = torch.randn(b, hkv, lk, d, device="cuda", dtype=dtype)
        ours = cuda_time_ms(lambda: attnfuse.flash_attention(q, k, v, impl="triton"), reps=20) * 1e3
        kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        theirs = cuda_time_ms(lambda: F.scaled_dot_product_attention(q, kr, vr), reps=20) * 1e3
        rows.append((name, ours, theirs, theirs / ours))
    return rows


# --------------------------------------------------------------------------------------

def report(attnfuse, budget: Budget) -> tuple[str, int]:
    """(markdown, number of failing correctness rows)."""
    import triton

    p = torch.cuda.get_device_properties(0)
    parts = [f"# attnfuse gpu_check\n\n{p.name} (sm_{p.major}{p.minor}), torch {torch.__version__}, "
             f"triton {triton.__version__}\n"]
    rows = []
    for c in correctness_cases():
        if not budget.take(c.name, 0.5):
            continue
        try:
            rows += run_case(c, attnfuse)
        except Exception as e:
            rows.append((c.name, "run", None, None, f"FAIL {type(e).__name__}: {str(e)[:150]}"))
    for dt in (torch.float16, torch.bfloat16):
        if budget.take(f"dropout {dt}", 0.55):
            try:
                rows += dropout_rows(attnfuse, dt)
            except Exception as e:
                rows.append((f"dropout {dt}", "run", None, None, f"FAIL {type(e).__name__}: {e}"))
    failing = sum(1 for r in rows if str(r[4]).startswith("FAIL"))
    parts += ["## Correctness (max abs error against fp32 SDPA math)\n",
              markdown_table(["case", "quantity", "ours", "SDPA same dtype", "check"], rows),
              f"\n{len(rows)} rows, {failing} failing\n"]
    parts += ["## Speed (TFLOP/s, 16k tokens per batch)\n",
              markdown_table(["shape", "batch", "ours fwd", "ours fwd+bwd", "SDPA flash fwd",
                              "SDPA flash fwd+bwd", "fwd ratio", "fwd+bwd ratio"],
                             speed_rows(attnfuse, budget))]
    parts += ["\n## Decode latency (µs, Lq = 1)\n",
              markdown_table(["shape", "ours", "SDPA", "SDPA / ours"], decode_rows(attnfuse, budget))]
    if budget.skipped:
        parts.append(f"\nSkipped (time budget spent): {', '.join(budget.skipped)}")
    parts.append(f"\nTotal {time.perf_counter() - budget.start:.0f} s")
    return "\n".join(parts), failing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--budget-s", type=float, default=420.0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_GPU_LINE)
        return 0
    import attnfuse

    text, failing = report(attnfuse, Budget(args.budget_s))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
