"""AOTInductor end to end on CPU: export a model, rewrite it with attnfuse, lower the fused
op to ATen ops (attnfuse/export.py), package it with ``aoti_compile_and_package`` and load
and run the package in a fresh process with torch's extension autoload off (attnfuse never
imported there). Also shows what happens without the lowering: the package builds, and
loading it fails (the op is a Python custom op).

Not a test: building a package runs a C++ compile (over a minute on a busy 2-core box).

    python benchmarks/aoti_package.py [--out benchmarks/results/aoti_package.txt]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

LOAD = """
import sys, torch
p = torch._inductor.aoti_load_package({path!r})
x, y = torch.load({io!r})
out = p(x)
print("max abs diff vs eager", (out - y).abs().max().item(), "| attnfuse imported:", "attnfuse" in sys.modules)
"""


def fresh_load(path: str, io: str) -> str:
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    env.pop("PYTHONPATH", None)
    res = subprocess.run([sys.executable, "-c", LOAD.format(path=path, io=io)], env=env,
                         capture_output=True, text=True, timeout=600)
    if res.returncode == 0:
        return res.stdout.strip()
    return "FAILED: " + res.stderr.strip().splitlines()[-1][:300]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import attnfuse
    from attnfuse import export as afx
    from tests.dist_checks import Block

    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), Block()).eval()
    x = torch.randn(2, 64, 32)
    lines = [f"torch {torch.__version__}; model: 2 hand-written GQA attention blocks, x {tuple(x.shape)}, CPU"]
    with tempfile.TemporaryDirectory() as tmp:
        io = os.path.join(tmp, "io.pt")
        torch.save((x, model(x)), io)
        ep = torch.export.export(model, (x,))
        rewritten = attnfuse.rewrite(ep, strict=True)
        ep2 = torch.export.export(rewritten.graph_module, (x,))
        lines.append(f"fused sites: {rewritten.fused}; fused calls in the re-exported program: "
                     f"{len(afx.fused_calls(ep2))}")
        t = time.perf_counter()
        path = afx.aoti_package(ep2, os.path.join(tmp, "lowered.pt2"))
        lines.append(f"lowered package built in {time.perf_counter() - t:.1f} s; fresh process: "
                     + fresh_load(path, io))
        t = time.perf_counter()
        raw = torch._inductor.aoti_compile_and_package(ep2, package_path=os.path.join(tmp, "raw.pt2"))
        lines.append(f"un-lowered package built in {time.perf_counter() - t:.1f} s; fresh process: "
                     + fresh_load(raw, io))
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
