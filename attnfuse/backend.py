"""The ``torch.compile`` backend named ``"attnfuse"``.

Found by name through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="attnfuse")`` works after ``pip install`` without
importing attnfuse first. For each graph dynamo hands it (a torch-level FX graph,
before AOTAutograd), the backend runs :func:`attnfuse.rewrite` and passes the
rewritten graph to an inner compiler. For training, the inner compiler
(``aot_eager`` / ``inductor``) traces the backward through the fused op's own
autograd formula; the rewrite never sees aten graphs here.

Options (``torch.compile(model, backend="attnfuse", options={...})``):

- ``inner``: the compiler the rewritten graph goes to: ``"inductor"`` (default),
  ``"aot_eager"`` or ``"eager"`` (runs the rewritten FX graph as Python; no
  AOTAutograd, so training uses autograd on the fused op directly). With Inductor,
  Inductor's own attention patterns (``torch/_inductor/fx_passes/fuse_attention.py``,
  which ignore the softmax dim and so turn a softmax over the query axis into SDPA over
  the keys) never run on the graph; every other Inductor pass does. The switch is
  :func:`attnfuse.inductor_guard.config_patches`, passed as ``compile_fx``'s
  ``config_patches`` (thread-local, part of Inductor's cache keys, gone after the
  compile): a public joint-graph pre pass hides each ``exp``/softmax behind an opaque
  barrier op from those patterns and a post pass removes the barriers.
- ``mode``: ``torch.compile(model, backend="attnfuse", mode="reduce-overhead")`` (torch
  hands the mode to the backend) or ``options={"mode": ...}`` (torch refuses ``mode``
  together with ``options``): one of ``torch._inductor.list_mode_options()``
  (``"default"``, ``"reduce-overhead"`` = CUDA graphs, ``"max-autotune"``,
  ``"max-autotune-no-cudagraphs"``, ...), given to the inner Inductor compile as that mode's
  config (``list_mode_options(mode)``). With ``inner="eager"`` / ``"aot_eager"`` a mode
  other than ``"default"`` cannot be honoured: a ``RuntimeWarning`` says so. Inductor
  itself decides whether CUDA graphs apply to a graph (it skips them, with a log line, for
  a graph on CPU).
- ``strict``: ``False`` (default): a failure costs only the fusion it concerns, with a
  warning (below). ``True``: the error is raised (use it in tests and CI). A bool.
- ``warn_unfused``: ``True`` (default): when a graph holds a softmax that looks like
  attention (a matmul before and after it, :mod:`attnfuse.unfused`) and it was left
  unfused, one WARNING per graph on the ``attnfuse`` logger lists each such site with its
  file:line, module and reason. ``False`` silences it.
- ``impl``: ``"auto"`` (default: Triton kernels on CUDA, PyTorch's CPU path
  otherwise), ``"triton"`` or ``"torch"``: the implementation every fused op in
  the graph uses.
- ``report``: a folder (created if missing). For every compiled graph, writes
  ``graph_NNN.json`` (schema ``attnfuse.report/1``, see
  :mod:`attnfuse.reporting`) and ``graph_NNN.html`` (self-contained, no network).
  The environment variable ``ATTNFUSE_REPORT=<folder>`` does the same for every
  compile that does not set this option.

- ``cpu_inline``: ``True`` (default), ``"all"`` or ``False``. With the Inductor inner
  compiler, on CPU:

  * a call without a causal band that the CPU dispatcher would run as one plain call of
    PyTorch's fused CPU kernel (no bias, key_mask, window, softcap, sinks, ALiBi, dropout
    or GQA, D == Dv; in bf16 only past its own path's 1,536 keys): BERT's and ViT's
    attention, which Inductor alone fuses into that same call. It is replaced at every
    size by :func:`attnfuse.kernels.torch_inline.fused_attention`, that aten call itself,
    so the compiled graph and its compile are Inductor's own (no C++ kernel of ours:
    inlining these calls made a cold compile of a 2-layer BERT or ViT at 128 tokens
    compile 2-3 more C++ kernels, 13-26 % more CPU than Inductor alone, for 0.87-1.04x
    Inductor's speed in float32; benchmarks/results/compile_overhead_policy.txt);
  * any other call whose score count ``B * Hq * Lq * Lk`` is small
    (:data:`attnfuse.kernels.torch_inline.INLINE_MAX_SCORES`, per dtype, with bounds of
    their own for inference, for training (inputs that require grad) and for training
    with a causal band) and that has no dropout is replaced by
    :func:`attnfuse.kernels.torch_inline.inline_attention`: the same semantics written as
    aten ops, which Inductor differentiates and compiles into its own C++ kernels (faster
    than the op's runtime kernels at those sizes; where Inductor alone does not fuse the
    attention it compiles the same softmax kernel for the unfused graph). Such a call
    keeps its (Lq, Lk) probabilities for the backward, as Inductor does for the unfused
    graph; the bound caps them, and past it nothing quadratic is kept. Under dynamic
    shapes the bound is a guard: a call on its other side recompiles the graph once;
  * a larger call that the CPU dispatcher would run as one plain fused-kernel call (no
    bias, key_mask or GQA; with a causal band too) gets ``fused_attention`` as well.

  The report counts the calls replaced either way (``report.inlined``); they stay
  fusions. ``"all"`` inlines the plain calls of the first case too, within the bounds
  (the previous default: 1.04x Inductor at 256 tokens in float32 training, 0.87x at 512,
  for 2-3 more C++ kernels to compile). ``False`` keeps every call on the op's runtime
  kernels. Any other value raises ``ValueError``.

A mask proven from the values of a module buffer that dynamo lifted to a graph input
(nanoGPT's ``tril``) is checked at every call: the compiled callable is a
:class:`attnfuse.witness.WitnessedGraph`, which runs the fused graph while the buffer
keeps the proven values and otherwise a fallback (the graph rewritten without reading
any buffer), compiled once on the first call that needs it, with a ``RuntimeWarning``.

Calls are matched and fused at every length: the rewrite never depends on the
sequence length; only the CPU lowering of small calls does (``cpu_inline``).

Logging, through ``logging.getLogger("attnfuse")``: one INFO line per compiled
graph (fusions, near misses, pass time), one DEBUG line per decision (each fusion
and each near miss, with its source location). ``attnfuse.last_report()`` returns
the report of the last graph compiled by this backend.

The backend never makes a compile fail for its own sake: unknown or invalid
options raise ``ValueError`` (a user error); every other failure is a
``RuntimeWarning`` (also logged) that costs only what it concerns (``strict`` raises
instead):

- a fusion that fails to emit, or to check on fake tensors, is undone alone (near
  miss ``rewrite_failed``, the error as reason); any other internal error of the pass
  leaves the whole graph as dynamo handed it over;
- when the inner compiler rejects the rewritten graph, :func:`isolate_rejected`
  bisects for the fusion it rejects with at most :data:`MAX_ISOLATION_COMPILES` (3)
  more compiles of partially fused graphs (the rewrite is re-run on the graph dynamo
  handed over, leaving the dropped fusions unfused), keeps the others and reports the
  dropped ones as ``compile_failed`` near misses with the compiler's error as reason;
  only when none of those compiles is the graph compiled exactly as dynamo handed it
  over (where a real error in the user's graph surfaces, as without attnfuse). The
  report (``last_report()``, the report folder, the log line) is that of the graph
  finally compiled: its fusions are the fusions in that graph.

Errors that only show when the compiled code runs are not caught.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import time
import warnings
from typing import Any, Callable, Iterator, List, Optional

import torch
from torch import fx

from attnfuse import cpu_lowering

log = logging.getLogger("attnfuse")

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
IMPLS = ("auto", "triton", "torch")
OPTIONS = ("inner", "strict", "impl", "report", "cpu_inline", "warn_unfused", "mode")
#: The ``cpu_inline`` value that inlines the plain calls too (see the module docstring).
CPU_INLINE_ALL = "all"

_last_report = None
_collectors: List[list] = []
_graph_counter = itertools.count(1)


def last_report():
    """The :class:`~attnfuse.reporting.GraphReport` of the last graph this backend compiled
    (``None`` before the first compile): fusions, near misses, errors, and the renderers
    ``to_text()``, ``to_json()``, ``diff()`` and ``to_html(path)``."""
    return _last_report


@contextlib.contextmanager
def collect_reports() -> Iterator[list]:
    """Collect the report of every graph compiled inside the ``with`` block into a list."""
    reports: list = []
    _collectors.append(reports)
    try:
        yield reports
    finally:
        _collectors.remove(reports)


def _warn(msg: str) -> None:
    """A ``RuntimeWarning`` and the same line on the ``attnfuse`` logger."""
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    log.warning(msg)


def _inner_compiler(name: str, mode: Optional[str] = None) -> Callable:
    """The inner compiler ``name``; ``mode`` (Inductor only) adds that mode's Inductor config."""
    if name == "eager":
        return lambda gm, example_inputs: gm.forward
    from torch._dynamo.backends.registry import lookup_backend

    if name == "inductor":
        # Inductor's own attention patterns must not rewrite what attnfuse declined
        from attnfuse import inductor_guard

        from attnfuse.compile_mode import mode_config

        return functools.partial(lookup_backend(name),
                                 config_patches={**mode_config(mode), **inductor_guard.config_patches()})
    return lookup_backend(name)


