"""``torch.compile``'s ``mode`` for the attnfuse backend.

Owns :func:`parse_mode` (the mode given as ``torch.compile(..., mode=...)``, which torch
hands to a custom backend as a keyword, or as ``options={"mode": ...}``, since torch refuses
``mode`` together with ``options``) and :func:`mode_config` (the Inductor config of a mode,
which the backend gives to its inner Inductor compile). The modes are Inductor's own:
``torch._inductor.list_mode_options()``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional


def parse_mode(option: Optional[str], keyword: Optional[str]) -> Optional[str]:
    """The mode from ``options["mode"]`` and/or the ``mode`` keyword; ``ValueError`` when they
    disagree or the mode is not one of Inductor's."""
    if keyword is not None and option is not None and option != keyword:
        raise ValueError(f"mode={keyword!r} and options['mode']={option!r} disagree")
    mode = keyword if keyword is not None else option
    if mode is None:
        return None
    from torch._inductor import list_mode_options

    known = list(list_mode_options())
    if mode not in known:
        raise ValueError(f"unknown torch.compile mode {mode!r}; known: {known}")
    return mode


def mode_config(mode: Optional[str]) -> Dict[str, Any]:
    """Inductor's config patches for ``mode`` (empty for None and ``"default"``)."""
    if mode is None or mode == "default":
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))
