"""End-to-end CPU benchmark: whole models, eager vs Inductor vs attnfuse (issue 6 §1, §2).

Owns the model zoo of this benchmark (GPT-2-, LLaMA-, BERT- and ViT-shaped Hugging Face models
built from config classes, no download), the measurement of one group of runs in a child process,
and the report (markdown table, JSON, memory fits, plot). Nothing asserts on these numbers.

    python benchmarks/e2e.py [--models gpt2 llama bert vit gpt2:pad-right ...] [--lengths 512 ...]
                             [--dtypes fp32 bf16] [--modes eval train] [--reps 3] [--layers 2]
                             [--check-length 8192] [--out e2e.md] [--json e2e.json] [--plot e2e.png]

Models: hidden 256, 4 heads of 64 (LLaMA: 4 query / 2 key-value heads), MLP 1024, vocabulary 4096,
8192 positions, ``--layers`` layers, every dropout probability 0 (so train mode computes the same
function in all three variants), the libraries' eager attention (``attn_implementation="eager"``).
GPT-2 and LLaMA are causal; BERT and ViT are not. ViT (patch 16) gets a square image whose patch
count is the nearest square to L (plus the CLS token), with ``interpolate_pos_encoding=True``.
Padded cases (``NAME:pad-right`` / ``NAME:pad-left``): batch 2, Hugging Face ``attention_mask``
where the second sequence holds 60 % real tokens and 40 % padding (right, or left for the
causal models); the plain cases have batch 1 and no mask argument.

Variants: ``eager``; ``inductor`` = ``torch.compile(model)``; ``attnfuse`` =
``torch.compile(model, backend="attnfuse")`` (inner Inductor). Modes: ``eval`` = forward under
``torch.no_grad``; ``train`` = forward + loss (mean of squared outputs) + backward in train mode.

One child process per (case, dtype, mode) (``--jobs`` of them at once, default 1, with one torch
thread each: two children at once on a 2-core machine compete for memory bandwidth and moved rows
by +-20 %; the three variants of a child share its core round-robin, so their ratios stay fair when
the absolute times drift) builds the model once, deep-copies it for the two compiled
variants (identical weights), and runs all lengths in increasing order. Recompiles: every input's
sequence dimension (ViT: image height and width) is marked ``maybe_mark_dynamic`` and dynamo's cache
limit is raised to 64, the same for both compiled variants; the number of graphs each compiled is
reported (a model that specialises on the length recompiles rather than falling back). Inductor's FX graph
caches are off (compile time is real, and every graph goes through the counting pass).

Per length: one warm-up call of each variant (the compile, on the first length); the outputs (train:
also parameter gradients) compared, as max |diff| / max |ref|, with eager's (fp32) or with an fp32
copy of the bf16 model (bf16; see ``mismatch``);
peak memory of one steady-state call per variant = the resident set's high-water mark during the
call (reset through ``/proc/self/clear_refs``) minus the resident set just before it; then ``--reps``
rounds that call the three variants round-robin (rotating who goes first), min and median per
variant. Memory runs fix glibc's mmap threshold at 256 KiB and trim the heap first, so memory freed
by earlier calls cannot hide this call's peak; timed runs fix it at 32 MiB, where glibc's adaptive
threshold settles (see ``_malloc_mode``).

Fused sites: attnfuse's from its reports (``attnfuse.backend.collect_reports``); Inductor's from the
SDPA nodes in its forward post-grad graphs (a ``post_grad_custom_post_pass``; backward graphs, with
``tangents`` inputs, are not counted).

Memory growth: per (case, dtype, mode, variant), ``peak = a + b·L + c·L²`` fitted by least squares
over the measured lengths; the longest L whose fitted peak stays under 16 GiB is EXTRAPOLATED from
that fit (a straight line where the fitted c is not positive). ``--check-length`` measures the peak
of the plain eval fp32 groups once more at a longer L (no timing there) and prints the fit's
prediction beside the measurement.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = ("eager", "inductor", "attnfuse")
#: ``--ab-fused-lowering`` adds this variant: the attnfuse backend with calls that run one
#: fused-kernel call left on the op (``torch_inline.USE_FUSED_LOWERING`` off while it runs)
OP_VARIANT = "attnfuse-op"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
BASE_MODELS = ("gpt2", "llama", "bert", "vit")
CAUSAL = {"gpt2", "llama"}
DEFAULT_CASES = ("gpt2", "llama", "bert", "vit", "gpt2:pad-right", "gpt2:pad-left",
                 "llama:pad-right", "llama:pad-left", "bert:pad-right")
HIDDEN, HEADS, KV_HEADS, MLP, VOCAB, POSITIONS, PATCH = 256, 4, 2, 1024, 4096, 8192, 16
PAD_KEEP = 0.6                  # the padded sequence's share of real tokens
BUDGET_MIB = 16 * 1024          # "fits in 16 GB"
TOL = {"fp32": (1e-4, 1e-3), "bf16": (1e-2, 5e-2)}   # (outputs, gradients), max |diff| / max |ref|


# ------------------------------------------------------------------------------------ the models

def parse_case(case: str) -> Tuple[str, Optional[str]]:
    """``"gpt2:pad-left"`` -> ("gpt2", "left"); ``"bert"`` -> ("bert", None)."""
    name, _, pad = case.partition(":")
    if name not in BASE_MODELS:
        raise ValueError(f"--models: unknown model {name!r} (known: {', '.join(BASE_MODELS)})")
    if pad not in ("", "pad-right", "pad-left"):
        raise ValueError(f"--models: unknown variant {pad!r} in {case!r} (pad-right | pad-left)")
    if pad and name == "vit":
        raise ValueError(f"--models: {case!r}: ViT takes no attention mask")
    if pad == "pad-left" and name not in CAUSAL:
        raise ValueError(f"--models: {case!r}: left padding is for the causal models (gpt2, llama)")
    return name, (pad[4:] if pad else None)


def build_model(name: str, layers: int, train: bool):
    """The eager Hugging Face model (a ``real_models.TupleModel``), its attention-site count."""
    import transformers
    import real_models as R

    common = dict(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=layers,
                  num_attention_heads=HEADS)
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=MLP, n_layer=layers,
                                      n_head=HEADS, n_positions=POSITIONS, bos_token_id=1, eos_token_id=2)
        cls, extra = transformers.GPT2Model, {}
    elif name == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=KV_HEADS,
                                       max_position_embeddings=POSITIONS, **common)
        cls, extra = transformers.LlamaModel, {}
    elif name == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=POSITIONS, **common)
        cls, extra = transformers.BertModel, {}
    else:
        cfg = transformers.ViTConfig(image_size=PATCH * 64, patch_size=PATCH, **common)
        cls, extra = transformers.ViTModel, {"interpolate_pos_encoding": True}
    model = R._hf(cls, cfg, train, 0.0)   # every dropout 0, use_cache off, eager attention
    names = ("pixel_values",) if name == "vit" else ("input_ids", "attention_mask")
    return R.TupleModel(model, names, ("last_hidden_state",), extra), layers


def make_inputs(name: str, pad: Optional[str], length: int, dtype) -> Tuple[tuple, int]:
    """The inputs at sequence length ``length`` and the token count the model really sees."""
    import torch
    import real_models as R

    g = torch.Generator().manual_seed(length)
    if name == "vit":
        side = max(1, round(math.sqrt(length)))
        px = torch.randn(1, 3, side * PATCH, side * PATCH, generator=g).to(dtype)
        return (px,), side * side + 1
    if pad is None:
        return (torch.randint(3, VOCAB, (1, length), generator=g),), length
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = R.padding_mask(length, pad=(0, length - round(PAD_KEEP * length)), left=pad == "left")
    return (ids, mask), length


# ------------------------------------------------------------------------------------ the child

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # resets VmHWM to the current VmRSS


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc mallopt parameters


def _malloc_mode(measure_memory: bool) -> None:
    """glibc serves blocks above its mmap threshold with mmap and unmaps them on free; smaller
    freed blocks stay in the heap, where a later call reuses them unseen by the RSS. For memory
    runs the threshold is fixed low (256 KiB) and the heap trimmed, so a call's peak shows in the
    RSS; for timed runs it is fixed at 32 MiB, the value glibc's own adaptive threshold climbs to."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    mmap = 256 * 1024 if measure_memory else 32 * 1024 * 1024
    if not (libc.mallopt(_M_MMAP_THRESHOLD, mmap) and libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap)):
        raise RuntimeError("mallopt failed")
    if measure_memory:
        libc.malloc_trim(0)


