"""Compile every attention kernel × every autotune config offline for sm_80 and sm_90
(no GPU needed) and report registers, spills and shared memory.

    .venv/bin/python benchmarks/kernel_resources.py [--jobs N] [--head-dims 64,128,256]
                                                    [--kernels attn_fwd,attn_decode_split,...]

Kernels: the main forward, the three backward kernels (``triton_flash.KERNEL_CONFIGS``)
and the two flash-decoding kernels (``triton_decode.DECODE_KERNEL_CONFIGS``).

Shared memory comes from ``compiled.metadata.shared``; registers and spills from the
ptxas bundled with Triton (``ptxas -v`` on ``compiled.asm["ptx"]``).  Each kernel is
compiled, for each arch, with the config list the launcher uses there
(``triton_flash._SM90_TABLE`` replaces some lists on sm_90) and the most expensive
constexpr variant that list serves: the "plain" lists (no bias, no dropout, no ALiBi)
with causal + softcap + sinks; the "[heavy]" lists (bias, dropout or ALiBi slopes:
``triton_flash._heavy``) with causal, float bias, softcap, dropout, the dS output, sinks
and ALiBi all on; window and key_mask on wherever a kernel takes them.

Specialisation: the launcher takes the plain lists only for a launch that is
``triton_flash.aligned`` (16-byte-aligned operands with unit last strides, their other
strides and the head dims multiples of 16), so the plain lists are compiled with exactly
the facts Triton's JIT derives from that (``triton_flash.aligned_specialisation``: unit
strides constexpr 1, ``tt.divisibility = 16`` on the operands' pointers and strides and
on D, DV) and every other argument unspecialised ("[aligned]" in the table).  The heavy
lists serve both kinds of launch and are compiled both ways ("[heavy]": nothing
specialised, every pointer and int argument plain; "[heavy, aligned]").  Specialisation
can raise register use as well as lower it (more vectorised or pipelined loads: several
plain dK/dV entries spilled only with it), so neither form bounds the other.  The single
lists (decode, preprocess) are compiled with nothing specialised.  The decode split
kernel has one list per (head dim, dtype, tile height BLOCK_M) for every mask variant,
compiled with everything on (ALiBi included); BLOCK_M is set by the packed row count, not
tuned (``triton_decode.decode_block_ms``).

Coverage check: every entry of every config table (``triton_flash._CONFIG_TABLE``,
``triton_decode._SPLIT_TABLE``, the combine config) must be compiled by the default
run; the summary prints configs defined vs compiled per kernel.  Exits 1 if a config
is not compiled, spills registers, or exceeds the per-block shared-memory limit
(A100: 166912 B, H100: 232448 B).

Do not set TRITON_INTERPRET for this script: it needs the real compiler.
:func:`kernel_ttgir` (one config's TTGIR, the compile stopped there) serves the test
suite's static determinism check (tests/test_triton_kernels.py: no atomics).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_resources.py: unset TRITON_INTERPRET (it needs the real compiler)")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnfuse.kernels import triton_decode as td
from attnfuse.kernels import triton_flash as tf

ARCHS = {80: ("A100", 166912), 90: ("H100", 232448)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP32_PTRS = {"Lse", "Delta", "MRow", "LRow", "DS", "PartM", "PartL", "PartAcc", "Sinks", "Alibi"}
U8_PTRS = {"KeyMask"}                            # bool key_mask, read as uint8
I32_PTRS = {"KeyBounds", "CausalOffsets"}        # per-batch key bounds; per-item causal shifts
FP32_SCALARS = {"qk_scale", "cap_scale", "dropout_p", "sm_scale"}
INT_SCALARS = {"H", "HKV", "GROUP", "M", "N", "D", "DV", "R"}
# every kernel checked: name -> (jit function, config-list function)
KERNELS = {**tf.KERNEL_CONFIGS, **td.DECODE_KERNEL_CONFIGS}
# kernels with one config list for every variant (no plain/heavy split)
SINGLE_LIST = {"attn_decode_split", "attn_decode_combine", "attn_bwd_preprocess"}


def _signature(fn, dtype_name, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name in U8_PTRS:
            sig[name] = "*u8"
        elif name in I32_PTRS:
            sig[name] = "*i32"
        elif name[0].isupper() and name not in INT_SCALARS:   # tensors: Q, K, V, Bias, Out, DO, DK, ...
            sig[name] = f"*{dtype_name}"
        elif name in FP32_SCALARS:
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        else:
            sig[name] = "i32"                    # sizes and strides
    return sig


def _worst_constexprs(fn, head_dim, dtype_name, config, heavy, block_m=None):
    # "plain" variant lists: causal + softcap + sinks, no bias, no dropout, no ALiBi.
    # "heavy" variant lists (bias, dropout or ALiBi: triton_flash._heavy): everything
    # on.  The preprocess kernel's
    # rare recompute path always includes the bias; the decode kernels have one list
    # for every variant, so they get everything on.
    heavy = heavy or fn.__name__ in ("_attn_bwd_preprocess", "_attn_decode_split")
    cx = dict(HEAD_D=head_dim, HEAD_DV=head_dim, CAUSAL=1, BIAS_KIND=1 if heavy else 0,
              SOFTCAP=True, DROPOUT=heavy, NEED_DS=heavy, WINDOW=True, KEY_MASK=True, SINKS=True,
              ALIBI=heavy,  # ALiBi slopes (issue 22) pick the heavy lists
              ITEM_SHIFT=heavy,  # causal_offsets pick the heavy lists too
              DOT_FP32=False, DOT_PREC=tf._dot_precision(DTYPES[dtype_name], head_dim),
              **config.kwargs)
    if block_m is not None:
        cx["BLOCK_M"] = block_m
    cx = {k: v for k, v in cx.items() if k in fn.arg_names}
    unset = [a for a in fn.arg_names if a.isupper() and a not in cx and a not in INT_SCALARS
             and fn.params[fn.arg_names.index(a)].is_constexpr]
    if unset:
        raise RuntimeError(f"{fn.__name__}: no worst-case value for constexprs {unset}")
    return cx


def _ptxas(ptx: str, arch: int):
    """(registers, spill bytes): ``kernel_launched.ptxas_stats`` (the ptxas the backend
    itself runs; the copy under ``backends/nvidia/bin`` cannot read triton 3.9's PTX)."""
    from kernel_launched import ptxas_stats

    return ptxas_stats(ptx, arch)


def _list_kwargs(kname, block_m, arch) -> dict:
    """Keyword arguments of kernel ``kname``'s config-list function: the arch (the
    launcher's lists per arch) or the decode split kernel's tile height."""
    if kname in tf.KERNEL_CONFIGS:
        return {"arch": arch}
    return {} if block_m is None else {"block_m": block_m}


def specs(kname, heavy) -> tuple:
    """The specialisations a list is compiled with (each a bool: aligned or not): the
    plain list of a plain/heavy pair serves only ``triton_flash.aligned`` launches, the
    heavy list every launch, the single lists are compiled unspecialised."""
    if kname in SINGLE_LIST:
        return (False,)
    return (False, True) if heavy else (True,)


def _source(kname, head_dim, dtype_name, heavy, idx, block_m, arch=80, aligned=None):
    """(ASTSource, config, constexprs) of config ``idx`` of kernel ``kname``'s list on
    sm_``arch``, with its worst-case constexprs, and with ``aligned`` (default: the
    first of the list's :func:`specs`) the aligned specialisation."""
    fn, configs = KERNELS[kname]
    extra = _list_kwargs(kname, block_m, arch)
    config = configs(head_dim, DTYPES[dtype_name], heavy, **extra)[idx]
    cx = _worst_constexprs(fn, head_dim, dtype_name, config, heavy, block_m)
    sig = _signature(fn, dtype_name, cx)
    attrs = {}
    if specs(kname, heavy)[0] if aligned is None else aligned:
        unit, div16 = tf.aligned_specialisation(fn.arg_names)
        sig.update({a: "constexpr" for a in unit})
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in sorted(div16)}
        cx = {**cx, **{a: 1 for a in unit}}
    return ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs), config, cx


