"""One cold ``torch.compile`` in a fresh process, for ``compile_overhead.py --cold``.

    python benchmarks/cold_compile_child.py VARIANT --layers 2 [--train] [--model tinygpt|gpt2|llama|bert|vit]

Prints one JSON line: seconds for ``import torch``, ``import attnfuse``, the first call of
the compiled model (the whole cold compile: dynamo, the backend, Inductor, first run) and
where the backend's share of it went (timers wrapped around its functions). Variants:

- ``inductor``: ``torch.compile(model)``;
- ``attnfuse``: ``torch.compile(model, backend="attnfuse")`` (inner Inductor, defaults);
- ``attnfuse-noinline``: the same with ``cpu_inline=False``;
- ``attnfuse-inlineall``: the same with ``cpu_inline="all"`` (plain calls inlined too: the
  default before the compile-cost policy of issue 19);
- ``attnfuse-noguard``: the same without the Inductor attention-pattern guard's config
  patches (a diagnostic: never a configuration to use, the guard is what keeps Inductor's
  unsound patterns off).

Models: ``tinygpt`` (attnfuse's demo TinyGPT, ``--seq`` tokens, n_embd 64, 4 heads) or one of
``benchmarks/e2e.py``'s Hugging Face models (``gpt2``, ``llama``, ``bert``, ``vit``: hidden 256,
4 heads, ``--layers`` layers, eager attention, dropout 0) at ``--seq`` tokens (ViT: the nearest
square patch count plus the class token), static shapes, batch 1, fp32 (``--dtype bf16``:
the e2e models in bf16).

The caller gives each child a fresh ``TORCHINDUCTOR_CACHE_DIR`` and turns the FX-graph and
AOT-autograd caches off, so each compile is cold, and ``TORCHINDUCTOR_COMPILE_THREADS=1``, so
that Inductor compiles its kernels in this process and the first call's CPU time
(``first_call_cpu_s``: this process and its finished children, the C++ compiler runs; less
sensitive than wall time to other load on a shared machine) counts all of the compile's work.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

T0 = time.perf_counter()
import torch  # noqa: E402

T_TORCH = time.perf_counter() - T0
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

TIMERS: dict = {}


def timed(owner, name: str, key: str) -> None:
    """Wrap ``owner.name`` so that the seconds spent in it add up in ``TIMERS[key]`` (wall) and
    ``TIMERS[key + "_cpu"]`` (this process's CPU time: less sensitive to other load)."""
    fn = getattr(owner, name)
    depth = [0]   # compile_fx calls itself: count the outermost call only

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        depth[0] += 1
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            depth[0] -= 1
            if not depth[0]:
                TIMERS[key] = TIMERS.get(key, 0.0) + time.perf_counter() - start
                TIMERS[key + "_cpu"] = TIMERS.get(key + "_cpu", 0.0) + time.process_time() - cpu
    setattr(owner, name, wrapper)


def cpu_s(children_only: bool = False) -> float:
    """CPU seconds of this process and of its finished children (the C++ compiler runs), or
    of the children alone."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (0.0 if children_only else own.ru_utime + own.ru_stime) + kids.ru_utime + kids.ru_stime


def cpp_kernels() -> dict:
    """The C++ kernels Inductor generated in this process (read back from the fresh
    ``TORCHINDUCTOR_CACHE_DIR`` the caller gave: the output-code modules name each kernel
    they compile) and how many shared objects it compiled (one per distinct kernel source:
    identical kernels of different layers are compiled once)."""
    import re

    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    names, shared = [], 0
    for folder, _, files in os.walk(root or "/nonexistent"):
        for f in files:
            path = os.path.join(folder, f)
            if f.endswith(".so"):
                shared += 1
            elif f.endswith(".py"):
                with open(path, errors="replace") as fh:
                    names += re.findall(r"^(cpp_\w+) = async_compile\.cpp", fh.read(), re.M)
    return {"kernels": sorted(names), "shared_objects": shared}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=("inductor", "attnfuse", "attnfuse-noinline", "attnfuse-inlineall",
                                        "attnfuse-noguard"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--model", default="tinygpt", choices=("tinygpt", "gpt2", "llama", "bert", "vit"))
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                    help="the e2e models' weights and inputs (TinyGPT: fp32 only)")
    ap.add_argument("--assume-native-bf16", action="store_true",
                    help="choose as on a CPU with native bf16 matrix products (kernels/base.py "
                         "NATIVE_BF16_GEMM), to see what compiles there on a CPU without them: the "
                         "kernel list is that CPU's, the times are not (its bf16 GEMMs are emulated)")
    ap.add_argument("--kernels", action="store_true",
                    help="also list the C++ kernels generated (read from TORCHINDUCTOR_CACHE_DIR)")
    args = ap.parse_args()

    start = time.perf_counter()
    import attnfuse  # noqa: F401  (torch's autoload imports only attnfuse._autoload)
    from attnfuse import backend
    from attnfuse.demo import TinyGPT
    t_attnfuse = time.perf_counter() - start
    if args.assume_native_bf16:
        from attnfuse.kernels import base
        base.NATIVE_BF16_GEMM = True

    import torch._inductor.compile_fx as compile_fx_module
    timed(compile_fx_module, "compile_fx", "inductor_s")
    if args.variant.startswith("attnfuse"):
        timed(backend, "_prepare", "rewrite_s")          # the pass, its report context, the CPU inlining
        timed(backend, "_publish", "report_s")           # last_report, logging, the warn_unfused check
        timed(backend, "_witnessed", "witness_s")
        if args.variant == "attnfuse-noguard":
            from attnfuse import inductor_guard
            inductor_guard.config_patches = lambda: {}
    options = {"attnfuse-noinline": {"cpu_inline": False},
               "attnfuse-inlineall": {"cpu_inline": "all"}}.get(args.variant, {})

    torch.manual_seed(0)
    if args.model == "tinygpt":
        model = TinyGPT(n_layer=args.layers, n_embd=64, n_head=4, block_size=args.seq).train(args.train)
        inputs = (torch.randint(0, 512, (1, args.seq), generator=torch.Generator().manual_seed(0)),)
    else:   # e2e.py's model zoo (imports transformers: outside the timed first call)
        sys.path.insert(0, HERE)
        import e2e

        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model, _ = e2e.build_model(args.model, args.layers, args.train)
        model = model.to(dtype)
        inputs, _ = e2e.make_inputs(args.model, None, args.seq, dtype)
    compiled = (torch.compile(model) if args.variant == "inductor"
                else torch.compile(model, backend="attnfuse", options=options))
    start, cpu, kids = time.perf_counter(), cpu_s(), cpu_s(children_only=True)
    with torch.set_grad_enabled(args.train):
        out = compiled(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        if args.train:
            out.sum().backward()
    first_call, first_call_cpu = time.perf_counter() - start, cpu_s() - cpu
    first_call_children = cpu_s(children_only=True) - kids
    report = backend.last_report() if args.variant.startswith("attnfuse") else None
    inlined = report.inlined if report is not None else None
    from torch._dynamo.utils import counters
    print(json.dumps({"variant": args.variant, "model": args.model, "dtype": args.dtype, "train": args.train,
                      "assume_native_bf16": args.assume_native_bf16,
                      "import_torch_s": T_TORCH,
                      "import_attnfuse_s": t_attnfuse, "first_call_s": first_call, "first_call_cpu_s": first_call_cpu,
                      "first_call_children_cpu_s": first_call_children,
                      "fused": len(report.fusions) if report is not None else None, "inlined": inlined,
                      "frames_compiled": int(counters["stats"]["unique_graphs"]),
                      **(cpp_kernels() if args.kernels else {}), **TIMERS}))


if __name__ == "__main__":
    main()