def _compiler_for(opts: dict) -> Callable:
    """The inner compiler of ``opts``, with its ``torch.compile`` mode where one was given."""
    if opts["mode"] is None:
        return _inner_compiler(opts["inner"])
    return _inner_compiler(opts["inner"], opts["mode"])


def _set_impl(gm: fx.GraphModule, impl: str) -> None:
    """Make every fused-op call in ``gm`` (and in the higher-order-op bodies under it) use ``impl``."""
    from attnfuse.passes.subgraphs import graph_modules

    for _, mod in graph_modules(gm):
        _set_impl_in(mod, impl)


def _set_impl_in(gm: fx.GraphModule, impl: str) -> None:
    """Make every fused-op call in ``gm``'s own graph use ``impl``."""
    ops = (torch.ops.attnfuse.flash_attention, torch.ops.attnfuse.flash_attention.default)
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ops:
            # A positional impl (the last of 10 arguments) would shadow the keyword.
            if len(node.args) == 10:
                node.args = node.args[:9]
            node.kwargs = {**node.kwargs, "impl": impl}
            changed = True
    if changed:
        gm.recompile()


def _parse_options(options: Optional[dict], mode: Optional[str] = None) -> dict:
    options = dict(options or {})
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown attnfuse option(s) {sorted(unknown)}; known: {list(OPTIONS)}")
    inner = options.get("inner", "inductor")
    if inner not in INNER_COMPILERS:
        raise ValueError(f"options['inner'] must be one of {INNER_COMPILERS}, got {inner!r}")
    impl = options.get("impl", "auto")
    if impl not in IMPLS:
        raise ValueError(f"options['impl'] must be one of {IMPLS}, got {impl!r}")
    report = options.get("report", os.environ.get("ATTNFUSE_REPORT") or None)
    flags = {}
    for name, default in (("strict", False), ("cpu_inline", True), ("warn_unfused", True)):
        flags[name] = options.get(name, default)
        if name == "cpu_inline" and isinstance(flags[name], str) and flags[name] == CPU_INLINE_ALL:
            continue
        if not isinstance(flags[name], bool):
            also = f' or {CPU_INLINE_ALL!r}' if name == "cpu_inline" else ""
            raise ValueError(f"options[{name!r}] must be True{also} or False, got {flags[name]!r}")
    from attnfuse.compile_mode import parse_mode

    return {"inner": inner, "impl": impl, "report": report, "mode": parse_mode(options.get("mode"), mode), **flags}