def compile_kernel(kname, head_dim, dtype_name, heavy, idx, block_m, arch, aligned=None):
    """(compiled kernel, config, constexprs): that config compiled offline for sm_``arch``
    (``compiled.asm`` holds every stage: "ttir", "ttgir", "ptx", "cubin")."""
    src, config, cx = _source(kname, head_dim, dtype_name, heavy, idx, block_m, arch, aligned)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config.num_warps,
                                           num_stages=config.num_stages))
    return compiled, config, cx


def kernel_ttgir(kname, head_dim, dtype_name, heavy, idx, block_m, arch) -> str:
    """The TTGIR text of that config for sm_``arch``: the compile stops after the
    "ttgir" stage (no LLVM, PTX or ptxas: a few seconds per kernel)."""
    src, config, _ = _source(kname, head_dim, dtype_name, heavy, idx, block_m, arch)
    from kernel_launched import ttgir

    return ttgir(src, arch, dict(num_warps=config.num_warps, num_stages=config.num_stages))


def _job(args):
    kname, head_dim, dtype_name, heavy, idx, block_m, arch, aligned = args
    try:
        compiled, config, cx = compile_kernel(kname, head_dim, dtype_name, heavy, idx, block_m,
                                              arch, aligned)
        shared = compiled.metadata.shared
        regs, spills = _ptxas(compiled.asm["ptx"], arch)
        err = ""
    except Exception as e:                       # e.g. out of resources at compile time
        shared, regs, spills, err = -1, -1, -1, f"{type(e).__name__}: {str(e)[:200]}"
        _, config, cx = _source(kname, head_dim, dtype_name, heavy, idx, block_m, arch, aligned)
    tiles = " ".join(f"{short}={cx[full]:<3}" for short, full in
                     (("BM", "BLOCK_M"), ("BN", "BLOCK_N"), ("BR", "BLOCK_R")) if full in cx)
    cfg = f"{tiles} w={config.num_warps} s={config.num_stages}"
    tags = (["heavy"] if heavy else []) + (["aligned"] if aligned else [])
    label = f" [{', '.join(tags)}]" if tags else ""
    return kname + label, head_dim, dtype_name, cfg, arch, regs, spills, shared, err