class _Counter:
    """Counts, per variant, forward graphs and their SDPA / attnfuse nodes after Inductor's post-grad passes."""

    def __init__(self) -> None:
        self.variant = "eager"
        self.stats: Dict[str, Dict[str, int]] = {}

    def __call__(self, graph) -> None:
        if any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes):
            return  # a backward graph
        s = self.stats.setdefault(self.variant, {"graphs": 0, "sdpa": 0, "attnfuse": 0})
        s["graphs"] += 1
        for n in graph.nodes:
            if n.op == "call_function":
                t = str(n.target)
                s["sdpa"] += "scaled_dot_product" in t and "backward" not in t
                s["attnfuse"] += t.startswith("attnfuse.flash_attention") and "backward" not in t


def _fusion_label(f) -> str:
    """``causal/bias`` plus the structural masks and GQA of one attnfuse fusion record."""
    extra = [f"window={f.window}" if getattr(f, "window", 0) else "",
             "key_mask" if getattr(f, "key_mask", "") else "", "gqa" if f.gqa else ""]
    return " ".join([f"{f.causal}/{f.bias}"] + [e for e in extra if e])


def _step(model, inputs, train: bool):
    import torch

    if not train:
        with torch.no_grad():
            return model(*inputs)[0]
    model.zero_grad(set_to_none=True)
    out = model(*inputs)[0]
    out.float().square().mean().backward()
    return out.detach()


