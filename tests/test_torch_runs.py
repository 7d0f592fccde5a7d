"""The key-run path of the CPU implementation (kernels/torch_runs.py): a padding
key_mask runs PyTorch's fused kernel on each batch row's run of visible keys only.

Results are compared with the float64 reference of tests/reference.py (through
``_check`` of tests/test_structural_masks.py); the kernel calls are spied on to show
that no padded key and no mask reaches the kernel.
"""
from __future__ import annotations

import pytest
import torch

import attnfuse
from attnfuse.kernels import torch_impl as T
from attnfuse.kernels import torch_base as TS
from attnfuse.kernels import torch_runs as TR
from tests.reference import attention_reference
from tests.test_structural_masks import _check, _inputs, _padding


_DEFAULT_MIN_SCORES = TR.RUNS_MIN_SCORES


@pytest.fixture(autouse=True)
def runs_at_every_size(monkeypatch):
    """The tests' small shapes are below the path's size gate: lift it; and one torch
    thread, so that the task gate (tested on its own) does not depend on the machine."""
    monkeypatch.setattr(TR, "RUNS_MIN_SCORES", dict.fromkeys(TR.RUNS_MIN_SCORES, 0))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def kernel_calls(monkeypatch):
    """(key length, mask, is_causal) of every fused forward / backward kernel call."""
    calls = []
    fwd, bwd = TS.aten._scaled_dot_product_flash_attention_for_cpu, \
        TS.aten._scaled_dot_product_flash_attention_for_cpu_backward

    class Spy:
        def __getattr__(self, name):
            return getattr(torch.ops.aten, name)

        def _scaled_dot_product_flash_attention_for_cpu(self, q, k, v, p, causal, **kw):
            calls.append(("fwd", q.shape[2], k.shape[2], kw.get("attn_mask"), causal))
            return fwd(q, k, v, p, causal, **kw)

        def _scaled_dot_product_flash_attention_for_cpu_backward(self, d, q, k, v, o, l, p,
                                                                  causal, **kw):
            calls.append(("bwd", q.shape[2], k.shape[2], kw.get("attn_mask"), causal))
            return bwd(d, q, k, v, o, l, p, causal, **kw)

    monkeypatch.setattr(TS, "aten", Spy())
    return calls


def _runs_path(q, k, v, causal, km):
    return T.forward_path(q, k, v, None, causal=causal, dropout_p=0.0, softcap=0.0,
                          key_mask=km)


@pytest.mark.parametrize("causal", ["none", "top_left"])
@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_padding_runs_only_visible_keys(causal, left, hkv, kernel_calls):
    q, k, v = _inputs(b=3, hq=4, hkv=hkv, lq=23, lk=23)
    km = _padding(3, 23, left=left, keep=(1.0, 0.6, 0.3))
    assert _runs_path(q, k, v, causal, km) == "runs"
    _check(q, k, v, causal=causal, key_mask=km)
    runs = TR.key_runs(km)
    lengths = {e - s for s, e in runs}
    assert all(mask is None for *_, mask, _c in kernel_calls)  # no mask tensor at all
    assert {lk for _d, _q, lk, _m, _c in kernel_calls} == lengths  # only the runs' keys
    if causal == "none":
        assert all(not c for *_, c in kernel_calls)


@pytest.mark.parametrize("lq,lk", [(13, 23), (23, 13), (1, 23)])
@pytest.mark.parametrize("causal", ["none", "top_left"])
def test_unequal_lengths(lq, lk, causal):
    q, k, v = _inputs(b=2, lq=lq, lk=lk)
    for left in (False, True):
        km = _padding(2, lk, left=left)
        assert _runs_path(q, k, v, causal, km) == "runs"
        _check(q, k, v, causal=causal, key_mask=km)


def test_left_padded_causal_pad_queries_are_dead():
    """Left padding with top-left causal: query rows before the run see no key."""
    q, k, v = _inputs(b=2, lq=20, lk=20)
    km = _padding(2, 20, left=True, keep=(1.0, 0.5))
    out, dead = _check(q, k, v, causal="top_left", key_mask=km)
    assert dead[1, :, :10].all() and not dead[1, :, 10:].any() and not dead[0].any()
    assert (out[1, :, :10] == 0).all()


def test_rows_with_no_visible_key_and_runs_in_the_middle():
    q, k, v = _inputs(b=4, lq=17, lk=17)
    km = torch.zeros(4, 17, dtype=torch.bool)
    km[1, 4:11] = True  # a run with padding on both sides
    km[2, :] = True
    km[3, 16] = True  # one key, the last
    assert TR.key_runs(km) == [(0, 0), (4, 11), (0, 17), (16, 17)]
    for causal in ("none", "top_left"):
        out, dead = _check(q, k, v, causal=causal, key_mask=km)
        assert (out[0] == 0).all() and dead[0].all()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_half_types(dtype, tol):
    q, k, v = _inputs(b=2, lq=33, lk=33, dtype=dtype)
    km = _padding(2, 33, left=True)
    assert _runs_path(q, k, v, "top_left", km) == "runs"
    _check(q, k, v, causal="top_left", key_mask=km, tol=tol)


