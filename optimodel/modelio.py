"""Model I/O: load with external data, check, save atomically, record provenance.

Every command reads and writes models through here so the safety rules live in one
place: never overwrite the input, never leave a half-written output, never follow an
external-data location out of the model's folder.
"""

from __future__ import annotations

import hashlib
import math
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper

from optimodel import __version__
from optimodel.errors import ModelLoadError, OptimodelError

# Protobuf cannot serialize a message of 2 GiB or more; keep a margin for the graph.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 2**20
# Tensors smaller than this stay inside the .onnx file when saving external data.
EXTERNAL_TENSOR_MIN_BYTES = 1024

PROVENANCE_PREFIX = "optimodel."

# External data of at least this many bytes is not read into memory at load: its tensors
# keep pointing at the file and are read on demand (a tensor at a time, or mapped by
# ONNX Runtime), so a model above protobuf's 2 GB limit loads, runs and saves without
# ever being serialized whole.
LAZY_EXTERNAL_BYTES = 1 << 30

# The folder a lazily loaded model's external data is relative to travels with the model
# (and every copy a pass makes of it) in this metadata entry, removed again at save.
FOLDER_KEY = "optimodel:external_folder"
# The folder tensor_array() reads from, for code that holds a tensor and not its model.
_external_folder: ContextVar[Path | None] = ContextVar("external_folder", default=None)


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Yield a graph and every subgraph nested in its nodes (If / Loop / Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graphs(sub)


def count_nodes(model: onnx.ModelProto) -> int:
    """Nodes of the main graph and of every subgraph."""
    return sum(len(g.node) for g in iter_graphs(model.graph))


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Yield every stored tensor: initializers and Constant/attribute tensors, subgraphs too."""
    for graph in iter_graphs(model.graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield attr.sparse_tensor.values


def _uses_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and (tensor.data_location == onnx.TensorProto.EXTERNAL)


def has_external_tensors(model: onnx.ModelProto) -> bool:
    """True for a lazily loaded model: some tensors still live in an external file."""
    return any(_uses_external_data(t) for t in iter_tensors(model))


def external_folder(model: onnx.ModelProto | None = None) -> Path | None:
    """Folder a lazily loaded model's external data is relative to (None: not lazy)."""
    if model is not None:
        for prop in model.metadata_props:
            if prop.key == FOLDER_KEY:
                return Path(prop.value)
        return None
    return _external_folder.get()


def _mark_lazy(model: onnx.ModelProto, source: Path) -> None:
    """Record where a lazily loaded model's data lives, on the model and as the default."""
    folder = Path(os.path.realpath(source.parent))
    _strip_folder(model)
    model.metadata_props.add(key=FOLDER_KEY, value=str(folder))
    _external_folder.set(folder)


def _strip_folder(model: onnx.ModelProto) -> str | None:
    """Remove the folder entry (it must never reach a saved file); returns its value."""
    found = [p.value for p in model.metadata_props if p.key == FOLDER_KEY]
    if found:
        kept = [p for p in model.metadata_props if p.key != FOLDER_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
    return found[0] if found else None


@contextmanager
def external_data_folder(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Resolve external tensors of in-memory models against `folder` inside the block."""
    token = _external_folder.set(Path(folder))
    try:
        yield
    finally:
        _external_folder.reset(token)


@contextmanager
def model_scope() -> Iterator[None]:
    """One command's (or one batch task's) models: a lazily loaded folder is forgotten after."""
    token = _external_folder.set(None)
    try:
        yield
    finally:
        _external_folder.reset(token)


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values, read from its external file when it was loaded lazily."""
    if _uses_external_data(tensor):
        folder = external_folder()
        if folder is None:
            raise ModelLoadError(f"tensor '{tensor.name}' has external data and no known folder")
        return numpy_helper.to_array(tensor, base_dir=str(folder))
    return numpy_helper.to_array(tensor)


def in_external_folder(model: onnx.ModelProto | None = None) -> Any:
    """Work inside a lazily loaded model's folder, for tools that read external data
    relative to the working folder (the ONNX checker, ONNX Runtime's quantizer, onnx-ir)."""
    return _in_folder(external_folder(model))


@contextmanager
def _in_folder(folder: Path | None) -> Iterator[None]:
    """Work inside `folder`: the ONNX checker resolves in-memory external data from cwd."""
    if folder is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def external_data_files(model: onnx.ModelProto, base_dir: Path, source: Path) -> dict[Path, int]:
    """Return the external data files a model refers to and the bytes it uses from each.

    Refuses absolute locations, locations that leave the model's folder (`..`, symlinks)
    and references past the end of a file, before any byte of them is read.
    """
    base_real = Path(os.path.realpath(base_dir))
    files: dict[Path, int] = {}
    for tensor in iter_tensors(model):
        if not _uses_external_data(tensor):
            continue
        info = _external_info(tensor)
        location = info.get("location", "")
        if not location:
            raise ModelLoadError(
                f"{source}: tensor '{tensor.name}' has external data without a location"
            )
        if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location[:3]:
            raise ModelLoadError(
                f"{source}: tensor '{tensor.name}' points to an absolute external data path "
                f"'{location}'; only paths inside the model's folder are allowed"
            )
        target = Path(os.path.realpath(base_dir / location))
        if target != base_real and base_real not in target.parents:
            raise ModelLoadError(
                f"{source}: tensor '{tensor.name}' external data '{location}' escapes the "
                "model's folder; refusing to read it"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{source}: external data file '{location}' for tensor '{tensor.name}' is missing"
            )
        offset = int(info.get("offset", "0") or 0)
        length = info.get("length")
        size = target.stat().st_size
        end = offset + int(length) if length else size
        if offset < 0 or end > size:
            raise ModelLoadError(
                f"{source}: tensor '{tensor.name}' reads bytes {offset}..{end} of '{location}', "
                f"which has only {size} bytes (truncated external data?)"
            )
        files[target] = files.get(target, 0) + (end - offset)
    return files


def load_model(
    path: str | os.PathLike[str], *, load_external_data: bool = True, check: bool = True
) -> onnx.ModelProto:
    """Read an ONNX model, refusing files that are not one, are invalid, or untrusted.

    `check=False` skips the ONNX checker (inspect shows a model before judging it).
    """
    return load_model_with_bytes(path, load_external_data=load_external_data, check=check)[0]


def load_model_with_bytes(
    path: str | os.PathLike[str], *, load_external_data: bool = True, check: bool = True
) -> tuple[onnx.ModelProto, bytes | None]:
    """`load_model`, plus the file's bytes when they are the model's whole serialization
    (no external data, at most `REUSE_MAX_BYTES`): serializing the input again for its
    checks would cost as much as reading it (0.2 s for a 90 MB encoder)."""
    source = Path(path)
    if not source.exists():
        raise ModelLoadError(f"{source}: no such file")
    if source.is_dir():
        raise ModelLoadError(f"{source}: is a folder, not an ONNX model file")
    if source.stat().st_size == 0:
        raise ModelLoadError(f"{source}: empty file, not an ONNX model")
    data: bytes | None = None
    try:
        if source.stat().st_size <= REUSE_MAX_BYTES:
            data = source.read_bytes()
            model = onnx.load_model_from_string(data)
        else:
            model = onnx.load_model(str(source), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, TypeError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"{source}: not a valid ONNX model (protobuf parse failed: {reason}); "
            "is the file truncated or of another format?"
        ) from exc
    except OSError as exc:
        raise ModelLoadError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    if model.ir_version <= 0 or not model.HasField("graph"):
        raise ModelLoadError(
            f"{source}: not an ONNX model (no IR version or graph); is it another file format?"
        )
    files = external_data_files(model, source.parent, source)
    if files or has_external_tensors(model):
        data = None  # the file holds the graph, not the weights
    if files and (not load_external_data or sum(files.values()) >= LAZY_EXTERNAL_BYTES):
        _mark_lazy(model, source)
    elif files:
        try:
            external_data_helper.load_external_data_for_model(model, str(source.parent))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{source}: cannot read external data: {exc}") from exc
    if check:
        check_model(model, source, serialized=data)
    return model, data


def _declared_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a tensor's type and shape call for (sub-byte types packed), None if unknown."""
    from onnx import helper

    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    count = 1
    for dim in tensor.dims:
        count *= dim
    bits = _SUB_BYTE_BITS.get(tensor.data_type)
    return (count * bits + 7) // 8 if bits else count * itemsize


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes a tensor's payload takes, whether raw, typed or external.

    Reading `raw_data` copies it (protobuf hands out a new bytes object), so a raw
    tensor's size comes from its type and shape, which `_check_raw_sizes` holds it to.
    """
    if _uses_external_data(tensor):
        length = _external_info(tensor).get("length")
        if length:
            return int(length)
    declared = _declared_bytes(tensor)
    if tensor.HasField("raw_data"):
        return declared if declared is not None else len(tensor.raw_data)
    return declared if declared is not None else 4 * math.prod(tensor.dims)


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size plus external data, estimated without serializing when huge."""
    external = sum(tensor_bytes(t) for t in iter_tensors(model) if _uses_external_data(t))
    try:
        return model.ByteSize() + external
    except (ValueError, OverflowError):  # pragma: no cover - protobuf refuses >2 GB
        return sum(tensor_bytes(t) for t in iter_tensors(model))


def near_protobuf_limit(model: onnx.ModelProto) -> bool:
    """Whether the model (with its external data) reaches EXTERNAL_DATA_THRESHOLD.

    Tensor payloads are summed first, which is cheap; only a model whose tensors alone come
    within half the threshold is measured exactly (ByteSize costs as much as serializing).
    """
    payload = sum(tensor_bytes(t) for t in iter_tensors(model))
    if payload < EXTERNAL_DATA_THRESHOLD // 2:
        return False
    return model_size(model) >= EXTERNAL_DATA_THRESHOLD


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_files_bytes(path: str | os.PathLike[str], model: onnx.ModelProto | None = None) -> int:
    """Bytes on disk of a model file plus its external data files.

    `model`: the model the file holds, when the caller has it. A file at least as large as
    all its tensors keeps them inside, so it is not parsed again to look for data files
    (0.1 s on a 90 MB model).
    """
    source = Path(path)
    total = source.stat().st_size
    if model is not None and not has_external_tensors(model):
        if total >= sum(tensor_bytes(t) for t in iter_tensors(model)):
            return total
    try:
        model = onnx.load_model(str(source), load_external_data=False)
        for data_file, _ in external_data_files(model, source.parent, source).items():
            total += data_file.stat().st_size
    except (OptimodelError, DecodeError, OSError):
        pass
    return total


# Domains whose ops the onnx checker and ONNX Runtime know (com.microsoft: ORT contrib ops).
KNOWN_DOMAINS = {
    "",
    "ai.onnx",
    "ai.onnx.ml",
    "ai.onnx.training",
    "ai.onnx.preview.training",
    "com.microsoft",
}


def custom_domains(model: onnx.ModelProto) -> set[str]:
    """Op domains no standard tool knows: their nodes are opaque and kept as they are."""
    return {
        n.domain for g in iter_graphs(model.graph) for n in g.node if n.domain not in KNOWN_DOMAINS
    }


_SUB_BYTE_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(onnx.TensorProto, name)
}


def _check_raw_sizes(model: onnx.ModelProto, source: str | os.PathLike[str]) -> None:
    """Refuse a tensor whose raw bytes do not match its type and shape.

    The ONNX checker refuses too few bytes but lets too many through, and every
    later reader (numpy_helper.to_array) would then fail on the reshape.
    """
    for tensor in iter_tensors(model):
        if not tensor.HasField("raw_data") or _uses_external_data(tensor):
            continue
        need = _declared_bytes(tensor)
        if need is None:
            continue  # unknown type: the checker's business
        if len(tensor.raw_data) != need:
            raise ModelLoadError(
                f"{source}: tensor '{tensor.name}' holds {len(tensor.raw_data)} bytes, "
                f"its type and shape need {need}"
            )


# A model's serialized bytes, where whoever made them vouches the model is not changed
# while they are registered: a 90 MB model takes 0.2 s to serialize, and the pipeline's
# check, the next pass's probe session and the check after it would each pay for it.
_KNOWN_BYTES: ContextVar[dict[int, tuple[onnx.ModelProto, bytes]] | None] = ContextVar(
    "optimodel_known_bytes", default=None
)


@contextmanager
def known_bytes(model: onnx.ModelProto, payload: bytes | None) -> Iterator[None]:
    """Within the block, `model_bytes(model)` is `payload` (None registers nothing).

    The caller promises `model` is not changed inside the block: the bytes are matched
    to the object, not to its contents.
    """
    if payload is None:
        yield
        return
    known = dict(_KNOWN_BYTES.get() or {})
    known[id(model)] = (model, payload)
    token = _KNOWN_BYTES.set(known)
    try:
        yield
    finally:
        _KNOWN_BYTES.reset(token)


def registered_bytes(model: onnx.ModelProto) -> bytes | None:
    """The bytes registered for this very object by `known_bytes`, or None."""
    entry = (_KNOWN_BYTES.get() or {}).get(id(model))
    return entry[1] if entry is not None and entry[0] is model else None


def model_bytes(model: onnx.ModelProto) -> bytes:
    """The model's bytes: the registered ones, else serialized now."""
    payload = registered_bytes(model)
    return payload if payload is not None else model.SerializeToString()


# Above this many bytes of tensors, a model's bytes are not kept for reuse: holding a
# second copy would raise peak memory by the model's size for the whole run.
REUSE_MAX_BYTES = 512 << 20


def reusable_bytes(model: onnx.ModelProto) -> bytes | None:
    """Serialized bytes worth keeping for reuse: all data in memory and at most
    `REUSE_MAX_BYTES` of tensors (a copy of a large model is not kept around)."""
    if has_external_tensors(model):
        return None
    if sum(tensor_bytes(t) for t in iter_tensors(model)) > REUSE_MAX_BYTES:
        return None
    return model_bytes(model)


def check_model(
    model: onnx.ModelProto,
    source: str | os.PathLike[str] = "model",
    *,
    strict: bool = False,
    serialized: bytes | None = None,
    raw_sizes: bool = True,
) -> int:
    """Run the ONNX checker; a failure becomes one line naming the model and the problem.

    `strict` adds type and shape inference, which custom-domain ops are exempt from
    (their schemas are unknown, so inference cannot judge them). `serialized` is the
    model's bytes when the caller already has them. `raw_sizes=False` skips holding raw
    tensors to their declared sizes (each read copies the bytes), for a model this
    process wrote itself. Returns the model's size in bytes (serialized plus external
    data), which the caller would otherwise pay for again.
    """
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        # -1 is how some exporters (Paddle) write a dynamic dim; anything lower is nonsense.
        if any(d.HasField("dim_value") and d.dim_value < -1 for d in dims):
            raise ModelLoadError(f"{source}: '{value.name}' declares a negative dimension")
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise ModelLoadError(
                f"{source}: uses opset {opset.version}, newer than this onnx supports ({newest})"
            )
    huge = near_protobuf_limit(model) and Path(str(source)).is_file()
    lazy = external_folder(model) if has_external_tensors(model) else None
    if huge:
        payload: str | bytes = str(source)
        size = model_size(model)
    else:  # serialized once, for the checker, the strict check and the size
        payload = serialized if serialized is not None else model_bytes(model)
        size = len(payload) + sum(
            tensor_bytes(t) for t in iter_tensors(model) if _uses_external_data(t)
        )
    folder = None if huge else lazy
    if strict and not huge and not custom_domains(model):
        try:  # the full check runs the plain one too: a valid model is checked once
            with _in_folder(lazy):
                onnx.checker.check_model(payload, full_check=True)
        except (
            onnx.checker.ValidationError,
            onnx.shape_inference.InferenceError,
            ValueError,  # e.g. "Invalid tensor data type 99." from inference
        ) as exc:
            _plain_check(payload, folder, source)  # its failure is the clearer message
            if raw_sizes:
                _check_raw_sizes(model, source)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelLoadError(f"{source}: fails ONNX type/shape inference: {reason}") from exc
    else:
        _plain_check(payload, folder, source)
    if raw_sizes:
        _check_raw_sizes(model, source)
    return size


def _plain_check(payload: str | bytes, folder: Path | None, source: Any) -> None:
    """The ONNX checker without inference; one line on failure."""
    try:
        with _in_folder(folder):
            onnx.checker.check_model(payload)
    except (onnx.checker.ValidationError, ValueError) as exc:
        reason = " ".join(str(exc).split("\n")[0:1]).strip() or type(exc).__name__
        raise ModelLoadError(f"{source}: fails the ONNX checker: {reason}") from exc


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """ONNX shape inference that never aborts: returns the model and a warning if it failed."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True), None
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as exc:
        return model, f"shape inference failed: {str(exc).splitlines()[0] if str(exc) else exc}"


@dataclass(frozen=True)
class Provenance:
    """What produced a model; written into its metadata_props."""

    command: str
    passes: tuple[str, ...] = ()

    @classmethod
    def from_argv(cls, passes: tuple[str, ...] = ()) -> Provenance:
        args = ["optimodel", *sys.argv[1:]] if sys.argv else ["optimodel"]
        return cls(command=shlex.join(args), passes=passes)


def stamp_provenance(model: onnx.ModelProto, provenance: Provenance) -> None:
    """Record optimodel's version, command and passes in the model's metadata_props."""
    entries = {
        f"{PROVENANCE_PREFIX}version": __version__,
        f"{PROVENANCE_PREFIX}command": provenance.command,
        f"{PROVENANCE_PREFIX}passes": ",".join(provenance.passes),
    }
    kept = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def _stamped(model: onnx.ModelProto, provenance: Provenance, payload: bytes | None) -> bytes | None:
    """Stamp the provenance; the stamped model's bytes from `payload` when the stamp only
    appends entries (no earlier optimodel entry, no folder entry to strip), else None."""
    keys = [p.key for p in model.metadata_props]
    appends_only = not any(k.startswith(PROVENANCE_PREFIX) or k == FOLDER_KEY for k in keys)
    count = len(model.metadata_props)
    stamp_provenance(model, provenance)
    if payload is None or not appends_only:
        return None
    tail = onnx.ModelProto()
    tail.metadata_props.extend(model.metadata_props[count:])
    return payload + tail.SerializeToString()


def read_provenance(model: onnx.ModelProto) -> dict[str, str]:
    """The optimodel entries of a model's metadata_props (empty if it never passed through)."""
    return {
        p.key[len(PROVENANCE_PREFIX) :]: p.value
        for p in model.metadata_props
        if p.key.startswith(PROVENANCE_PREFIX)
    }


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(
    output: str | os.PathLike[str],
    *,
    input_path: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Path:
    """Refuse an output that would overwrite the input, or an existing file without force."""
    out = Path(output)
    if input_path is not None:
        src = Path(input_path)
        if _same_file(out, src) or os.path.abspath(out) == os.path.abspath(src):
            raise OptimodelError(
                f"{out}: refusing to overwrite the input model; choose another -o/--output"
            )
        if out.suffix:
            data_name = Path(f"{out}.data")
            if _same_file(data_name, src):
                raise OptimodelError(f"{out}: its external data file would overwrite the input")
    if out.is_dir():
        raise OptimodelError(f"{out}: is a folder; give a file name for the output model")
    if out.exists() and not force:
        raise OptimodelError(f"{out}: already exists; pass --force to replace it")
    return out


def _refuse_overwriting_sources(model: onnx.ModelProto, data_path: Path) -> None:
    """The new data file must not replace a file the lazily loaded tensors are read from."""
    folder = external_folder(model)
    if folder is None or not data_path.exists():
        return
    for tensor in iter_tensors(model):
        if _uses_external_data(tensor):
            source = folder / _external_info(tensor).get("location", "")
            if _same_file(source, data_path):
                raise OptimodelError(
                    f"{data_path}: is the input's external data file; choose another -o/--output"
                )


_COPY_CHUNK = 16 << 20
_PAGE = 4096
_MAP_MIN_BYTES = 1 << 16


def write_streaming(model: onnx.ModelProto, path: Path, data_name: str) -> None:
    """Write a model whose tensors may live in external files, never holding them whole.

    External tensors are copied file to file in chunks; in-memory tensors of at least
    `EXTERNAL_TENSOR_MIN_BYTES` are written out too; all land in one `data_name` file
    beside `path`, large ones page-aligned so ONNX Runtime can map them.
    """
    light = onnx.ModelProto()
    light.CopyFrom(model)
    folder = external_folder(model) or external_folder()
    _strip_folder(light)
    with open(path.parent / data_name, "wb") as out:
        for tensor in iter_tensors(light):
            if _uses_external_data(tensor):
                if folder is None:
                    raise OptimodelError(f"tensor '{tensor.name}': external data folder unknown")
                info = _external_info(tensor)
                source = folder / info.get("location", "")
                offset = int(info.get("offset", "0") or 0)
                length = int(info.get("length") or source.stat().st_size - offset)
                start = _align(out, length)
                with open(source, "rb") as handle:
                    handle.seek(offset)
                    left = length
                    while left:
                        chunk = handle.read(min(left, _COPY_CHUNK))
                        if not chunk:
                            raise OptimodelError(f"{source}: ends inside tensor '{tensor.name}'")
                        out.write(chunk)
                        left -= len(chunk)
            elif len(tensor.raw_data) >= EXTERNAL_TENSOR_MIN_BYTES:
                length = len(tensor.raw_data)
                start = _align(out, length)
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                continue
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", start), ("length", length)):
                tensor.external_data.add(key=key, value=str(value))
        out.flush()
        os.fsync(out.fileno())
    path.write_bytes(light.SerializeToString())


def _align(handle: BinaryIO, length: int) -> int:
    """Pad to where the next tensor starts: a page for large ones (ONNX Runtime maps
    those), 64 bytes for the rest (so many small tensors do not grow the file)."""
    position = handle.tell()
    padding = -position % (_PAGE if length >= _MAP_MIN_BYTES else 64)
    if padding:
        handle.write(b"\0" * padding)
    return position + padding


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_model(
    model: onnx.ModelProto,
    output: str | os.PathLike[str],
    *,
    input_path: str | os.PathLike[str] | None = None,
    force: bool = False,
    external_data: bool | None = None,
    provenance: Provenance | None = None,
    check: bool = True,
    payload: bytes | None = None,
) -> Path:
    """Write a model atomically: into a temporary folder beside the output, then rename.

    External data (automatic above the 2 GB protobuf limit, or on request) goes to one
    `<output>.data` file with a relative location. Either the complete new model appears
    under the output name or nothing changes; an existing output survives a failed write.
    `payload`: the model's serialized bytes, when known; the provenance entries are then
    appended to them as bytes (protobuf merges a repeated field's concatenated parts), not
    serialized with the whole model again.
    """
    out = check_output_path(output, input_path=input_path, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    if provenance is not None:
        payload = _stamped(model, provenance, payload)
    lazy = has_external_tensors(model) and external_folder(model) is not None
    if not lazy:
        _strip_folder(model)  # all its data is in memory now: the folder no longer matters
    use_external = lazy or (
        external_data if external_data is not None else near_protobuf_limit(model)
    )
    data_name = f"{out.name}.data"
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # left by a killed earlier save
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp_model = tmp_dir / out.name
        if lazy:
            _refuse_overwriting_sources(model, out.parent / data_name)
            write_streaming(model, tmp_model, data_name)
        elif use_external:
            to_write = onnx.ModelProto()
            to_write.CopyFrom(model)
            onnx.save_model(
                to_write,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=EXTERNAL_TENSOR_MIN_BYTES,
                convert_attribute=True,
            )
        else:
            if payload is None:
                payload = model.SerializeToString()
            with open(tmp_model, "wb") as handle:
                handle.write(payload)
            if check:  # its tensors were held to their sizes when loaded or made
                check_model(model, out, serialized=payload, raw_sizes=False)
        if check and use_external:
            onnx.checker.check_model(str(tmp_model))
        _fsync_file(tmp_model)
        tmp_data = tmp_dir / data_name
        if tmp_data.exists():
            _fsync_file(tmp_data)
            os.replace(tmp_data, out.parent / data_name)
        os.replace(tmp_model, out)
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"{out}: the written model fails the ONNX checker: {exc}") from exc
    except OSError as exc:
        raise OptimodelError(f"{out}: cannot write: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out
