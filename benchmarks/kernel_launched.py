"""The Triton kernels as they are launched, compiled offline for sm_80 and sm_90.

    env -u TRITON_INTERPRET .venv/bin/python benchmarks/kernel_launched.py [--jobs N]
                       [--scenarios a,b] [--archs 80,90] [--out FILE]

Unlike ``kernel_resources.py`` (every config with hand-typed i32 arguments: a
conservative bound), this compiles what a GPU would run:

1. **Capture.** The real launcher (``triton_flash.forward`` / ``backward`` and
   ``triton_decode.decode_forward``) is called on fake CUDA tensors (PyTorch's
   ``FakeTensorMode``: shapes, strides, storage offsets, no memory, no GPU) of typical
   training and decode shapes (:data:`SCENARIOS`), with the autotuned kernels swapped for
   recorders that keep the kernel, its positional arguments, its keyword constexprs and
   its autotune config list instead of launching.
2. **Bind as the JIT does.** Each recorded launch, merged with one autotune config, goes
   through Triton's own binder (``runtime.jit.create_function_from_signature`` with the
   target's backend, then ``JITFunction._pack_args``): integers equal to 1 become
   constexprs, integers divisible by 16 and 16-byte-aligned pointers get
   ``tt.divisibility = 16``, exactly as at launch.  Pointers are stand-ins whose address
   is a 256-byte-aligned allocation base plus the tensor's storage offset (CUDA's caching
   allocator hands out blocks aligned to at least 512 B), so a q sliced from a fused QKV
   projection keeps its real alignment.
3. **Compile** with ``triton.compile`` for ``GPUTarget("cuda", 80|90, 32)`` and read:
   shared memory (``metadata.shared``); registers and spills from ``ptxas -v`` run on the
   PTX with the ptxas the backend itself uses (``backends.nvidia.compiler.get_ptxas``:
   triton 3.9 emits a PTX version older bundled binaries cannot read); pipelined loads
   (``cp.async`` or TMA ``cp.async.bulk.tensor`` in the PTX, i.e. the software pipeliner
   turned the main loop's loads asynchronous) and the MMA kind (``wgmma`` warp-group MMA
   vs ``mma.sync``) by counting instructions in the PTX.

Scenarios named ``fallback:*`` have strides that are not multiples of 16 (head dim 72,
q/k/v sliced from a fused QKV tensor at an address off a 16-byte boundary): launches that
are not ``triton_flash.aligned``, so the launcher gives them the heavy config lists
(``triton_flash._heavy``), reported apart; the table does not require pipelining there.
Exit status 1 if any launch spills, exceeds the shared-memory limit or fails to compile,
or an aligned launch has an unpipelined main loop (every kernel but the preprocess and
combine kernels, which have no dot loop).

Works with triton 3.8 and 3.9 (Triton's binder is used where it exists under either
name).  Do not set TRITON_INTERPRET: it needs the real compiler.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import inspect
import os
import re
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_launched.py: unset TRITON_INTERPRET (it needs the real compiler)")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnfuse.kernels import triton_decode as td
from attnfuse.kernels import triton_flash as tf

ARCHS = {80: ("A100", 166912), 90: ("H100", 232448)}
ALLOC_ALIGN = 256
# kernels without a dot main loop: nothing to pipeline
NO_MAIN_LOOP = {"attn_bwd_preprocess", "attn_decode_combine"}


# --------------------------------------------------------------------------------------
# 1. Capture
# --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    """One kernel launch as the launcher made it, before autotuning picks a config."""
    kernel: str                       # KERNEL_CONFIGS name, e.g. "attn_fwd"
    fn: Any                           # the JITFunction
    configs: list                     # autotune configs (one entry: a fixed launch)
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for an autotuned kernel: ``rec[grid](*args, **kw)`` records a Launch."""

    def __init__(self, name, fn, configs, sink):
        self.name, self.fn, self.configs, self.sink = name, fn, configs, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.name, self.fn, self.configs, args, kwargs))
        return launch


def _fixed_config(kwargs):
    """The single 'config' of a launch that is not autotuned (its warps in kwargs)."""
    meta = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    return [triton.Config({}, **meta)]


