"""The rewrite API on an exported program, without ``torch.compile``.

    python examples/export_rewrite.py [--out rewritten.pt2]

``attnfuse.rewrite(exported_program)`` rewrites the program's ``.module()`` and returns it
(``result.graph_module``); export it again to save it. The fused op is registered at
``import torch`` wherever attnfuse is installed, so the saved program loads without
``import attnfuse``.
"""
import argparse

import torch

import attnfuse
from model_factory import make


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="rewritten.pt2", help="where to save the re-exported program")
    args = parser.parse_args(argv)

    model, inputs = make()
    model.eval()
    result = attnfuse.rewrite(torch.export.export(model, inputs))
    print(result.report.to_text())
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(*inputs), model(*inputs))
    program = torch.export.export(result.graph_module, inputs)
    torch.export.save(program, args.out)
    loaded = torch.export.load(args.out)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(*inputs), model(*inputs))
    print(f"fused {result.fused} attention site(s); saved the rewritten program to {args.out}")
    return result


if __name__ == "__main__":
    main()
