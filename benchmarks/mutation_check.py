"""Mutation check: does the test suite catch deliberate semantic bugs?

    python benchmarks/mutation_check.py [--jobs 2] [--only NAME[,NAME...]] [--list]
                                        [--out benchmarks/results/mutation_check.txt]

Holds a curated list of mutants (``mutants.py`` next to this file): each one a small,
exact string replacement in one source file (a scale off by 1 %, a causal alignment
flipped, a dropout mask shifted, a matcher that declines everything, ...), with the
tests that should catch it. For each mutant the script copies the repository (tracked
and untracked, not ignored, files) into a scratch folder under the system's temporary
directory, applies the replacement there, and runs the mutant's tests against that
copy (``python -m pytest -x`` from the copy's root, so ``attnfuse`` and its kernels and
passes are imported from the copy; the script checks that they are). A mutant whose
tests fail is caught (the first failing test is printed); one whose tests all pass
SURVIVED.

Before anything runs, every mutant's target text must occur in its file exactly as
often as the mutant declares (once unless stated): a target that the code no longer
contains fails the script loudly, so the list stays valid as the code changes. The
tests of every mutant are first run once on the unmutated copy (the baseline), which
must pass. Prints one row per mutant (caught by / SURVIVED / TIMEOUT / ERROR) and exits
non-zero if any mutant survived or errored.

This is a benchmark (minutes to an hour on 2 cores), not part of the CI test budget.
Extend ``mutants.py`` whenever a new path lands.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from mutants import MUTANTS, Mutant  # noqa: E402

TIMEOUT_S = 900


def repo_files(root: str) -> list[str]:
    """Tracked and untracked files that git does not ignore (relative paths)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=root, check=True, capture_output=True).stdout
    return sorted({p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(root, p))})


def validate(mutants: list[Mutant], root: str) -> list[str]:
    """Problems with the list: unknown files, target text not found the declared number of
    times, duplicate names, replacements that change nothing, missing test files."""
    problems, seen = [], set()
    for m in mutants:
        if m.name in seen:
            problems.append(f"{m.name}: duplicate name")
        seen.add(m.name)
        path = os.path.join(root, m.file)
        if not os.path.isfile(path):
            problems.append(f"{m.name}: no file {m.file}")
            continue
        text = open(path, encoding="utf-8").read()
        n = text.count(m.old)
        if n != m.count:
            problems.append(f"{m.name}: target text found {n} times in {m.file}, expected {m.count}: {m.old!r}")
        if m.old == m.new:
            problems.append(f"{m.name}: replacement equals the target")
        for t in m.tests:
            if not os.path.isfile(os.path.join(root, t.split("::")[0])):
                problems.append(f"{m.name}: no test file {t.split('::')[0]}")
    return problems


def make_copy(root: str, files: list[str], dest: str) -> None:
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
        shutil.copy2(os.path.join(root, rel), os.path.join(dest, rel))


def _env() -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTHONPATH", None)
    return env


def check_imports(copy: str) -> None:
    """The copy's own attnfuse, kernels and passes are the ones imported there."""
    code = ("import attnfuse, attnfuse.kernels.torch_impl as k, attnfuse.passes.match as p;"
            "print(attnfuse.__file__); print(k.__file__); print(p.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=_env(), capture_output=True,
                         text=True, check=True).stdout.split()
    real = os.path.realpath(copy)
    bad = [f for f in out if not os.path.realpath(f).startswith(real + os.sep)]
    if bad:
        raise SystemExit(f"the scratch copy does not import its own code: {bad}")


