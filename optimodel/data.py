"""Input data for verification, calibration and evaluation, without pickle.

Three layouts (see the README): one `.npz` stacked along a samples axis, a folder of
one-feed `.npz` files read lazily in sorted order, or `random` data built from the
model's input signature. Everything is checked against the model's inputs up front so
a wrong file fails with one line instead of deep inside ONNX Runtime.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from optimodel.errors import DataError, UsageError

LABELS_KEY = "labels"
MAX_RANDOM_INPUT_BYTES = 4 * 2**30
DEFAULT_DYNAMIC_DIM = 32
RANDOM = "random"

Dim = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype, and dims (int, symbolic name, or None)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]
    # rows of the table an integer input indexes (Gather of an embedding): random ids stay
    # below it, so token_type_ids of a 2-row table get 0 or 1, not 0..255
    index_limit: int | None = None

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype.name}[{dims}]"


def _value_info_shape(value: onnx.ValueInfoProto) -> tuple[Dim, ...]:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return ()
    dims: list[Dim] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _value_info_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    elem = value.type.tensor_type.elem_type
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"input '{value.name}' has an unsupported element type {elem}") from exc


_PASS_THROUGH = {"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity"}


def _index_limits(model: onnx.ModelProto) -> dict[str, int]:
    """For each graph input used as Gather indices into a constant table, the table's rows
    along the gathered axis (the smallest such table), followed through shape-only ops."""
    tables = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tables[node.output[0]] = list(node.attribute[0].t.dims)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    limits: dict[str, int] = {}
    for value in model.graph.input:
        frontier, seen = [value.name], set()
        for _ in range(4):  # a few pass-through hops at most
            following = []
            for name in frontier:
                for node in readers.get(name, []):
                    if id(node) in seen:
                        continue
                    seen.add(id(node))
                    if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
                        dims = tables.get(node.input[0])
                        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                        if dims and -len(dims) <= axis < len(dims) and dims[axis] > 0:
                            rows = int(dims[axis])
                            limits[value.name] = min(limits.get(value.name, rows), rows)
                    elif node.op_type == "EmbedLayerNormalization" and name in node.input[:2]:
                        # ONNX Runtime's fused embedding lookup: input_ids index the word
                        # table (input 2), segment_ids the segment table (input 4)
                        position = 2 if node.input[0] == name else 4
                        table = node.input[position] if len(node.input) > position else ""
                        dims = tables.get(table)
                        if dims and dims[0] > 0:
                            rows = int(dims[0])
                            limits[value.name] = min(limits.get(value.name, rows), rows)
                    elif node.op_type in _PASS_THROUGH and node.input[0] == name:
                        following.append(node.output[0])
            frontier = following
    return limits


def model_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed: graph inputs that are not initializers."""
    initializers = {init.name for init in model.graph.initializer}
    limits = _index_limits(model)
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise DataError(
                f"input '{value.name}' is not a tensor; only tensor inputs are supported"
            )
        specs.append(
            InputSpec(
                value.name,
                _value_info_dtype(value),
                _value_info_shape(value),
                limits.get(value.name),
            )
        )
    return specs


_SHAPE_RE = re.compile(r"^\s*(?P<name>.+?)\s*[=:]\s*(?P<dims>\d+(?:\s*[x,*]\s*\d+)*)\s*$")