@contextlib.contextmanager
def recording(arch: int):
    """Swap every kernel the launchers call for a recorder, the device's compute
    capability for ``arch``; yields the list of Launches."""
    sink: list = []
    saved = (tf._tuned, tf._arch, td._tuned_split, td._attn_decode_combine)
    combine = td._attn_decode_combine

    def tuned(name, head_dim, dtype, heavy, arch):
        fn, configs = tf.KERNEL_CONFIGS[name]
        return _Recorder(name, fn, configs(head_dim, dtype, heavy, arch), sink)

    def tuned_split(head_dim, dtype, block_m):
        return _Recorder("attn_decode_split", td._attn_decode_split,
                         td.decode_split_configs(head_dim, dtype, block_m=block_m), sink)

    class _Combine:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                sink.append(Launch("attn_decode_combine", combine,
                                   _fixed_config(kwargs), args, kwargs))
            return launch

    tf._tuned, tf._arch = tuned, (lambda device: arch)
    td._tuned_split, td._attn_decode_combine = tuned_split, _Combine()
    try:
        yield sink
    finally:
        tf._tuned, tf._arch, td._tuned_split, td._attn_decode_combine = saved


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A call of the op's Triton path: shapes, dtype and options; ``backward`` adds the
    backward's launches; ``qkv_fused`` slices q, k, v from one (B, L, 3·H·D) tensor."""
    name: str
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    dtype: str = "fp16"
    causal: str = "none"
    bias: str = ""                    # "", "float" (B,1,Lq,Lk) or "float_grad"
    dropout_p: float = 0.0
    window: int = 0
    key_mask: bool = False
    backward: bool = True
    qkv_fused: bool = False
    alibi: bool = False               # (Hq,) float32 ALiBi slopes: the heavy lists
    sinks: bool = False               # (Hq,) float32 attention sinks
    offsets: bool = False             # (B,) int32 causal_offsets (a mask given as input)

    @property
    def fallback(self) -> bool:
        return self.name.startswith("fallback:")


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Typical training shapes (4k tokens per batch; Lq = Lk), decode shapes (a KV cache), and
# the unspecialised fallback.  Head dims 64 / 128 / 256 cover every config-table class.
SCENARIOS = [
    Scenario("train d64 fp16 causal", 2, 16, 16, 2048, 2048, 64, "fp16", "top_left"),
    Scenario("train d64 bf16", 2, 16, 16, 2048, 2048, 64, "bf16"),
    Scenario("train d128 fp16 causal gqa", 1, 32, 8, 4096, 4096, 128, "fp16", "top_left"),
    Scenario("train d128 bf16", 1, 16, 16, 4096, 4096, 128, "bf16"),
    Scenario("train d256 bf16 causal", 1, 8, 8, 4096, 4096, 256, "bf16", "top_left"),
    Scenario("train d64 fp32", 2, 8, 8, 1024, 1024, 64, "fp32"),
    Scenario("train d128 fp32 causal", 1, 8, 8, 1024, 1024, 128, "fp32", "top_left"),
    Scenario("heavy d64 fp16 bias+dropout", 2, 16, 16, 1024, 1024, 64, "fp16", "none",
             "float_grad", 0.1),
    Scenario("heavy d128 bf16 bias", 1, 16, 16, 2048, 2048, 128, "bf16", "top_left",
             "float_grad"),
    Scenario("masks d128 fp16 window+key_mask", 2, 16, 16, 2048, 2048, 128, "fp16",
             "top_left", window=512, key_mask=True),
    Scenario("alibi d128 bf16 causal", 1, 16, 16, 2048, 2048, 128, "bf16", "top_left",
             alibi=True),
    Scenario("sinks d128 fp16 causal window", 1, 16, 16, 2048, 2048, 128, "fp16", "top_left",
             window=512, sinks=True),
    Scenario("offsets d128 bf16 static-cache prefill", 2, 16, 16, 2048, 4096, 128, "bf16",
             bias="float", key_mask=True, offsets=True),
    # (decode with a key_mask, offsets or not, is not pipelined: the split kernel's in-loop
    # skip of key blocks with no visible key; see the README's known limitations)
    Scenario("offsets decode d128 fp16 lq16", 4, 16, 16, 16, 4096, 128, "fp16", bias="float",
             backward=False, offsets=True),
    Scenario("decode d128 bf16 gqa", 8, 32, 8, 1, 8192, 128, "bf16", "bottom_right",
             backward=False),
    Scenario("decode d64 fp16 lq16", 4, 16, 16, 16, 4096, 64, "fp16", "bottom_right",
             backward=False),
    Scenario("decode d256 bf16", 4, 8, 2, 1, 4096, 256, "bf16", "bottom_right",
             backward=False),
    Scenario("fallback: d72 fp16", 2, 12, 12, 1024, 1024, 72, "fp16", "top_left"),
    Scenario("fallback: d64 fp16 fused qkv", 2, 12, 12, 1024, 1024, 64, "fp16", "top_left",
             qkv_fused=True),
]


