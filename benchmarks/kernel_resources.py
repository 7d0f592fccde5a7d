"""Compile every attention kernel × every autotune config offline for sm_80 and sm_90
(no GPU needed) and report registers, spills and shared memory.

    .venv/bin/python benchmarks/kernel_resources.py [--jobs N] [--head-dims 64,128,256]

Shared memory comes from ``compiled.metadata.shared``; registers and spills from the
ptxas bundled with Triton (``ptxas -v`` on ``compiled.asm["ptx"]``).  Each kernel is
compiled with the most expensive constexpr variant its config list serves: the
"plain" lists (no bias, no dropout) with causal + softcap; the "[heavy]" lists (bias or
dropout) with causal, float bias, softcap, dropout and the dS output all on.  Exits 1 if any config spills registers or exceeds the
per-block shared-memory limit (A100: 166912 B, H100: 232448 B).

Do not set TRITON_INTERPRET for this script: it needs the real compiler.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_resources.py: unset TRITON_INTERPRET (it needs the real compiler)")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from attnfuse.kernels import triton_flash as tf

ARCHS = {80: ("A100", 166912), 90: ("H100", 232448)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP32_PTRS = {"Lse", "Delta", "MRow", "LRow", "DS"}
FP32_SCALARS = {"qk_scale", "cap_scale", "dropout_p", "sm_scale"}
INT_SCALARS = {"H", "HKV", "GROUP", "M", "N", "D", "DV"}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _signature(fn, dtype_name, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name[0].isupper() and name not in INT_SCALARS:   # tensors: Q, K, V, Bias, Out, DO, DK, ...
            sig[name] = f"*{dtype_name}"
        elif name in FP32_SCALARS:
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        else:
            sig[name] = "i32"                    # sizes and strides
    return sig


def _worst_constexprs(fn, head_dim, dtype_name, config, heavy):
    # "plain" variant lists: causal + softcap, no bias, no dropout.
    # "heavy" variant lists (bias or dropout): everything on.  The preprocess kernel's
    # rare recompute path always includes the bias.
    heavy = heavy or fn.__name__ == "_attn_bwd_preprocess"
    cx = dict(HEAD_D=head_dim, HEAD_DV=head_dim, CAUSAL=1, BIAS_KIND=1 if heavy else 0,
              SOFTCAP=True, DROPOUT=heavy, NEED_DS=heavy, DOT_FP32=False,
              DOT_PREC=tf._dot_precision(DTYPES[dtype_name], head_dim), **config.kwargs)
    return {k: v for k, v in cx.items() if k in fn.arg_names}


def _ptxas(ptx: str, arch: int):
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    gpu = target.group(1) if target else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([PTXAS, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log}")
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    spill_ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    return regs, spill_st + spill_ld


def _job(args):
    kname, head_dim, dtype_name, heavy, idx, arch = args
    fn, configs = tf.KERNEL_CONFIGS[kname]
    config = configs(head_dim, DTYPES[dtype_name], heavy)[idx]
    cx = _worst_constexprs(fn, head_dim, dtype_name, config, heavy)
    src = ASTSource(fn=fn, signature=_signature(fn, dtype_name, cx), constexprs=cx)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=config.num_warps,
                                               num_stages=config.num_stages))
        shared = compiled.metadata.shared
        regs, spills = _ptxas(compiled.asm["ptx"], arch)
        err = ""
    except Exception as e:                       # e.g. out of resources at compile time
        shared, regs, spills, err = -1, -1, -1, f"{type(e).__name__}: {str(e)[:200]}"
    cfg = (f"BM={config.kwargs['BLOCK_M']:<3} BN={config.kwargs['BLOCK_N']:<3} "
           f"w={config.num_warps} s={config.num_stages}")
    return kname + (" [heavy]" if heavy else ""), head_dim, dtype_name, cfg, arch, regs, spills, shared, err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--head-dims", default="64,128,256",
                    help="padded head dims to check (smaller dims share the <=64 configs "
                         "and use fewer resources)")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    args = ap.parse_args(argv)
    head_dims = [int(x) for x in args.head_dims.split(",")]
    jobs = []
    for kname, (fn, configs) in tf.KERNEL_CONFIGS.items():
        for hd in head_dims:
            for dn in args.dtypes.split(","):
                for heavy in (False, True):
                    for idx in range(len(configs(hd, DTYPES[dn], heavy))):
                        for arch in ARCHS:
                            jobs.append((kname, hd, dn, heavy, idx, arch))
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
    print(f"{len(rows)} kernel/config/arch combinations, {bad} failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
