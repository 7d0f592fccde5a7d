"""Checks that run inside a two-rank gloo process group (CPU), for tests/test_distributed.py.

:func:`run_group` spawns the two ranks once and runs every check in :data:`CHECKS` in
both, in order, so the whole file pays for one process start and one group. Each check
compares against a single-process run of the same weights and inputs (computed on every
rank), forward and gradients, and raises ``AssertionError`` on a difference. The result
of each check on each rank ("ok" or the traceback) is written to a JSON file per rank.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import socket
import time
import traceback
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

WORLD = 2
CHECKS: Dict[str, Callable] = {}


def check(fn: Callable) -> Callable:
    CHECKS[fn.__name__] = fn
    return fn


def close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max abs diff {err}"


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def compiled_with_reports(model: nn.Module, *args, inner: str = "aot_eager"):
    """(output, reports) of ``model`` compiled with the attnfuse backend (strict)."""
    import attnfuse.backend

    cm = torch.compile(model, backend="attnfuse", options={"inner": inner, "strict": True})
    with attnfuse.backend.collect_reports() as reports:
        out = cm(*args)
        if torch.is_grad_enabled() and out.requires_grad:
            out.sum().backward()
    return out, reports


def fused_count(reports) -> int:
    return sum(len(r.fusions) for r in reports)


def near_misses(reports) -> List[str]:
    return [f"{n.kind}: {n.reason}" for r in reports for n in r.near_misses]


# ------------------------------------------------------------------------------ models
class Block(nn.Module):
    """Hand-written attention block (GQA through expand + reshape, HF's repeat_kv);
    head counts read from the tensors (``view(..., -1, hd)``) as tensor-parallel code does."""

    def __init__(self, c: int = 32, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.hd = c // heads
        self.q = nn.Linear(c, c)
        self.k = nn.Linear(c, kv_heads * self.hd)
        self.v = nn.Linear(c, kv_heads * self.hd)
        self.o = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, -1, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, -1, self.hd).transpose(1, 2)
        g = q.shape[1] // k.shape[1]
        k = k[:, :, None].expand(-1, -1, g, -1, -1).reshape(b, -1, t, self.hd)
        v = v[:, :, None].expand(-1, -1, g, -1, -1).reshape(b, -1, t, self.hd)
        a = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.hd), dim=-1) @ v
        return x + self.o(a.transpose(1, 2).reshape(b, t, -1))


def grads_equal(model: nn.Module, ref: nn.Module, what: str) -> None:
    for (name, p), rp in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None, f"{what}: no gradient for {name}"
        close(full(p.grad), rp.grad, f"{what}: grad of {name}")


# ------------------------------------------------------------------------------ checks
@check
def ddp(rank: int, mesh) -> None:
    """DDP + torch.compile(backend="attnfuse"): the site fused, gradients equal one process."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    ref = Block()
    x = torch.randn(4, 8, 32)
    ref(x).sum().backward()
    model = DDP(copy.deepcopy(ref))
    model.zero_grad()
    # each rank gets half the batch; DDP averages, so scale the loss by the world size
    mine = x.chunk(WORLD)[rank]
    out, reports = compiled_with_reports(lambda t: model(t) * WORLD, mine, inner="eager")
    assert fused_count(reports) == 1, near_misses(reports)
    close(out / WORLD, ref(mine), "ddp output")
    grads_equal(model.module, ref, "ddp")


@check
def dtensor_op(rank: int, mesh) -> None:
    """The fused op on DTensors sharded over batch, heads (GQA), query heads (MQA), and
    replicated; with a bias (broadcast over batch, per head) and a key_mask; output, lse
    placement and gradients (dbias summed over ranks where the bias broadcasts)."""
    import attnfuse
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(1)
    b, hq, l, d = 2, 4, 6, 8
    km = torch.ones(b, l, dtype=torch.bool)
    km[1, 4:] = False
    cases = [  # (name, kv heads, q/k/v placement, k/v placement, bias shape, key_mask)
        ("batch", 2, Shard(0), Shard(0), (1, hq, l, l), km),
        ("heads-gqa", 2, Shard(1), Shard(1), (1, hq, 1, l), km),
        ("heads-mqa", 1, Shard(1), Replicate(), (b, 1, l, l), None),
        ("heads-mha", 4, Shard(1), Shard(1), (hq, l, l), None),
        ("replicate", 2, Replicate(), Replicate(), (l,), km),
    ]
    for name, hkv, qp, kvp, bshape, mask in cases:
        q = torch.randn(b, hq, l, d, requires_grad=True)
        k, v = (torch.randn(b, hkv, l, d, requires_grad=True) for _ in range(2))
        bias = torch.randn(bshape, requires_grad=True)
        ref = attnfuse.flash_attention(q, k, v, bias, causal=True, key_mask=mask)
        dout = torch.randn_like(ref)
        ref.backward(dout)
        dq, dk, dv = (distribute_tensor(t.detach(), mesh, [p]).requires_grad_()
                      for t, p in ((q, qp), (k, kvp), (v, kvp)))
        db = distribute_tensor(bias.detach(), mesh, [Replicate()]).requires_grad_()
        dmask = None if mask is None else distribute_tensor(mask, mesh, [Replicate()])
        out = attnfuse.flash_attention(dq, dk, dv, db, causal=True, key_mask=dmask)
        assert tuple(out.placements) == (qp,), f"{name}: output placements {out.placements}"
        out.backward(distribute_tensor(dout, mesh, [qp]))
        close(full(out), ref, f"{name}: out")
        for got, want, what in ((dq, q, "dq"), (dk, k, "dk"), (dv, v, "dv"), (db, bias, "dbias")):
            close(full(got.grad), want.grad, f"{name}: {what}")
        lse = torch.ops.attnfuse.flash_attention(dq, dk, dv, db, 0.5, "top_left")[1]
        ref_lse = torch.ops.attnfuse.flash_attention(q, k, v, bias, 0.5, "top_left")[1]
        assert tuple(lse.placements) == (qp,), f"{name}: lse placements {lse.placements}"
        close(full(lse), ref_lse, f"{name}: lse")


@check
def dtensor_sinks(rank: int, mesh) -> None:
    """Attention sinks (issue 22) on DTensors: the (Hq,) sinks follow the heads (Shard(0)
    under head sharding), their gradient is summed over batch shards (Partial); output
    and the gradients of q, k, v and the sinks equal one process."""
    import attnfuse
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(2)
    b, hq, l, d = 2, 4, 6, 8
    cases = [("batch", 2, Shard(0), Shard(0)), ("heads-gqa", 2, Shard(1), Shard(1)),
             ("heads-mqa", 1, Shard(1), Replicate()), ("replicate", 2, Replicate(), Replicate())]
    for name, hkv, qp, kvp in cases:
        q = torch.randn(b, hq, l, d, requires_grad=True)
        k, v = (torch.randn(b, hkv, l, d, requires_grad=True) for _ in range(2))
        sinks = torch.randn(hq, requires_grad=True)
        ref = attnfuse.flash_attention(q, k, v, causal=True, sinks=sinks)
        dout = torch.randn_like(ref)
        ref.backward(dout)
        dq, dk, dv = (distribute_tensor(t.detach(), mesh, [p]).requires_grad_()
                      for t, p in ((q, qp), (k, kvp), (v, kvp)))
        ds = distribute_tensor(sinks.detach(), mesh, [Replicate()]).requires_grad_()
        out = attnfuse.flash_attention(dq, dk, dv, causal=True, sinks=ds)
        assert tuple(out.placements) == (qp,), f"{name}: output placements {out.placements}"
        out.backward(distribute_tensor(dout, mesh, [qp]))
        close(full(out), ref, f"sinks {name}: out")
        for got, want, what in ((dq, q, "dq"), (dk, k, "dk"), (dv, v, "dv"), (ds, sinks, "dsinks")):
            close(full(got.grad), want.grad, f"sinks {name}: {what}")


@check
def dtensor_alibi(rank: int, mesh) -> None:
    """ALiBi slopes on DTensors (issue 22): (Hq,) slopes sharded with the heads, (B, Hq)
    with the batch; output and q/k/v gradients equal the single-process op's."""
    import attnfuse
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(2)
    b, hq, l, d = 2, 4, 6, 8
    for name, qp, slopes, sp in (("heads", Shard(1), torch.rand(hq), Shard(0)),
                                 ("batch", Shard(0), torch.rand(b, hq), Shard(0)),
                                 ("heads-2d", Shard(1), torch.rand(b, hq), Shard(1)),
                                 ("replicate", Replicate(), torch.rand(hq), Replicate())):
        q, k, v = (torch.randn(b, hq, l, d, requires_grad=True) for _ in range(3))
        ref = attnfuse.flash_attention(q, k, v, causal=True, alibi_slopes=slopes)
        dout = torch.randn_like(ref)
        ref.backward(dout)
        dq, dk, dv = (distribute_tensor(t.detach(), mesh, [qp]).requires_grad_() for t in (q, k, v))
        out = attnfuse.flash_attention(dq, dk, dv, causal=True,
                                       alibi_slopes=distribute_tensor(slopes, mesh, [sp]))
        assert tuple(out.placements) == (qp,), f"alibi {name}: output placements {out.placements}"
        out.backward(distribute_tensor(dout, mesh, [qp]))
        close(full(out), ref, f"alibi {name}: out")
        for got, want, what in ((dq, q, "dq"), (dk, k, "dk"), (dv, v, "dv")):
            close(full(got.grad), want.grad, f"alibi {name}: {what}")


@check
def dtensor_causal_offsets(rank: int, mesh) -> None:
    """causal_offsets (issue 18, category 10) on DTensors: the (B,) offsets follow the batch
    (Shard(0) under batch sharding, replicated otherwise); output, lse and the q, k, v and
    bias gradients equal the single-process op's."""
    import attnfuse
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(3)
    b, h, lq, lk, d = 2, 4, 5, 9, 8
    offsets = torch.tensor([4, -1])
    for name, qp, op_ in (("batch", Shard(0), Shard(0)), ("heads", Shard(1), Replicate()),
                          ("replicate", Replicate(), Replicate())):
        q = torch.randn(b, h, lq, d, requires_grad=True)
        k, v = (torch.randn(b, h, lk, d, requires_grad=True) for _ in range(2))
        bias = torch.randn(1, 1, lq, lk, requires_grad=True)
        ref = attnfuse.flash_attention(q, k, v, bias, causal_offsets=offsets)
        dout = torch.randn_like(ref)
        ref.backward(dout)
        dq, dk, dv = (distribute_tensor(t.detach(), mesh, [qp]).requires_grad_() for t in (q, k, v))
        db = distribute_tensor(bias.detach(), mesh, [Replicate()]).requires_grad_()
        out = attnfuse.flash_attention(dq, dk, dv, db,
                                       causal_offsets=distribute_tensor(offsets, mesh, [op_]))
        assert tuple(out.placements) == (qp,), f"offsets {name}: output placements {out.placements}"
        out.backward(distribute_tensor(dout, mesh, [qp]))
        close(full(out), ref, f"offsets {name}: out")
        for got, want, what in ((dq, q, "dq"), (dk, k, "dk"), (dv, v, "dv"), (db, bias, "dbias")):
            close(full(got.grad), want.grad, f"offsets {name}: {what}")


def _raises(fn: Callable, *needles: str) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001  (DTensor re-raises the rule's error as RuntimeError)
        msg = str(e)
        assert all(n in msg for n in needles), f"unexpected error: {msg[:400]}"
        return
    raise AssertionError(f"no error; expected one mentioning {needles}")


@check
def dtensor_refusals(rank: int, mesh) -> None:
    """Sequence-sharded q/k/v and dropout on sharded inputs raise a clear error."""
    import attnfuse
    from torch.distributed.tensor import Shard, distribute_tensor

    x = torch.randn(2, 4, 8, 8)
    seq = distribute_tensor(x, mesh, [Shard(2)])
    _raises(lambda: attnfuse.flash_attention(seq, seq, seq), "sequence axis",
            "context_parallel_attention")
    heads = distribute_tensor(x, mesh, [Shard(1)])
    _raises(lambda: attnfuse.flash_attention(heads, heads, heads, dropout_p=0.1), "dropout")
    # DTensor caches sharding decisions; the key must see dropout_p (a float argument), so a
    # call that differs from an accepted one only there is still refused
    seed = torch.tensor(7)
    torch.ops.attnfuse.flash_attention(heads, heads, heads, None, 0.5, "none", 0.0, 0.0, seed)
    _raises(lambda: torch.ops.attnfuse.flash_attention(heads, heads, heads, None, 0.5, "none", 0.1,
                                                       0.0, seed), "dropout")


@check
def tp_block(rank: int, mesh) -> None:
    """parallelize_module (column-wise q/k/v, row-wise o) on a hand-written GQA block with
    DTensors kept through attention (``use_local_output=False``: the fused op runs on
    DTensors, traced by AOTAutograd through the sharding rules); compiled with the backend:
    the site fused, output and gradients equal one process. (Plain local outputs, the
    default, are checked on the LLaMA model below.)"""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(2)
    ref = Block()
    x = torch.randn(2, 8, 32)
    want = ref(x)
    want.sum().backward()
    for local in (False,):
        model = copy.deepcopy(ref)
        model.zero_grad()
        plan = {n: ColwiseParallel(use_local_output=local) for n in ("q", "k", "v")}
        plan["o"] = RowwiseParallel()
        parallelize_module(model, mesh, plan)
        out, reports = compiled_with_reports(model, x)
        assert fused_count(reports) == 1, (local, near_misses(reports))
        close(out, want, f"tp block (use_local_output={local}) output")
        grads_equal(model, ref, f"tp block (use_local_output={local})")


@check
def tp_llama(rank: int, mesh) -> None:
    """A tiny Hugging Face LLaMA (GQA, causal, RoPE) under parallelize_module, compiled
    with the backend: every layer's attention fused, output and gradients equal one process."""
    import transformers
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    torch.manual_seed(3)
    ref = transformers.LlamaModel._from_config(config, attn_implementation="eager")
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(4))
    want = ref(input_ids=ids).last_hidden_state
    want.sum().backward()
    model = copy.deepcopy(ref)
    model.zero_grad()
    plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel()}
    for layer in model.layers:
        parallelize_module(layer, mesh, plan)
    out, reports = compiled_with_reports(lambda i: model(input_ids=i).last_hidden_state, ids,
                                         inner="eager")
    assert fused_count(reports) == config.num_hidden_layers, near_misses(reports)
    close(out, want, "tp llama output", atol=1e-4)
    grads_equal(model, ref, "tp llama")