def _inputs(s: Scenario):
    dt = DTYPES[s.dtype]
    if s.qkv_fused:     # (B, L, 3, H, D) from one projection, then (B, H, L, D) views
        qkv = torch.empty(s.B, s.Lq, 3 * s.Hq * s.D + 4, device="cuda", dtype=dt)
        qkv = qkv[..., 4:].view(s.B, s.Lq, 3, s.Hq, s.D)   # an odd start, as after a slice
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q = torch.empty(s.B, s.Hq, s.Lq, s.D, device="cuda", dtype=dt)
        k = torch.empty(s.B, s.Hkv, s.Lk, s.D, device="cuda", dtype=dt)
        v = torch.empty(s.B, s.Hkv, s.Lk, s.D, device="cuda", dtype=dt)
    bias = (torch.empty(s.B, 1, s.Lq, s.Lk, device="cuda", dtype=dt)
            if s.bias else None)
    key_mask = (torch.ones(s.B, s.Lk, device="cuda", dtype=torch.bool)
                if s.key_mask else None)
    per_head = lambda on: torch.empty(s.Hq, device="cuda", dtype=torch.float32) if on else None
    offsets = torch.zeros(s.B, device="cuda", dtype=torch.int32) if s.offsets else None
    return q, k, v, bias, key_mask, per_head(s.alibi), per_head(s.sinks), offsets


def capture(s: Scenario, arch: int = 90) -> list:
    """The Launches of one forward (and backward) of scenario ``s`` on an sm_``arch``
    device, on fake CUDA tensors (no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), recording(arch) as sink, warnings.catch_warnings():
        # triton_flash.aligned reads data_ptr(): on a fake tensor, storage offset x
        # element size (an allocation base of 0), as _Pointer below; torch warns
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        q, k, v, bias, key_mask, slopes, sinks, offsets = _inputs(s)
        opts = dict(scale=s.D ** -0.5, causal=s.causal, dropout_p=s.dropout_p,
                    softcap=0.0, seed=1234, window=s.window, key_mask=key_mask,
                    alibi_slopes=slopes, sinks=sinks, causal_offsets=offsets)
        out, lse = tf.forward(q, k, v, bias, **opts)
        if s.backward:
            tf.backward(torch.empty_like(out), q, k, v, bias, out, lse,
                        need_dbias=s.bias == "float_grad", **opts)
    return sink


# --------------------------------------------------------------------------------------
# 2. Bind as Triton's JIT does
# --------------------------------------------------------------------------------------

class _Pointer:
    """What the JIT's specialisation reads of a tensor: its dtype and its address."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._addr = ALLOC_ALIGN * 4096 + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._addr


def _binder(fn, backend):
    from triton.runtime import jit as J

    make = getattr(J, "create_function_from_signature", None)
    if make is None:
        raise RuntimeError(f"triton {triton.__version__}: no create_function_from_signature")
    return make(fn.signature, fn.params, backend)


