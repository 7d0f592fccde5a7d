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
]
