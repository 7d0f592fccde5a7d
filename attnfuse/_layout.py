"""Where the sub-packages ``attnfuse.kernels`` and ``attnfuse.passes`` come from.

Owns :func:`mount_subpackages`. The design card keeps their folders at the top of the
repository, next to ``attnfuse/`` (``kernels/``, ``passes/``); setuptools' ``package-dir``
installs them as ``attnfuse.kernels`` and ``attnfuse.passes``. Neither folder has an
``__init__.py``: each is a PEP 420 namespace package (what each owns is in the folder's
README.md). A checkout on ``sys.path`` (the working directory of ``python -c``, pytest's
rootdir insertion, a benchmark's ``sys.path`` insert) would otherwise offer ``kernels``
and ``passes`` as top-level regular packages, shadowing any distribution of that name
(Hugging Face's ``kernels``, which transformers imports). A regular package anywhere on
``sys.path`` wins over a namespace portion, so now the distribution's is found.

A wheel holds both folders inside ``attnfuse/``, where the import system finds them
unaided. An editable install maps them to the checkout's folders, but setuptools'
editable finder resolves a mapped package only through its ``__init__.py``
(pypa/setuptools#4943); so where a folder is not inside this package, a
:class:`SiblingFinder` resolves ``attnfuse.<name>`` as the folder of that name next to
the package's own folder, exactly as the import system resolves a namespace package.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from typing import Optional

SUBPACKAGES = ("kernels", "passes")


class SiblingFinder(importlib.abc.MetaPathFinder):
    """Finds ``<package>.<name>`` for ``name`` in :data:`SUBPACKAGES` as the namespace
    package of folder ``<root>/<name>``; nothing else."""

    def __init__(self, package: str, root: str):
        self.package, self.root = package, root

    def find_spec(self, fullname: str, path=None, target=None) -> Optional[importlib.machinery.ModuleSpec]:
        parent, _, name = fullname.rpartition(".")
        if parent != self.package or name not in SUBPACKAGES:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [self.root])


def mount_subpackages(package: str, package_dir: str) -> None:
    """Let ``<package>.kernels`` / ``<package>.passes`` resolve to the folders next to
    ``package_dir`` where they are not inside it (an editable install, a checkout on
    ``sys.path``): appends one :class:`SiblingFinder` to ``sys.meta_path``, once."""
    if all(os.path.isdir(os.path.join(package_dir, name)) for name in SUBPACKAGES):
        return  # a wheel install
    root = os.path.dirname(os.path.abspath(package_dir))
    if not any(isinstance(f, SiblingFinder) and (f.package, f.root) == (package, root) for f in sys.meta_path):
        sys.meta_path.append(SiblingFinder(package, root))
