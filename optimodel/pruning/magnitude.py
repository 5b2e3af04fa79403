"""Unstructured magnitude pruning: zero the smallest weights, per layer or globally.

Dense kernels do the same work with zeros in them, so this buys a smaller compressed
file (and a model ready for sparse kernels), not speed. Counts are exact: a layer asked
for sparsity S gets round(S * size) zeros, so achieved sparsity matches the request to
within half an element.

Global scope ranks every weight by |w| / RMS(layer): dividing by the layer's root mean
square puts layers with different scales (a 3x3 stem, a wide classifier) on one axis,
so one threshold cannot wipe out a layer just because its weights are small; a per-layer
cap (`max_layer_sparsity`) is the backstop.
"""

from __future__ import annotations

import math

import numpy as np

from optimodel.pruning.common import capped_smallest


def smallest_mask(array: np.ndarray, count: int) -> np.ndarray:
    """Boolean keep-mask with exactly `count` of the smallest |values| dropped."""
    flat = np.abs(array.astype(np.float64, copy=False)).ravel()
    keep = np.ones(flat.size, dtype=bool)
    if count >= flat.size:
        keep[:] = False
    elif count > 0:
        keep[np.argpartition(flat, count - 1)[:count]] = False
    return keep.reshape(array.shape)


def rms_scores(array: np.ndarray) -> np.ndarray | None:
    """|w| / RMS(w), flattened; None for an all-zero layer (nothing to rank)."""
    flat = np.abs(array.astype(np.float64, copy=False)).ravel()
    rms = math.sqrt(float(np.mean(flat * flat))) if flat.size else 0.0
    return flat / rms if rms > 0 else None


def layer_counts(sizes: list[int], sparsity: float) -> list[int]:
    """Zeros per layer when each layer gets the same sparsity."""
    return [int(round(sparsity * n)) for n in sizes]


def global_counts(
    arrays: list[np.ndarray], sparsity: float, max_layer_sparsity: float
) -> list[int]:
    """Zeros per layer for one normalized-magnitude threshold across all layers."""
    scores = [rms_scores(a) for a in arrays]
    ranked = [s if s is not None else np.zeros(0) for s in scores]
    total = int(round(sparsity * sum(a.size for a in arrays)))
    cap_ratio = max(max_layer_sparsity, sparsity)
    caps = [
        int(math.floor(cap_ratio * a.size)) if s is not None else 0
        for a, s in zip(arrays, scores, strict=True)
    ]
    return capped_smallest(ranked, total, caps)


def prune_unstructured(array: np.ndarray, count: int) -> np.ndarray:
    """A copy of the weight with its `count` smallest-magnitude entries set to zero."""
    return np.where(smallest_mask(array, count), array, np.zeros((), dtype=array.dtype)).astype(
        array.dtype
    )
