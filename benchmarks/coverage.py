"""Real-model coverage: every attention in a corpus of Hugging Face transformers, timm and diffusers
models (tests/real_models.py, tiny random configs, no downloads), compiled with attnfuse and with
Inductor, side by side.

    python benchmarks/coverage.py [--cases REGEX] [--inner eager|aot_eager|inductor] [--impl torch|auto|triton]
                                  [--no-inductor] [--train] [--json out.json] [--snippets]

Per case (one row): attention sites in the model (from its config: layers x attention modules),
sites fused by attnfuse (``attnfuse::flash_attention`` nodes in the graphs handed to the inner
compiler), sites fused by Inductor (SDPA nodes in its post-grad forward graphs, counted by a
``post_grad_custom_post_pass``; not its counter, which double-counts in training), max abs and
relative (to the largest reference value) error against eager for both, whether each compiled, the
compile time (first call), how each fused site receives its masks (``masks`` column: ``causal`` /
``causal-br`` (bottom-right) / ``wN`` (sliding window N) / ``keymask`` passed as structure, ``bias`` for a
tensor still read by the kernel, ``fix`` where rows that see no key get eager's finite-fill average;
``-`` for no mask), and for every unfused site the near-miss reason from attnfuse's report; with a
mask kept as a tensor, the report's reason too.

``--train``: every case that supports it also runs in train mode with dropout 0 (deterministic), with
a backward pass whose parameter gradients are compared with eager's; and once with dropout 0.1, which
must still be fused (with its dropout_p) and give finite outputs and gradients.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import real_models as R  # noqa: E402


def _fmt_err(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def mask_kind(f) -> str:
    """How one fusion gets its masks: e.g. "causal+keymask+fix", "causal+w5", "bias", "-"."""
    parts = []
    if f.causal != "none":
        parts.append("causal" if f.causal == "top_left" else "causal-br")
    if getattr(f, "window", 0):
        parts.append(f"w{f.window}")
    if getattr(f, "key_mask", ""):
        parts.append("keymask")
    if f.bias != "none":
        parts.append("bias")
    if getattr(f, "empty_row_fixup", False):
        parts.append("fix")
    return "+".join(parts) or "-"


def _mask_summary(fusions) -> dict:
    kinds: dict = {}
    for f in fusions:
        k = mask_kind(f)
        kinds[k] = kinds.get(k, 0) + 1
    n_bias = sum(1 for f in fusions if f.bias != "none")
    n_struct = sum(1 for f in fusions if f.bias == "none" and mask_kind(f) != "-")
    kept = sorted({n for f in fusions for n in getattr(f, "masks", []) if "kept as a tensor" in n})
    return {"masks": " ".join(f"{k}:{n}" for k, n in sorted(kinds.items())), "n_structure": n_struct,
            "n_bias": n_bias, "n_plain": len(fusions) - n_struct - n_bias, "bias_kept": kept}


def run_case(case: R.Case, args) -> list:
    rows = []
    modes = [("eval", False, 0.0)]
    if args.train and case.train:
        modes += [("train", True, 0.0), ("train-dropout", True, 0.1)]
    for mode, train, dropout in modes:
        row = {"case": case.name, "library": case.library, "variant": case.variant, "mode": mode,
               "attn_dropout": case.attn_dropout}
        try:
            torch.manual_seed(0)
            model, inputs, sites = case.build(train=train, dropout=dropout)
        except Exception as e:  # noqa: BLE001
            row.update(build_ok=False, error=f"build: {type(e).__name__}: {e}"[:400])
            rows.append(row)
            continue
        row.update(build_ok=True, sites=sites)
        backward = train
        ref_grads = None
        if dropout == 0.0:
            model.zero_grad(set_to_none=True)
            ref = R._run(model, R._clone(inputs), train)
            if backward:
                R.loss_of(ref).backward()
                ref_grads = R.grads(model)
        # attnfuse
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        a = R.compile_attnfuse(model, inputs, inner=args.inner, train=train, impl=args.impl, backward=backward)
        row.update(attnfuse_ok=a.ok, attnfuse_error=a.error, attnfuse_fused=a.fused,
                   attnfuse_graphs=a.graphs, attnfuse_compile_s=round(a.compile_s, 2),
                   near_misses=[{"kind": k, "reason": r, "location": loc, "snippet": s}
                                for k, r, loc, s in a.near_misses])
        row.update(_mask_summary(a.fusions))
        if a.ok and dropout == 0.0:
            row["attnfuse_abs"], row["attnfuse_rel"] = R.errors(ref, a.out)
            if backward:
                row["attnfuse_grad_abs"], row["attnfuse_grad_rel"] = R.grad_errors(ref_grads, R.grads(model))
        if a.ok and dropout > 0.0:
            # dropout on: the fused op must carry it, and outputs and gradients must be finite
            dps = sorted({f.dropout_p for f in a.fusions})
            row["attnfuse_dropout_p"] = dps
            finite = all(torch.isfinite(t).all().item() for t in R.flatten(a.out))
            finite = finite and all(torch.isfinite(g).all().item() for g in R.grads(model).values())
            row["finite"] = finite
        # inductor
        if not args.no_inductor and dropout == 0.0:
            model.zero_grad(set_to_none=True)
            i = R.compile_inductor(model, inputs, train=train, backward=backward)
            row.update(inductor_ok=i.ok, inductor_error=i.error, inductor_fused=i.fused,
                       inductor_compile_s=round(i.compile_s, 2))
            if i.ok:
                row["inductor_abs"], row["inductor_rel"] = R.errors(ref, i.out)
                if backward:
                    row["inductor_grad_abs"], row["inductor_grad_rel"] = R.grad_errors(ref_grads, R.grads(model))
        rows.append(row)
        _print_row(row)
    return rows


def _passes(row) -> bool:
    if not row.get("build_ok") or not row.get("attnfuse_ok"):
        return False
    if row.get("attnfuse_fused") != row.get("sites"):
        return False
    if row["mode"] == "train-dropout":
        return bool(row.get("finite")) and row.get("attnfuse_dropout_p") == ([0.1] if row["attn_dropout"] else [0.0])
    if row.get("attnfuse_rel", 1.0) > R.TOL:
        return False
    if "attnfuse_grad_rel" in row and row["attnfuse_grad_rel"] > R.GRAD_TOL:
        return False
    return True


HEADER = (f"{'case':<20} {'mode':<13} {'sites':>5} {'attnf':>5} {'ind':>4}  {'af err(rel)':>11} {'ind err(rel)':>12}"
          f"  {'af grad':>8} {'ind grad':>8}  {'af s':>5} {'ind s':>5}  {'masks':<24} status")


def _print_row(row) -> None:
    if not row.get("build_ok"):
        print(f"{row['case']:<20} {row['mode']:<13} BUILD FAILED: {row['error']}", flush=True)
        return
    ind = row.get("inductor_fused")
    status = "ok" if _passes(row) else "FAIL"
    if not row.get("attnfuse_ok"):
        status += f" attnfuse compile error: {row['attnfuse_error']}"
    if row.get("inductor_ok") is False:
        status += f" inductor compile error: {row['inductor_error']}"
    if row["mode"] == "train-dropout":
        status += f" dropout_p={row.get('attnfuse_dropout_p')} finite={row.get('finite')}"
    ind_err = row.get("inductor_rel")
    if ind_err is not None and ind_err > R.TOL:
        status += " (inductor WRONG)"
    print(f"{row['case']:<20} {row['mode']:<13} {row['sites']:>5} {row.get('attnfuse_fused', '-'):>5} "
          f"{'-' if ind is None else ind:>4}  {_fmt_err(row.get('attnfuse_rel')):>11} {_fmt_err(ind_err):>12}  "
          f"{_fmt_err(row.get('attnfuse_grad_rel')):>8} {_fmt_err(row.get('inductor_grad_rel')):>8}  "
          f"{row.get('attnfuse_compile_s', 0):>5.1f} {row.get('inductor_compile_s', 0) or 0:>5.1f}  "
          f"{row.get('masks', ''):<24} {status}", flush=True)
    for note in row.get("bias_kept", []):
        print(f"    mask {note}", flush=True)
    for nm in row.get("near_misses", []):
        print(f"    near miss [{nm['kind']}] {nm['location']}: {nm['reason']}", flush=True)
        if _SNIPPETS and nm["snippet"]:
            print("\n".join("      | " + ln for ln in nm["snippet"].splitlines()), flush=True)


_SNIPPETS = False


def main(argv=None) -> int:
    global _SNIPPETS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=".*", help="regex on case names (re.search)")
    p.add_argument("--inner", default="eager", choices=("eager", "aot_eager", "inductor"))
    p.add_argument("--impl", default="torch", choices=("auto", "torch", "triton"))
    p.add_argument("--no-inductor", action="store_true", help="skip the Inductor comparison (slow on CPU)")
    p.add_argument("--train", action="store_true", help="also train mode: gradients vs eager, and dropout on")
    p.add_argument("--snippets", action="store_true", help="print a graph snippet for every near miss")
    p.add_argument("--json", default=None, help="write all rows to this file")
    args = p.parse_args(argv)
    _SNIPPETS = args.snippets
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("transformers").setLevel(logging.ERROR)

    cases = [c for n, c in R.CASES.items() if re.search(args.cases, n)]
    print(f"attnfuse coverage: {len(cases)} case(s), inner={args.inner}, impl={args.impl}, torch {torch.__version__}")
    print("errors are max|compiled - eager| / max|eager|; tolerance", R.TOL, "(outputs),", R.GRAD_TOL, "(grads)")
    print(HEADER, flush=True)
    rows = []
    t0 = time.perf_counter()
    for c in cases:
        rows += run_case(c, args)

    # summary
    built = [r for r in rows if r.get("build_ok")]
    sites = sum(r["sites"] for r in built)
    af = sum(min(r.get("attnfuse_fused", 0), r["sites"]) for r in built)
    print()
    print(f"rows: {len(rows)} ({len(rows) - len(built)} failed to build), total {time.perf_counter() - t0:.0f}s")
    print(f"attnfuse: {af}/{sites} sites fused; {sum(1 for r in built if r.get('attnfuse_fused') == r['sites'])}"
          f"/{len(built)} rows fully fused; compile failures: {sum(1 for r in built if not r.get('attnfuse_ok'))}; "
          f"numerical mismatches: {sum(1 for r in built if r.get('attnfuse_ok') and (r.get('attnfuse_rel', 0) > R.TOL or r.get('attnfuse_grad_rel', 0) > R.GRAD_TOL))}")
    n_struct, n_bias, n_plain = (sum(r.get(k, 0) for r in built) for k in ("n_structure", "n_bias", "n_plain"))
    print(f"attnfuse masks: {n_struct} fused sites get their masks as structure only (causal/window/key_mask), "
          f"{n_bias} read a bias tensor, {n_plain} have no mask")
    over = [r["case"] + "/" + r["mode"] for r in built if r.get("attnfuse_fused", 0) > r["sites"]]
    if over:
        print(f"  MORE fused than sites (check the ground truth!): {over}")
    ind_rows = [r for r in built if "inductor_fused" in r]
    if ind_rows:
        isites = sum(r["sites"] for r in ind_rows)
        ifu = sum(min(r["inductor_fused"], r["sites"]) for r in ind_rows)
        print(f"inductor: {ifu}/{isites} sites fused; compile failures: "
              f"{sum(1 for r in ind_rows if not r.get('inductor_ok'))}; numerical mismatches: "
              f"{sum(1 for r in ind_rows if r.get('inductor_ok') and (r.get('inductor_rel', 0) > R.TOL or r.get('inductor_grad_rel', 0) > R.GRAD_TOL))}")
    failing = [f"{r['case']}/{r['mode']}" for r in rows if not _passes(r)]
    print(f"rows not passing: {len(failing)}{': ' + ', '.join(failing) if failing else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "inner": args.inner, "impl": args.impl, "rows": rows}, f,
                      indent=1, default=str)
        print(f"wrote {args.json}")
    return 0 if not failing else 1


if __name__ == "__main__":
    sys.exit(main())