def parse_shapes(values: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse `--shape name=1x3x224x224` (also `name:1,3,224,224`) options."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values or []:
        match = _SHAPE_RE.match(value)
        if not match:
            raise UsageError(
                f"bad --shape '{value}': expected NAME=DIMxDIMx... such as input=1x3x224x224"
            )
        dims = tuple(int(d) for d in re.split(r"\s*[x,*]\s*", match["dims"]))
        if any(d <= 0 for d in dims):
            raise UsageError(f"bad --shape '{value}': every dimension must be a positive integer")
        shapes[match["name"]] = dims
    return shapes


def parse_int_range(value: str) -> tuple[int, int]:
    """Parse `--int-range LOW:HIGH` (inclusive), e.g. `0:255`."""
    match = re.fullmatch(r"\s*(-?\d+)\s*[:,]\s*(-?\d+)\s*", value or "")
    if not match or int(match[1]) > int(match[2]):
        raise UsageError(
            f"bad --int-range '{value}': expected LOW:HIGH with LOW <= HIGH, e.g. 0:255"
        )
    return int(match[1]), int(match[2])


@dataclass
class Batch:
    """One complete feed for a model run, with its labels when the data has them."""

    feed: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @property
    def size(self) -> int:
        first = next(iter(self.feed.values()), None)
        return int(first.shape[0]) if first is not None and first.ndim else 1


@dataclass
class Dataset:
    """An iterable of feeds plus what it is, for reports."""

    description: str
    source: str
    _factory: object = field(repr=False)
    num_feeds: int | None = None
    has_labels: bool = False
    same_shapes: bool = True  # every feed has the same input shapes

    def __iter__(self) -> Iterator[Batch]:
        return self._factory()  # type: ignore[operator]


def _check_array(
    spec: InputSpec, array: np.ndarray, where: str, *, extra_leading: bool
) -> np.ndarray:
    """Cast within a dtype family and check rank and static dims against the model."""
    if array.dtype == object:
        raise DataError(f"{where}: array '{spec.name}' holds Python objects; refusing it")
    same_family = (
        (array.dtype.kind == "f" and spec.dtype.kind == "f")
        or (array.dtype.kind in "iu" and spec.dtype.kind in "iu")
        or (array.dtype.kind == "b" and spec.dtype.kind == "b")
        or array.dtype == spec.dtype
    )
    if not same_family:
        raise DataError(
            f"{where}: input '{spec.name}' is {array.dtype.name} but the model expects "
            f"{spec.dtype.name}"
        )
    feed_shape = array.shape[1:] if extra_leading else array.shape
    if spec.shape and len(feed_shape) != len(spec.shape):
        raise DataError(
            f"{where}: input '{spec.name}' has shape {list(array.shape)} but the model expects "
            f"rank {len(spec.shape)} ({spec.describe()})"
        )
    for axis, (have, want) in enumerate(zip(feed_shape, spec.shape, strict=False)):
        if isinstance(want, int) and want > 0 and have != want:
            if not extra_leading and axis == 0:
                continue  # samples along a fixed batch axis: checked when batching
            raise DataError(
                f"{where}: input '{spec.name}' has shape {list(array.shape)} but the model "
                f"expects {spec.describe()} (axis {axis} is {have}, not {want})"
            )
    return array.astype(spec.dtype, copy=False)


def _open_npz(path: Path) -> dict[str, np.ndarray]:
    """Load every array of an .npz without pickle, turning any failure into one line."""
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a readable .npz file (not a zip archive of .npy arrays)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object arrays" in str(exc).lower():
            raise DataError(
                f"{path}: holds pickled Python objects; optimodel never loads pickles "
                "(save plain numeric arrays with numpy.savez)"
            ) from exc
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc


def npz_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Array shapes of an .npz from the .npy headers alone (no data read, no pickle);
    None when a header cannot be read (loading the file will say why)."""
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shapes[member[: -len(".npy")]] = tuple(read(handle)[0])
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    return shapes


def _check_keys(arrays: dict[str, np.ndarray], specs: list[InputSpec], where: str) -> None:
    names = {spec.name for spec in specs}
    missing = sorted(names - arrays.keys())
    unknown = sorted(set(arrays) - names - {LABELS_KEY})
    if not arrays:
        raise DataError(f"{where}: holds no arrays")
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown key(s) {', '.join(unknown)}")
        raise DataError(
            f"{where}: {'; '.join(parts)}; the model's inputs are "
            f"{', '.join(s.describe() for s in specs)}"
        )


def _stacked_npz(
    path: Path, specs: list[InputSpec], batch_size: int, max_samples: int | None
) -> Dataset:
    arrays = _open_npz(path)
    _check_keys(arrays, specs, str(path))
    # Decide per file whether the leading axis is an extra samples axis or the batch axis.
    first = specs[0]
    rank = len(first.shape)
    extra = bool(rank) and arrays[first.name].ndim == rank + 1
    checked = {
        s.name: _check_array(s, arrays[s.name], str(path), extra_leading=extra) for s in specs
    }
    counts = {name: (arr.shape[0] if arr.ndim else 1) for name, arr in checked.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{path}: inputs hold different numbers of samples: {counts}")
    total = next(iter(counts.values()))
    if total == 0:
        raise DataError(f"{path}: holds zero samples")
    labels = arrays.get(LABELS_KEY)
    if labels is not None and labels.shape[:1] != (total,):
        raise DataError(
            f"{path}: 'labels' has {labels.shape[0] if labels.ndim else 0} entries "
            f"for {total} samples"
        )
    if max_samples is not None:
        total = min(total, max_samples)
    step = 1 if extra else batch_size
    if not extra:
        fixed = [s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)]
        if fixed:
            step = fixed[0]
            if total % step:
                raise DataError(
                    f"{path}: {total} samples do not split into the model's fixed batch of {step}"
                )

    def factory() -> Iterator[Batch]:
        for start in range(0, total, step):
            stop = min(start + step, total)
            if extra:
                feed = {name: arr[start] for name, arr in checked.items()}
            else:
                feed = {name: arr[start:stop] for name, arr in checked.items()}
            yield Batch(feed, None if labels is None else labels[start:stop])

    feeds = -(-total // step)
    return Dataset(
        description=f"{path.name}: {total} samples in {feeds} feeds",
        source=str(path),
        _factory=factory,
        num_feeds=feeds,
        has_labels=labels is not None,
    )


def _npz_folder(path: Path, specs: list[InputSpec], max_samples: int | None) -> Dataset:
    files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
    if not files:
        raise DataError(
            f"{path}: folder holds no .npz files (nor test_data_set_*/input_*.pb folders)"
        )
    if max_samples is not None:
        files = files[:max_samples]
    has_labels = LABELS_KEY in _open_npz(files[0])
    first = npz_shapes(files[0])
    same_shapes = first is not None and all(npz_shapes(f) == first for f in files[1:])

    def factory() -> Iterator[Batch]:
        for file in files:
            arrays = _open_npz(file)
            _check_keys(arrays, specs, str(file))
            feed = {
                s.name: _check_array(s, arrays[s.name], str(file), extra_leading=False)
                for s in specs
            }
            yield Batch(feed, arrays.get(LABELS_KEY))

    return Dataset(
        description=f"{path.name}/: {len(files)} feeds (one per file)",
        source=str(path),
        _factory=factory,
        num_feeds=len(files),
        has_labels=has_labels,
        same_shapes=same_shapes,
    )


def resolve_shape(
    spec: InputSpec, shapes: dict[str, tuple[int, ...]], batch_size: int
) -> tuple[int, ...]:
    """Concrete dims for an input: `--shape` first, then the batch size on axis 0, else 32.

    32 rather than 1 for other dynamic dims (sequence, height, width): a sequence of one
    token makes attention trivial and a 1x1 image breaks most CNNs, so verification on
    such inputs would prove little.
    """
    if spec.name in shapes:
        given = shapes[spec.name]
        if spec.shape and len(given) != len(spec.shape):
            raise DataError(
                f"--shape {spec.name}={'x'.join(map(str, given))} has rank {len(given)} but the "
                f"model expects {spec.describe()}"
            )
        for have, want in zip(given, spec.shape, strict=False):
            if isinstance(want, int) and want > 0 and have != want:
                raise DataError(
                    f"--shape {spec.name}={'x'.join(map(str, given))} conflicts with the model's "
                    f"fixed dims {spec.describe()}"
                )
        return given
    dims = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim > 0:
            dims.append(dim)
        else:
            dims.append(batch_size if axis == 0 else DEFAULT_DYNAMIC_DIM)
    return tuple(dims)


def random_feed(
    specs: list[InputSpec],
    shapes: dict[str, tuple[int, ...]],
    rng: np.random.Generator,
    *,
    batch_size: int = 1,
    int_range: tuple[int, int] = (0, 255),
) -> dict[str, np.ndarray]:
    """One synthetic feed: floats uniform in [0, 1), integers uniform in int_range (and
    below the table size for inputs that index an embedding table)."""
    feed = {}
    for spec in specs:
        shape = resolve_shape(spec, shapes, batch_size)
        nbytes = int(np.prod(shape, dtype=np.float64)) * max(spec.dtype.itemsize, 1)
        if nbytes > MAX_RANDOM_INPUT_BYTES:
            raise DataError(
                f"input '{spec.name}' of shape {'x'.join(map(str, shape))} would need "
                f"{nbytes / 2**30:.1f} GiB of random data; pass a smaller --shape or --data"
            )
        if spec.dtype.kind == "f":
            feed[spec.name] = rng.random(shape, dtype=np.float32).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            info = np.iinfo(spec.dtype)
            low, high = max(int_range[0], int(info.min)), min(int_range[1], int(info.max))
            if spec.index_limit is not None:  # ids into a table: keep them in it
                low, high = max(low, 0), min(high, spec.index_limit - 1)
                high = max(high, low)
            feed[spec.name] = rng.integers(low, high + 1, size=shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feed[spec.name] = rng.random(shape) < 0.5
        else:
            raise DataError(
                f"input '{spec.name}' is {spec.dtype.name}; random data supports numeric inputs "
                "only, pass --data"
            )
    return feed


PB_SET_PREFIX = "test_data_set_"  # ONNX's own test-data layout (model zoo, onnx backend tests)


def _numbered(path: Path) -> tuple[int, str]:
    digits = re.search(r"(\d+)$", path.stem)
    return (int(digits.group(1)) if digits else -1, path.name)


def _pb_sets(path: Path) -> list[Path]:
    """`test_data_set_N` folders holding `input_K.pb` under `path` (or `path` itself)."""

    def is_set(folder: Path) -> bool:
        return folder.name.startswith(PB_SET_PREFIX) and any(folder.glob("input_*.pb"))

    if is_set(path):
        return [path]
    return sorted((p for p in path.iterdir() if p.is_dir() and is_set(p)), key=_numbered)


def _read_pb(path: Path) -> tuple[str, np.ndarray]:
    """(name, array) of one serialized TensorProto; protobuf only, never pickle."""
    from google.protobuf.message import DecodeError
    from onnx import numpy_helper

    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(path.read_bytes())
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError("its data is in an external file")
        return tensor.name, numpy_helper.to_array(tensor)
    except (DecodeError, ValueError, TypeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else "not parsable"
        raise DataError(f"{path}: not a readable TensorProto .pb file ({first})") from exc


def _pb_folder(
    path: Path, sets: list[Path], specs: list[InputSpec], max_samples: int | None
) -> Dataset:
    """One feed per `test_data_set_N`: `input_K.pb` by tensor name, else by position."""
    if max_samples is not None:
        sets = sets[:max_samples]
    names = [s.name for s in specs]

    def feed_of(folder: Path) -> dict[str, np.ndarray]:
        files = sorted(folder.glob("input_*.pb"), key=_numbered)
        if len(files) != len(specs):
            raise DataError(
                f"{folder}: {len(files)} input_*.pb file(s) for the model's {len(specs)} "
                f"input(s) {', '.join(s.describe() for s in specs)}"
            )
        arrays: dict[str, np.ndarray] = {}
        for index, file in enumerate(files):
            name, array = _read_pb(file)
            arrays[name if name in names else names[index]] = array
        _check_keys(arrays, specs, str(folder))
        return {
            s.name: _check_array(s, arrays[s.name], str(folder), extra_leading=False) for s in specs
        }

    feed_of(sets[0])  # a bad set fails now, with its folder named

    def factory() -> Iterator[Batch]:
        for folder in sets:
            yield Batch(feed_of(folder))

    return Dataset(
        description=f"{path.name}/: {len(sets)} ONNX test data set(s) (input_*.pb)",
        source=str(path),
        _factory=factory,
        num_feeds=len(sets),
        same_shapes=False,  # not known without parsing every set: calibrate one at a time
    )


def load_data(
    source: str | Path | None,
    specs: list[InputSpec],
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
    batch_size: int = 1,
    num_samples: int | None = None,
    int_range: tuple[int, int] = (0, 255),
    seed: int = 0,
) -> Dataset:
    """Open `.npz`, a folder of `.npz`, ONNX `test_data_set_*` folders of `input_*.pb`,
    or `random` (the default) as feeds for a model."""
    shapes = shapes or {}
    unknown = sorted(set(shapes) - {s.name for s in specs})
    if unknown:
        raise DataError(
            f"--shape names unknown input(s) {', '.join(unknown)}; the model's inputs are "
            f"{', '.join(s.describe() for s in specs)}"
        )
    if source is None or str(source) == RANDOM:
        count = num_samples or 4
        random_feed(
            specs, shapes, np.random.default_rng(seed), batch_size=batch_size, int_range=int_range
        )  # fail now, not in the middle of a run

        def factory() -> Iterator[Batch]:
            rng = np.random.default_rng(seed)
            for _ in range(count):
                yield Batch(
                    random_feed(specs, shapes, rng, batch_size=batch_size, int_range=int_range)
                )

        dims = "; ".join(
            f"{s.name}={'x'.join(map(str, resolve_shape(s, shapes, batch_size)))}" for s in specs
        )
        return Dataset(f"random: {count} feeds ({dims})", RANDOM, factory, count, False)
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such data file or folder")
    if path.is_dir():
        sets = _pb_sets(path)
        if sets:
            return _pb_folder(path, sets, specs, num_samples)
        return _npz_folder(path, specs, num_samples)
    if path.suffix != ".npz":
        raise DataError(
            f"{path}: unsupported data file; give a .npz, a folder of .npz, a folder of "
            "test_data_set_*/input_*.pb, or 'random'"
        )
    return _stacked_npz(path, specs, batch_size, num_samples)
