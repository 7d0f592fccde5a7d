"""Context parallelism on CPU: per-rank peak memory and step time against sequence length.

One training step (forward + backward) of causal GQA attention, B=1, Hq=8, Hkv=2, D=64,
fp32: on one process (:func:`attnfuse.flash_attention` over the whole sequence) and on two
gloo ranks (:func:`attnfuse.distributed.context_parallel_attention`, load balanced, once
with ``strategy="ring"`` and once with ``strategy="allgather"``), each rank holding half
the sequence. Each (world size, length) runs in fresh processes. Peak
memory is the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) over its resident set just before the first step, the inputs
already allocated, after one step at length 64 that pays the one-time costs (lazy imports,
thread pools, gloo buffers): the allocator then holds little freed memory, so the rise is
mostly what the step itself needed (glibc's mmap threshold is pinned at 64 KiB,
``MALLOC_MMAP_THRESHOLD_``, set here for every process, so that freed large tensors leave
the resident set at once instead of staying in the heap, where the peak would count them
again); time is the median of ``--reps`` steps after it. On a
shared 2-core machine the two ranks share the cores: their times measure contention, not
the speed-up of two machines; the memory column is the point.

    python benchmarks/context_parallel.py [--lengths 2048 4096 8192] [--reps 1] [--out benchmarks/results/context_parallel.txt]
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

B, HQ, HKV, D = 1, 8, 2, 64


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _measure(step, reps: int):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = _kib("VmRSS")
    step()  # the first step: its memory rise; also the warm-up
    peak_mib = (_kib("VmHWM") - before) / 1024
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times), peak_mib


def _inputs(length: int, world: int, rank: int):
    from attnfuse.distributed import shard_sequence

    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, length, D, generator=g)
    k, v = (torch.randn(B, HKV, length, D, generator=g) for _ in range(2))
    if world > 1:
        q, k, v = (shard_sequence(t, 2, rank, world) for t in (q, k, v))
    return [t.contiguous().requires_grad_() for t in (q, k, v)]


def _rank(rank: int, world: int, strategy: str, port: int, length: int, reps: int,
          out_dir: str) -> None:
    """One process of one configuration: world 1 runs the op on the whole sequence."""
    import attnfuse
    from attnfuse.distributed import context_parallel_attention

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
    def stepper(q, k, v):
        def step():
            if world > 1:
                out = context_parallel_attention(q, k, v, causal=True, strategy=strategy)
            else:
                out = attnfuse.flash_attention(q, k, v, causal=True)
            out.sum().backward()
            for t in (q, k, v):
                t.grad = None
        return step
    stepper(*_inputs(64, world, rank))()  # one-time costs (lazy imports, thread pools, gloo)
    t, mem = _measure(stepper(*_inputs(length, world, rank)), reps)
    with open(os.path.join(out_dir, f"w{world}_{strategy}_l{length}_r{rank}.tsv"), "w") as f:
        f.write(f"{world}\t{strategy}\t{rank}\t{length}\t{t * 1e3:.1f}\t{mem:.1f}")
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    # read by glibc at process start: the spawned ranks inherit it (see the docstring)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world, strategy in ((1, "-"), (2, "ring"), (2, "allgather")):
            for length in args.lengths:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                mp.spawn(_rank, args=(world, strategy, port, length, args.reps, tmp), nprocs=world,
                         join=True)
                for r in range(world):
                    with open(os.path.join(tmp, f"w{world}_{strategy}_l{length}_r{r}.tsv")) as f:
                        rows.append(f.read().strip())
    header = (f"# torch {torch.__version__}; causal GQA attention fwd+bwd, B={B} Hq={HQ} Hkv={HKV} D={D} fp32, "
              "1 torch thread per process, gloo, MALLOC_MMAP_THRESHOLD_="
              f"{os.environ['MALLOC_MMAP_THRESHOLD_']}; shared 2-core machine (other jobs running)\n"
              "world\tstrategy\trank\tseq_len\tstep_ms\tpeak_rss_rise_MiB")
    text = header + "\n" + "\n".join(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
