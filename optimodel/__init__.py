"""optimodel: optimize ONNX models and prove every step with numbers.

The command line is a thin layer over these functions; heavy modules (onnx,
onnxruntime) are imported lazily so `optimodel --help` stays instant.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("optimodel.modelio", "load_model"),
    "save_model": ("optimodel.modelio", "save_model"),
    "inspect_model": ("optimodel.inspection", "inspect_model"),
    "load_data": ("optimodel.data", "load_data"),
    "verify_models": ("optimodel.verify", "verify_models"),
    "evaluate": ("optimodel.evaluate", "evaluate"),
    "quantize": ("optimodel.quant.api", "quantize"),
    "get_pass": ("optimodel.passes", "get_pass"),
    "transform_file": ("optimodel.transform", "transform_file"),
    "Tolerance": ("optimodel.verify", "Tolerance"),
    "Report": ("optimodel.report", "Report"),
    "OptimodelError": ("optimodel.errors", "OptimodelError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'optimodel' has no attribute {name!r}")
