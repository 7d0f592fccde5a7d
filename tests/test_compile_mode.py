"""torch.compile modes reach the inner Inductor compile (issue 19, item 9)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from attnfuse import backend


class Attn(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def _qkv():
    return [torch.randn(1, 2, 4, 4) for _ in range(3)]


def test_mode_becomes_inductor_config_next_to_the_guard(monkeypatch):
    from torch._dynamo.backends import registry

    def inductor(gm, example_inputs, **kw):   # not Inductor's own backend: importing compile_fx takes seconds
        raise AssertionError("not called here")
    monkeypatch.setattr(registry, "lookup_backend", lambda name: inductor if name == "inductor" else None)
    compiler = backend._inner_compiler("inductor", "max-autotune-no-cudagraphs")
    assert compiler.func is inductor
    patches = compiler.keywords["config_patches"]
    assert patches["max_autotune"] is True and patches["coordinate_descent_tuning"] is True
    assert "joint_custom_pre_pass" in patches or patches.get("pattern_matcher") is False  # the guard stays
    assert "max_autotune" not in backend._inner_compiler("inductor", None).keywords["config_patches"]


@pytest.mark.parametrize("how", ["keyword", "option"])
def test_torch_compile_mode_reaches_the_inner_compiler(monkeypatch, how):
    seen = []

    def recording_inner(name, mode=None):
        seen.append((name, mode))
        return lambda gm, example_inputs: gm.forward
    monkeypatch.setattr(backend, "_inner_compiler", recording_inner)
    torch._dynamo.reset()
    model = Attn()
    kw = {"mode": "reduce-overhead"} if how == "keyword" else {"options": {"mode": "reduce-overhead"}}
    out = torch.compile(model, backend="attnfuse", **kw)(*_qkv())
    assert seen and seen[0] == ("inductor", "reduce-overhead") and out.shape == (1, 2, 4, 4)


def test_mode_that_cannot_be_honoured_warns_and_bad_modes_raise():
    torch._dynamo.reset()
    qkv = _qkv()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(Attn(), backend="attnfuse", options={"inner": "eager", "mode": "max-autotune"})(*qkv)
    torch.testing.assert_close(out, Attn()(*qkv))
    assert any("'max-autotune'" in str(w.message) and "cannot be honoured" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="unknown torch.compile mode"):
        backend._parse_options({"mode": "fastest"})
    with pytest.raises(ValueError, match="disagree"):
        backend._parse_options({"mode": "max-autotune"}, "reduce-overhead")