def _rewrite(gm: fx.GraphModule, example_inputs: list, impl: str, strict: bool, graph_id: int,
             leave_unfused: Optional[dict] = None, warn_failed: bool = True):
    """Rewrite ``gm`` in place; returns its report. A fusion that fails to emit or check is
    dropped alone (a ``rewrite_failed`` near miss, warned about when ``warn_failed``);
    any other internal error restores the whole graph. ``leave_unfused``: see
    :func:`attnfuse.rewrite.fuse_graph_module`."""
    from attnfuse import reporting
    from attnfuse.passes.report import Report
    from attnfuse.rewrite import backup_graphs, failed_fusion_messages, fuse_graph_module, restore_graphs

    start = time.perf_counter()
    try:
        backup = backup_graphs(gm)
    except Exception as e:  # noqa: BLE001  (cannot restore: do not rewrite at all)
        if strict:
            raise
        msg = f"attnfuse: cannot copy graph {graph_id} ({type(e).__name__}: {e}); it is compiled unchanged"
        _warn(msg)
        return reporting.GraphReport(Report(errors=[msg])), time.perf_counter() - start, None, {}
    try:
        # Errors other than one fusion's propagate to here: the backend does its own restore
        # so that any of them (the pass's or ours, e.g. in _set_impl) leaves the graph exactly
        # as dynamo handed it over. dynamo graphs carry example_value meta, so no shape
        # propagation runs; the example inputs only give the values of lifted module buffers
        # (e.g. a causal ``tril``), which the compiled graph then checks (:func:`_witnessed`).
        result = fuse_graph_module(gm, example_inputs, strict=strict, leave_unfused=leave_unfused)
        report, buffers_read = result.report, result.buffers_read
        if warn_failed:
            for msg in failed_fusion_messages(report):
                _warn(f"{msg} (graph {graph_id})")
        if impl != "auto":
            _set_impl(gm, impl)
    except Exception as e:  # noqa: BLE001
        if strict:
            raise
        msg = f"attnfuse: internal error while rewriting graph {graph_id} ({type(e).__name__}: {e}); " \
              "the graph is compiled unchanged"
        _warn(msg)
        restore_graphs(backup)
        report = reporting.GraphReport(Report(errors=[f"{type(e).__name__}: {e}"]))
        backup, buffers_read = None, {}
    elapsed = time.perf_counter() - start
    if report.context is not None:
        report.context.name = f"graph_{graph_id:03d}"
    return report, elapsed, (backup if report.fusions else None), buffers_read


