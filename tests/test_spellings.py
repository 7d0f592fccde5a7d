"""Every attention spelling of issue 3, through symbolic_trace, make_fx and dynamo graphs:
the expected number of fused ops appears and the output equals the original's."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared catalog

import pytest
import torch

from attn_spellings import SPELLINGS, check_case, check_train_dropout

CASES = [pytest.param(c, d, id=f"{c.name}-{d}") for c in SPELLINGS.values() for d in c.dialects]


@pytest.mark.parametrize("case,dialect", CASES)
def test_spelling_fused_and_exact(case, dialect):
    check_case(case, dialect, idempotent=True)


DROPOUT = [pytest.param(c, d, id=f"{c.name}-{d}") for c in SPELLINGS.values() if c.dropout_p > 0 for d in c.dialects]


@pytest.mark.parametrize("case,dialect", DROPOUT)
def test_dropout_train_mode_fused(case, dialect):
    check_train_dropout(case, dialect)


# Dynamic shapes: symbolic sizes must not confuse the matcher.
# qk_bmm_reshape_bart is left out: merging a mask added to (B*H, L, L)-reshaped scores back needs
# static sizes (a documented limitation; it fuses at static shapes, tested above).
DYNAMIC_NAMES = ["qk_at", "qk_einsum_heads_after_seq", "qk_baddbmm_alibi", "scale_div_shape_pow",
                 "mask_tril_buffer_nanogpt", "mask_arange_causal", "mask_arange_bottom_right", "gqa_hf_repeat_kv",
                 "cross_attention_lq_ne_lk", "out_transpose_reshape", "bias_keypad_finfo_min", "softcap_gemma2",
                 "qk_permute_blhd"]
DYNAMIC = [pytest.param(SPELLINGS[n], d, id=f"{n}-{d}") for n in DYNAMIC_NAMES for d in ("aten_symbolic", "dynamo_dynamic")]


@pytest.mark.parametrize("case,dialect", DYNAMIC)
def test_spelling_dynamic_shapes(case, dialect):
    check_case(case, dialect)


def test_catalog_is_well_formed():
    assert len(SPELLINGS) >= 80
    for c in SPELLINGS.values():
        assert c.fused >= 1 and not c.near_miss, c.name
        m = c.module().eval()
        with torch.no_grad():
            out = m(*c.inputs())
        assert out is not None
