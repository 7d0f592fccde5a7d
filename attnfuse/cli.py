"""The ``attnfuse`` console script (also ``python -m attnfuse``).

``attnfuse demo [--seq-len N] [--layers N] [--repeats N] [--inner eager|aot_eager|inductor]``
    A built-in GPT-style model compiled with ``backend="attnfuse"``: prints the report,
    then eager vs attnfuse time and peak memory on CPU (progress on stderr).

``attnfuse report path/to/file.py:factory [--format text|json|html] [-o FILE] [--train]``
    Imports ``file.py``, calls ``factory()``, which must return ``(model, example_inputs)``
    (``example_inputs`` a tuple/list of arguments, or one tensor), compiles the model with
    ``backend="attnfuse"`` (inner "eager", impl "torch") and runs it once on the inputs
    (in ``train()`` mode with autograd on under ``--train``, else ``eval()`` under no_grad),
    then writes the report of the model: every attention site (fused, or not and why) and
    every graph compiled. stdout holds the report only: whatever the model or the factory
    prints goes to stderr. ``--format json`` writes one object of schema
    ``attnfuse.model-report/1`` (:mod:`attnfuse.model_report`; its ``graphs`` list holds one
    ``attnfuse.report/1`` object per graph) whatever the number of graphs.

Errors: ``attnfuse: error: ...`` on stderr with the underlying cause (the innermost
exception of the chain) and the user's source line it was raised at, without a traceback
unless ``--debug`` is given. Exit status: 0 on success, 1 on an error, 2 on bad usage
(including out-of-range numbers such as ``--seq-len 0``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import re
import sys
import traceback
from typing import Any, Iterator, List, Optional, Sequence, Tuple


class CLIError(Exception):
    """An error reported on stderr with exit status 1: a line with the message, then the
    underlying cause of ``error`` (if given) and the user's line it was raised at."""

    def __init__(self, message: str, error: Optional[BaseException] = None):
        super().__init__(message)
        self.error = error


_USER_CODE = re.compile(r'from user code:\s*\n(?:.*\n)*?\s*File "([^"]+)", line (\d+)[^\n]*\n\s*([^\n]*)')


def _next_in_chain(e: BaseException) -> Optional[BaseException]:
    """``e``'s cause (``raise ... from``), else its context: also a context that torch's own
    exceptions hide (dynamo re-raises the real error ``from None``), never one the user's
    code hid."""
    if e.__cause__ is not None:
        return e.__cause__
    if e.__suppress_context__ and not type(e).__module__.startswith("torch"):
        return None
    return e.__context__


def _chain(e: BaseException) -> List[BaseException]:
    """``e`` and the exceptions it was raised from, outermost first."""
    chain: List[BaseException] = []
    cur: Optional[BaseException] = e
    while cur is not None and all(cur is not x for x in chain):
        chain.append(cur)
        cur = _next_in_chain(cur)
    return chain


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _internal(path: str) -> bool:
    """A file of torch, of attnfuse or of the Python standard library (not the user's code)."""
    import torch

    path = os.path.abspath(path)
    roots = [os.path.dirname(os.path.abspath(torch.__file__)), os.path.dirname(os.path.abspath(__file__)),
             os.path.dirname(os.path.abspath(os.__file__))]
    return path.startswith("<") or any(path.startswith(r + os.sep) for r in roots)


def _user_line(e: BaseException) -> Optional[Tuple[str, int, str]]:
    """(file, line, source) in the user's code where ``e`` (or an exception of its chain) was
    raised: dynamo's "from user code" frame, else the innermost traceback frame outside torch,
    attnfuse and the standard library."""
    chain = _chain(e)
    for x in chain:
        m = _USER_CODE.search(str(x))
        if m:
            return m.group(1), int(m.group(2)), m.group(3).strip()
    for x in reversed(chain):
        frames = [f for f in traceback.extract_tb(x.__traceback__) if not _internal(f.filename)]
        if frames:
            f = frames[-1]
            return f.filename, f.lineno or 0, (f.line or "").strip()
    return None