def _compare(ref, got, ref_grads, got_grads) -> dict:
    import real_models as R

    res = {"out_rel": R.errors(ref, got)[1]}
    if ref_grads is not None:
        res["grad_rel"] = R.grad_errors(ref_grads, got_grads)[1]
    return res


def paired_ratio_ci(rec: dict) -> Optional[Tuple[int, float, float, float]]:
    """(rounds, median, lo, hi) of the per-round ratio inductor / attnfuse of one record:
    the median of the ratios and the order-statistics interval [r_(k), r_(n+1-k)] around it,
    k the largest with P(Binomial(n, 1/2) < k) <= 0.025 (coverage >= 95 %, no assumption on
    the distribution); None without per-round times or with fewer than 6 rounds."""
    rounds = rec.get("ms_rounds", {})
    ind, af = rounds.get("inductor"), rounds.get("attnfuse")
    if not ind or not af or len(ind) != len(af) or len(ind) < 6:
        return None
    ratios = sorted(i / a for i, a in zip(ind, af))
    n = len(ratios)
    k, tail = 0, 0.0
    while True:
        nxt = tail + math.comb(n, k) / 2 ** n   # P(Bin < k + 1)
        if nxt > 0.025:
            break
        tail, k = nxt, k + 1
    k = max(k, 1)
    return n, statistics.median(ratios), ratios[k - 1], ratios[n - k]


