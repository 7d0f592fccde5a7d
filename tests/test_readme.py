"""README.md's snippets run as written (issue 19, item 2).

Every ```python block runs, in order, in one namespace (each from a file of its own, so
that tracebacks and attnfuse's source locations name it), in a scratch folder. Every
```bash line that calls the CLI must parse with the CLI's own parser and name a factory
that exists; every ``pip install`` names only extras that ``pyproject.toml`` declares, and
the first command (the demo's) installs no extra at all.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)


def _blocks(lang: str):
    with open(README, encoding="utf-8") as f:
        return [body for kind, body in BLOCK.findall(f.read()) if kind == lang]


def test_python_snippets_run(tmp_path, monkeypatch):
    blocks = _blocks("python")
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("readme_snippets")   # classes the snippets define live in a module
    monkeypatch.setitem(sys.modules, module.__name__, module)
    torch._dynamo.reset()
    for i, body in enumerate(blocks):
        path = tmp_path / f"readme_block_{i}.py"
        path.write_text(body)
        exec(compile(body, str(path), "exec"), module.__dict__)  # noqa: S102
    ns = module.__dict__
    # what the snippets claim: both routes fuse both blocks, and every site names its line
    assert len(ns["result"].report.fusions) == 2 and len(ns["exported"].report.fusions) == 2
    for f in ns["result"].report.to_dict()["fusions"]:
        assert f["location"].startswith(str(tmp_path / "readme_block_")) and f["module"] in ("0", "1")
    assert (tmp_path / "report.html").exists()
    torch._dynamo.reset()


def _cli_lines():
    for body in _blocks("bash"):
        for line in body.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                yield line


def test_bash_snippets_are_valid_commands():
    from attnfuse.cli import build_parser

    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        toml = f.read()
    section = toml[toml.index("[project.optional-dependencies]"):]
    section = section[:section.index("\n[", 1)]
    extras = set(re.findall(r"^(\w+) = \[", section, re.M))
    assert "test" in extras
    lines = list(_cli_lines())
    first = lines[0]
    assert "attnfuse demo" in first and "[" not in first.split("pip install -e")[1].split("&&")[0], first
    checked = 0
    for line in lines:
        for command in line.split("&&"):
            words = shlex.split(command)
            if "pip" in words[0] and "install" in words:
                for extra in re.findall(r"\.\[([\w,]+)\]", command):
                    assert set(extra.split(",")) <= extras, command
            cli = words[3:] if words[:3] == ["python", "-m", "attnfuse"] else \
                words[1:] if os.path.basename(words[0]) == "attnfuse" else None
            if cli is None:
                continue
            args = build_parser().parse_args(cli)
            if args.command == "report":
                path, _, name = args.target.rpartition(":")
                with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                    assert re.search(rf"^def {name}\(", f.read(), re.M), command
            checked += 1
    assert checked >= 5

