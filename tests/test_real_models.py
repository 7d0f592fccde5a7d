"""Real models (transformers, timm, diffusers; tiny random configs from tests/real_models.py) through
``torch.compile(backend="attnfuse")``: every attention site fused, outputs and gradients equal to eager.

The whole corpus runs from ``benchmarks/coverage.py``; these are the fast ones.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared corpus

import pytest
import torch

import real_models as R

FAST = ["gpt2-padded", "bert-padded", "llama-padded", "t5-padded", "falcon_alibi-padded", "timm-vit", "sd-unet",
        "flash-attn-attention-ref"]  # issue 18: row fills after the softmax, causal+padding structure


def _describe(res) -> str:
    return "; ".join(f"[{k}] {loc}: {r}\n{snip}" for k, r, loc, snip in res.near_misses) or "no near misses"


@pytest.mark.parametrize("name", FAST)
def test_real_model_fused_and_exact(name):
    torch.manual_seed(0)
    model, inputs, sites = R.CASES[name].build()
    ref = R._run(model, R._clone(inputs), train=False)
    res = R.compile_attnfuse(model, inputs, inner="eager", strict=True)
    assert res.ok, res.error
    assert res.graphs == 1, f"{res.graphs} graphs: attnfuse must not add graph breaks"
    assert res.fused == sites, f"{name}: {res.fused}/{sites} sites fused; {_describe(res)}"
    abs_err, rel_err = R.errors(ref, res.out)
    assert rel_err <= R.TOL, f"{name}: max abs error {abs_err:.3g}, relative {rel_err:.3g}"


def test_real_model_padding_mask_matters():
    """The padded variants do exercise the mask: the padded row's output differs from the unpadded one."""
    m1, in1, _ = R.CASES["bert"].build()
    m2, in2, _ = R.CASES["bert-padded"].build()
    with torch.no_grad():
        a, b = m1(*in1)[0], m2(*in2)[0]
    assert torch.allclose(a[0], b[0], atol=1e-6)       # row 0 has no padding
    assert not torch.allclose(a[1], b[1], atol=1e-3)   # row 1 has three padded keys


def _train_like_eager(name: str):
    """Train mode, dropout 0: compile ``name`` with the backend (aot_eager, strict), run forward
    and backward, and check every site fused, the output and every parameter's gradient
    against eager's. Returns (the compile result, eager's gradients by name, the site count)."""
    torch.manual_seed(0)
    model, inputs, sites = R.CASES[name].build(train=True, dropout=0.0)
    ref = R._run(model, R._clone(inputs), train=True)
    R.loss_of(ref).backward()
    ref_grads = R.grads(model)
    model.zero_grad(set_to_none=True)
    res = R.compile_attnfuse(model, inputs, inner="aot_eager", train=True, backward=True, strict=True)
    assert res.ok, res.error
    assert res.fused == sites, f"{name}: {res.fused}/{sites} sites fused; {_describe(res)}"
    _, rel_err = R.errors(ref, res.out)
    assert rel_err <= R.TOL
    g_abs, g_rel = R.grad_errors(ref_grads, R.grads(model))
    assert g_rel <= R.GRAD_TOL, f"{name}: gradient max abs error {g_abs:.3g}, relative {g_rel:.3g}"
    return res, ref_grads, sites


@pytest.mark.parametrize("name", ["llama-padded", "gpt_oss-padded"])
def test_real_model_train_gradients(name):
    """Train mode, dropout 0: the backward through the fused op (aot_eager) gives eager's gradients
    (gpt-oss: every site fused with its sinks, whose gradients are among those compared)."""
    res, ref_grads, sites = _train_like_eager(name)
    if name.startswith("gpt_oss"):
        assert all(f.sinks for f in res.fusions), res.fusions
        assert sum(n.endswith("self_attn.sinks") for n in ref_grads) == sites


def test_real_model_train_dropout_fused():
    """Train mode with attention dropout on: fused with its dropout_p, and the gradient is
    the derivative of the compiled forward with the same dropout masks (a central
    difference along a random direction of the attention layers' query/key/value
    parameters, every call reseeded; independent of how the op draws its masks): a
    backward that applied another mask, or another scale, than the forward fails.
    Measured: 6e-5 relative error at this step; the bound is 1e-3."""
    torch.manual_seed(0)
    model, inputs, sites = R.CASES["bert-padded"].build(train=True, dropout=0.1)
    res = R.compile_attnfuse(model, inputs, inner="eager", train=True, strict=True)
    assert res.ok, res.error
    assert res.fused == sites, _describe(res)
    assert sorted({f.dropout_p for f in res.fusions}) == [0.1]

    def loss():
        torch.manual_seed(1)  # the same dropout masks (fused or not) at every call
        return R.loss_of(res.model(*R._clone(inputs)))

    model.zero_grad(set_to_none=True)
    loss().backward()
    params = dict(model.named_parameters())
    grads = R.grads(model)
    g = torch.Generator().manual_seed(3)
    direction = {n: torch.randn(params[n].shape, generator=g) for n in grads if "attention.self" in n}
    assert len(direction) == 12  # q, k, v weights and biases of both layers
    slope = sum((grads[n].double() * d).sum() for n, d in direction.items()).item()

    def shifted(step):
        with torch.no_grad():
            for n, d in direction.items():
                params[n].add_(step * d)
        return loss().item()

    eps = 3e-3
    up, down = shifted(eps), shifted(-2 * eps)
    shifted(eps)
    fd = (up - down) / (2 * eps)
    assert abs(fd - slope) <= 1e-3 * abs(slope), (fd, slope)


