"""Model I/O: load with external data, check, save atomically, record provenance.

Every command reads and writes models through here so the safety rules live in one
place: never overwrite the input, never leave a half-written output, never follow an
external-data location out of the model's folder.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from optimodel import __version__
from optimodel.errors import ModelLoadError, OptimodelError

# Protobuf cannot serialize a message of 2 GiB or more; keep a margin for the graph.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 2**20
# Tensors smaller than this stay inside the .onnx file when saving external data.
EXTERNAL_TENSOR_MIN_BYTES = 1024

PROVENANCE_PREFIX = "optimodel."


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
    source = Path(path)
    if not source.exists():
        raise ModelLoadError(f"{source}: no such file")
    if source.is_dir():
        raise ModelLoadError(f"{source}: is a folder, not an ONNX model file")
    if source.stat().st_size == 0:
        raise ModelLoadError(f"{source}: empty file, not an ONNX model")
    try:
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
    if load_external_data:
        files = external_data_files(model, source.parent, source)
        if files:
            try:
                external_data_helper.load_external_data_for_model(model, str(source.parent))
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"{source}: cannot read external data: {exc}") from exc
    if check:
        check_model(model, source)
    return model


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes a tensor's payload takes, whether raw, typed or external."""
    if _uses_external_data(tensor):
        length = _external_info(tensor).get("length")
        if length:
            return int(length)
    if tensor.raw_data:
        return len(tensor.raw_data)
    from onnx import helper

    try:
        elem = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        elem = 4
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * elem


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size, estimated without serializing when the model is huge."""
    try:
        return model.ByteSize()
    except (ValueError, OverflowError):  # pragma: no cover - protobuf refuses >2 GB
        return sum(tensor_bytes(t) for t in iter_tensors(model))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_files_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a model file plus its external data files."""
    source = Path(path)
    total = source.stat().st_size
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
    from onnx import helper

    for tensor in iter_tensors(model):
        if not tensor.raw_data or _uses_external_data(tensor):
            continue
        if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            continue
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            continue  # unknown type: the checker's business
        count = 1
        for dim in tensor.dims:
            count *= dim
        bits = _SUB_BYTE_BITS.get(tensor.data_type)
        need = (count * bits + 7) // 8 if bits else count * itemsize
        if len(tensor.raw_data) != need:
            raise ModelLoadError(
                f"{source}: tensor '{tensor.name}' holds {len(tensor.raw_data)} bytes, "
                f"its type and shape need {need}"
            )


def check_model(
    model: onnx.ModelProto, source: str | os.PathLike[str] = "model", *, strict: bool = False
) -> None:
    """Run the ONNX checker; a failure becomes one line naming the model and the problem.

    `strict` adds type and shape inference, which custom-domain ops are exempt from
    (their schemas are unknown, so inference cannot judge them).
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
    huge = model_size(model) >= EXTERNAL_DATA_THRESHOLD and Path(str(source)).is_file()
    try:
        if huge:
            onnx.checker.check_model(str(source))
        else:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        reason = " ".join(str(exc).split("\n")[0:1]).strip() or type(exc).__name__
        raise ModelLoadError(f"{source}: fails the ONNX checker: {reason}") from exc
    _check_raw_sizes(model, source)
    if strict and not huge and not custom_domains(model):
        try:
            onnx.checker.check_model(model, full_check=True)
        except (
            onnx.checker.ValidationError,
            onnx.shape_inference.InferenceError,
            ValueError,  # e.g. "Invalid tensor data type 99." from inference
        ) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelLoadError(f"{source}: fails ONNX type/shape inference: {reason}") from exc


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
) -> Path:
    """Write a model atomically: into a temporary folder beside the output, then rename.

    External data (automatic above the 2 GB protobuf limit, or on request) goes to one
    `<output>.data` file with a relative location. Either the complete new model appears
    under the output name or nothing changes; an existing output survives a failed write.
    """
    out = check_output_path(output, input_path=input_path, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    if provenance is not None:
        stamp_provenance(model, provenance)
    use_external = (
        external_data if external_data is not None else model_size(model) >= EXTERNAL_DATA_THRESHOLD
    )
    data_name = f"{out.name}.data"
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # left by a killed earlier save
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp_model = tmp_dir / out.name
        if use_external:
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
            with open(tmp_model, "wb") as handle:
                handle.write(model.SerializeToString())
        if check and use_external:
            onnx.checker.check_model(str(tmp_model))
        elif check:
            check_model(model, out)
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