def _inline_or_warn(gm: fx.GraphModule, graph_id: int, opts: dict) -> int:
    """:func:`attnfuse.cpu_lowering.lower_cpu_calls` as ``opts["cpu_inline"]`` asks; an internal error leaves
    the fused-op calls as they are."""
    strict = opts["strict"]
    try:
        return cpu_lowering.lower_cpu_calls(gm, inline_plain=opts["cpu_inline"] == CPU_INLINE_ALL)
    except Exception as e:  # noqa: BLE001
        if strict:
            raise
        msg = f"attnfuse: could not inline the CPU attention of graph {graph_id} ({type(e).__name__}: {e}); " \
              "the fused op runs"
        _warn(msg)
        return 0


def _log_report(report: Any, graph_id: int, n_nodes: int, elapsed: float) -> None:
    log.info("attnfuse: graph %d (%d nodes): %d fused%s, %d near miss(es)%s in %.1f ms",
             graph_id, n_nodes, len(report.fusions),
             f" ({report.inlined} inlined for Inductor)" if report.inlined else "", len(report.near_misses),
             f", {len(report.errors)} error(s)" if report.errors else "", elapsed * 1e3)
    if log.isEnabledFor(logging.DEBUG):
        for f in report.fusions:
            log.debug("attnfuse: FUSED %s: %s (scale=%s causal=%s bias=%s gqa=%s dropout_p=%s softcap=%s) "
                      "replaces %d nodes", f.location or "<unknown>", f.node_inserted, f.scale, f.causal,
                      f.bias, f.gqa or "none", f.dropout_p, f.softcap, len(f.nodes_removed))
        for m in report.near_misses:
            log.debug("attnfuse: NEAR MISS [%s] %s at %s: %s", m.kind, m.location or "<unknown>", m.node,
                      m.reason)