# How each model's masks reach the op: structure (no (Lq, Lk) tensor) wherever it is provably exact.
STRUCTURE = {
    "gpt2-causal": {"causal"},
    "llama-padded": {"causal+keymask+fix"},                 # left padding: pad rows see no key
    "mistral-padded": {"causal+w5+keymask+fix"},            # sliding_window=5
    "bert-padded": {"keymask+fix"},                         # right padding, encoder
    "gemma2-causal": {"causal", "causal+w5"},               # global and sliding layers, with softcap
}


def _mask_kind(f) -> str:
    parts = [p for p, on in (("causal", f.causal == "top_left"), ("causal-br", f.causal == "bottom_right"),
                             (f"w{f.window}", bool(f.window)), ("keymask", bool(f.key_mask)),
                             ("bias", f.bias != "none"), ("fix", f.empty_row_fixup)) if on]
    return "+".join(parts) or "-"


@pytest.mark.parametrize("name", sorted(STRUCTURE))
def test_real_model_masks_become_structure(name):
    """Hugging Face's eager masks (index comparisons, padding gathered at [batch, kv]) are passed as
    causal / window / key_mask, with no bias tensor; outputs (padded rows included) equal eager's."""
    torch.manual_seed(0)
    model, inputs, sites = R.CASES[name].build()
    ref = R._run(model, R._clone(inputs), train=False)
    res = R.compile_attnfuse(model, inputs, inner="eager", strict=True)
    assert res.ok, res.error
    assert res.fused == sites, _describe(res)
    kinds = {_mask_kind(f) for f in res.fusions}
    assert kinds == STRUCTURE[name], f"{name}: {kinds}; notes: {[f.masks for f in res.fusions]}"
    _, rel_err = R.errors(ref, res.out)
    assert rel_err <= R.TOL, f"{name}: relative error {rel_err:.3g}"


def test_real_model_gemma2_padded_keeps_the_bias_and_says_why():
    """Softcap + left padding: the empty-row fix-up cannot reproduce eager's softcap gradient, so the
    mask stays a bias; the report says why."""
    model, inputs, sites = R.CASES["gemma2-padded"].build()
    ref = R._run(model, R._clone(inputs), train=False)
    res = R.compile_attnfuse(model, inputs, inner="eager", strict=True)
    assert res.ok and res.fused == sites, _describe(res)
    assert all(f.bias != "none" for f in res.fusions)
    assert all(any("softcap" in n for n in f.masks) for f in res.fusions), [f.masks for f in res.fusions]
    assert R.errors(ref, res.out)[1] <= R.TOL


@pytest.mark.parametrize("name,window", [("llama-padded", 0), ("mistral-padded", 5)])
def test_real_model_structure_under_dynamic_shapes(name, window):
    """One dynamic=True compile serves other lengths and paddings, left and right, including a
    sequence that is padding only (every row of it sees no key: the empty-row fix-up), with the
    masks still as structure and outputs equal to eager's."""
    import attnfuse

    model, inputs, _ = R.CASES[name].build()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="attnfuse", dynamic=True,
                             options={"strict": True, "inner": "eager"})
    with torch.no_grad():
        for seq, pad, left in [(16, (0, 3), True), (23, (0, 9), True), (31, (5, 0), False),
                               (12, (0, 12), True)]:
            args = (R.input_ids(seq=seq), R.padding_mask(seq=seq, pad=pad, left=left))
            abs_err, rel_err = R.errors(model(*args), compiled(*args))
            assert rel_err <= R.TOL, f"{name} L={seq} pad={pad}: relative error {rel_err:.3g}"
    fusions = attnfuse.last_report().fusions
    assert fusions and all(f.causal == "top_left" and f.window == window and f.key_mask
                           and f.empty_row_fixup for f in fusions), fusions


def _record_op_biases(monkeypatch) -> list:
    """Record (shape, stride) of the bias of every real (not fake) fused-op call from now on."""
    import attnfuse.op as op
    from torch._subclasses.fake_tensor import FakeTensor

    seen, check = [], op.validate_op_call

    def recording(q, k, v, bias, *args, **kw):
        if not isinstance(q, FakeTensor):
            seen.append(None if bias is None else (tuple(bias.shape), bias.stride()))
        return check(q, k, v, bias, *args, **kw)

    monkeypatch.setattr(op, "validate_op_call", recording)
    return seen


