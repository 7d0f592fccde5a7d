"""Train a hand-written GPT through ``torch.compile(backend="attnfuse")``.

    python examples/training_loop.py [--steps 20] [--inner inductor|aot_eager|eager]

The fused attention op has its own backward (Triton on GPU, PyTorch's CPU kernels
otherwise); the inner compiler (Inductor by default) compiles the rest of the graph and,
with ``aot_eager`` / ``inductor``, traces the backward through the op's autograd formula.
"""
import argparse

import torch
import torch.nn.functional as F

import attnfuse
from model_factory import GPT


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = GPT().train()
    compiled = torch.compile(model, backend="attnfuse", options={"inner": args.inner})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 256, (8, args.seq_len + 1))    # learn to repeat a fixed batch
    losses = []
    for step in range(args.steps):
        logits = compiled(data[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"step {step:3d}  loss {loss.item():.4f}")
    print(attnfuse.last_report().to_text())
    return losses


if __name__ == "__main__":
    main()
