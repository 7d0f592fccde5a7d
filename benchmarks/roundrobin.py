"""Round-robin timing shared by the CPU crossover benchmarks (``lowp_crossover.py``,
``inline_crossover.py``): every implementation called on the same inputs, in eval (no
grad) and train (forward + backward) mode, the starting implementation rotating each
round so drift on a shared machine spreads evenly; one child process per case, and the
ratio cells of their tables."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

MODES = ("eval", "train")


def make_call(fns: Dict[str, Callable], q, k, v, dout) -> Callable[[str, str], None]:
    """call(impl, mode): ``fns[impl](q, k, v)`` under no_grad (eval), or with the gradient
    of q, k, v for ``dout`` (train)."""
    import torch

    def call(impl: str, mode: str) -> None:
        if mode == "eval":
            with torch.no_grad():
                fns[impl](q, k, v)
        else:
            out = fns[impl](q, k, v)
            torch.autograd.grad(out, (q, k, v), dout)

    return call


def round_robin(call: Callable[[str, str], None], impls: Sequence[str], reps: int) -> dict:
    """{"median": {"impl/mode": ms}, "min": {...}} over ``reps`` rounds after two warm-up
    calls of each (impl, mode); ``impls`` rotate their order each round."""
    impls = tuple(impls)
    times = {(i, m): [] for i in impls for m in MODES}
    for r in range(reps):
        for m in MODES:
            order = impls[r % len(impls):] + impls[:r % len(impls)]
            for i in order:
                t0 = time.perf_counter()
                call(i, m)
                times[(i, m)].append(1e3 * (time.perf_counter() - t0))
    return {"median": {f"{i}/{m}": statistics.median(t) for (i, m), t in times.items()},
            "min": {f"{i}/{m}": min(t) for (i, m), t in times.items()}}


def warm_up(call: Callable[[str, str], None], impl: str) -> None:
    """Two calls of ``impl`` per mode (the compile, then one steady call)."""
    for m in MODES:
        call(impl, m)
        call(impl, m)


def run_children(script: str, cases: Sequence[Sequence[str]], json_path: Optional[str]) -> List[dict]:
    """Runs ``python script --child *case`` for each case, one at a time, and returns the
    JSON record each prints last (also written to ``json_path`` when given)."""
    recs = []
    for case in cases:
        out = subprocess.run([sys.executable, script, "--child", *case], capture_output=True,
                             text=True, check=True).stdout
        recs.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  done {' '.join(case)}", file=sys.stderr, flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(recs, f, indent=1)
    return recs


def ratio(rec: dict, impl: str, ref: str, mode: str) -> str:
    """``impl`` time / ``ref`` time of one record: on medians (on minima)."""
    med, lo = rec["median"], rec["min"]
    return (f"{med[f'{impl}/{mode}'] / med[f'{ref}/{mode}']:.2f}x "
            f"({lo[f'{impl}/{mode}'] / lo[f'{ref}/{mode}']:.2f}x)")
