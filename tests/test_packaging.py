"""The checkout's folders never shadow another distribution's top-level package.

The design card keeps ``kernels/`` and ``passes/`` at the top of the repository, installed
as ``attnfuse.kernels`` / ``attnfuse.passes``. From the repository root (``python -c``
puts the working directory first on ``sys.path``; ``python -m pytest`` inserts the
rootdir; benchmarks insert it) a regular package there would be found as the top-level
``kernels``, in place of Hugging Face's ``kernels`` distribution that transformers >= 5.25
imports (``ImportError: cannot import name 'CUDAProperties' from 'kernels'``). Both
folders are PEP 420 namespace packages instead (see attnfuse/_layout.py). Each check runs
in a fresh interpreter, as a user's process would.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_the_kernels_distribution_wins_from_the_repository_root():
    """With the root as the working directory and first on sys.path, ``import kernels``
    is the installed distribution's package (a test dependency, as transformers needs
    it), and attnfuse's own sub-packages still import, from the checkout's folders."""
    out = _python(f"""
        import importlib.metadata, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        assert sys.path[1] == "", sys.path[:2]   # and the working directory right after
        import kernels
        dist = importlib.metadata.distribution("kernels")
        assert os.path.samefile(kernels.__file__, dist.locate_file("kernels/__init__.py")), kernels.__file__
        import attnfuse.kernels.torch_impl, attnfuse.passes.rewrite
        print(kernels.__file__)
        print(attnfuse.kernels.torch_impl.__file__)
        """, cwd=ROOT)
    kernels_file, torch_impl_file = out.split()
    assert Path(kernels_file).resolve().parent != ROOT / "kernels"
    assert Path(torch_impl_file).resolve() == ROOT / "kernels" / "torch_impl.py"


def test_subpackages_import_from_elsewhere():
    """Away from the root (only the installed package on sys.path), attnfuse.kernels and
    attnfuse.passes resolve, to the folders the installation maps them to."""
    out = _python("""
        import attnfuse, attnfuse.kernels.torch_runs as r, attnfuse.passes.structure as s
        print(r.__file__); print(s.__file__)
        """, cwd=Path("/"))
    runs, structure = out.split()
    assert Path(runs).parent.name == "kernels" and Path(structure).parent.name == "passes"


def test_no_regular_top_level_package_but_attnfuse_and_the_suite():
    """Structure: of the root's folders, only ``attnfuse`` (the distribution's one
    top-level name) and ``tests`` (the suite's own package, a name packaging tools keep out
    of distributions) are regular packages; every other folder with Python code is not a
    package at all, so none can be imported in place of a distribution's package."""
    regular = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert regular == ["attnfuse", "tests"], regular
    for name in ("kernels", "passes"):
        assert any((ROOT / name).glob("*.py")) and not (ROOT / name / "__init__.py").exists()