def run_group(case: str, dtype_name: str, mode: str, lengths: Sequence[int], reps: int, layers: int,
              check_length: int, threads: int, lowp: bool = True, inline: bool = True,
              fused_lowering: bool = True, timed: Sequence[str] = VARIANTS, clock: str = "wall") -> None:
    """Measure one (case, dtype, mode) for every length; print one JSON line per length to stdout."""
    import torch
    import torch._dynamo
    import torch._inductor.config as icfg
    import real_models as R
    from attnfuse.backend import collect_reports

    from attnfuse.kernels import torch_inline, torch_lowp

    torch_lowp.USE_LOWP = lowp   # --no-lowp: the bf16 GEMM path off (an A/B of that path)
    torch_inline.USE_INLINE = inline   # --no-inline: no small call inlined for Inductor (an A/B)
    torch_inline.USE_FUSED_LOWERING = fused_lowering   # --no-fused-lowering: the op, not one aten call
    name, pad = parse_case(case)
    train = mode == "train"
    dtype = getattr(torch, DTYPES[dtype_name])
    torch.set_num_threads(threads)
    torch._dynamo.config.cache_size_limit = 64
    _malloc_mode(measure_memory=False)
    icfg.fx_graph_cache = False
    if hasattr(icfg, "autograd_cache"):
        icfg.autograd_cache = False
    counter = _Counter()
    icfg.post_grad_custom_post_pass = counter

    torch.manual_seed(0)
    eager, sites = build_model(name, layers, train)
    eager = eager.to(dtype)
    models = {"eager": eager,
              "inductor": torch.compile(copy.deepcopy(eager)),
              "attnfuse": torch.compile(copy.deepcopy(eager), backend="attnfuse")}
    variants = VARIANTS
    if OP_VARIANT in timed:   # the same backend, the lowering off while it runs (and compiles)
        models[OP_VARIANT] = torch.compile(copy.deepcopy(eager), backend="attnfuse")
        variants = VARIANTS + (OP_VARIANT,)
    # bf16: every variant is compared with an fp32 copy of the same (bf16-rounded) weights
    ref_model = None if dtype == torch.float32 else copy.deepcopy(eager).float()
    fusions: List[str] = []
    near: List[str] = []

    def call(v: str, inputs):
        counter.variant = v
        torch_inline.USE_FUSED_LOWERING = fused_lowering and v != OP_VARIANT
        if v == OP_VARIANT:
            return _step(models[v], inputs, train)
        if v != "attnfuse":
            return _step(models[v], inputs, train)
        with collect_reports() as reps_:
            out = _step(models[v], inputs, train)
        for r in reps_:
            fusions.extend(_fusion_label(f) for f in r.fusions)
            near.extend(f"{m.kind}: {m.reason}" for m in r.near_misses)
        return out

    todo = list(lengths) + ([check_length] if check_length else [])
    for i, length in enumerate(todo):
        checking = bool(check_length) and i == len(lengths)
        inputs, tokens = make_inputs(name, pad, length, dtype)
        for t in inputs:
            for d in (2, 3) if name == "vit" else (1,):
                torch._dynamo.maybe_mark_dynamic(t, d)
        rec = {"case": case, "model": name, "pad": pad, "dtype": dtype_name, "mode": mode,
               "L": length, "tokens": tokens, "batch": inputs[0].shape[0], "layers": layers, "reps": reps,
               "sites": sites, "check": checking, "threads": torch.get_num_threads(), "lowp": lowp,
               "inline": inline, "fused_lowering": fused_lowering, "timed": list(timed), "clock": clock,
               "torch": torch.__version__, "errors": {}, "first_call_s": {}, "peak_mib": {},
               "ms_min": {}, "ms_median": {}, "cmp": {}}
        print(f"[{case} {dtype_name} {mode}] L={length}", file=sys.stderr, flush=True)
        ok = {}
        ref = None   # (outputs, gradients) of the fp32 reference
        if ref_model is not None:
            out = _step(ref_model, tuple(t.float() if t.is_floating_point() else t for t in inputs), train)
            ref = (out, R.grads(ref_model) if train else None)
            ref_model.zero_grad(set_to_none=True)
        for v in variants:   # warm-up (compiles on the first length) and the correctness check
            try:
                t0 = time.perf_counter()
                out = call(v, inputs)
                rec["first_call_s"][v] = round(time.perf_counter() - t0, 2)
                grads = R.grads(getattr(models[v], "_orig_mod", models[v])) if train else None
                if ref is None:   # fp32: eager is the reference
                    ref = (out, grads)
                else:
                    rec["cmp"][v] = _compare(ref[0], out, ref[1], grads)
                ok[v] = True
            except Exception as e:  # noqa: BLE001  (an out-of-memory or a compile error: keep going)
                msg = " ".join(x.strip() for x in str(e).splitlines() if x.strip())
                rec["errors"][v] = f"{type(e).__name__}: {msg[:300]}"
            out = grads = None
        ref = None
        for v in variants:   # peak memory of one steady-state call
            if ok.get(v) and v in timed:
                if train:
                    models[v].zero_grad(set_to_none=True)
                gc.collect()
                _malloc_mode(measure_memory=True)
                base = _status_kib("VmRSS")
                _reset_peak()
                out = call(v, inputs)
                rec["peak_mib"][v] = round((_status_kib("VmHWM") - base) / 1024, 1)
                del out
        _malloc_mode(measure_memory=False)
        times: Dict[str, List[float]] = {v: [] for v in variants if ok.get(v) and v in timed}
        order = list(times)
        now = time.process_time if clock == "cpu" else time.perf_counter
        for r in range(0 if checking else reps):   # round-robin, rotating who goes first
            for v in order[r % len(order):] + order[:r % len(order)]:
                t0 = now()
                call(v, inputs)
                times[v].append(1e3 * (now() - t0))
        for v, ts in times.items():
            if not ts:
                continue
            rec["ms_min"][v] = round(min(ts), 2)
            rec["ms_median"][v] = round(statistics.median(ts), 2)
            rec.setdefault("ms_rounds", {})[v] = [round(t, 2) for t in ts]   # per round, paired by index
        rec["compiled"] = {v: dict(counter.stats.get(v, {})) for v in ("inductor", "attnfuse")}
        rec["attnfuse_fusions"] = sorted(set(fusions))
        rec["attnfuse_near_misses"] = sorted(set(near))
        rec["attnfuse_fused_total"] = len(fusions)
        print(json.dumps(rec), flush=True)


# ------------------------------------------------------------------------------------ the parent

