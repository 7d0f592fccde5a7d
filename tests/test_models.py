"""Attention blocks written in the style of real models: fused (expected count) and exact in
eval; in train mode the attention dropout is fused with its dropout_p."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared catalog

import pytest
import torch

from attn_spellings import (MODELS, assert_outputs_close, check_case, check_train_dropout, clone_inputs,
                            fused_nodes, run_rewrite)

CASES = [pytest.param(c, d, id=f"{c.name}-{d}") for c in MODELS.values() for d in c.dialects]


@pytest.mark.parametrize("case,dialect", CASES)
def test_model_fused_and_exact(case, dialect):
    check_case(case, dialect)


# Train mode runs each graph 2 x 50 times (the fused op's CPU dropout path is not fast):
# every model in dynamo graphs, two of them in aten graphs too.
TRAIN = [pytest.param(c, d, id=f"{c.name}-{d}") for c in MODELS.values() if c.dropout_p > 0
         for d in (("dynamo", "aten") if c.name in ("nanogpt", "hf_bert") else ("dynamo",)) if d in c.dialects]


@pytest.mark.parametrize("case,dialect", TRAIN)
def test_model_train_dropout_fused(case, dialect):
    check_train_dropout(case, dialect)


def _call(mod_or_gm, inputs):
    if hasattr(mod_or_gm, "module") and not isinstance(mod_or_gm, torch.nn.Module):
        mod_or_gm = mod_or_gm.module()  # an ExportedProgram
    with torch.no_grad():
        return mod_or_gm(*clone_inputs(inputs))


def _graph_module(x):
    if isinstance(x, torch.fx.GraphModule):
        return x
    if hasattr(x, "graph_module"):  # ExportedProgram
        return x.graph_module
    raise AssertionError(f"unexpected result type {type(x)}")


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in MODELS.values()])
def test_model_plain_module_api(case):
    """attnfuse.rewrite(nn.Module, example_inputs) traces the module itself."""
    torch.manual_seed(0)
    mod = case.module().eval()
    inputs = case.inputs()
    with torch.no_grad():
        expected = mod(*clone_inputs(inputs))
    result = run_rewrite(mod, clone_inputs(inputs))
    gm = _graph_module(result.graph_module)
    n = len(fused_nodes(gm))
    assert n == case.fused, (f"expected {case.fused} fused node(s), got {n}; near misses: "
                             f"{[(nm.kind, nm.reason) for nm in result.report.near_misses]}")
    assert_outputs_close(_call(result.graph_module, inputs), expected, atol=case.atol, rtol=case.rtol)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in MODELS.values()])
def test_model_torch_export(case):
    """An ExportedProgram in; a usable ExportedProgram or module out."""
    torch.manual_seed(0)
    mod = case.module().eval()
    inputs = case.inputs()
    with torch.no_grad():
        expected = mod(*clone_inputs(inputs))
    ep = torch.export.export(mod, clone_inputs(inputs))
    result = run_rewrite(ep, clone_inputs(inputs))
    gm = _graph_module(result.graph_module)
    n = len(fused_nodes(gm))
    assert n == case.fused, (f"expected {case.fused} fused node(s), got {n}; near misses: "
                             f"{[(nm.kind, nm.reason) for nm in result.report.near_misses]}")
    assert_outputs_close(_call(result.graph_module, inputs), expected, atol=case.atol, rtol=case.rtol)
