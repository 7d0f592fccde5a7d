"""The curated mutants of ``benchmarks/mutation_check.py``: deliberate semantic bugs, each a
small exact string replacement in one file, with the test selections (files or
``file::test`` node ids, run together with ``pytest -x``) that must catch it.

Keep targets short and exact; ``count`` is how many times the target occurs in the file
(every occurrence is replaced). When code moves, the script says which target it no
longer finds: update the target, never drop the mutant silently.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple
    count: int = 1
    why: str = ""


SM = "tests/test_structural_masks.py"
TI = "tests/test_torch_impl.py"
TL = "tests/test_torch_lowp.py"
TB = "tests/test_backend.py"
RM = "tests/test_real_models.py"

MUTANTS: list[Mutant] = [
    # ---------------------------------------------------------------- matcher (passes/)
    Mutant("matcher-declines-everything", "passes/match.py",
           '    gm, memo = ctx["gm"], ctx["memo"]\n    x = op["x"]',
           '    gm, memo = ctx["gm"], ctx["memo"]\n    raise _Miss("unsupported_op", "declined", sm)\n    x = op["x"]',
           ("tests/test_fuzz_matcher.py",),
           why="issue 17: every softmax a near miss with a reason; the fuzz counted that as a pass"),
    # ---------------------------------------------------------------- CPU: blocked loop
    Mutant("blocked-dropout-window-bwd-key-offset", "kernels/torch_blocked.py",
           "i0, i1, kmin, kmax, hkv, g)\n            mk = keep.to(cdt)",
           "i0, i1, 0, kw, hkv, g)\n            mk = keep.to(cdt)",
           (f"{SM}::test_dropout_with_window_uses_one_mask",),
           why="issue 17: the backward's keep-mask read at keys [0, kw) instead of the band's"),
    Mutant("blocked-dropout-bwd-unscaled", "kernels/torch_blocked.py",
           "mk = keep.to(cdt).mul_(drop_scale)", "mk = keep.to(cdt)",
           (f"{TB}::test_train_mode_dropout_is_fused_and_unbiased",
            f"{RM}::test_real_model_train_dropout_fused"),
           why="the backward forgets 1/(1-p): the old checks asserted finite gradients only"),
    # ---------------------------------------------------------------- CPU: bf16 GEMM path
    Mutant("lowp-dq-times-1.03", "kernels/torch_lowp.py",
           "= _gemm(ds, kb, scale)", "= _gemm(ds, kb, scale * 1.03)",
           (TL,), why="issue 17: bf16 dq 3 % off passed the flat 6e-2/4e-2 tolerance"),
    Mutant("cpu-scale-off-1pct", "kernels/torch_impl.py",
           "scale, window, dropout_p = float(scale), int(window)",
           "scale, window, dropout_p = float(scale) * 1.01, int(window)",
           (f"{TI}::test_scale_and_lse_fp32",), count=2,
           why="every CPU path's scale 1 % off: the old fused-equals-blocked test compared two wrong paths"),
    # ---------------------------------------------------------------- CPU: banded path
    Mutant("banded-bf16-dq-times-1.10", "kernels/torch_banded.py",
           "dq[:, :, i0:i1] = gq",
           "dq[:, :, i0:i1] = gq * (1.1 if q.dtype == torch.bfloat16 else 1.0)",
           (f"{SM}::test_half_types",), why="issue 17: bf16 only, passed the flat 0.2 tolerance"),
    Mutant("banded-window-off-by-one", "kernels/torch_banded.py",
           "keep = keep & (j > i - window)", "keep = keep & (j >= i - window)",
           (f"{SM}::test_through_torch_compile",),
           why="one key too many per row; the compiled op was compared with itself uncompiled"),
    # ---------------------------------------------------------------- Triton (interpreter)
    Mutant("triton-dq-atomic-add", "kernels/triton_bwd.py",
           "tl.store(DQ + ", "tl.atomic_add(DQ + ",
           ("tests/test_triton_kernels.py::test_kernels_have_no_atomics",),
           why="issue 17: an atomic accumulate (nondeterministic on a GPU); the interpreter "
               "runs programs one after another, so a two-run comparison could not fail"),
    Mutant("triton-window-off-by-one", "kernels/triton_fwd.py",
           "keep = keep & (dist.to(tl.uint32) < window.to(tl.uint32))",
           "keep = keep & (dist.to(tl.uint32) <= window.to(tl.uint32))",
           ("tests/test_triton_structural.py::test_structural_masks_vs_reference",),
           why="the main kernels' window edge (the decode kernel has its own)"),
    Mutant("decode-window-off-by-one", "kernels/triton_decode.py",
           "s = tl.where(offs_n[None, :] > offs_i[:, None] + causal_shift - window,",
           "s = tl.where(offs_n[None, :] >= offs_i[:, None] + causal_shift - window,",
           ("tests/test_triton_structural.py::test_decode_path_wired_into_forward",),
           why="the decode path's window edge, through triton_flash.forward"),
    Mutant("triton-causal-diagonal-excluded", "kernels/triton_fwd.py",
           "keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_shift)",
           "keep = keep & (offs_n[None, :] < offs_m[:, None] + causal_shift)",
           ("tests/test_triton_decode.py::test_split_count_does_not_change_result",),
           why="shared score code: decode vs main agreed on the wrong answer"),

    Mutant("matcher-softmax-over-query-axis", "passes/match.py",
           'if smtags[A.norm_dim(dim, r)] != "k":', 'if smtags[A.norm_dim(dim, r)] not in ("k", "q"):',
           ("tests/test_near_misses.py",),
           why="issue 17: a matcher that accepts a softmax over the wrong axis"),
    Mutant("matcher-probs-other-users-ignored", "passes/match.py",
           "        if len(users) > 1:\n            raise _Miss(\"probs_other_users\",",
           "        if len(users) > 99:\n            raise _Miss(\"probs_other_users\",",
           ("tests/test_near_misses.py",), why="returned attention weights fused away"),
    Mutant("matcher-key-varying-scale-accepted", "passes/assemble.py",
           'if "k" in tags:\n            raise Miss("key_varying_scale"',
           'if False:\n            raise Miss("key_varying_scale"',
           ("tests/test_near_misses.py",), why="a per-key scale folded into q"),
    Mutant("matcher-fill-limit-too-high", "passes/consts.py",
           "FILL_LIMIT = -1e30", "FILL_LIMIT = -1e3",
           ("tests/test_near_misses.py", "tests/test_mask_structure.py"),
           why="a -1000 fill taken as one that absorbs the scores"),
    Mutant("bands-causal-alignment-flipped", "passes/bands.py",
           'for name, off in (("top_left", 0), ("bottom_right", vk - vq)):',
           'for name, off in (("top_left", vk - vq), ("bottom_right", 0)):',
           ("tests/test_mask_structure.py",), why="issue 17: a causal alignment flipped"),
    Mutant("bands-window-off-by-one", "passes/bands.py",
           "w = i + off - int(m[i].to(torch.int8).argmax()) + 1",
           "w = i + off - int(m[i].to(torch.int8).argmax()) + 2",
           ("tests/test_mask_structure.py",), why="issue 17: a window off by one (the proof's)"),
    # ---------------------------------------------------------------- CPU: dispatcher, fused path
    Mutant("cpu-causal-alignment-flipped", "kernels/base.py",
           'return (lk - lq) if causal == "bottom_right" else 0',
           'return (lk - lq) if causal == "top_left" else 0',
           (f"{TI}::test_causal_lengths",), why="issue 17: bottom-right and top-left swapped"),
    Mutant("fused-dead-row-lse-not-fixed", "kernels/torch_base.py",
           "lse = _fix_fully_masked_lse(lse, bias, plan.is_causal)", "lse = lse",
           (f"{TI}::test_fully_masked_and_finfo_rows",), why="rows that see no key get lse 0"),
    Mutant("fused-gqa-dk-not-summed", "kernels/torch_base.py",
           "dk = dk.unflatten(1, (hkv, hq // hkv)).sum(2)",
           "dk = dk.unflatten(1, (hkv, hq // hkv))[:, :, 0]",
           (f"{TI}::test_gqa_mqa",), why="causal GQA: dK of one query head of each group only"),
    Mutant("fused-bwd-lse-bound-ignored", "kernels/torch_base.py",
           "return finite.numel() == 0 or bool(finite.abs().max() <= FUSED_BWD_MAX_ABS_LSE)",
           "return True",
           (f"{TI}::test_fully_masked_and_finfo_rows",),
           why="the fused backward on finfo.min rows, whose fp32 lse lost log(Lk)"),
    # ---------------------------------------------------------------- CPU: blocked loop
    Mutant("blocked-softcap-derivative-dropped", "kernels/torch_blocked.py",
           "        if dcap is not None:\n            ds.mul_(dcap)",
           "        if False:\n            ds.mul_(dcap)",
           (f"{TI}::test_softcap",), why="issue 17: a softcap derivative dropped"),
    Mutant("blocked-dk-overwritten", "kernels/torch_blocked.py",
           "dk[b0:b1, :, kmin:kmax] += torch.matmul(", "dk[b0:b1, :, kmin:kmax] = torch.matmul(",
           (f"{TI}::test_causal_lengths",), why="issue 17: dK overwritten instead of accumulated"),
    Mutant("blocked-window-off-by-one", "kernels/torch_base.py",
           "s5.masked_fill_(j <= i + off - window, base.NEG_INF)",
           "s5.masked_fill_(j < i + off - window, base.NEG_INF)",
           (f"{SM}::test_window",), why="issue 17: a window off by one"),
    Mutant("blocked-key-mask-dropped", "kernels/torch_base.py",
           "    if key_mask is not None:  # (B|1, Lk) key padding",
           "    if False:  # (B|1, Lk) key padding",
           (f"{SM}::test_key_mask_padding", f"{SM}::test_window_and_key_mask_with_bias"),
           why="issue 17: a key_mask dropped (the blocked loop takes it only with a bias or "
               "window; a key_mask alone is folded into the fused kernel's mask)"),
    Mutant("blocked-bias-dropped", "kernels/torch_base.py",
           "            s5.add_(bs)", "            pass",
           (f"{TI}::test_bias",), why="issue 17: a mask (float bias) dropped"),
    Mutant("blocked-dbias-not-accumulated", "kernels/torch_blocked.py",
           "        if grad_bias:\n            TS.accumulate_dbias(",
           "        if False:\n            TS.accumulate_dbias(",
           (f"{TI}::test_bias",), why="the bias gradient stays zero"),
    Mutant("blocked-dropout-unscaled-both-ways", "kernels/torch_blocked.py",
           "drop_scale = 0.0 if dropout_p >= 1 else 1.0 / (1.0 - dropout_p)",
           "drop_scale = 1.0", (f"{TI}::test_dropout_mask_forward_backward_agree",), count=2,
           why="forward and backward agree, both without 1/(1-p)"),
    Mutant("dropout-keep-rate-wrong", "kernels/torch_dropout.py",
           "thr = int(round((1.0 - p) * (1 << _RNG_BITS)))",
           "thr = int(round((1.0 - p / 2) * (1 << _RNG_BITS)))",
           (f"{TI}::test_dropout_mask_forward_backward_agree",), why="keeps 1 - p/2 of the probabilities"),
    # ---------------------------------------------------------------- CPU: bf16 GEMM path
    Mutant("lowp-dropout-mask-shifted", "kernels/torch_lowp.py",
           "i0, i1, kmin, kmax, hkv, g)\n            p.view(nb, hkv, g, n, kw)",
           "i0, i1, kmin + 1, kmax + 1, hkv, g)\n            p.view(nb, hkv, g, n, kw)",
           (f"{TL}::test_dropout",), why="issue 17: a dropout mask shifted (forward only)"),
    Mutant("lowp-key-mask-dropped", "kernels/torch_lowp.py",
           "        TS.mask_block_scores(s.view(nb, hkv, g, n, kw), TS.bslice(bias5, b0, b1),\n"
           "                             TS.bslice(key_mask, b0, b1), i0=i0, i1=i1, kmin=kmin, kmax=kmax,\n"
           "                             causal=\"none\", window=0, lq=lq, lk=lk)\n        m = s.amax",
           "        TS.mask_block_scores(s.view(nb, hkv, g, n, kw), TS.bslice(bias5, b0, b1),\n"
           "                             None, i0=i0, i1=i1, kmin=kmin, kmax=kmax,\n"
           "                             causal=\"none\", window=0, lq=lq, lk=lk)\n        m = s.amax",
           (f"{TL}::test_key_mask",), why="issue 17: a key_mask dropped (forward)"),
    # ---------------------------------------------------------------- CPU: banded, runs, inline
    Mutant("banded-gqa-dk-not-summed", "kernels/torch_banded.py",
           "dk[:, :, kmin:kmax] += gk.to(cdt).unflatten(1, (hkv, g)).sum(2)",
           "dk[:, :, kmin:kmax] += gk.to(cdt).unflatten(1, (hkv, g))[:, :, 0]",
           (f"{SM}::test_window",), why="GQA dK of one head per group"),
    Mutant("runs-causal-square-not-causal", "kernels/torch_runs.py",
           "yield Segment(b, s, min(e, lq), s, e, True)", "yield Segment(b, s, min(e, lq), s, e, False)",
           ("tests/test_torch_runs.py",), why="a padded causal row sees keys after it"),
    Mutant("runs-dk-overwritten", "kernels/torch_runs.py",
           "dk[sg.b, :, keys] += gk[0].to(cdt)", "dk[sg.b, :, keys] = gk[0].to(cdt)",
           ("tests/test_torch_runs.py",), why="issue 17: two segments' dK overwrite each other"),
    Mutant("inline-window-off-by-one", "kernels/torch_inline.py",
           "keep = keep & (j > i + off - window)", "keep = keep & (j >= i + off - window)",
           ("tests/test_torch_inline.py",), why="issue 17: a window off by one (inlined call)"),
    Mutant("inline-softmax-backward-sign", "kernels/torch_inline.py",
           "return p * (dp - (p * dp).sum(-1, keepdim=True)), None, None, None",
           "return p * (dp + (p * dp).sum(-1, keepdim=True)), None, None, None",
           ("tests/test_torch_inline.py",), why="the inlined call's hand-written backward"),
    Mutant("inline-scale-off-1pct", "kernels/torch_inline.py",
           "t = s.float() * scale", "t = s.float() * scale * 1.01",
           ("tests/test_torch_inline.py",), why="issue 17: a scale off by 1 %"),
    # ---------------------------------------------------------------- Triton (interpreter)
    Mutant("triton-scale-off-1pct", "kernels/triton_launch.py",
           "qk_scale, cap_scale, soft = scale * LOG2E, 1.0, False",
           "qk_scale, cap_scale, soft = scale * LOG2E * 1.01, 1.0, False",
           ("tests/test_triton_kernels.py::test_forward_backward_vs_reference",),
           why="issue 17: a scale off by 1 %"),
    Mutant("triton-softcap-derivative-dropped", "kernels/triton_bwd.py",
           "ds = ds * (1.0 - t * t)     # d tanh", "ds = ds                     # d tanh",
           ("tests/test_triton_kernels.py::test_forward_backward_vs_reference",),
           why="issue 17: a softcap derivative dropped (dK/dV kernel)"),
    Mutant("triton-dk-overwritten", "kernels/triton_bwd.py",
           "dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_FP32, DOT_PREC)",
           "dk = _dot(tl.trans(ds.to(q.dtype)), q, DOT_FP32, DOT_PREC)",
           ("tests/test_triton_kernels.py::test_forward_backward_vs_reference",),
           why="issue 17: dK overwritten instead of accumulated"),
    Mutant("triton-dropout-bwd-other-mask", "kernels/triton_bwd.py",
           "keep = _dropout_keep(seed, off_z, off_h, offs_m, n_first, dropout_p,",
           "keep = _dropout_keep(seed + 1, off_z, off_h, offs_m, n_first, dropout_p,",
           ("tests/test_triton_kernels.py::test_dropout_backward_uses_forward_mask",),
           why="the dK/dV kernel regenerates another mask"),
    Mutant("triton-fwd-dropout-unscaled", "kernels/triton_fwd.py",
           "out = out * (1.0 / (1.0 - dropout_p))", "out = out",
           ("tests/test_triton_kernels.py::test_dropout_keep_rate_and_unbiased_mean",),
           why="the forward forgets 1/(1-p)"),
    Mutant("triton-key-mask-dropped", "kernels/triton_fwd.py",
           "            edge = edge | (n_visible < BLOCK_N)\n        else:",
           "            km = offs_n < n_rel\n        else:",
           ("tests/test_triton_structural.py::test_structural_masks_vs_reference",),
           why="issue 17: a key_mask dropped (main forward)"),
    Mutant("decode-combine-weights-dropped", "kernels/triton_decode.py",
           "acc = acc * alpha[:, None] + a_s * beta[:, None]", "acc = acc * alpha[:, None] + a_s",
           ("tests/test_triton_decode.py::test_decode_forward_vs_reference",),
           why="the split-KV combine forgets a split's rescale"),
    # ---------------------------------------------------------------- backend fallback, reports
    Mutant("backend-isolation-wrong-half", "attnfuse/backend.py",
           "            suspects = list(drop)\n",
           "            suspects = [f for f in suspects if f not in drop] or list(drop)\n",
           ("tests/test_per_fusion.py",), why="the bisection keeps the wrong half after a success"),
    Mutant("backend-last-resort-reports-fusions", "attnfuse/backend.py",
           "    final = rewritten_without(fusions)[0]   # the report of that graph (nothing fused)",
           "    final = report",
           ("tests/test_per_fusion.py",),
           why="the unfused last resort still reports its fusions"),
    Mutant("report-json-near-miss-count", "attnfuse/report_data.py",
           '"near_misses": len(report.near_misses),', '"near_misses": len(report.fusions),',
           ("tests/test_reporting.py",), why="the report's counts"),
    Mutant("report-text-fused-count", "passes/report.py",
           'lines = [f"attnfuse: {len(self.fusions)} fused',
           'lines = [f"attnfuse: {len(self.near_misses)} fused',
           ("tests/test_reporting.py", "tests/test_cli.py"), why="the text report's count"),
]
