"""``attnfuse demo``: a built-in GPT-style model, fused and measured on CPU.

Builds a small nanoGPT-style decoder (causal mask from a registered ``tril``
buffer, as nanoGPT writes it), compiles it with
``torch.compile(model, backend="attnfuse")`` (inner compiler "eager" by default, so
the comparison isolates the attention fusion and no C++ compiler is needed), prints
the report of what was fused, then compares eager and attnfuse latency and peak
memory at a long sequence. Progress goes to stderr, results to stdout.
"""
from __future__ import annotations

import itertools
import math
import sys
import threading
import time
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """A nanoGPT-shaped decoder: embeddings, ``n_layer`` blocks, LM head."""

    def __init__(self, vocab: int = 512, n_layer: int = 2, n_embd: int = 256, n_head: int = 4,
                 block_size: int = 4096):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, block_size) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _peak_rss_during(fn: Callable[[], object]) -> tuple[float, int]:
    """(seconds, peak resident bytes above the start) of one call of ``fn``.

    Linux only: writing 5 to /proc/self/clear_refs resets the VmHWM high-water mark.
    """
    def rss(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        return 0

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss("VmRSS:")
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, rss("VmHWM:") - base


class _Progress:
    """A progress indicator on stderr: a spinner with elapsed time on a terminal, plain lines otherwise."""

    def __init__(self, msg: str):
        self.msg = msg
        self.tty = sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _spin(self) -> None:
        for ch in itertools.cycle("|/-\\"):
            if self._stop.wait(0.1):
                break
            sys.stderr.write(f"\r  {ch} {self.msg} ({time.perf_counter() - self.start:.1f}s)")
            sys.stderr.flush()

    def __enter__(self) -> "_Progress":
        self.start = time.perf_counter()
        if self.tty:
            self._thread = threading.Thread(target=self._spin, daemon=True)
            self._thread.start()
        else:
            print(f"  ... {self.msg}", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        took = time.perf_counter() - self.start
        print(f"{chr(13) if self.tty else ''}  done: {self.msg} ({took:.1f}s)" + (" " * 8 if self.tty else ""),
              file=sys.stderr, flush=True)


def run_demo(seq_len: int = 2048, n_layer: int = 2, repeats: int = 3, inner: str = "eager") -> int:
    """Compile TinyGPT with ``backend="attnfuse"``, print the report, then time eager vs attnfuse."""
    import attnfuse
    from attnfuse import reporting

    torch.manual_seed(0)
    model = TinyGPT(n_layer=n_layer, block_size=max(seq_len, 64)).eval()
    idx = torch.randint(0, 512, (1, seq_len))
    compiled = torch.compile(model, backend="attnfuse", options={"inner": inner})

    with torch.no_grad():
        with _Progress(f"compiling a {n_layer}-layer GPT-style model with backend='attnfuse' "
                       f"(inner={inner}) at sequence length {seq_len}"):
            out = compiled(idx)
        report = attnfuse.last_report()
        print(reporting.to_text(report) if report is not None else "attnfuse: no graph was compiled")
        with _Progress(f"running eager at sequence length {seq_len} to check the outputs"):
            ref = model(idx)
        err = (out - ref).abs().max().item()
        print(f"\nmax |attnfuse - eager| = {err:.2e}")
        rows = []
        for name, fn in (("eager", lambda: model(idx)), ("attnfuse", lambda: compiled(idx))):
            with _Progress(f"timing {name} ({repeats} runs)"):
                fn()
                runs = [_peak_rss_during(fn) for _ in range(repeats)]
            rows.append((name, min(t for t, _ in runs), max(m for _, m in runs)))
    (_, t_eager, m_eager), (_, t_fused, m_fused) = rows
    print(f"\nCPU, batch 1, sequence {seq_len}, {n_layer} layers, fp32 (best of {repeats}):")
    print(f"{'':10}{'time (s)':>10}{'peak extra RSS (MiB)':>24}")
    for name, t, m in rows:
        print(f"{name:10}{t:10.3f}{m / 2**20:24.1f}")
    # RSS is sampled in pages the allocator maps anew; below 1 MiB the fused run reused
    # memory it already had, and a ratio would be meaningless.
    if m_fused >= 2**20:
        mem = f"peak memory ratio eager/attnfuse {m_eager / m_fused:.2f}x"
    else:
        mem = f"attnfuse peak below 1 MiB of new memory (eager {m_eager / 2**20:.1f} MiB)"
    print(f"speed-up {t_eager / t_fused:.2f}x, {mem}")
    return 0 if err < 1e-3 else 1