def _write_report(report: Any, folder: str, graph_id: int, strict: bool) -> None:
    from attnfuse import reporting

    try:
        os.makedirs(folder, exist_ok=True)
        base = os.path.join(folder, f"graph_{graph_id:03d}")
        with open(base + ".json", "w", encoding="utf-8") as f:
            f.write(reporting.to_json(report))
        reporting.to_html(report, base + ".html")
        log.info("attnfuse: wrote %s.json and %s.html", base, base)
    except Exception as e:  # noqa: BLE001
        if strict:
            raise
        log.warning("attnfuse: could not write the report to %s: %r", folder, e)


def _prepare(gm: fx.GraphModule, example_inputs: list, opts: dict, graph_id: int,
             leave_unfused: Optional[dict] = None, warn_failed: bool = True):
    """:func:`_rewrite`, then the CPU inlining for Inductor; returns (report, pass time, the
    graphs as dynamo handed them over, or None when nothing was fused, the buffers read)."""
    report, elapsed, backup, buffers_read = _rewrite(gm, example_inputs, opts["impl"], opts["strict"], graph_id,
                                                     leave_unfused, warn_failed)
    if opts["warn_unfused"] and report.near_misses:
        report.unfused_attention = _attention_like(gm, report, opts["strict"])
    if backup is not None and opts["inner"] == "inductor" and opts["cpu_inline"]:
        report.inlined = _inline_or_warn(gm, graph_id, opts)
    return report, elapsed, backup, buffers_read


def _attention_like(gm: fx.GraphModule, report: Any, strict: bool) -> set:
    """:func:`attnfuse.unfused.attention_like` (on the graph before the inner compiler runs,
    which may change it in place); an internal error only costs the warning."""
    from attnfuse.unfused import attention_like

    try:
        return attention_like(gm, report.near_misses)
    except Exception as e:  # noqa: BLE001
        if strict:
            raise
        log.debug("attnfuse: could not look for unfused attention: %r", e)
        return set()


def _publish(report: Any, graph_id: int, n_nodes: int, elapsed: float, opts: dict) -> None:
    """Make ``report`` the last report, hand it to collectors, log it (with one warning when
    attention-like softmaxes were left unfused) and write it out."""
    global _last_report
    _last_report = report
    for c in _collectors:
        c.append(report)
    _log_report(report, graph_id, n_nodes, elapsed)
    if opts["warn_unfused"]:
        from attnfuse.unfused import unfused_message

        message = unfused_message(report, report.unfused_attention, graph_id)
        if message:
            log.warning(message)
    if opts["report"]:
        _write_report(report, opts["report"], graph_id, opts["strict"])


#: Compiles of partially fused graphs the backend may spend on one graph to find the
#: fusion(s) its inner compiler rejects, before compiling the graph as dynamo produced it.
MAX_ISOLATION_COMPILES = 3
COMPILE_FAILED = "compile_failed"   # near-miss kind: the inner compiler rejected the graph with this fusion


