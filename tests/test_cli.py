"""The ``attnfuse`` console script and ``python -m attnfuse``, through subprocesses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

BIN = os.path.join(os.path.dirname(sys.executable), "attnfuse")

FACTORIES = textwrap.dedent('''
    import torch
    import torch.nn as nn
    import torch.nn.functional as F


    class M(nn.Module):
        def forward(self, q, k, v):
            w = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)  # <script>x</script>
            return F.dropout(w, 0.25, self.training) @ v


    def make():
        torch.manual_seed(0)
        return M(), tuple(torch.randn(1, 2, 8, 4) for _ in range(3))


    def make_one_tensor_input():
        class N(nn.Module):
            def forward(self, x):
                return torch.softmax(x @ x.transpose(-2, -1), dim=-1) @ x
        return N(), torch.randn(1, 2, 8, 4)


    def wrong():
        return 3


    def wrong_model():
        return "model", ()


    def boom():
        raise RuntimeError("factory exploded")

    not_callable = 5
''')


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "models.py").write_text(FACTORIES)
    (d / "broken.py").write_text("import torch\ndef broken(:\n")
    return d


def run(*args, cwd=None, module=False, timeout=180):
    cmd = [sys.executable, "-m", "attnfuse", *args] if module else [BIN, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_console_script_installed():
    assert os.path.exists(BIN)
    r = run("--help")
    assert r.returncode == 0 and "demo" in r.stdout and "report" in r.stdout


def test_report_text(factories):
    r = run("report", "models.py:make", cwd=factories)
    assert r.returncode == 0, r.stderr
    assert "1 fused, 0 near miss" in r.stdout and "models.py:9" in r.stdout and "scale=0.5" in r.stdout
    assert "dropout_p" not in r.stdout                      # eval mode: the dropout is dropped


def test_report_json_train_to_file_via_module(factories):
    out = factories / "r.json"
    r = run("report", f"{factories / 'models.py'}:make", "--format", "json", "-o", str(out), "--train",
            module=True)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["schema"] == "attnfuse.report/1" and data["totals"]["fused"] == 1
    assert data["fusions"][0]["dropout_p"] == 0.25          # train mode: the dropout is fused


def test_report_html(factories):
    r = run("report", "models.py:make_one_tensor_input", "--format", "html", cwd=factories)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("<!DOCTYPE html>") and "flash_attention" in r.stdout


ERRORS = [
    ("missing.py:make", "no such file: missing.py"),
    ("models.py:nope", "has no attribute 'nope'"),
    ("models.py:wrong", "must return (model, example_inputs), got int"),
    ("models.py:boom", "raised RuntimeError: factory exploded"),
    ("models.py", "expected path/to/file.py:factory"),
    ("broken.py:make", "importing broken.py failed: SyntaxError"),
]


def test_report_errors_are_one_line(factories):
    # run concurrently: each process imports torch
    procs = [(t, m, subprocess.Popen([BIN, "report", t], cwd=factories, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)) for t, m in ERRORS]
    for target, message, p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 1, (target, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("attnfuse: error:") and message in lines[0], (target, err)
        assert "Traceback" not in err and out == "", target


def test_bad_usage_exits_2():
    r = run("report")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_demo_small():
    r = run("demo", "--seq-len", "128", "--layers", "1", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    assert "1 fused" in r.stdout and "speed-up" in r.stdout and "max |attnfuse - eager|" in r.stdout
    assert "compiling" in r.stderr and "done:" in r.stderr      # progress goes to stderr
