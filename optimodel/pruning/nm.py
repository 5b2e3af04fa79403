"""N:M semi-structured sparsity: in every m consecutive weights along the reduction
axis keep the n largest.

The groups run along the axis a layer sums over (MatMul [K, N]: K; Gemm transB=1
[N, K]: K; Conv [M, C/g, kh, kw]: C for each kh, kw), because that is the layout
sparse tensor cores (2:4) and N:M kernels expect. ONNX Runtime's CPU and CUDA kernels
do not exploit the pattern; it pays off only where a backend (e.g. TensorRT with sparse
weights enabled) does, so the pass says so instead of claiming speed.
"""

from __future__ import annotations

import re

import numpy as np

from optimodel.errors import UsageError


def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4); n must be below m."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text or "")
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise UsageError(f"bad N:M pattern '{text}': expected N:M with 0 < N < M, e.g. 2:4")
    return int(match[1]), int(match[2])


def _groups(weight: np.ndarray, m: int, axis: int) -> np.ndarray:
    """View as [..., K/m, m] with the reduction axis last, split into groups of m."""
    moved = np.moveaxis(weight, axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def nm_mask(weight: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep-mask with the n largest |values| of every m consecutive along `axis`."""
    if weight.shape[axis] % m:
        raise ValueError(f"axis {axis} of size {weight.shape[axis]} is not a multiple of {m}")
    groups = np.abs(_groups(weight, m, axis).astype(np.float64))
    # stable sort: among equal magnitudes the earlier position is kept
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    moved_shape = np.moveaxis(weight, axis, -1).shape
    return np.moveaxis(keep.reshape(moved_shape), -1, axis)


def prune_nm(weight: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """A copy of the weight that satisfies the n:m pattern along `axis`."""
    mask = nm_mask(weight, n, m, axis)
    return np.where(mask, weight, np.zeros((), dtype=weight.dtype)).astype(weight.dtype)


def nm_violations(weight: np.ndarray, n: int, m: int, axis: int) -> int:
    """Groups of m along `axis` holding more than n non-zeros (-1: axis not divisible)."""
    if weight.ndim == 0 or weight.shape[axis] % m:
        return -1
    nonzero = np.count_nonzero(_groups(weight, m, axis), axis=-1)
    return int(np.sum(nonzero > n))


def check_nm(weight: np.ndarray, n: int, m: int, axis: int) -> bool:
    """True when every group of m consecutive weights along `axis` has at most n non-zeros."""
    return nm_violations(weight, n, m, axis) == 0
