"""What Inductor runs for attnfuse and for itself on the e2e models (issue 20 part 2).

    python benchmarks/parity_graphs.py [--models bert vit] [--modes eval train] [--length 512]

For each model of ``benchmarks/e2e.py`` (2 layers, fp32, static shapes at ``--length``
tokens) and mode, compiles it three ways, each in this process after a dynamo reset:
``inductor`` (``torch.compile(model)``), ``attnfuse`` (the backend, defaults) and
``attnfuse-op`` (the backend with ``torch_inline.USE_FUSED_LOWERING`` off: the fused op's
runtime call, as before issue 20 part 2). Prints, per variant, the calls of Inductor's
post-grad graphs (forward and, in training, backward) that are not Inductor's own
generated kernels: fallback kernels (attention, GEMMs), copies and the custom op. Where
the attnfuse and Inductor columns agree, both compiled models make the same kernel calls;
the timing difference of the e2e rows can then only come from Inductor's generated
kernels around them. Nothing is timed: this is the noise-free half of the parity check.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import e2e  # noqa: E402

KEEP = ("attention", "mm", "addmm", "bmm", "clone", "copy", "attnfuse", "convolution", "_to_copy")


def graphs_of(variant: str, model_name: str, train: bool, length: int):
    import torch
    import torch._dynamo
    import torch._inductor.config as icfg
    from attnfuse.kernels import torch_inline

    torch._dynamo.reset()
    seen = []

    def grab(graph):
        kind = "bwd" if any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes) else "fwd"
        calls = collections.Counter(str(n.target) for n in graph.nodes if n.op == "call_function"
                                    and any(k in str(n.target).split(".")[-2 if "." in str(n.target) else -1]
                                            for k in KEEP))
        seen.append((kind, calls))

    icfg.post_grad_custom_post_pass = grab
    icfg.fx_graph_cache = False
    torch_inline.USE_FUSED_LOWERING = variant != "attnfuse-op"
    torch.manual_seed(0)
    model, _ = e2e.build_model(model_name, 2, train)
    inputs, _ = e2e.make_inputs(model_name, None, length, torch.float32)
    compiled = torch.compile(model) if variant == "inductor" else torch.compile(model, backend="attnfuse")
    e2e._step(compiled, inputs, train)
    icfg.post_grad_custom_post_pass = None
    torch_inline.USE_FUSED_LOWERING = True
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["bert", "vit"])
    ap.add_argument("--modes", nargs="+", default=["eval", "train"], choices=["eval", "train"])
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args()
    import torch

    print(f"torch {torch.__version__}; fp32, 2 layers, static shapes, L={args.length}; counts of the non-generated "
          f"calls in Inductor's post-grad graphs (summed over graphs)")
    for name in args.models:
        for mode in args.modes:
            res = {v: graphs_of(v, name, mode == "train", args.length) for v in ("inductor", "attnfuse", "attnfuse-op")}
            for kind in ("fwd", "bwd"):
                tot = {v: sum((c for k, c in gs if k == kind), collections.Counter()) for v, gs in res.items()}
                keys = sorted(set().union(*tot.values()))
                if not keys:
                    continue
                print(f"\n{name} {mode} {kind}: {'call':<62} {'inductor':>8} {'attnfuse':>8} {'af-op':>6}")
                for k in keys:
                    print(f"  {k:<72} {tot['inductor'][k]:>8} {tot['attnfuse'][k]:>8} {tot['attnfuse-op'][k]:>6}")
                same = tot["inductor"] == tot["attnfuse"]
                print(f"  -> attnfuse {'makes the same calls as' if same else 'DIFFERS from'} Inductor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