def describe_error(e: BaseException) -> List[str]:
    """Lines saying what ``e`` was: its innermost cause and the user's line (no traceback)."""
    inner = _chain(e)[-1]
    lines = [_first_line(inner)]
    if inner is not e and _first_line(e) != lines[0]:
        lines.append(f"(raised as {_first_line(e)})")
    where = _user_line(e)
    if isinstance(inner, SyntaxError) and inner.filename:
        where = (inner.filename, inner.lineno or 0, (inner.text or "").strip())
    if where is not None:
        lines.append(f"at {where[0]}:{where[1]}" + (f": {where[2]}" if where[2] else ""))
    return lines


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what the user's code prints (Python's ``print`` and writes to file descriptor 1)
    to stderr, so that stdout holds the report only."""
    sys.stdout.flush()
    saved = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        try:
            sys.__stdout__.flush()
        except (AttributeError, ValueError, OSError):
            pass
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


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
        raise CLIError(f"importing {path} failed", e) from None
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
        raise CLIError(f"{label}() failed", e) from None
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
    compiled = torch.compile(model, backend="attnfuse", options={"inner": "eager", "impl": "torch",
                                                                      "warn_unfused": False})
    with collect_reports() as reports:
        try:
            with torch.set_grad_enabled(train):
                compiled(*inputs)
        except Exception as e:  # noqa: BLE001
            raise CLIError("running the model failed", e) from None
    return reports


def _render(reports: List[Any], fmt: str, target: str, mode: str) -> str:
    from attnfuse import model_report

    if fmt == "json":
        return model_report.to_json(reports, target, mode) + "\n"
    if fmt == "html":
        return model_report.to_html(reports, target, mode)
    return model_report.to_text(reports, target, mode) + "\n"


def _report(args: argparse.Namespace) -> int:
    with _stdout_to_stderr():
        factory = _load_factory(args.target)
        model, inputs = _model_and_inputs(factory, args.target)
        reports = _collect(model, inputs, args.train)
    text = _render(reports, args.format, args.target, "train" if args.train else "eval")
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


def _positive(text: str) -> int:
    """An argparse type: a positive integer (anything else is a usage error, exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _print_error(e: CLIError, debug: bool) -> None:
    lines = describe_error(e.error) if e.error is not None else []
    head = f"attnfuse: error: {e}" + (f": {lines[0]}" if lines else "")
    print(head, file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line}", file=sys.stderr)
    if e.error is not None:
        if debug:
            traceback.print_exception(type(e.error), e.error, e.error.__traceback__, file=sys.stderr)
        else:
            print("  (--debug shows the traceback)", file=sys.stderr)


@contextlib.contextmanager
def _quiet_torch(debug: bool) -> Iterator[None]:
    """Without ``--debug``, torch's own error log of a failed fake-tensor call (a traceback
    the error message repeats) is not printed."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    old = logger.disabled
    logger.disabled = not debug or old
    try:
        yield
    finally:
        logger.disabled = old


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (``attnfuse demo`` / ``attnfuse report``)."""
    parser = argparse.ArgumentParser(prog="attnfuse",
                                     description="Find hand-written attention in PyTorch models and fuse it.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fuse a built-in GPT-style model and compare it with eager on CPU")
    demo.add_argument("--seq-len", type=_positive, default=2048, help="sequence length (default 2048)")
    demo.add_argument("--layers", type=_positive, default=2, help="number of transformer blocks (default 2)")
    demo.add_argument("--repeats", type=_positive, default=3, help="timed runs per variant (default 3)")
    demo.add_argument("--inner", default="eager", choices=("eager", "aot_eager", "inductor"),
                      help="inner compiler after the attnfuse rewrite (default eager)")
    rep = sub.add_parser("report", help="report what attnfuse fuses in a model from a factory function")
    rep.add_argument("target", metavar="FILE.py:FACTORY",
                     help="a Python file and a function in it returning (model, example_inputs)")
    rep.add_argument("--format", choices=("text", "json", "html"), default="text")
    rep.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE instead of stdout")
    rep.add_argument("--train", action="store_true", help="report on the training graph (train mode, autograd on)")
    for p in (demo, rep):
        p.add_argument("--debug", action="store_true", help="on an error, print the full traceback")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _quiet_torch(args.debug):
            if args.command == "demo":
                from attnfuse.demo import run_demo

                return run_demo(seq_len=args.seq_len, n_layer=args.layers, repeats=args.repeats, inner=args.inner)
            return _report(args)
    except CLIError as e:
        _print_error(e, args.debug)
        return 1
    except KeyboardInterrupt:
        print("attnfuse: interrupted", file=sys.stderr)
        return 130
