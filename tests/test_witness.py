"""A mask proven from a module buffer's values stays exact when the buffer changes.

nanoGPT keeps its causal mask in a buffer; the backend proves it causal from the values
dynamo hands it, and checks them at every call (attnfuse/witness.py). Every case below
changes the buffer after compiling and compares with eager on the same module.
"""
import torch
import pytest

import attnfuse
from attnfuse import backend as backend_mod
from attnfuse.witness import BufferWitness
from tests.test_backend import NanoGPTBlock
from tests.test_matcher_core import Fn

TRIL = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)


def _eager_and_compiled(m, x, cm, train=False):
    ref = m(x)
    out = cm(x)
    if not train:
        return (out - ref).abs().max().item()
    ps = [x, m.c_attn.weight]
    gr = torch.autograd.grad(ref.sum(), ps)
    go = torch.autograd.grad(out.sum(), ps)
    return max([(out - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(go, gr)])


# The changes a user can make to the buffer; each one must be seen by the compiled model.
CHANGES = [
    ("fill_", lambda m: m.bias.fill_(1)),
    ("restore", lambda m: m.bias.copy_(TRIL)),
    ("reassign", lambda m: setattr(m, "bias", torch.ones(1, 1, 64, 64))),
    ("load_same", lambda m: m.load_state_dict({**m.state_dict(), "bias": TRIL.clone()})),
    ("load_other", lambda m: m.load_state_dict({**m.state_dict(), "bias": torch.triu(torch.ones(64, 64))[None, None]})),
]


@pytest.fixture
def count_inner(monkeypatch):
    """Counts the inner compiles (the fused graph's and the fallback's)."""
    calls = []
    real = backend_mod._inner_compiler

    def counting(name):
        fn = real(name)

        def compile_(gm, inputs):
            calls.append(name)
            return fn(gm, inputs)
        return compile_
    monkeypatch.setattr(backend_mod, "_inner_compiler", counting)
    return calls


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_buffer_changed_after_compile_stays_exact(train, count_inner):
    torch.manual_seed(0)
    m = NanoGPTBlock(dropout=0.0)
    x = torch.randn(2, 16, 32, requires_grad=train)
    cm = torch.compile(m, backend="attnfuse", options={"inner": "aot_eager"})
    with attnfuse.backend.collect_reports() as reports:
        assert _eager_and_compiled(m, x, cm, train) < 1e-5
        with pytest.warns(RuntimeWarning, match="no longer hold the values"):
            for name, change in CHANGES:
                with torch.no_grad():
                    change(m)
                assert _eager_and_compiled(m, x, cm, train) < 1e-5, name
    # proven causal from the buffer at compile time; one dynamo graph, one fallback compile
    assert [f.causal for r in reports for f in r.fusions] == ["top_left"]
    assert count_inner == ["aot_eager", "aot_eager"]


def test_default_inner_compiler_sees_the_change():
    torch.manual_seed(1)
    m = NanoGPTBlock(dropout=0.0)
    x = torch.randn(2, 16, 32)
    cm = torch.compile(m, backend="attnfuse")
    assert _eager_and_compiled(m, x, cm) < 1e-5
    with torch.no_grad():
        m.bias.fill_(1)
    with pytest.warns(RuntimeWarning, match="no longer hold the values"):
        err = _eager_and_compiled(m, x, cm)
    assert err < 1e-5


def test_inference_tensor_buffer_is_compared_every_call():
    torch.manual_seed(2)
    with torch.inference_mode():
        m = NanoGPTBlock(dropout=0.0).eval()
        m.bias = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)  # an inference tensor: no version counter
        x = torch.randn(2, 16, 32)
        cm = torch.compile(m, backend="attnfuse", options={"inner": "aot_eager"})
        assert _eager_and_compiled(m, x, cm) < 1e-5
        m.bias.fill_(1)
        with pytest.warns(RuntimeWarning, match="no longer hold the values"):
            assert _eager_and_compiled(m, x, cm) < 1e-5
        m.bias.copy_(TRIL)
        assert _eager_and_compiled(m, x, cm) < 1e-5


def test_witness_checks_identity_version_and_values():
    buf = TRIL.clone()
    w = BufferWitness(0, "bias", TRIL.clone())
    assert w.holds(buf)
    buf.fill_(1)                       # same tensor, new version: values compared again
    assert not w.holds(buf)
    buf.copy_(TRIL)                    # back to the proven values
    assert w.holds(buf)
    assert w.holds(TRIL.clone())       # another tensor with the same values
    assert not w.holds(TRIL.clone().mT.contiguous())
    assert not w.holds(TRIL[..., :32, :32])   # another shape
    assert not w.holds(TRIL.double())        # another dtype
    with torch.inference_mode():
        inf = TRIL.clone()
    assert w.holds(inf)
    with torch.inference_mode():
        inf.fill_(0)
    assert not w.holds(inf)


def test_rewrite_of_a_graph_module_does_not_bake_its_buffer():
    """A GraphModule's own buffers (get_attr) can change after the rewrite and nothing would
    check them: the mask stays a (fused) mask tensor, and a change to it is seen."""
    def f(s, q, k, v):
        return torch.softmax(torch.where(s.keep, q @ k.transpose(-2, -1) * 0.35, float("-inf")), dim=-1) @ v

    m = Fn(f, keep=torch.tril(torch.ones(5, 5, dtype=torch.bool)))
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    gm = torch.fx.symbolic_trace(m)
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == ["keep"]
    res = attnfuse.rewrite(gm, (q, k, v), strict=True)
    (fusion,) = res.report.fusions
    assert fusion.causal == "none" and fusion.bias != "none"
    assert any("module state" in note for note in fusion.masks)
    assert (gm(q, k, v) - m(q, k, v)).abs().max() < 1e-5
    with torch.no_grad():
        m.keep.fill_(True)  # the GraphModule holds the same tensor
    assert gm.keep is m.keep
    assert (gm(q, k, v) - m(q, k, v)).abs().max() < 1e-5


class CheckpointedBlock(torch.nn.Module):
    """The nanoGPT block inside activation checkpointing: the buffer reaches the checkpoint
    body as an operand of the higher-order op, and is read there."""

    def __init__(self):
        super().__init__()
        self.block = NanoGPTBlock(dropout=0.0)

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def test_buffer_read_inside_a_checkpoint_body_is_witnessed():
    torch.manual_seed(4)
    m = CheckpointedBlock()
    x = torch.randn(2, 16, 32, requires_grad=True)
    cm = torch.compile(m, backend="attnfuse", options={"inner": "aot_eager"})

    def err():
        ref, out = m(x), cm(x)
        gr = torch.autograd.grad(ref.sum(), [x, m.block.c_attn.weight])
        go = torch.autograd.grad(out.sum(), [x, m.block.c_attn.weight])
        return max([(out - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(go, gr)])

    with attnfuse.backend.collect_reports() as reports:
        assert err() < 1e-5
    assert [f.causal for r in reports for f in r.fusions] == ["top_left"]
    with torch.no_grad():
        m.block.bias.fill_(1)
    with pytest.warns(RuntimeWarning, match="no longer hold the values"):
        assert err() < 1e-5
