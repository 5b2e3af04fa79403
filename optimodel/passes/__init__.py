"""Passes, one per file, registered by name.

Importing this package imports every module in it, so a new pass is one new file:
`get_pass("fold")` and recipes find it by the name it registers.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from optimodel.passes.base import Pass, PassResult, register_pass, registry

__all__ = ["Pass", "PassResult", "register_pass", "get_pass", "available_passes"]

_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def available_passes() -> dict[str, type[Pass]]:
    _load_all()
    return dict(sorted(registry().items()))


def get_pass(name: str, **options: Any) -> Pass:
    """An instance of the pass registered as `name`, with options checked."""
    from optimodel.errors import UsageError

    passes = available_passes()
    if name not in passes:
        raise UsageError(f"unknown pass '{name}'; available: {', '.join(passes)}")
    return passes[name](**options)
