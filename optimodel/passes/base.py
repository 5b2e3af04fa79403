"""The pass contract: a pass rewrites a model and returns what it did; it never prints.

The pipeline around it (`optimodel.pipeline`) checks the result, compares outputs
against the input, times it and records it, so a pass only has to be right about
its own rewrite and say why a pattern declined.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx


@dataclass
class PassResult:
    """A pass's output model, whether it changed anything, and its own figures."""

    model: onnx.ModelProto
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    declined: list[dict[str, str]] = field(default_factory=list)  # pattern, node, reason
    payload: bytes | None = None  # `model` serialized, when the pass already has the bytes


class Pass(ABC):
    """One named rewrite; options come from the command line or a recipe."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    # Tolerance name (optimodel.verify.TOLERANCES) its result is verified with.
    tolerance: ClassVar[str] = "exact"
    # Option names and defaults; unknown options are refused with the valid ones.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        from optimodel.errors import UsageError

        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise UsageError(
                f"pass '{self.name}' has no option(s) {', '.join(unknown)}; valid: {valid}"
            )
        self.options = {**self.defaults, **options}

    @abstractmethod
    def run(self, model: onnx.ModelProto) -> PassResult:
        """Rewrite a copy of the model (never the caller's object) and say what changed."""


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its `name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"two passes named '{cls.name}'")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Pass]]:
    return _REGISTRY
