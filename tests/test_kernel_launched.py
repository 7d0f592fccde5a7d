"""The kernels as launched (benchmarks/kernel_launched.py), on a small representative
subset: launches captured from the real launcher on fake CUDA tensors, bound by Triton's
own binder, compiled offline.  The full table is the benchmark's
(benchmarks/results/kernel_launched_*.md).  Runs in a subprocess without
TRITON_INTERPRET (the kernels must be real JIT functions to compile)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

_SCRIPT = r"""
import json, sys
sys.path.insert(0, "benchmarks")
import kernel_launched as KL

by_name = {s.name: s for s in KL.SCENARIOS}
found = {}
# 1. the main forward, d=64 fp16 causal, first config, sm_90: the full compile
fwd = KL.capture(by_name["train d64 fp16 causal"])[0]
found["fwd"] = {"kernel": fwd.kernel, **KL.compile_one(fwd, fwd.configs[0], 90)}
# 2. how the launch binds: aligned vs q/k/v sliced from a fused QKV projection
for name in ("train d64 fp16 causal", "fallback: d64 fp16 fused qkv"):
    launch = KL.capture(by_name[name])[0]
    src, options = KL.bind(launch, launch.configs[0], 90)
    names = launch.fn.arg_names
    div = {names[path[0]] for path, a in src.attrs.items() if ["tt.divisibility", 16] in a}
    const = {names[path[0]]: v for path, v in src.constants.items()}
    found[name] = {"div": sorted(div), "stride_qd": const.get("stride_qd"),
                   "num_stages": options["num_stages"]}
# 3. the dQ kernel at head dim 128 (bf16) on sm_80, first config: TTGIR facts (it ran
#    one synchronous stage before issue 21)
dq = [l for l in KL.capture(by_name["train d128 bf16"], 80) if l.kernel == "attn_bwd_dq"][0]
found["dq128"] = [KL.ttgir_facts(dq, dq.configs[0], 80)]
# 4. the plain/heavy choice (triton_flash.aligned): every aligned launch binds with at
#    least the facts kernel_resources.py compiles the plain lists under
#    (aligned_specialisation); the fused-QKV launches (odd address) take the heavy lists
import torch
from attnfuse.kernels import triton_flash as tf
for name in ("train d64 fp16 causal", "fallback: d64 fp16 fused qkv"):
    for launch in KL.capture(by_name[name]):
        if launch.kernel == "attn_bwd_preprocess":   # one list for both
            continue
        src, _ = KL.bind(launch, launch.configs[0], 90)
        names = launch.fn.arg_names
        div = {names[path[0]] for path, a in src.attrs.items() if ["tt.divisibility", 16] in a}
        const = {names[path[0]]: v for path, v in src.constants.items()}
        unit, div16 = tf.aligned_specialisation(names)
        heavy = tf.KERNEL_CONFIGS[launch.kernel][1](64, torch.float16, True, 90)
        found[name + " " + launch.kernel] = {
            "unit": len(unit), "not_unit": sorted(a for a in unit if const.get(a) != 1),
            "div16": len(div16), "not_div16": sorted(div16 - div),
            "heavy": [str(c) for c in launch.configs] == [str(c) for c in heavy]}
print(json.dumps(found))
"""


def test_kernels_as_launched():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    found = json.loads(res.stdout.strip().splitlines()[-1])
    fwd = found["fwd"]
    assert fwd["kernel"] == "attn_fwd"
    assert fwd["spills"] == 0 and 0 < fwd["regs"] <= 255, fwd
    assert fwd["cp_async"] > 0 or fwd["tma"] > 0, f"forward main loop not pipelined: {fwd}"
    assert fwd["wgmma"] > 0 and fwd["mma"] == 0, f"sm_90 forward without wgmma: {fwd}"
    assert fwd["shared"] <= 232448
    aligned, fused = found["train d64 fp16 causal"], found["fallback: d64 fp16 fused qkv"]
    # the JIT's specialisation: unit strides become constexpr 1; aligned pointers and
    # strides divisible by 16 carry tt.divisibility; a fused-QKV view's do not
    assert aligned["stride_qd"] == 1 and fused["stride_qd"] == 1
    assert {"Q", "K", "V", "stride_qm", "stride_kn"} <= set(aligned["div"])
    assert not {"Q", "K", "V", "stride_qm", "stride_kn"} & set(fused["div"])
    assert aligned["num_stages"] > 1
    for facts in found["dq128"]:
        assert facts["async_copies"] > 0, f"dQ d128 main loop not pipelined: {facts}"
        assert facts["mma"] > 0
    for kernel in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"):
        plain = found["train d64 fp16 causal " + kernel]
        assert not plain["heavy"] and plain["unit"] >= 3 and plain["div16"] >= 11, plain
        assert plain["not_unit"] == [] and plain["not_div16"] == [], (kernel, plain)
        fused = found["fallback: d64 fp16 fused qkv " + kernel]
        assert fused["heavy"] and fused["not_div16"], (kernel, fused)