def isolate_rejected(fusions: List[str], compile_without: Callable[[List[str]], Any],
                     budget: int = MAX_ISOLATION_COMPILES) -> Optional[tuple]:
    """Bisect for the fusion the inner compiler rejects, with at most ``budget`` calls of
    ``compile_without(dropped)`` (which returns the compiled graph, or None when the
    compiler failed again). Returns ``(compiled, dropped)`` of the best success, or None.

    Assumes one culprit: each try drops the first half of the fusions still suspected and
    keeps every other; a success narrows the suspects to that half, a failure to the rest.
    The last try drops all suspects (a success, if the assumption holds) unless that
    would not improve on an earlier success. With the default budget of 3, one culprit
    among n fusions always ends in a success that drops at most ceil(n / 4) of them:
    exactly the culprit for n <= 4. With several culprits, or none (the graph fails without
    attnfuse too), the tries fail and the caller compiles the graph unfused. Dropping every
    fusion is never tried here: that graph is the caller's last resort (so n = 1 costs no
    try)."""
    suspects, best = list(fusions), None
    for attempt in range(budget):
        if attempt == budget - 1 and (best is None or len(suspects) < len(best[1])):
            drop = suspects
        else:
            drop = suspects[:max(1, len(suspects) // 2)]
        if len(drop) >= len(fusions):
            break
        compiled = compile_without(drop)
        if compiled is not None:
            best = (compiled, list(drop))
            if len(drop) == 1:
                break
            suspects = list(drop)
        else:
            suspects = [f for f in suspects if f not in drop]
            if not suspects:
                break
    return best


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _compile_per_fusion(gm: fx.GraphModule, example_inputs: list, opts: dict, graph_id: int, compiler: Callable,
                        report: Any, backup: list, buffers_read: dict,
                        publish: Callable[[Any, int], None]) -> Callable:
    """Compile the rewritten ``gm``. When the inner compiler rejects it, find the fusion(s)
    it rejects (:func:`isolate_rejected`), keep the others and report the dropped ones as
    ``compile_failed`` near misses; as a last resort compile the graph as dynamo handed it
    over. ``publish(report, node count)`` is called once, with the report of the graph
    compiled last (node count taken before the compiler runs: Inductor's passes work in
    place). A graph whose fusions read buffer values is returned guarded
    (:func:`_witnessed`)."""
    from attnfuse.rewrite import restore_graphs

    n_nodes = len(gm.graph.nodes)
    try:
        compiled = compiler(gm, example_inputs)
    except Exception as e:  # noqa: BLE001
        if opts["strict"]:
            publish(report, n_nodes)
            raise
        error, full_error = _first_line(e), f"inner compiler: {type(e).__name__}: {e}"
    else:
        publish(report, n_nodes)
        return _witnessed(compiled, gm, example_inputs, backup, buffers_read, opts, graph_id)
    fusions = [f.softmax for f in report.fusions]

    def rewritten_without(dropped: List[str]):
        why = f"the {opts['inner']} compiler failed on the graph with this fusion ({error})"
        if 1 < len(dropped) < len(fusions):
            why += f"; dropped with {len(dropped) - 1} other(s) while isolating the culprit"
        restore_graphs(backup)
        rep, _, _, read = _prepare(gm, example_inputs, opts, graph_id, {f: (COMPILE_FAILED, why) for f in dropped},
                                   warn_failed=False)
        return rep, read

    def compile_without(dropped: List[str]):
        rep, read = rewritten_without(dropped)
        n = len(gm.graph.nodes)
        try:
            return _witnessed(compiler(gm, example_inputs), gm, example_inputs, backup, read, opts, graph_id), rep, n
        except Exception:  # noqa: BLE001  (the next try, or the last resort, decides)
            return None
    found = isolate_rejected(fusions, compile_without)
    if found is not None:
        (compiled, final, n_nodes), dropped = found
        where = ", ".join(str(m.location or m.node) for m in final.near_misses if m.kind == COMPILE_FAILED)
        _warn(f"attnfuse: the {opts['inner']} compiler failed on rewritten graph {graph_id} ({error}); "
              f"{len(dropped)} of {len(fusions)} fusion(s) left unfused ({where}), the others kept")
        final.errors.append(full_error)
        publish(final, n_nodes)
        return compiled
    # The last resort: every fusion dropped, i.e. the graph as dynamo handed it over (a real
    # error in the user's graph surfaces here, as it would without attnfuse).
    _warn(f"attnfuse: the {opts['inner']} compiler failed on rewritten graph {graph_id} ({error}); "
          "compiling it unfused")
    final = rewritten_without(fusions)[0]   # the report of that graph (nothing fused)
    restore_graphs(backup)
    final.errors.append(full_error)
    publish(final, len(gm.graph.nodes))
    return compiler(gm, example_inputs)


def attnfuse_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None,
                     mode: Optional[str] = None, **kwargs: Any) -> Callable:
    """Rewrite hand-written attention in ``gm``, then compile it with the inner compiler
    (dropping only the fusions the inner compiler rejects, see the module doc). ``mode``:
    ``torch.compile``'s mode, which torch passes here as a keyword."""
    opts = _parse_options(options, mode)
    from attnfuse.op import register_dtensor_rules_if_loaded

    register_dtensor_rules_if_loaded()  # a graph on DTensors traces the op through DTensor
    graph_id = next(_graph_counter)
    if opts["mode"] not in (None, "default") and opts["inner"] != "inductor":
        _warn(f"attnfuse: torch.compile mode {opts['mode']!r} is an Inductor setting and cannot be honoured "
              f"with options['inner']={opts['inner']!r}; graph {graph_id} is compiled without it")
    report, elapsed, backup, buffers_read = _prepare(gm, example_inputs, opts, graph_id)
    compiler = _compiler_for(opts)

    def publish(final: Any, n_nodes: int) -> None:
        _publish(final, graph_id, n_nodes, elapsed, opts)
    if backup is None:
        publish(report, len(gm.graph.nodes))
        return compiler(gm, example_inputs)
    return _compile_per_fusion(gm, example_inputs, opts, graph_id, compiler, report, backup, buffers_read, publish)


def _witnessed(compiled: Callable, gm: fx.GraphModule, example_inputs: list, backup: list, buffers_read: dict,
               opts: dict, graph_id: int) -> Callable:
    """``compiled``, guarded by a run-time check of the buffers its fusions were proven from
    (:mod:`attnfuse.witness`). The fallback is the graph as it was before the rewrite
    (``backup``), rewritten without reading any buffer value, compiled by the same inner
    compiler on the first call that needs it. Without buffers read, ``compiled`` itself."""
    from attnfuse.rewrite import rewrite, unrewritten_copy
    from attnfuse.witness import BufferWitness, WitnessedGraph, snapshot

    if not buffers_read:
        return compiled
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kept: list = []
    witnesses = [BufferWitness(placeholders.index(n), n.name, snapshot(value, kept))
                 for n, value in buffers_read.items() if n in placeholders]
    original = unrewritten_copy(gm, backup)
    fake_inputs = [n.meta.get("example_value", n.meta.get("val")) for n in original.graph.nodes
                   if n.op == "placeholder"]
    # dynamo's fake inputs, so that the real ones are not kept alive (always there in practice)
    inputs = fake_inputs if all(x is not None for x in fake_inputs) else list(example_inputs)

    def fallback() -> Callable:
        from attnfuse.rewrite import backup_graphs, restore_graphs

        fb = original
        undo = backup_graphs(fb)
        try:
            rewrite(fb, None, strict=True)  # no example inputs: no buffer value is read
            if opts["impl"] != "auto":
                _set_impl(fb, opts["impl"])
            if opts["inner"] == "inductor" and opts["cpu_inline"]:
                cpu_lowering.lower_cpu_calls(fb, inline_plain=opts["cpu_inline"] == CPU_INLINE_ALL)
        except Exception as e:  # noqa: BLE001  (the graph as dynamo produced it is exact)
            if opts["strict"]:
                raise
            _warn(f"attnfuse: could not rewrite the fallback of graph {graph_id} ({type(e).__name__}: {e}); "
                  "it runs unfused")
            restore_graphs(undo)
        return _compiler_for(opts)(fb, inputs)

    return WitnessedGraph(compiled, witnesses, fallback, f"graph {graph_id}")
