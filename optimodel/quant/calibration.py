"""Calibration data for static quantization, from optimodel's own data layouts.

ONNX Runtime wants a `CalibrationDataReader`; users have a stacked `.npz`, a folder of
one-feed `.npz` files (stateful or variable-shape models), or nothing but the input
signature. `load_data` already checks names, dtypes and static dims, so a bad file fails
with one line before ONNX Runtime sees it. The reader supports `set_range`, which lets
`quantize_static` collect statistics chunk by chunk (`CalibStridedMinMax`): its
histogram calibrators (entropy, percentile) otherwise keep every intermediate output of
every sample in memory until the end (USER_ASKS item 12).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import onnx

from optimodel.data import RANDOM, Dataset, load_data, model_input_specs
from optimodel.errors import DataError, UsageError

# Samples whose intermediate outputs are held at once while calibrating: at most CHUNK,
# fewer when their activations would take more than CALIB_MEMORY_BUDGET bytes (entropy
# calibration of PP-OCR det at 640x640 holds ~380 MB per sample: 6.1 GB for 16 at once,
# 0.57 GB one at a time, for 20 % more time).
CHUNK = 16
CALIB_MEMORY_BUDGET = 1 << 30
RANDOM_WARNING = (
    "calibrating on random data: activation ranges will not match real inputs and accuracy "
    "can suffer; pass --calib-data with a .npz or a folder of .npz from real inputs"
)


# Called with (samples served in this calibration pass, samples in the pass) after each
# feed ONNX Runtime pulls: the command line draws a progress bar with it.
_PROGRESS: ContextVar[Callable[[int, int], None] | None] = ContextVar(
    "calibration_progress", default=None
)


@contextmanager
def calibration_progress(callback: Callable[[int, int], None]) -> Iterator[None]:
    """Report calibration progress to `callback` while the block runs."""
    token = _PROGRESS.set(callback)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


class DatasetReader:
    """Feeds ONNX Runtime's calibrators one feed at a time from an optimodel Dataset.

    ONNX Runtime's CalibrationDataReader accepts any class with `get_next` as a subclass,
    so importing onnxruntime.quantization waits until a model is really quantized.
    """

    def __init__(self, dataset: Dataset, count: int) -> None:
        self.dataset = dataset
        self.count = count
        self._iter: Iterator[Any] | None = None
        self._pos = 0
        self._end = count

    def __len__(self) -> int:
        return self.count

    def _restart(self, start: int) -> None:
        self._iter = islice(iter(self.dataset), start, self.count)
        self._pos = start

    def __iter__(self) -> DatasetReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._restart(0)
        if self._pos >= self._end:
            return None
        batch = next(self._iter, None)  # type: ignore[arg-type]
        if batch is None:
            return None
        self._pos += 1
        hook = _PROGRESS.get()
        if hook is not None:
            hook(self._pos, self.count)
        return batch.feed

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve feeds [start, end) next; sequential ranges keep reading the same pass."""
        if self._iter is None or start_index != self._pos:
            self._restart(start_index)
        self._end = min(end_index, self.count)


def chunk_size(count: int, limit: int = CHUNK) -> int:
    """Largest divisor of `count` up to `limit`: ONNX Runtime's strides must divide the total."""
    return max(d for d in range(1, max(1, min(limit, count)) + 1) if count % d == 0)


def activation_bytes(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> int | None:
    """Bytes of the tensors one feed produces, from shape inference at the feed's shapes."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for value in probe.graph.input:
        if value.name in feed and value.type.HasField("tensor_type"):
            shape = value.type.tensor_type.shape
            shape.ClearField("dim")
            for size in feed[value.name].shape:
                shape.dim.add().dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False, data_prop=True)
    except Exception:  # shape inference failing only costs the estimate
        return None
    total = 0
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        dims = [d.dim_value for d in tensor.shape.dim]
        if not tensor.HasField("shape") or not all(dims):
            continue
        try:
            size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        total += int(np.prod(dims)) * size
    return total or None


@dataclass
class Calibration:
    """A checked calibration set: the reader ORT pulls from, and what to report about it."""

    reader: DatasetReader
    description: str
    warnings: list[str]
    chunk: int  # samples whose statistics are collected at once
    bytes_per_sample: int | None  # estimated activation bytes of one sample

    def describe(self) -> dict[str, Any]:
        mb = self.bytes_per_sample / 2**20 if self.bytes_per_sample else None
        return {
            "data": self.description,
            "samples": len(self.reader),
            "chunk": self.chunk,
            "activation_mb_per_sample": round(mb, 3) if mb is not None else None,
        }


def calibration_reader(
    source: str | None,
    model: onnx.ModelProto,
    *,
    samples: int,
    shapes: dict[str, tuple[int, ...]] | None = None,
    int_range: tuple[int, int] = (0, 255),
) -> Calibration:
    """A checked reader over at most `samples` feeds, chunked to fit the memory budget."""
    if not source:
        raise UsageError(
            "static quantization needs --calib-data: a .npz (samples stacked), a folder of "
            "one-feed .npz files, or 'random' (only for trying things out)"
        )
    if samples < 1:
        raise UsageError(f"--calib-samples {samples}: must be at least 1")
    warnings = [RANDOM_WARNING] if str(source) == RANDOM else []
    dataset = load_data(
        source,
        model_input_specs(model),
        shapes=shapes,
        batch_size=1,
        num_samples=samples,
        int_range=int_range,
    )
    first = next(iter(dataset), None)  # a folder is checked lazily: fail on its first file now
    if first is None:
        raise DataError(f"{source}: holds no calibration samples")
    count = dataset.num_feeds if dataset.num_feeds is not None else samples
    count = min(count, samples)
    if count < 8 and str(source) != RANDOM:
        warnings.append(
            f"calibrating on only {count} sample(s): activation ranges may miss real extremes"
        )
    if str(source) == RANDOM:
        unresolved = [
            spec.name
            for spec in model_input_specs(model)
            if spec.name not in (shapes or {})
            and any(not isinstance(d, int) or d <= 0 for d in spec.shape[1:])
        ]
        if unresolved:
            warnings.append(
                f"random calibration data uses 1 for the dynamic dims of {', '.join(unresolved)}; "
                "give --shape NAME=DIMS with a realistic size"
            )
    per_sample = activation_bytes(model, first.feed)
    limit = CHUNK if per_sample is None else CALIB_MEMORY_BUDGET // per_sample
    # ONNX Runtime's histogram calibrators stack a chunk's outputs into one array, which
    # fails when samples differ in shape (sentences of different lengths): one at a time
    chunk = chunk_size(count, max(1, min(CHUNK, limit))) if dataset.same_shapes else 1
    reader = DatasetReader(dataset, count)
    return Calibration(reader, dataset.description, warnings, chunk, per_sample)