def op_calls(fn: Callable) -> Dict[str, int]:
    """Run ``fn()`` under the profiler; how many fused forward/backward calls and softmaxes
    ran (compiled graphs are shared between blocks, so reports undercount sites)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = prof.events()
    names = [e.name for e in events]

    def inside_fused_op(e) -> bool:
        while e.cpu_parent is not None:
            e = e.cpu_parent
            if e.name.startswith("attnfuse::"):
                return True
        return False

    return {"fused": names.count("attnfuse::flash_attention"),
            "fused_backward": names.count("attnfuse::flash_attention_backward"),
            "softmax": sum("softmax" in e.name and not inside_fused_op(e) for e in events)}


@check
def fsdp2(rank: int, mesh) -> None:
    """FSDP2, both recipes: (a) compile each block, then fully_shard; (b) fully_shard per
    block and the root, then compile the whole model. Every site runs fused, forward and
    backward, with no softmax left; gradients equal one process."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(5)
    ref = nn.Sequential(Block(), Block())
    x = torch.randn(2, 8, 32)
    want = ref(x)
    want.sum().backward()
    opts = {"inner": "aot_eager", "strict": True}
    for recipe in ("compile-then-shard", "shard-then-compile"):
        model = copy.deepcopy(ref)
        model.zero_grad()
        if recipe == "compile-then-shard":
            for block in model:
                block.compile(backend="attnfuse", options=opts)
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            run = model
        else:
            for block in model:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            run = torch.compile(model, backend="attnfuse", options=opts)
        out = run(x)  # compiles
        out.sum().backward()
        close(out, want, f"fsdp2 {recipe}: output")
        grads_equal(model, ref, f"fsdp2 {recipe}")
        model.zero_grad()
        calls = op_calls(lambda: run(x).sum().backward())
        assert calls == {"fused": 2, "fused_backward": 2, "softmax": 0}, (recipe, calls)