def _run_child(case: str, dtype: str, mode: str, args) -> List[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, dtype, mode,
           "--lengths", *map(str, args.lengths), "--reps", str(args.reps), "--layers", str(args.layers),
           "--threads", str(args.threads)] + (["--no-lowp"] if args.no_lowp else []) \
        + (["--no-inline"] if args.no_inline else []) \
        + (["--no-fused-lowering"] if args.no_fused_lowering else []) + ["--timed", *args.timed] \
        + ["--clock", args.clock]
    plain = ":" not in case and dtype == "fp32" and mode == "eval"
    cmd += ["--check-length", str(args.check_length if plain else 0)]
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if args.verbose else subprocess.PIPE,
                              text=True, env=env, timeout=args.child_timeout)
        stdout, rc, stderr = proc.stdout, proc.returncode, proc.stderr or ""
    except subprocess.TimeoutExpired as e:   # keep the lengths it finished
        out = e.stdout or b""
        stdout, rc, stderr = out.decode() if isinstance(out, bytes) else out, "timeout", ""
    recs = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    msg = f"  {case} {dtype} {mode}: {len(recs)} lengths in {time.perf_counter() - t0:.0f}s"
    if rc:
        msg += f", exit {rc}: " + " | ".join(stderr.strip().splitlines()[-3:])
    print(msg, file=sys.stderr, flush=True)
    return recs


def fit(points: Sequence[Tuple[int, float]]) -> Optional[dict]:
    """Least-squares ``peak = a + b·L + c·L²`` (MiB, L in units of 1024 tokens) and the largest L
    whose fitted peak stays within 16 GiB. Where the fitted c is not positive (no measurable
    quadratic growth), the limit comes from a straight-line fit instead (``l_max_from`` says which)."""
    import numpy as np

    if len(points) < 3:
        return None
    x = np.array([p[0] for p in points], dtype=float) / 1024.0
    y = np.array([p[1] for p in points], dtype=float)
    c, b, a = (float(v) for v in np.polyfit(x, y, 2))
    if c > 0:   # the positive root of c x² + b x + (a - budget)
        l_max, how = 1024 * (-b + math.sqrt(b * b - 4 * c * (a - BUDGET_MIB))) / (2 * c), "quadratic"
    else:
        b1, a1 = (float(v) for v in np.polyfit(x, y, 1))
        l_max, how = (1024 * (BUDGET_MIB - a1) / b1, "linear") if b1 > 0 else (math.inf, "no growth")
    return {"a_mib": a, "b_mib_per_1k": b, "c_mib_per_1k2": c, "l_max_16g": l_max, "l_max_from": how,
            "predict": lambda L: a + b * L / 1024 + c * (L / 1024) ** 2}


def mismatch(r: dict) -> bool:
    """Whether attnfuse's error is out of bounds: fp32, against eager, TOL; bf16, against an fp32 run of
    the same weights, more than TOL or twice eager bf16's own error, whichever is larger."""
    af, ea = r["cmp"].get("attnfuse"), r["cmp"].get("eager", {})
    if af is None:
        return False
    for i, key in enumerate(("out_rel", "grad_rel")):
        bound = max(TOL[r["dtype"]][i], 2 * ea.get(key, 0.0))
        if af.get(key, 0.0) > bound:
            return True
    return False


def _per_graph(comp: dict, variant: str, key: str) -> str:
    """Fused sites per compiled forward graph (the counts add up over recompiles)."""
    c = comp.get(variant, {})
    return f"{c[key] / c['graphs']:g}" if c.get("graphs") else "-"


def _af_per_graph(r: dict) -> str:
    """attnfuse's fusions per compiled forward graph, from its reports: calls inlined for
    Inductor count (they leave no op node in the post-grad graph)."""
    graphs = r.get("compiled", {}).get("attnfuse", {}).get("graphs")
    total = r.get("attnfuse_fused_total")
    return f"{total / graphs:g}" if graphs and total is not None else "-"


def _fmt_ratio(x: Optional[float], y: Optional[float]) -> str:
    return f"{x / y:.2f}x" if x and y else "-"


