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


    class Chatty(nn.Module):
        """Prints while it runs, and a graph break splits it into two graphs."""

        def forward(self, q, k, v):
            print("model output line")
            a = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
            torch._dynamo.graph_break()
            return torch.softmax(a @ k.transpose(-2, -1), dim=-1) @ v


    def chatty():
        print("factory output line")
        return Chatty(), tuple(torch.randn(1, 2, 8, 4) for _ in range(3))


    class Wrong(nn.Module):
        def forward(self, q, k, v):
            w = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
            return w @ v[:, :, :3]  # WRONG-SHAPE


    def wrong_shape():
        return Wrong(), tuple(torch.randn(1, 2, 8, 4) for _ in range(3))

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
    assert data["schema"] == "attnfuse.model-report/1" and data["totals"]["fused"] == 1 and data["mode"] == "train"
    (graph,) = data["graphs"]
    assert graph["schema"] == "attnfuse.report/1" and graph["fusions"][0]["dropout_p"] == 0.25  # fused in train


def test_report_html(factories):
    r = run("report", "models.py:make_one_tensor_input", "--format", "html", cwd=factories)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("<!DOCTYPE html>") and "flash_attention" in r.stdout


ERRORS = [
    ("missing.py:make", "no such file: missing.py"),
    ("models.py:nope", "has no attribute 'nope'"),
    ("models.py:wrong", "must return (model, example_inputs), got int"),
    ("models.py:boom", "boom() failed: RuntimeError: factory exploded"),
    ("models.py", "expected path/to/file.py:factory"),
    ("broken.py:make", "importing broken.py failed: SyntaxError"),
]


def test_report_errors_name_the_cause_without_traceback(factories, capfd, monkeypatch):
    """Every usage/factory error: exit status 1, one "attnfuse: error:" line first, no traceback,
    nothing on stdout, the user's line where there is one. In-process (fd-level capture), as the
    console script runs ``main`` (its exit status is checked by the subprocess tests above)."""
    from attnfuse.cli import main

    monkeypatch.chdir(factories)
    capfd.readouterr()
    for target, message in ERRORS:
        assert main(["report", target]) == 1, target
        out, err = capfd.readouterr()
        lines = err.strip().splitlines()
        assert lines[0].startswith("attnfuse: error:") and message in lines[0], (target, err)
        assert "Traceback" not in err and out == "", target
        if target == "models.py:boom":                      # the user's line it was raised at
            assert 'models.py:34: raise RuntimeError("factory exploded")' in err, err
        if target == "broken.py:make":
            assert "broken.py:2: def broken(:" in err, err


def test_json_shape_stdout_and_error_cause(factories, capfd, monkeypatch):
    """stdout is the report only (the model's prints go to stderr); the JSON is one object of
    schema attnfuse.model-report/1 with a list of graphs, here two (a graph break); a model
    that fails shows the real error and the user's line, the traceback only under --debug;
    ``demo --seq-len 0`` is a usage error (exit status 2). In-process (fd-level capture)."""
    from attnfuse.cli import main

    monkeypatch.chdir(factories)
    capfd.readouterr()
    assert main(["report", "models.py:chatty", "--format", "json"]) == 0
    out, err = capfd.readouterr()
    data = json.loads(out)                                   # nothing but the report on stdout
    assert "model output line" in err and "factory output line" in err
    assert data["schema"] == "attnfuse.model-report/1" and data["target"] == "models.py:chatty"
    assert [g["schema"] for g in data["graphs"]] == ["attnfuse.report/1"] * 2
    assert data["totals"]["graphs"] == 2 and data["totals"]["fused"] == 2 and len(data["sites"]) == 2
    assert all(s["fused"] and s["location"].startswith(str(factories / "models.py")) for s in data["sites"])

    line = next(i for i, t in enumerate(FACTORIES.splitlines(), 1) if "# WRONG-SHAPE" in t)
    for debug in (False, True):
        assert main(["report", "models.py:wrong_shape"] + ["--debug"] * debug) == 1
        out, err = capfd.readouterr()
        first = next(t for t in err.splitlines() if t.startswith("attnfuse: error:"))
        assert out == "" and (debug or err.startswith(first)) and first.startswith(
            "attnfuse: error: running the model failed: RuntimeError: Expected size"), err
        assert f"models.py:{line}: return w @ v[:, :, :3]  # WRONG-SHAPE" in err, err
        assert ("Traceback (most recent call last)" in err) == debug, err

    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--seq-len", "0"])
    assert exit_.value.code == 2 and "--seq-len" in capfd.readouterr().err


def test_bad_usage_exits_2():
    r = run("report")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_demo_small():
    r = run("demo", "--seq-len", "128", "--layers", "1", "--repeats", "1")
    assert r.returncode == 0, r.stderr
    assert "1 fused" in r.stdout and "speed-up" in r.stdout and "max |attnfuse - eager|" in r.stdout
    assert "compiling" in r.stderr and "done:" in r.stderr      # progress goes to stderr