def _config_kwargs(config) -> dict:
    if hasattr(config, "all_kwargs"):
        return dict(config.all_kwargs())
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def bind(launch: Launch, config, arch: int):
    """(ASTSource, options dict) of ``launch`` with ``config`` for sm_``arch``: the
    signature, constexprs and divisibility attributes Triton's JIT would compute."""
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    args = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
    kwargs = {**launch.kwargs, **{k: v for k, v in _config_kwargs(config).items()
                                  if v is not None}}
    kwargs.setdefault("debug", False)
    bound, specialization, options = _binder(launch.fn, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(
        backend, kwargs, bound, specialization, options)
    return ASTSource(launch.fn, signature, constexprs, attrs), options.__dict__


# --------------------------------------------------------------------------------------
# 3. Compile and read the facts
# --------------------------------------------------------------------------------------

def _ptxas_path(arch: int) -> str:
    from triton.backends.nvidia import compiler as nv

    if hasattr(nv, "get_ptxas"):
        return nv.get_ptxas(arch).path
    return triton.knobs.nvidia.ptxas.path


def ptxas_stats(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from the backend's own ptxas, run with its options."""
    from triton.backends.nvidia import compiler as nv

    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    gpu = target.group(1) if target else f"sm_{arch}"
    extra = (["--regAllocOptLevel=2"]
             if "regAllocOptLevel=2" in inspect.getsource(nv.CUDABackend.make_cubin) else [])
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas_path(arch), "-v", *extra, f"--gpu-name={gpu}", src,
                              "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log[-500:]}")
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def ptx_facts(ptx: str) -> dict:
    """Instruction counts that say how the main loop runs."""
    tma = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
    cp_async = len(re.findall(r"\bcp\.async\.(?:ca|cg)\.shared", ptx))
    return dict(cp_async=cp_async, tma=tma,
                wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
                mma=len(re.findall(r"\bmma\.sync\.aligned\b", ptx)))


class _StopAfterTTGIR(Exception):
    pass


def ttgir(src, arch: int, options: dict) -> str:
    """The TTGIR of ``src`` compiled with ``options`` for sm_``arch``, the compile
    stopped after that stage."""
    import triton.compiler.compiler as tc

    real_make_backend = tc.make_backend

    def make_backend(target):
        backend = real_make_backend(target)
        real_add_stages = backend.add_stages

        def add_stages(stages, options, *rest):
            real_add_stages(stages, options, *rest)
            to_ttgir = stages["ttgir"]

            def ttgir_then_stop(module, metadata):
                raise _StopAfterTTGIR(str(to_ttgir(module, metadata)))
            stages["ttgir"] = ttgir_then_stop

        backend.add_stages = add_stages
        return backend

    tc.make_backend = make_backend
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except _StopAfterTTGIR as stop:
        return str(stop)
    finally:
        tc.make_backend = real_make_backend
    return compiled.asm["ttgir"]  # a cache hit: the full compile was stored before


def ttgir_facts(launch: Launch, config, arch: int) -> dict:
    """The main-loop facts read from the TTGIR alone (a few seconds, no LLVM/ptxas):
    asynchronous copies (cp.async or TMA) and dots by kind (``ttng.warp_group_dot`` is
    wgmma; ``tt.dot`` is lowered to mma.sync)."""
    src, options = bind(launch, config, arch)
    ir = ttgir(src, arch, options)
    return dict(async_copies=len(re.findall(
                    r"ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_\w+", ir)),
                wgmma=len(re.findall(r"ttng\.warp_group_dot\b", ir)),
                mma=len(re.findall(r"\btt\.dot\b", ir)))


def describe(launch: Launch, config) -> str:
    cx = {**launch.kwargs, **config.kwargs}
    tiles = " ".join(f"{s}={cx[f]}" for s, f in (("BM", "BLOCK_M"), ("BN", "BLOCK_N"),
                                                  ("BR", "BLOCK_R")) if f in cx)
    return f"{tiles} w={config.num_warps} s={config.num_stages}"


def compile_one(launch: Launch, config, arch: int, *, full: bool = True) -> dict:
    """Facts of one launch × config × arch; ``full=False`` stops at the PTX-free facts
    (no ptxas: no registers or spills)."""
    src, options = bind(launch, config, arch)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    row = dict(shared=compiled.metadata.shared, **ptx_facts(ptx))
    if full:
        row["regs"], row["spills"] = ptxas_stats(ptx, arch)
    return row


def pipelined(row: dict) -> bool:
    return row["cp_async"] > 0 or row["tma"] > 0


def mma_kind(row: dict) -> str:
    kinds = [k for k in ("wgmma", "mma") if row[k]]
    return "+".join(kinds) if kinds else "-"


def _job(job):
    sname, li, ci, arch = job
    s = next(x for x in SCENARIOS if x.name == sname)
    launch = capture(s, arch)[li]
    config = launch.configs[ci]
    base = dict(scenario=sname, kernel=launch.kernel, config=describe(launch, config),
                arch=arch, fallback=s.fallback)
    try:
        return {**base, **compile_one(launch, config, arch), "error": ""}
    except Exception as e:     # a compile failure is a result to report
        return {**base, "error": f"{type(e).__name__}: {str(e)[:160]}"}


def verdict(row: dict) -> str:
    """'' when the row holds what must hold, else the reason: it compiles, fits the
    shared memory, does not spill, and, for aligned launches, does not leave its main
    loop unpipelined."""
    if row["error"]:
        return row["error"]
    limit = ARCHS[row["arch"]][1]
    bad = []
    if row["spills"]:
        bad.append(f"spills {row['spills']} B")
    if row["shared"] > limit:
        bad.append("shared memory over the limit")
    if not row["fallback"] and row["kernel"] not in NO_MAIN_LOOP and not pipelined(row):
        bad.append("main loop not pipelined")
    return "; ".join(bad)


def table(rows: list) -> str:
    hdr = ("| scenario | kernel | config | arch | regs | spill B | shared B | "
           "cp.async | TMA | MMA | check |")
    lines = [hdr, "|" + "---|" * 11]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['scenario']} | {r['kernel']} | {r['config']} | sm_{r['arch']} "
                         f"| | | | | | | FAIL {r['error']} |")
            continue
        v = verdict(r)
        ok = "FAIL " + v if v else "ok"
        lines.append(f"| {r['scenario']} | {r['kernel']} | {r['config']} | sm_{r['arch']} | "
                     f"{r['regs']} | {r['spills']} | {r['shared']} | {r['cp_async']} | "
                     f"{r['tma']} | {mma_kind(r)} | {ok} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--scenarios", default="", help="comma-separated name prefixes")
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--first-config", action="store_true",
                    help="only each launch's first autotune config")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    prefixes = [p for p in args.scenarios.split(",") if p]
    chosen = [s for s in SCENARIOS if not prefixes or any(s.name.startswith(p) for p in prefixes)]
    archs = [int(a) for a in args.archs.split(",")]
    jobs, seen = [], set()
    for s in chosen:
        for arch in archs:
            for li, launch in enumerate(capture(s, arch)):
                configs = launch.configs[:1] if args.first_config else launch.configs
                for ci, config in enumerate(configs):
                    # one compile per distinct (kernel, constexprs, config, arch, args' shape class)
                    key = (s.name, launch.kernel, describe(launch, config), arch)
                    if key not in seen:
                        seen.add(key)
                        jobs.append((s.name, li, ci, arch))
    with ProcessPoolExecutor(max_workers=args.jobs) as ex:
        rows = list(ex.map(_job, jobs))
    main_rows = [r for r in rows if not r["fallback"]]
    fb_rows = [r for r in rows if r["fallback"]]
    out = [f"triton {triton.__version__}, torch {torch.__version__}; ptxas {_ptxas_path(90)}",
           "", "## Aligned launches (as the JIT specialises them)", "", table(main_rows)]
    if fb_rows:
        out += ["", "## Launches that are not aligned (heavy lists; strides not multiples of 16)",
                "", table(fb_rows)]
    failing = [r for r in rows if verdict(r)]
    summary = collections.Counter((r["arch"], bool(verdict(r))) for r in rows)
    out += ["", f"{len(rows)} compiles, {len(failing)} failing; "
            + ", ".join(f"sm_{a}: {summary[(a, False)]} ok / {summary[(a, True)]} failing"
                        for a in archs)]
    text = "\n".join(out)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