# ALiBi models (issue 22): what reaches the op, every site; no (Lq, Lk) tensor in any case.
ALIBI = {
    "bloom-causal": ({"causal"}, {None}, True),
    "mpt-causal": ({"causal"}, {None}, True),
    "mpt-padded": ({"causal+keymask+fix"}, {None}, True),          # padding read back from a bool cast
    # Falcon: slopes rounded to bfloat16 before the product: its own (B, H, 1, Lk) bias, the
    # causal/padding fill over it as structure (unpadded: the same rule without the key mask,
    # tests/test_alibi_matcher.py; inference: test_real_model_fused_and_exact)
    # BLOOM padded: baddbmm on the merged (B·H) axis, scores viewed (B, H, Lq, Lk): matched on
    # (B, H); its ALiBi (positions from the mask's cumsum) a (B, H, 1, Lk) bias beside the
    # finite-fill mask as causal + key_mask
    "bloom-padded": ({"causal+keymask+bias+fix"}, {((R.B, 4, 1, R.SEQ), (4 * R.SEQ, R.SEQ, R.SEQ, 1))}, False),
    "falcon_alibi-padded": ({"causal+keymask+bias+fix"}, {((R.B, 4, 1, R.SEQ), (4 * R.SEQ, R.SEQ, R.SEQ, 1))},
                            False),
    # BLOOM padded at batch 1 (generate()): the view (1·H, Lq, Lk) -> (1, H, Lq, Lk) puts a unit
    # batch axis in front of the heads: the same structure, a (1, H, 1, Lk) bias
    "bloom-padded-b1": ({"causal+keymask+bias+fix"}, {((1, 4, 1, R.SEQ), (4 * R.SEQ, R.SEQ, R.SEQ, 1))}, False),
}


@pytest.mark.parametrize("name", sorted(ALIBI))
def test_real_model_alibi_with_eager_gradients_and_no_square_tensor(name, monkeypatch):
    """BLOOM (slopes x arange through baddbmm) and MPT (arange x slopes, sliced; with left
    padding too): every site fused with ALiBi as ``alibi_slopes`` and the masks as structure;
    Falcon (``bfloat16(slopes) * positions``, which the op's float32 ALiBi would not round
    alike): the ALiBi term as a query-broadcast (B, H, 1, Lk) bias, the masks as structure.
    The op reads no bias, or that (B, H, 1, Lk) one; no node of the rewritten graph holds an (Lq, Lk) tensor (the model's own masks included:
    their nodes are erased); train mode (aot_eager): outputs and every parameter's gradient
    equal eager's (issue 22). BLOOM with padding (positions from the mask's cumsum, scores on
    B·H viewed (B, H, Lq, Lk)): matched on (B, H), its ALiBi the (B, H, 1, Lk) bias."""
    kinds, biases, alibi = ALIBI[name]
    seen = _record_op_biases(monkeypatch)
    res, _, _ = _train_like_eager(name)
    assert {_mask_kind(f) for f in res.fusions} == kinds, [(f.structure, f.bias, f.masks) for f in res.fusions]
    assert all(bool(f.alibi) == alibi for f in res.fusions)
    assert seen and set(seen) == biases, set(seen)   # the bias (if any) as the op reads it: O(L)
    assert [R.square_tensors(gm, R.SEQ) for gm in res.graph_modules] == [[]] * res.graphs


def test_real_model_static_cache_mask_gets_its_key_mask_and_causal_band(monkeypatch):
    """Issue 18, category 10: Llama with a static KV cache (20 slots, SEQ filled) and its 4-D
    mask given as a graph input. With the run-time derivations on (what GPU fusions get),
    every site fuses exactly and the op receives, besides the bias, a key mask and causal
    offsets computed from the mask's values: item 0 (no padding) sees its filled slots on a
    top-left diagonal; item 1 (left padding: pad queries that see no key, eager's uniform
    average over all 20 slots) keeps every key and a band that hides nothing."""
    import attnfuse.op as op
    from attnfuse.passes import inputmask
    from torch._subclasses.fake_tensor import FakeTensor

    monkeypatch.setattr(inputmask, "DERIVE_ON_CPU", True)
    seen, check = [], op.validate_op_call

    def recording(q, k, v, bias, *args):
        if not isinstance(q, FakeTensor):
            seen.append((args[7], args[10]))     # key_mask, causal_offsets
        return check(q, k, v, bias, *args)

    monkeypatch.setattr(op, "validate_op_call", recording)
    torch.manual_seed(0)
    model, inputs, sites = R.CASES["llama-static-cache"].build()
    ref = R._run(model, R._clone(inputs), train=False)
    res = R.compile_attnfuse(model, inputs, inner="eager", strict=True)
    assert res.ok, res.error
    assert res.fused == sites, f"{res.fused}/{sites} sites fused; {_describe(res)}"
    _, rel_err = R.errors(ref, res.out)
    assert rel_err <= R.TOL
    assert len(seen) == sites
    filled = torch.arange(20) < R.SEQ
    for key_mask, offsets in seen:
        assert torch.equal(key_mask, torch.stack([filled, torch.ones(20, dtype=torch.bool)]))
        assert offsets.tolist() == [0, inputmask._NO_BAND]