def test_key_runs_rejects_holes():
    km = torch.tensor([[True, True, False, True], [False, True, True, False]])
    assert TR.key_runs(km) is None
    assert TR.key_runs(km[1:]) == [(1, 3)]


@pytest.mark.parametrize("change,path", [
    (dict(causal="bottom_right", lq=9), "banded"),
    (dict(window=4), "banded"),
    (dict(softcap=5.0), "blocked"),
])
def test_other_paths_keep_their_inputs(change, path):
    b, lq = change.get("b", 2), change.get("lq", 21)
    q, k, v = _inputs(b=b, lq=lq, lk=21)
    km = _padding(b, 21)
    causal = change.get("causal", "top_left" if "window" in change else "none")
    kw = dict(window=change.get("window", 0), softcap=change.get("softcap", 0.0))
    assert T.forward_path(q, k, v, None, causal=causal, dropout_p=0.0, key_mask=km,
                          **kw) == path


@pytest.mark.parametrize("dtype,length,path", [
    (torch.float32, 255, "fused"), (torch.float32, 256, "runs"),
    (torch.bfloat16, 511, "fused"), (torch.bfloat16, 512, "runs")])
def test_size_gate(dtype, length, path, monkeypatch):
    """Below RUNS_MIN_SCORES per batch row (4 heads x 256 x 256 in fp32, 512 x 512 in
    bf16) one call with the folded mask is cheaper than per-row calls
    (benchmarks/key_runs.py)."""
    monkeypatch.setattr(TR, "RUNS_MIN_SCORES", _DEFAULT_MIN_SCORES)
    q, k, v = (t.detach() for t in _inputs(b=2, hq=4, hkv=4, lq=length, lk=length, d=8,
                                           dtype=dtype))
    assert T.forward_path(q, k, v, None, causal="top_left", dropout_p=0.0, softcap=0.0,
                          key_mask=_padding(2, length)) == path


def test_ill_conditioned_lse_falls_back_in_backward():
    """Huge logits: the fp32 lse cannot recompute P in the fused backward; the blocked
    loop computes the gradients instead (and they still match the reference)."""
    q, k, v = _inputs(b=2, lq=15, lk=15)
    q = (q.detach() * 300).requires_grad_()
    km = _padding(2, 15)
    out, lse = T.forward(q.detach(), k.detach(), v.detach(), None, scale=1.0, causal="none",
                         dropout_p=0.0, softcap=0.0, seed=0, key_mask=km)
    assert lse.abs().max() > TS.FUSED_BWD_MAX_ABS_LSE
    assert T.backward_path(q, k, v, None, lse, causal="none", dropout_p=0.0, softcap=0.0,
                           need_dbias=False, key_mask=km) == "blocked"
    _check(q, k, v, key_mask=km, tol=1e-4)


def test_no_padding_is_one_plain_call(kernel_calls):
    """One batch row that sees every key: a single kernel call, no mask, no copies."""
    q, k, v = _inputs(b=1, hq=4, hkv=2, lq=19, lk=19)
    km = torch.ones(1, 19, dtype=torch.bool)
    _check(q, k, v, causal="top_left", key_mask=km)
    assert [(d, lq, lk, m, c) for d, lq, lk, m, c in kernel_calls] == [
        ("fwd", 19, 19, None, True), ("bwd", 19, 19, None, True)]


def test_key_runs_sees_in_place_changes():
    """key_runs remembers its last answer per mask object; an in-place change of the
    mask (a new version) is seen."""
    km = torch.ones(2, 8, dtype=torch.bool)
    assert TR.key_runs(km) == [(0, 8), (0, 8)]
    km[1, 6:] = False
    assert TR.key_runs(km) == [(0, 8), (0, 6)]
    km[0, 3] = False
    assert TR.key_runs(km) is None
    assert TR.key_runs(km.clone()) is None


