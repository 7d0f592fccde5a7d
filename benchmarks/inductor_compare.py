"""Run the attention catalog (tests/attn_spellings.py) through PyTorch Inductor's own
attention fusion and through attnfuse.rewrite, and compare.

    python benchmarks/inductor_compare.py [--only NAME_SUBSTRING] [--skip-inductor]

Inductor: ``torch.compile(model)`` (default inductor backend, CPU); the number of SDPA
nodes is counted in the post-grad graph (``torch._inductor.config.post_grad_custom_post_pass``;
the fuse_attention counter is printed alongside), and the compiled output is compared
with eager. attnfuse: the dynamo graph of the same model, ``attnfuse.rewrite``, count of
``attnfuse::flash_attention`` nodes, output compared with eager.

Per row: expected fused count, inductor fused?, inductor correct?, attnfuse fused?,
attnfuse correct?. For near misses "fused" is bad (the graph is not attention that the
op can express) and the expected count is 0. "square" rows are attention on transposed
operands at square sizes: fusing them is fine if the output is right.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from attn_spellings import (MODELS, NEAR_MISSES, SPELLINGS, SQUARE_DATAFLOW, assert_outputs_close, capture, clone_inputs,  # noqa: E402
                            fused_nodes, run_rewrite)

_SDPA = []


def _post_grad_count(graph):
    _SDPA.append(sum(1 for n in graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)))


def _close(a, b, case):
    try:
        assert_outputs_close(a, b, atol=max(case.atol, 1e-4), rtol=max(case.rtol, 1e-4))
        return True
    except AssertionError:
        return False


def run_inductor(case):
    torch._dynamo.reset()
    counters.clear()
    _SDPA.clear()
    torch.manual_seed(0)
    mod = case.module().eval()
    x = case.inputs()
    with torch.no_grad():
        expected = mod(*clone_inputs(x))
        out = torch.compile(mod)(*clone_inputs(x))
    return sum(_SDPA), counters["inductor"]["fuse_attention"], _close(out, expected, case)


def run_attnfuse(case):
    torch.manual_seed(0)
    mod = case.module().eval()
    x = case.inputs()
    with torch.no_grad():
        expected = mod(*clone_inputs(x))
    gm, ex = capture(mod, clone_inputs(x), "dynamo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run_rewrite(gm, clone_inputs(ex), strict=False)
    with torch.no_grad():
        out = res.graph_module(*clone_inputs(ex))
    return len(fused_nodes(res.graph_module)), _close(out, expected, case)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None)
    ap.add_argument("--skip-inductor", action="store_true")
    args = ap.parse_args(argv)
    inductor_config.post_grad_custom_post_pass = _post_grad_count
    tables = [("spelling", SPELLINGS), ("near-miss", NEAR_MISSES), ("square", SQUARE_DATAFLOW), ("model", MODELS)]
    totals = {}
    t0 = time.time()
    hdr = f"{'case':44s} {'exp':>3s} | {'ind fused':>9s} {'ind ok':>6s} | {'af fused':>8s} {'af ok':>5s}"
    for kind, table in tables:
        print(f"\n== {kind} cases ==\n{hdr}")
        tot = dict(n=0, ind_fused=0, ind_ok=0, ind_bad_fuse=0, af_fused=0, af_ok=0, af_bad_fuse=0)
        for name, case in table.items():
            if args.only and args.only not in name:
                continue
            if "dynamo" not in case.dialects:
                continue
            tot["n"] += 1
            if args.skip_inductor:
                ind = (None, None, None)
            else:
                try:
                    ind = run_inductor(case)
                except Exception as e:  # noqa: BLE001
                    ind = (f"ERR {type(e).__name__}", None, False)
            try:
                af = run_attnfuse(case)
            except Exception as e:  # noqa: BLE001
                af = (f"ERR {type(e).__name__}", False)
            exp = case.fused
            i_n, i_ctr, i_ok = ind
            a_n, a_ok = af
            if isinstance(i_n, int):
                tot["ind_fused"] += (i_n == exp) if exp else 0
                tot["ind_bad_fuse"] += (exp == 0 and i_n > 0)
            tot["ind_ok"] += bool(i_ok)
            if isinstance(a_n, int):
                tot["af_fused"] += (a_n == exp) if exp else 0
                tot["af_bad_fuse"] += (exp == 0 and a_n > 0)
            tot["af_ok"] += bool(a_ok)
            flag = ""
            if isinstance(i_n, str):
                flag += "  <-- inductor ERROR"
                tot["ind_err"] = tot.get("ind_err", 0) + 1
            elif i_ok is False:
                flag += "  <-- inductor WRONG RESULT"
            if isinstance(a_n, str):
                flag += "  <-- attnfuse ERROR"
                tot["af_err"] = tot.get("af_err", 0) + 1
            elif a_ok is False:
                flag += "  <-- attnfuse WRONG RESULT"
            print(f"{name:44s} {exp:>3d} | {str(i_n):>9s} {str(i_ok):>6s} | {str(a_n):>8s} {str(a_ok):>5s}{flag}",
                  flush=True)
        totals[kind] = tot
    print(f"\n== totals ({time.time() - t0:.0f}s, torch {torch.__version__}) ==")
    for kind, t in totals.items():
        n = t["n"]
        errs = f"  (errors: inductor {t.get('ind_err', 0)}, attnfuse {t.get('af_err', 0)})"
        if kind == "near-miss":
            print(f"{kind:10s} n={n:3d}  inductor: wrongly fused {t['ind_bad_fuse']}, correct output {t['ind_ok']}/{n}"
                  f"   attnfuse: wrongly fused {t['af_bad_fuse']}, correct output {t['af_ok']}/{n}" + errs)
        else:
            print(f"{kind:10s} n={n:3d}  inductor: fused {t['ind_fused']}/{n}, correct output {t['ind_ok']}/{n}"
                  f"   attnfuse: fused {t['af_fused']}/{n}, correct output {t['af_ok']}/{n}" + errs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
