"""Fuzz the attention matcher with >= 10,000 random compositions of spellings and
near-miss perturbations (the generator of tests/fuzz_gen.py, shared with the CI test).

    python benchmarks/fuzz_matcher.py --n 10000 [--seed 0] [--dialects fx,aten,dynamo] [--jobs 2]

Prints counts: fused / near-miss / mismatch (count, numerics, near-miss kind) / crash,
and a breakdown of the failures by recipe option, then a few failing examples in full.
Example i is drawn from random.Random(f"{seed}-{i}"), so any example is reproducible
with --only i.
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import random
import sys
import time
import warnings
from dataclasses import asdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)  # the checkout's attnfuse, whatever the editable install maps

from fuzz_gen import DIALECTS, draw_recipe, run_example  # noqa: E402

_ARGS = None


def _one(i):
    rng = random.Random(f"{_ARGS.seed}-{i}")
    r = draw_recipe(lambda name, options: rng.choice(options), dialects=_ARGS.dialects)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = run_example(r, strict=_ARGS.strict)
    return i, o.kind, o.detail if not o.ok else "", asdict(r), (o.source if not o.ok else "")


def _init(args):
    global _ARGS
    _ARGS = args
    import torch
    torch.set_num_threads(1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dialects", default=",".join(DIALECTS))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--strict", action="store_true", help="rewrite(strict=True): internal errors raise (count as crash)")
    ap.add_argument("--show", type=int, default=5, help="failing examples to print in full")
    ap.add_argument("--only", type=int, default=None, help="run only example i (verbose)")
    ap.add_argument("--json", default=None, help="write all failures to this file")
    args = ap.parse_args(argv)
    args.dialects = [d for d in args.dialects.split(",") if d]

    if args.only is not None:
        _init(args)
        i, kind, detail, recipe, src = _one(args.only)
        print(kind, json.dumps(recipe), detail, src, sep="\n")
        return 0

    t0 = time.time()
    counts = collections.Counter()
    by_dialect = collections.defaultdict(collections.Counter)
    fail_opts = collections.defaultdict(collections.Counter)
    failures = []
    indices = range(args.n)
    if args.jobs > 1:
        pool = mp.get_context("fork").Pool(args.jobs, initializer=_init, initargs=(args,))
        it = pool.imap_unordered(_one, indices, chunksize=8)
    else:
        _init(args)
        it = map(_one, indices)
    for done, (i, kind, detail, recipe, src) in enumerate(it, 1):
        counts[kind] += 1
        by_dialect[recipe["dialect"]][kind] += 1
        if kind not in ("fused", "near_miss", "near_miss_other_kind", "not_fused_ok"):  # "missed" is listed too
            failures.append({"i": i, "kind": kind, "detail": detail, "recipe": recipe, "source": src})
            for key in ("qk", "kt", "scale", "bias", "softmax", "pv", "gqa", "out", "perturb", "layout", "dialect",
                        "softcap", "cross", "sizes"):
                fail_opts[kind][f"{key}={recipe[key]}"] += 1
        if done % 500 == 0:
            print(f"  {done}/{args.n}  {dict(counts)}  {time.time() - t0:.0f}s", flush=True)
    if args.jobs > 1:
        pool.close()
        pool.join()

    n = sum(counts.values())
    mism = counts["count_mismatch"] + counts["numerics_mismatch"] + counts["unreported"]
    print(f"\nattnfuse matcher fuzz: n={n} seed={args.seed} dialects={','.join(args.dialects)} "
          f"({time.time() - t0:.0f}s)")
    print(f"  fused:               {counts['fused']}")
    print(f"  near-miss:           {counts['near_miss'] + counts['near_miss_other_kind']}  ({counts['near_miss']} with "
          f"the perturbation's kind, {counts['near_miss_other_kind']} with another kind)")
    print(f"  missed:              {counts['missed']}   (attention left unfused, with a near-miss reason: "
          f"coverage gap)")
    print(f"  mismatch:            {mism}")
    print(f"    count mismatch:    {counts['count_mismatch']}   (fused count differs from the composition's)")
    print(f"    NUMERICS mismatch: {counts['numerics_mismatch']}   (the rewrite changed the output: unsound)")
    print(f"    unreported:        {counts['unreported']}   (perturbed, not fused, but no near miss reported)")
    print(f"  crash:               {counts['crash']}")
    print(f"  harness errors:      {counts['harness']}   (bugs in the generator itself)")
    for d, c in sorted(by_dialect.items()):
        print(f"  [{d}] {dict(c)}")
    for kind, c in fail_opts.items():
        print(f"\n  {kind}: most common recipe options")
        for opt, k in c.most_common(12):
            print(f"    {k:5d}  {opt}")
    for f in sorted(failures, key=lambda f: (f["kind"] != "numerics_mismatch", f["i"]))[: args.show]:
        print(f"\n--- example {f['i']} ({f['kind']}): {f['detail'][:600]}")
        print(json.dumps(f["recipe"]))
        print(f["source"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"counts": counts, "failures": failures}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