@pytest.mark.parametrize("causal", ["none", "top_left"])
def test_mask_made_in_inference_mode(causal):
    """A mask made under torch.inference_mode() has no version counter: the runs are
    found without the memo (the path crashed on it), an in-place change made in
    inference mode is seen, and the op still trains with such a mask (as eager's
    ``masked_fill(~mask, -inf)`` does)."""
    q, k, v = _inputs(b=2, lq=21, lk=21)
    with torch.inference_mode():
        km = _padding(2, 21, keep=(1.0, 0.6))
    assert km.is_inference()
    assert _runs_path(q, k, v, causal, km) == "runs"
    _check(q, k, v, causal=causal, key_mask=km)
    with torch.inference_mode():
        km[0, 9:] = False
        assert TR.key_runs(km) == [(0, 9), (0, 13)]
        qi, ki, vi = (t.detach().clone() for t in (q, k, v))
        out = attnfuse.flash_attention(qi, ki, vi, causal=causal, key_mask=km, impl="torch")
    ref = attention_reference(qi.double(), ki.double(), vi.double(), causal=causal, key_mask=km,
                              dead_rows="zero")
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", ["none", "top_left"])
def test_mask_of_one_row_serves_every_batch_row(causal):
    """A (1, Lk) key_mask is the same padding for every batch row."""
    q, k, v = _inputs(b=3, lq=21, lk=21)
    km = _padding(1, 21, keep=(0.6,))
    assert _runs_path(q, k, v, causal, km) == "runs"
    out, _ = _check(q, k, v, causal=causal, key_mask=km)
    assert (out[1:] != 0).any(-1).all()  # no batch row left at zero


@pytest.fixture
def threads():
    """Sets torch's thread count for one test (restored after)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_few_tasks_per_row_keep_the_folded_mask(threads):
    """More torch threads than one batch row's kernel call has tasks: per-row calls would
    leave threads idle, so the masked call over the whole batch runs instead; the
    backward (tasks = heads) switches before the forward (heads x query blocks)."""
    q, k, v = _inputs(b=2, hq=4, hkv=4, lq=200, lk=200, d=8)  # 4 blocks of 64 rows per head
    km = _padding(2, 200)
    lse = torch.zeros(2, 4, 200)
    kw = dict(causal="top_left", dropout_p=0.0, softcap=0.0, key_mask=km)
    paths = {}
    for n in (4, 8, 32):
        threads(n)
        paths[n] = (T.forward_path(q, k, v, None, **kw),
                    T.backward_path(q, k, v, None, lse, need_dbias=False, **kw))
    assert paths == {4: ("runs", "runs"), 8: ("runs", "fused"), 32: ("fused", "fused")}
    threads(8)  # forward on the runs, backward on the folded mask: still exact
    _check(q, k, v, causal="top_left", key_mask=km)
    assert TR.kernel_tasks(4, 200, backward=False) == 16
    assert TR.kernel_tasks(4, 1024, backward=False) == 16
    assert TR.kernel_tasks(4, 100, backward=False) == 16


def test_one_batch_row_ignores_the_task_count(threads):
    """With one batch row the masked call has no more tasks than the run's call."""
    threads(64)
    q, k, v = _inputs(b=1, hq=2, hkv=2, lq=40, lk=40)
    assert _runs_path(q, k, v, "none", _padding(1, 40, keep=(0.5,))) == "runs"


@pytest.mark.parametrize("name,train", [("gpt2-padded", False), ("bert-padded", False),
                                        ("llama-padded", False), ("llama-padded", True)])
def test_padded_hf_models_take_the_runs_path(name, train, monkeypatch):
    """Tiny padded Hugging Face models through the backend (inner aot_eager: the runtime
    op, no inlining), with the size gate lifted: the key_masks the matcher builds take the
    key-run path, and outputs and gradients equal eager's."""
    import tests.real_models as R

    ran = []
    real = TR.runs_forward
    monkeypatch.setattr(TR, "runs_forward", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    model, inputs, sites = R.CASES[name].build(train=train, dropout=0.0)
    ref = R._run(model, R._clone(inputs), train=train)
    if train:
        R.loss_of(ref).backward()
        ref_grads = R.grads(model)
        model.zero_grad(set_to_none=True)
    res = R.compile_attnfuse(model, inputs, inner="aot_eager", train=train, backward=train,
                             strict=True)
    assert res.ok, res.error
    assert res.fused == sites and len(ran) == sites
    assert R.errors(ref, res.out)[1] <= R.TOL
    if train:
        assert R.grad_errors(ref_grads, R.grads(model))[1] <= R.GRAD_TOL


def test_gqa_without_causal_counts_the_kv_heads_tasks(threads):
    """Non-causal GQA runs with the query groups folded into the kv heads' rows: one kv
    head's call has one backward task whatever the query heads."""
    q, k, v = _inputs(b=2, hq=4, hkv=1, lq=200, lk=200, d=8)  # folded rows 800: 4 blocks
    km = _padding(2, 200)
    kw = dict(causal="none", dropout_p=0.0, softcap=0.0, key_mask=km)
    threads(2)
    assert T.forward_path(q, k, v, None, **kw) == "runs"
    assert T.backward_path(q, k, v, None, torch.zeros(2, 4, 200), need_dbias=False,
                           **kw) == "fused"
    _check(q, k, v, key_mask=km)