def run_tests(copy: str, tests: list[str], timeout: int) -> tuple[str, str, float]:
    """(status, detail, seconds): status "pass", "fail", "timeout" or "error"."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf",
           "-W", "ignore::DeprecationWarning", *tests]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=copy, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result in {timeout} s", time.time() - t0
    dt = time.time() - t0
    out = r.stdout + r.stderr
    if r.returncode == 0:
        return "pass", "", dt
    if r.returncode == 1:
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
        return "fail", failed[0] if failed else "(failure, no test id)", dt
    tail = " | ".join(out.strip().splitlines()[-3:])
    return "error", f"pytest exit {r.returncode}: {tail}", dt


def run_mutant(m: Mutant, copy: str, timeout: int) -> tuple[str, str, float]:
    path = os.path.join(copy, m.file)
    original = open(path, encoding="utf-8").read()
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original.replace(m.old, m.new))
        status, detail, dt = run_tests(copy, list(m.tests), timeout)
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
    verdict = {"fail": "caught", "pass": "SURVIVED", "timeout": "TIMEOUT", "error": "ERROR"}[status]
    return verdict, detail, dt


def table(rows) -> str:
    w = max(len(r[0]) for r in rows)
    lines = [f"{'mutant':<{w}}  {'result':<8}  {'s':>5}  caught by / detail", "-" * (w + 60)]
    for name, verdict, detail, dt in rows:
        lines.append(f"{name:<{w}}  {verdict:<8}  {dt:5.0f}  {detail}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (one scratch copy each)")
    ap.add_argument("--only", default=None, help="comma-separated mutant names (or regex with re:)")
    ap.add_argument("--list", action="store_true", help="validate and list the mutants, run nothing")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    ap.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per mutant's test run")
    ap.add_argument("--tests", default=None,
                    help="comma-separated test selections to run instead of each mutant's own "
                         "(to check that one test catches a planted bug)")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)

    problems = validate(MUTANTS, ROOT)
    if problems:
        print("INVALID MUTANT LIST (fix benchmarks/mutants.py):", *problems, sep="\n  ", file=sys.stderr)
        return 2
    chosen = MUTANTS
    if args.only:
        if args.only.startswith("re:"):
            chosen = [m for m in MUTANTS if re.search(args.only[3:], m.name)]
        else:
            names = args.only.split(",")
            unknown = set(names) - {m.name for m in MUTANTS}
            if unknown:
                print(f"unknown mutants: {sorted(unknown)}", file=sys.stderr)
                return 2
            chosen = [m for m in MUTANTS if m.name in names]
    if args.tests:
        chosen = [dataclasses.replace(m, tests=tuple(args.tests.split(","))) for m in chosen]
    if args.list:
        for m in chosen:
            print(f"{m.name:<40} {m.file:<32} {' '.join(m.tests)}")
        print(f"{len(chosen)} mutants, all targets found")
        return 0

    files = repo_files(ROOT)
    scratch = tempfile.mkdtemp(prefix="attnfuse-mutants-")
    copies = [os.path.join(scratch, f"copy{i}") for i in range(max(1, args.jobs))]
    for c in copies:
        make_copy(ROOT, files, c)
    check_imports(copies[0])
    print(f"{len(chosen)} mutants, {len(copies)} scratch copies under {scratch}", flush=True)
    t_start = time.time()
    try:
        if not args.no_baseline:
            tests = sorted({t for m in chosen for t in m.tests})
            status, detail, dt = run_tests(copies[0], tests, args.timeout * 2)
            print(f"baseline (unmutated, {len(tests)} selections): {status} in {dt:.0f} s {detail}", flush=True)
            if status != "pass":
                print("the baseline must pass before mutants mean anything", file=sys.stderr)
                return 2
        free = list(copies)
        rows = {}
        with cf.ThreadPoolExecutor(len(copies)) as pool:
            pending = {}
            queue = list(chosen)
            while queue or pending:
                while queue and free:
                    m, c = queue.pop(0), free.pop()
                    pending[pool.submit(run_mutant, m, c, args.timeout)] = (m, c)
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    m, c = pending.pop(fut)
                    free.append(c)
                    verdict, detail, dt = fut.result()
                    rows[m.name] = (m.name, verdict, detail, dt)
                    print(f"{m.name}: {verdict} ({dt:.0f} s) {detail}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ordered = [rows[m.name] for m in chosen]
    survived = [r for r in ordered if r[1] != "caught"]
    text = table(ordered)
    summary = (f"{len(ordered)} mutants: {len(ordered) - len(survived)} caught, "
               f"{sum(r[1] == 'SURVIVED' for r in ordered)} survived, "
               f"{sum(r[1] in ('TIMEOUT', 'ERROR') for r in ordered)} timeout/error "
               f"({time.time() - t_start:.0f} s, --jobs {args.jobs})")
    print("\n" + text + "\n" + summary)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(f"$ python benchmarks/mutation_check.py --jobs {args.jobs}"
                    + (f" --only {args.only}" if args.only else "") + "\n\n" + text + "\n\n" + summary + "\n")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
