"""Mixed precision: float32 models to float16 / bfloat16 with measured float32 fallback."""

from __future__ import annotations

from optimodel.precision.formats import BFLOAT16, FLOAT16, LowFormat
from optimodel.precision.mixed import (
    DEFAULT_BLOCK_OPS,
    MixedOptions,
    MixedResult,
    convert_mixed,
)

__all__ = [
    "BFLOAT16",
    "DEFAULT_BLOCK_OPS",
    "FLOAT16",
    "LowFormat",
    "MixedOptions",
    "MixedResult",
    "convert_mixed",
]