def _fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def report(recs: List[dict], args) -> Tuple[str, List[dict]]:
    """The markdown report and the memory-fit rows."""
    main = [r for r in recs if not r["check"]]
    lines = []
    r0 = recs[0] if recs else {}
    lines.append(f"# attnfuse end-to-end CPU benchmark\n\n"
                 f"torch {r0.get('torch')}, {r0.get('threads')} torch thread(s) per child process, "
                 f"{getattr(args, 'jobs', 1)} child processes at once, {args.layers} layers, hidden {HIDDEN}, "
                 f"{HEADS} heads of {HIDDEN // HEADS} (LLaMA {KV_HEADS} kv heads), dropout 0; "
                 f"{r0.get('reps', args.reps)} round-robin reps, times are medians (min in the JSON) of "
                 f"{'the child process CPU time' if r0.get('clock') == 'cpu' else 'wall time'}; "
                 f"peak = RSS high-water mark of one steady-state call above the RSS before it. "
                 f"Dynamic sequence dim (`maybe_mark_dynamic`), dynamo cache limit 64, for both compiled variants. "
                 f"Ratios > 1 mean attnfuse is faster / smaller; time ratios on medians (on minima). "
                 f"`fused` = attention sites fused by inductor / attnfuse per compiled forward graph, out of `sites` "
                 f"(attnfuse's from its reports: calls inlined for Inductor count). "
                 f"`err` = max |diff| / "
                 f"max |reference| over the outputs (train: per parameter gradient, see real_models.grad_errors): "
                 f"fp32 against eager; bf16 against an fp32 run of the same weights (so eager has an error too). "
                 f"MISMATCH: attnfuse's error above {TOL['fp32']} (fp32) or above max({TOL['bf16']}, 2x eager's) "
                 f"(bf16).\n")
    lines.append("| case | dtype | mode | L | eager ms | ind ms | af ms | eager/af | ind/af | "
                 "eager MiB | ind MiB | af MiB | mem eager/af | mem ind/af | fused ind/af (sites) | "
                 "out err eager/ind/af | grad err eager/ind/af | notes |")
    lines.append("|" + "---|" * 18)
    for r in main:
        t, tmin, m = r["ms_median"], r["ms_min"], r["peak_mib"]
        comp = r.get("compiled", {})
        notes = "; ".join(f"{v}: {e}" for v, e in r["errors"].items())
        if mismatch(r):
            notes = ("MISMATCH " + notes).strip()

        def errs(key: str) -> str:
            vals = [r["cmp"].get(v, {}).get(key) for v in VARIANTS]
            return "-" if all(x is None for x in vals) else "/".join(_fmt(x, ".0e") for x in vals)

        def tr(v: str) -> str:   # ratio on medians (ratio on minima)
            return f"{_fmt_ratio(t.get(v), t.get('attnfuse'))} ({_fmt_ratio(tmin.get(v), tmin.get('attnfuse'))})"

        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['mode']} | {r['tokens']} | {_fmt(t.get('eager'))} | "
            f"{_fmt(t.get('inductor'))} | {_fmt(t.get('attnfuse'))} | {tr('eager')} | {tr('inductor')} | "
            f"{_fmt(m.get('eager'), '.0f')} | {_fmt(m.get('inductor'), '.0f')} | {_fmt(m.get('attnfuse'), '.0f')} | "
            f"{_fmt_ratio(m.get('eager'), m.get('attnfuse'))} | {_fmt_ratio(m.get('inductor'), m.get('attnfuse'))} | "
            f"{_per_graph(comp, 'inductor', 'sdpa')}/{_af_per_graph(r)} "
            f"({r['sites']}) | {errs('out_rel')} | {errs('grad_rel')} | {notes} |")

    # rows below Inductor on medians: within noise, or below? (issue 20)
    below = [(r, paired_ratio_ci(r)) for r in main
             if r["ms_median"].get("attnfuse") and r["ms_median"].get("inductor")
             and r["ms_median"]["inductor"] / r["ms_median"]["attnfuse"] < 1.0]
    if below:
        lines.append("\n## Rows below Inductor on medians: the paired per-round ratio\n")
        lines.append("Per round r the ratio ind_r / af_r of the two variants timed in that round (the same "
                     "round-robin), its median and a distribution-free confidence interval of that median "
                     "(order statistics, binomial, >= 95 %). A row counts as below Inductor only where the "
                     "whole interval lies below 1.00; otherwise it is within noise.\n")
        lines.append("| case | dtype | mode | L | rounds | median ind/af per round | CI | verdict |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r, ci in below:
            if ci is None:
                lines.append(f"| {r['case']} | {r['dtype']} | {r['mode']} | {r['tokens']} | - | - | - | "
                             f"too few rounds for an interval |")
                continue
            n, med, lo, hi = ci
            verdict = "below" if hi < 1.0 else "within noise"
            lines.append(f"| {r['case']} | {r['dtype']} | {r['mode']} | {r['tokens']} | {n} | {med:.3f} | "
                         f"[{lo:.3f}, {hi:.3f}] | {verdict} |")

    # what attnfuse fused, compile counts and times, per group
    lines.append("\n## Fusions and compiles per group\n")
    lines.append("| case | dtype | mode | attnfuse fusions (causal/bias) | near misses | graphs ind/af | "
                 "first call s (eager/ind/af, first L) |")
    lines.append("|---|---|---|---|---|---|---|")
    groups: Dict[tuple, List[dict]] = {}
    for r in main:
        groups.setdefault((r["case"], r["dtype"], r["mode"]), []).append(r)
    for key, rs in groups.items():
        last, first = rs[-1], rs[0]
        c = last.get("compiled", {})
        fc = first["first_call_s"]
        lines.append(f"| {' | '.join(key)} | {', '.join(last['attnfuse_fusions']) or '-'} | "
                     f"{'; '.join(last['attnfuse_near_misses']) or '-'} | "
                     f"{c.get('inductor', {}).get('graphs', '-')}/{c.get('attnfuse', {}).get('graphs', '-')} | "
                     f"{fc.get('eager', '-')}/{fc.get('inductor', '-')}/{fc.get('attnfuse', '-')} |")

    # memory growth
    lines.append("\n## Peak memory growth: fit peak = a + b·L + c·L² (L in units of 1024 tokens, MiB)\n")
    lines.append("The longest L under 16 GiB is EXTRAPOLATED from the fit (the model's weights and the "
                 "process's resident set before the call are not counted). `check` = one measurement at a "
                 "longer L against the fit's prediction.\n")
    lines.append("| case | dtype | mode | variant | a MiB | b MiB/1k | c MiB/1k² | L max in 16 GiB (extrap.) | check |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    fits = []
    checks = {(r["case"], r["dtype"], r["mode"]): r for r in recs if r["check"]}
    for key, rs in groups.items():
        for v in VARIANTS:
            pts = [(r["tokens"], r["peak_mib"][v]) for r in rs if v in r["peak_mib"]]
            f = fit(pts)
            if f is None:
                continue
            chk = "-"
            cr = checks.get(key)
            if cr and v in cr["peak_mib"]:
                chk = f"L={cr['tokens']}: measured {cr['peak_mib'][v]:.0f}, fit {f['predict'](cr['tokens']):.0f}"
            elif cr:
                chk = f"L={cr['tokens']}: {cr['errors'].get(v, 'not run')}"
            lm = f["l_max_16g"]
            fits.append({"case": key[0], "dtype": key[1], "mode": key[2], "variant": v,
                         **{k: f[k] for k in ("a_mib", "b_mib_per_1k", "c_mib_per_1k2", "l_max_16g", "l_max_from")},
                         "points": pts, "check": chk})
            lines.append(f"| {' | '.join(key)} | {v} | {f['a_mib']:.0f} | {f['b_mib_per_1k']:.1f} | "
                         f"{f['c_mib_per_1k2']:.2f} | {'-' if math.isinf(lm) else f'{lm:,.0f}'} ({f['l_max_from']}) | {chk} |")
    return "\n".join(lines) + "\n", fits


def plot(recs: List[dict], path: str) -> None:
    """Peak memory vs L (top row) and latency ratios vs L (bottom row), one column per mode, fp32."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    main = [r for r in recs if not r["check"] and ":" not in r["case"]]
    modes = sorted({r["mode"] for r in main}) or ["eval"]
    dtype = "fp32" if any(r["dtype"] == "fp32" for r in main) else (main[0]["dtype"] if main else "fp32")
    fig, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 9), squeeze=False)
    styles = {"eager": ":", "inductor": "--", "attnfuse": "-"}
    for j, mode in enumerate(modes):
        ax_m, ax_t = axes[0][j], axes[1][j]
        for k, case in enumerate(sorted({r["case"] for r in main})):
            rs = [r for r in main if r["case"] == case and r["mode"] == mode and r["dtype"] == dtype]
            color = f"C{k}"
            for v in VARIANTS:
                pts = [(r["tokens"], r["peak_mib"][v]) for r in rs if v in r["peak_mib"]]
                if pts:
                    ax_m.plot(*zip(*pts), styles[v], marker="o", color=color, label=f"{case} {v}")
            for v, mk in (("inductor", "s"), ("eager", "o")):
                pts = [(r["tokens"], r["ms_median"][v] / r["ms_median"]["attnfuse"]) for r in rs
                       if v in r["ms_median"] and "attnfuse" in r["ms_median"]]
                if pts:
                    ax_t.plot(*zip(*pts), styles[v], marker=mk, color=color, label=f"{case} {v}/attnfuse")
        ax_m.set(title=f"peak memory of one call, {dtype} {mode}", xlabel="sequence length (tokens)",
                 ylabel="MiB above the RSS before the call")
        ax_t.axhline(1.0, color="gray", lw=0.8)
        ax_t.set(title=f"latency ratio (>1: attnfuse faster), {dtype} {mode}", xlabel="sequence length (tokens)",
                 ylabel="time / attnfuse time", yscale="log")
        ax_t.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
        ax_t.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
        for ax in (ax_m, ax_t):
            ax.legend(fontsize=7, ncol=2)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_CASES),
                    help="cases: gpt2 llama bert vit, optionally NAME:pad-right or NAME:pad-left")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--modes", nargs="+", choices=["eval", "train"], default=["eval", "train"])
    ap.add_argument("--pad-dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32"],
                    help="dtypes for the padded cases (default fp32 only, to keep the run short)")
    ap.add_argument("--pad-modes", nargs="+", choices=["eval", "train"], default=["eval"],
                    help="modes for the padded cases (default eval only, to keep the run short)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per child (default 1: on a shared machine, OpenMP threads that wait "
                         "for a descheduled sibling make 2-thread timings meaningless)")
    ap.add_argument("--check-length", type=int, default=8192,
                    help="one extra length for the plain fp32 eval groups, to check the memory fit (0: off)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="child processes at once (default 1: two at once compete for memory bandwidth "
                         "and move rows by +-20 %%), each with --threads torch threads")
    ap.add_argument("--child-timeout", type=int, default=1200)
    ap.add_argument("--out", help="markdown report file")
    ap.add_argument("--json", help="raw records and fits as JSON")
    ap.add_argument("--plot", help="PNG: peak memory and latency ratios vs L")
    ap.add_argument("--from-json", help="re-render the report and plot from a --json file; run nothing")
    ap.add_argument("--no-lowp", action="store_true",
                    help="switch the CPU bf16 GEMM path (kernels/torch_lowp.py) off, to A/B it")
    ap.add_argument("--no-inline", action="store_true",
                    help="inline no small CPU call for Inductor (kernels/torch_inline.py), to A/B it")
    ap.add_argument("--no-fused-lowering", action="store_true",
                    help="keep the op on calls that run one fused-kernel call, not lowered to that aten call "
                         "(torch_inline.fused_attention), to A/B it")
    ap.add_argument("--timed", nargs="+", choices=VARIANTS + (OP_VARIANT,), default=list(VARIANTS),
                    help="variants timed and measured for memory (all are run once and checked); leaving "
                         f"eager out shortens a run that compares attnfuse with Inductor; {OP_VARIANT!r} adds "
                         "the attnfuse backend with the fused-kernel lowering off (an A/B in one process)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="what a call's time is: wall time (default), or the CPU time of the child process "
                         "(time.process_time; with one torch thread, the work of the call itself, much less "
                         "sensitive than wall time to other jobs on an oversubscribed machine)")
    ap.add_argument("--verbose", action="store_true", help="pass the children's stderr through")
    ap.add_argument("--child", nargs=3, metavar=("CASE", "DTYPE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        for case in args.models:
            parse_case(case)
    except ValueError as e:
        ap.error(str(e))
    if min(args.reps, args.layers, args.threads, args.jobs, *args.lengths) < 1:
        ap.error("--reps, --layers, --threads, --jobs and --lengths must be positive")
    if args.child:
        run_group(*args.child, sorted(args.lengths), args.reps, args.layers, args.check_length, args.threads,
                  lowp=not args.no_lowp, inline=not args.no_inline,
                  fused_lowering=not args.no_fused_lowering, timed=args.timed, clock=args.clock)
        return 0

    if args.from_json:
        with open(args.from_json) as f:
            recs = json.load(f)["records"]
    else:
        from concurrent.futures import ThreadPoolExecutor

        groups = [(case, dtype, mode) for case in args.models
                  for dtype in (args.pad_dtypes if ":" in case else args.dtypes) if dtype in args.dtypes
                  for mode in (args.pad_modes if ":" in case else args.modes) if mode in args.modes]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            recs = [r for rs in pool.map(lambda g: _run_child(*g, args), groups) for r in rs]
        print(f"total {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    text, fits = report(recs, args)
    print(text)
    for path, content in ((args.out, text),
                          (args.json, json.dumps({"records": recs, "fits": fits}, indent=1) if args.json else None)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(content)
    if args.plot and recs:
        plot(recs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
