"""The two 16-bit float formats: limits, rounding and tensor encoding, numpy only.

bfloat16 is rounded by hand (round to nearest even on the top 16 bits of a float32)
so the package needs no extra dtype library for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper


@dataclass(frozen=True)
class LowFormat:
    """A 16-bit float format a model is converted to."""

    name: str  # "float16" | "bfloat16"
    onnx_type: int
    type_str: str  # as in ONNX schemas, e.g. "tensor(float16)"
    max: float  # largest finite value
    tiny: float  # smallest positive (subnormal) value

    @property
    def short(self) -> str:
        return "fp16" if self.onnx_type == TensorProto.FLOAT16 else "bf16"

    def round(self, array: np.ndarray) -> np.ndarray:
        """float32 values as this format stores them (overflow gives inf), as float32."""
        x = np.asarray(array, dtype=np.float32)
        if self.onnx_type == TensorProto.FLOAT16:
            with np.errstate(over="ignore"):
                return x.astype(np.float16).astype(np.float32)
        return _bf16_to_f32(_f32_to_bf16_bits(x))

    def tensor(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        """A TensorProto of this type holding `array` rounded."""
        x = np.asarray(array, dtype=np.float32)
        if self.onnx_type == TensorProto.FLOAT16:
            with np.errstate(over="ignore"):
                return numpy_helper.from_array(x.astype(np.float16), name)
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = TensorProto.BFLOAT16
        tensor.dims.extend(x.shape)
        tensor.raw_data = _f32_to_bf16_bits(x).astype("<u2").tobytes()
        return tensor


def _f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded).astype(np.uint16)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


FLOAT16 = LowFormat("float16", TensorProto.FLOAT16, "tensor(float16)", 65504.0, 2.0**-24)
BFLOAT16 = LowFormat("bfloat16", TensorProto.BFLOAT16, "tensor(bfloat16)", 3.3895314e38, 2.0**-133)


def relative_error(array: np.ndarray, fmt: LowFormat, sample: int = 1 << 16) -> float:
    """||x - round(x)|| / ||x|| over the finite values: what storing x in `fmt` loses.

    Large tensors are measured on an evenly strided sample of `sample` elements: the
    figure is a ratio of sums, and the full computation dominated calibration time.
    """
    x = np.asarray(array, dtype=np.float32).ravel()
    if x.size > sample:
        x = x[:: x.size // sample]
    x = x[np.isfinite(x)]
    if not x.size:
        return 0.0
    norm = float(np.sqrt(np.dot(x, x, out=None)))
    if norm == 0.0 or not np.isfinite(norm):
        norm = float(np.linalg.norm(x.astype(np.float64)))
        if norm == 0.0:
            return 0.0
    low = fmt.round(x)
    if not np.isfinite(low).all():
        return float("inf")
    diff = (x - low).astype(np.float64)
    return float(np.sqrt(np.dot(diff, diff))) / norm
