"""Fuzz the attention matcher with >= 10,000 random compositions of spellings and
near-miss perturbations (the generator of tests/fuzz_gen.py, shared with the CI test).

    python benchmarks/fuzz_matcher.py --n 10000 [--seed 0|random] [--dialects fx,aten,dynamo] [--jobs 2]
                                      [--out benchmarks/results/fuzz_matcher.txt]

Prints counts: fused / near-miss / mismatch (count, numerics, near-miss kind) / crash,
the fraction of unperturbed compositions fused per dialect, and a breakdown of the
failures by recipe option, then a few failing examples in full. Example i is drawn from
random.Random(f"{seed}-{i}"), so any example is reproducible with --seed S --only i;
``--seed random`` draws a new seed (printed) for a randomised run. Exits 1 on any
failing example, or when a dialect fuses less than ``fuzz_gen.MIN_FUSED`` of its
unperturbed compositions (the bound the CI test applies to its fixed examples).
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

from fuzz_gen import DIALECTS, MIN_FUSED, draw_recipe, run_example  # noqa: E402

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
    ap.add_argument("--seed", default="0", help="an integer, or 'random' (a new seed, printed)")
    ap.add_argument("--dialects", default=",".join(DIALECTS))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--strict", action="store_true", help="rewrite(strict=True): internal errors raise (count as crash)")
    ap.add_argument("--show", type=int, default=5, help="failing examples to print in full")
    ap.add_argument("--only", type=int, default=None, help="run only example i (verbose)")
    ap.add_argument("--json", default=None, help="write all failures to this file")
    ap.add_argument("--out", default=None, help="also write the summary to this file")
    args = ap.parse_args(argv)
    args.seed = random.SystemRandom().randrange(10**9) if args.seed == "random" else int(args.seed)
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
    unperturbed = collections.defaultdict(collections.Counter)
    for done, (i, kind, detail, recipe, src) in enumerate(it, 1):
        counts[kind] += 1
        by_dialect[recipe["dialect"]][kind] += 1
        if recipe["perturb"] == "none":
            unperturbed[recipe["dialect"]]["n"] += 1
            unperturbed[recipe["dialect"]]["fused"] += kind == "fused"
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
    lines = [
        f"attnfuse matcher fuzz: n={n} seed={args.seed} dialects={','.join(args.dialects)} "
        f"({time.time() - t0:.0f}s)",
        f"  fused:               {counts['fused']}",
        f"  near-miss:           {counts['near_miss'] + counts['near_miss_other_kind']}  ({counts['near_miss']} with "
        f"the perturbation's kind, {counts['near_miss_other_kind']} with another kind)",
        f"  missed:              {counts['missed']}   (attention left unfused, with a near-miss reason: "
        f"coverage gap)",
        f"  mismatch:            {mism}",
        f"    count mismatch:    {counts['count_mismatch']}   (fused count differs from the composition's)",
        f"    NUMERICS mismatch: {counts['numerics_mismatch']}   (the rewrite changed the output: unsound)",
        f"    unreported:        {counts['unreported']}   (perturbed, not fused, but no near miss reported)",
        f"  crash:               {counts['crash']}",
        f"  harness errors:      {counts['harness']}   (bugs in the generator itself)",
    ]
    lines += [f"  [{d}] {dict(c)}" for d, c in sorted(by_dialect.items())]
    low = []
    for d, c in sorted(unperturbed.items()):
        frac = c["fused"] / c["n"] if c["n"] else 0.0
        if frac < MIN_FUSED.get(d, 0.0):
            low.append(d)
        lines.append(f"  [{d}] unperturbed compositions fused: {c['fused']} of {c['n']} ({frac:.3f}; "
                     f"bound {MIN_FUSED.get(d, 0.0)}){'  <-- BELOW THE BOUND' if d in low else ''}")
    print("\n" + "\n".join(lines))
    if args.out:
        with open(args.out, "w") as fh:
            flags = (f" --dialects {','.join(args.dialects)}" if args.dialects != list(DIALECTS) else "") + \
                (" --strict" if args.strict else "")
            fh.write(f"$ python benchmarks/fuzz_matcher.py --n {args.n} --seed {args.seed} --jobs {args.jobs}{flags}\n\n"
                     + "\n".join(lines) + "\n")
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
    return 1 if any(f["kind"] != "missed" for f in failures) or low else 0


if __name__ == "__main__":
    sys.exit(main())