@check
def context_parallel(rank: int, mesh) -> None:
    """context_parallel_attention over two ranks, both strategies (the ring, and the
    all-gather): causal with load balancing (GQA; a padding key_mask; a window, all-gather
    only), causal without load balancing, non-causal with a mask and softcap, and bf16
    through the ring; outputs and the gradients of q, k and v equal one process over the
    whole sequence (float64 reference)."""
    from attnfuse.distributed import context_parallel_attention, shard_sequence, unshard_sequence
    from tests.reference import attention_reference

    torch.manual_seed(6)
    b, hq, hkv, l, d = 2, 4, 2, 16, 8
    km = torch.ones(b, l, dtype=torch.bool)
    km[1, -5:] = False
    km[0, :3] = False
    both = ("ring", "allgather")
    cases = [("causal-balanced", dict(causal=True), True, None, both, torch.float32),
             ("causal-balanced-mask", dict(causal=True), True, km, both, torch.float32),
             ("causal-window-mask", dict(causal=True, window=5), True, km, ("allgather",), torch.float32),
             ("causal-contiguous-mask", dict(causal=True), False, km, both, torch.float32),
             ("full-mask-softcap", dict(softcap=3.0), True, km, both, torch.float32),
             ("causal-balanced-bf16", dict(causal=True), True, km, ("ring",), torch.bfloat16)]
    for name, kw, lb, mask, strategies, dtype in cases:
        q = torch.randn(b, hq, l, d, dtype=torch.float64, requires_grad=True)
        k, v = (torch.randn(b, hkv, l, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
        want = attention_reference(q, k, v, causal="top_left" if kw.get("causal") else "none",
                                   window=kw.get("window", 0), softcap=kw.get("softcap", 0.0),
                                   key_mask=mask, dead_rows="zero")
        dout = torch.randn_like(want)
        want.backward(dout)
        tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=4e-2, rtol=2e-2)
        for strategy in strategies:
            what = f"cp {name} ({strategy})"
            mine = [shard_sequence(t.detach().to(dtype), 2, rank, WORLD, lb).requires_grad_()
                    for t in (q, k, v)]
            local_mask = None if mask is None else shard_sequence(mask, 1, rank, WORLD, lb)
            out = context_parallel_attention(*mine, key_mask=local_mask, load_balanced=lb,
                                             strategy=strategy, **kw)
            assert out.dtype == dtype, f"{what}: out dtype {out.dtype}"
            out.backward(shard_sequence(dout.to(dtype), 2, rank, WORLD, lb))
            close(unshard_sequence(out.detach(), 2, load_balanced=lb), want, f"{what}: out", **tol)
            for t, ref_t, x in zip(mine, (q, k, v), "qkv"):
                close(unshard_sequence(t.grad, 2, load_balanced=lb), ref_t.grad, f"{what}: d{x}", **tol)
    _raises(lambda: context_parallel_attention(*mine, causal=True, window=3, strategy="ring"),
            "window", "allgather")


@check
def context_parallel_torch_cm(rank: int, mesh) -> None:
    """Inside PyTorch's ``context_parallel`` context manager (which routes only its own
    SDPA ops), the buffers it shards hold exactly :func:`shard_sequence`'s head-tail
    slices, so ``context_parallel_attention`` on them (causal, the ring) equals one
    process; the buffer is restored on exit."""
    from torch.distributed.tensor.experimental import context_parallel

    from attnfuse.distributed import context_parallel_attention, shard_sequence, unshard_sequence
    from tests.reference import attention_reference

    torch.manual_seed(7)
    x = torch.randn(2, 4, 16, 8)  # (B, H, L, D): q = k = v = x, sharded on dim 2
    want = attention_reference(x, x, x, causal="top_left").float()
    buf = x.clone()
    with context_parallel(mesh, buffers=[buf], buffer_seq_dims=[2]):
        close(buf, shard_sequence(x, 2, rank, WORLD), "torch's context_parallel sharding")
        out = context_parallel_attention(buf, buf, buf, causal=True, group=mesh.get_group())
    close(unshard_sequence(out, 2), want, "cp inside torch's context_parallel: out")
    close(buf, x, "buffer restored")


# ------------------------------------------------------------------------------ driver
def _worker(rank: int, port: int, out_dir: str, names: List[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    # attnfuse.distributed is not imported here: the first DTensor call (dtensor_op) goes
    # through attnfuse.flash_attention, which registers the sharding rules by itself
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for name in names:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            CHECKS[name](rank, mesh)
            results[name] = {"status": "ok"}
        except Exception:  # noqa: BLE001  (reported to the test)
            results[name] = {"status": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        results[name]["cpu_seconds"] = round(time.process_time() - c0, 2)
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(out_dir: str, names: List[str] = None, timeout: float = 300.0) -> Dict[int, dict]:
    """Run the checks ``names`` (default: all) on two ranks; {rank: {check: result}}."""
    names = list(CHECKS) if names is None else names
    ctx = mp.start_processes(_worker, args=(free_port(), out_dir, names), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the two-rank group did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = {}
    for rank in range(WORLD):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            results[rank] = json.load(f)
    return results