def _table_entries(kname):
    """Every (table, key, config) a kernel's config tables define: what must be compiled."""
    if kname in tf._CONFIG_TABLE:
        tables = (("all", tf._CONFIG_TABLE), ("sm_90", tf._SM90_TABLE))
        return {(table, key, c) for table, t in tables
                for key, cs in t.get(kname, {}).items() for c in cs}
    if kname == "attn_decode_split":
        return {(key + (bm,), c) for key, per_bm in td._SPLIT_TABLE.items()
                for bm, cs in per_bm.items() for c in cs}
    return {("all", "combine")}


def _entry(kname, hd, dn, heavy, idx, block_m, arch):
    """The table entry a job compiles (inverse of the config-list functions)."""
    if kname == "attn_decode_combine":
        return ("all", "combine")
    width = 32 if dn == "fp32" else 16
    key = (tf._head_dim_class(hd), width)
    if kname in tf._CONFIG_TABLE:
        if kname != "attn_bwd_preprocess":
            key = key + (heavy,)
        sm90 = tf._SM90_TABLE.get(kname, {})
        if arch >= 90 and key in sm90:
            return "sm_90", key, sm90[key][idx]
        return "all", key, tf._CONFIG_TABLE[kname][key][idx]
    return key + (block_m,), td._SPLIT_TABLE[key][block_m][idx]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--head-dims", default="64,128,256",
                    help="padded head dims to check (smaller dims share the <=64 configs "
                         "and use fewer resources)")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--kernels", default=",".join(KERNELS),
                    help=f"comma-separated subset of {', '.join(KERNELS)}")
    args = ap.parse_args(argv)
    head_dims = [int(x) for x in args.head_dims.split(",")]
    kernels = args.kernels.split(",")
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        ap.error(f"unknown kernels {unknown}; choose from {list(KERNELS)}")
    jobs, covered = [], collections.defaultdict(set)
    for kname in kernels:
        fn, configs = KERNELS[kname]
        for hd in head_dims:
            for dn in args.dtypes.split(","):
                # one list for every variant: compiled once, with everything on
                for heavy in ((False,) if kname in SINGLE_LIST else (False, True)):
                    block_ms = (td.decode_block_ms(hd, DTYPES[dn])
                                if kname == "attn_decode_split" else (None,))
                    for bm in block_ms:
                        for arch in ARCHS:
                            extra = _list_kwargs(kname, bm, arch)
                            for idx in range(len(configs(hd, DTYPES[dn], heavy, **extra))):
                                covered[kname].add(_entry(kname, hd, dn, heavy, idx, bm, arch))
                                jobs += [(kname, hd, dn, heavy, idx, bm, arch, aligned)
                                         for aligned in specs(kname, heavy)]
    with ProcessPoolExecutor(max_workers=args.jobs) as ex:
        rows = list(ex.map(_job, jobs))

    bad = 0
    hdr = f"{'kernel':<28} {'hd':>4} {'dtype':<5} {'config':<24} {'arch':<10} {'regs':>4} {'spill':>5} {'shared':>7} / limit"
    print(hdr)
    print("-" * len(hdr))
    for kname, hd, dn, cfg, arch, regs, spills, shared, err in rows:
        name, limit = ARCHS[arch]
        flag = ""
        if err or spills > 0 or shared > limit:
            bad += 1
            flag = "  <-- FAIL " + err
        print(f"{kname:<28} {hd:>4} {dn:<5} {cfg:<24} sm_{arch}/{name} {regs:>4} {spills:>5} "
              f"{shared:>7} / {limit}{flag}")
    print()
    for arch, (name, limit) in ARCHS.items():
        sel = [r for r in rows if r[4] == arch and not r[8]]
        if sel:
            print(f"sm_{arch} ({name}): {len(sel)} compiled, max registers {max(r[5] for r in sel)}, "
                  f"max spill bytes {max(r[6] for r in sel)}, max shared {max(r[7] for r in sel)} B "
                  f"(limit {limit} B)")
    missing = 0
    for kname in kernels:
        defined = _table_entries(kname)
        miss = defined - covered[kname]
        missing += len(miss)
        print(f"{kname:<22} {len(defined):>3} table configs defined, "
              f"{len(defined & covered[kname]):>3} compiled"
              + (f"  <-- NOT COMPILED: {sorted(miss)}" if miss else ""))
    print(f"{len(rows)} kernel/config/arch combinations, {bad} failing, "
          f"{missing} table configs not compiled")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
