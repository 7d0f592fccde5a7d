"""The ``attnfuse`` console script (also ``python -m attnfuse``).

``attnfuse demo [--seq-len N] [--layers N] [--repeats N] [--inner eager|aot_eager|inductor]``
    A built-in GPT-style model compiled with ``backend="attnfuse"``: prints the report,
    then eager vs attnfuse time and peak memory on CPU (progress on stderr).

``attnfuse report path/to/file.py:factory [--format text|json|html] [-o FILE] [--train]``
    Imports ``file.py``, calls ``factory()``, which must return ``(model, example_inputs)``
    (``example_inputs`` a tuple/list of arguments, or one tensor), compiles the model with
    ``backend="attnfuse"`` (inner "eager", impl "torch") and runs it once on the inputs
    (in ``train()`` mode with autograd on under ``--train``, else ``eval()`` under no_grad),
    then writes the report of every graph compiled. ``--format json`` writes one object
    (schema ``attnfuse.report/1``, see :mod:`attnfuse.reporting`) for one graph, an array of
    them for several. Exit status: 0 on success, 1 on an error (one line on stderr), 2 on
    bad usage.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Any, List, Optional, Sequence


class CLIError(Exception):
    """An error reported as one line on stderr with exit status 1."""


def _load_factory(spec: str):
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise CLIError(f"expected path/to/file.py:factory, got {spec!r}")
    if not os.path.isfile(path):
        raise CLIError(f"no such file: {path}")
    mod_name = "_attnfuse_report_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise CLIError(f"cannot import {path} (not a Python file?)")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"importing {path} failed: {type(e).__name__}: {e}") from None
    factory = getattr(module, name, None)
    if factory is None:
        raise CLIError(f"{path} has no attribute {name!r}")
    if not callable(factory):
        raise CLIError(f"{path}:{name} is not callable (got {type(factory).__name__})")
    return factory


def _model_and_inputs(factory, label: str):
    import torch

    try:
        result = factory()
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"{label}() raised {type(e).__name__}: {e}") from None
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise CLIError(f"{label}() must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"{label}() must return (model, example_inputs) with model an nn.Module, "
                       f"got {type(model).__name__}")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise CLIError(f"{label}() must return (model, example_inputs) with example_inputs a tuple or list, "
                       f"got {type(inputs).__name__}")
    return model, tuple(inputs)


def _collect(model, inputs, train: bool) -> List[Any]:
    import torch

    from attnfuse.backend import collect_reports

    torch._dynamo.reset()
    model.train(train)
    compiled = torch.compile(model, backend="attnfuse", options={"inner": "eager", "impl": "torch"})
    with collect_reports() as reports:
        try:
            with torch.set_grad_enabled(train):
                compiled(*inputs)
        except Exception as e:  # noqa: BLE001
            raise CLIError(f"running the model failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return reports


def _render(reports: List[Any], fmt: str) -> str:
    from attnfuse import reporting

    if fmt == "json":
        data = [reporting.to_dict(r) for r in reports]
        return json.dumps(data[0] if len(data) == 1 else data, indent=2) + "\n"
    if fmt == "html":
        return reporting.to_html_many(reports)
    if not reports:
        return "attnfuse: no graph was compiled\n"
    return "\n\n".join(reporting.to_text(r) for r in reports) + "\n"


def _report(args: argparse.Namespace) -> int:
    factory = _load_factory(args.target)
    model, inputs = _model_and_inputs(factory, args.target)
    text = _render(_collect(model, inputs, args.train), args.format)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise CLIError(f"cannot write {args.output}: {e.strerror or e}") from None
        print(f"attnfuse: wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="attnfuse",
                                     description="Find hand-written attention in PyTorch models and fuse it.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fuse a built-in GPT-style model and compare it with eager on CPU")
    demo.add_argument("--seq-len", type=int, default=2048, help="sequence length (default 2048)")
    demo.add_argument("--layers", type=int, default=2, help="number of transformer blocks (default 2)")
    demo.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default 3)")
    demo.add_argument("--inner", default="eager", choices=("eager", "aot_eager", "inductor"),
                      help="inner compiler after the attnfuse rewrite (default eager)")
    rep = sub.add_parser("report", help="report what attnfuse fuses in a model from a factory function")
    rep.add_argument("target", metavar="FILE.py:FACTORY",
                     help="a Python file and a function in it returning (model, example_inputs)")
    rep.add_argument("--format", choices=("text", "json", "html"), default="text")
    rep.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE instead of stdout")
    rep.add_argument("--train", action="store_true", help="report on the training graph (train mode, autograd on)")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            if args.seq_len < 1 or args.layers < 1 or args.repeats < 1:
                raise CLIError("--seq-len, --layers and --repeats must be positive")
            from attnfuse.demo import run_demo

            return run_demo(seq_len=args.seq_len, n_layer=args.layers, repeats=args.repeats, inner=args.inner)
        return _report(args)
    except CLIError as e:
        print(f"attnfuse: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("attnfuse: interrupted", file=sys.stderr)
        return 130
