"""ONNX Runtime sessions: provider resolution, options, and one-line errors.

A provider that was asked for and is not installed is an error naming what to
install; a session that quietly fell back to CPU is detected from
`session.get_providers()`, never passed off as a GPU run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from optimodel.errors import OptimodelError, UsageError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GPU_INSTALL_HINT = "pip install 'optimodel[gpu]' (onnxruntime-gpu) on a machine with an NVIDIA GPU"


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve_providers(names: Sequence[str] | None) -> list[str]:
    """Map `cpu|cuda|tensorrt` to ORT provider names, refusing ones this install lacks."""
    names = list(names or ["cpu"])
    resolved = []
    for name in names:
        key = name.strip().lower()
        if key not in PROVIDERS:
            raise UsageError(f"unknown provider '{name}'; choose from {', '.join(PROVIDERS)}")
        resolved.append(PROVIDERS[key])
    have = available_providers()
    missing = [p for p in resolved if p not in have]
    if missing:
        raise OptimodelError(
            f"provider(s) {', '.join(missing)} not available in this ONNX Runtime "
            f"(available: {', '.join(have)}); install them with {GPU_INSTALL_HINT}"
        )
    return resolved


@dataclass
class SessionConfig:
    """How to build a session; recorded next to every figure it produces."""

    providers: list[str] = field(default_factory=lambda: ["cpu"])
    threads: int = 0  # 0: ONNX Runtime's default
    optimization: str = "all"  # disable|basic|extended|all
    no_fallback: bool = False
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    custom_op_library: str | None = None
    # Extra ORT session config entries, e.g. {"session.record_ep_graph_assignment_info": "1"}.
    session_entries: dict[str, str] = field(default_factory=dict)
    # When set, ORT profiles runs into PREFIX_<date>.json until session.end_profiling().
    profile_prefix: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "providers": list(self.providers),
            "threads": self.threads,
            "graph_optimization": self.optimization,
            "no_fallback": self.no_fallback,
        }


_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def _session_error(source: str, exc: Exception) -> OptimodelError:
    text = str(exc).strip()
    line = next((ln for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    line = line.replace("[ONNXRuntimeError] : ", "").strip()
    hint = ""
    low = text.lower()
    if (
        "is not a registered function/op" in low
        or "no opset import for domain" in low
        or ("could not find an implementation" in low)
    ):
        hint = "; custom ops need --custom-op-library, and the provider must implement every op"
    return OptimodelError(f"{source}: ONNX Runtime cannot load the model: {line}{hint}")


def create_session(
    model: str | os.PathLike[str] | onnx.ModelProto | bytes,
    config: SessionConfig | None = None,
    *,
    source: str | None = None,
) -> Any:
    """Build an InferenceSession; every failure becomes an OptimodelError of one line."""
    import onnxruntime as ort

    config = config or SessionConfig()
    providers = resolve_providers(config.providers)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if config.threads:
        options.intra_op_num_threads = config.threads
        options.inter_op_num_threads = 1
    level = _LEVELS.get(config.optimization)
    if level is None:
        raise UsageError(f"unknown optimization level '{config.optimization}'")
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if config.no_fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in config.session_entries.items():
        options.add_session_config_entry(key, value)
    if config.profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = config.profile_prefix
    if config.custom_op_library:
        library = Path(config.custom_op_library)
        if not library.is_file():
            raise OptimodelError(f"{library}: custom op library not found")
        options.register_custom_ops_library(str(library))
    provider_args = [(p, config.provider_options.get(p, {})) for p in providers]
    name = source or (str(model) if isinstance(model, (str, os.PathLike)) else "model")
    try:
        if isinstance(model, bytes):  # already serialized, all its data inside
            payload: Any = model
        elif isinstance(model, onnx.ModelProto):
            from optimodel.modelio import model_bytes

            point_to_external_data(model, options)
            payload = model_bytes(model)
        else:
            payload = str(model)
        return ort.InferenceSession(payload, sess_options=options, providers=provider_args)
    except Exception as exc:  # ORT raises its own (non-public) exception classes
        raise _session_error(name, exc) from exc


# Where ONNX Runtime finds external data for a model given as bytes (it maps the file).
EXTERNAL_FOLDER_ENTRY = "session.model_external_initializers_file_folder_path"


def point_to_external_data(model: onnx.ModelProto, options: Any) -> None:
    """Let ONNX Runtime read a lazily loaded model's weights from their file itself.

    The graph alone is serialized; the weights are never copied through Python, so a
    model above the 2 GB protobuf limit runs at about its own size in memory.
    """
    from optimodel.modelio import external_folder, has_external_tensors

    folder = external_folder(model) or external_folder()
    if folder is not None and has_external_tensors(model):
        options.add_session_config_entry(EXTERNAL_FOLDER_ENTRY, str(folder))


def fallback_providers(session: Any, requested: Sequence[str]) -> list[str]:
    """Requested providers that the session did not keep (it fell back to CPU)."""
    active = set(session.get_providers())
    return [PROVIDERS.get(p, p) for p in requested if PROVIDERS.get(p, p) not in active]


_HALF_INPUTS = {"tensor(float16)": "float16", "tensor(double)": "float64"}


def adapt_feed(session: Any, feed: dict[str, Any]) -> dict[str, Any]:
    """Cast float feeds to a float16 (or double) model input, so one data set fits the
    float32 model and its half-precision conversion alike."""
    wanted = {i.name: _HALF_INPUTS.get(i.type) for i in session.get_inputs()}
    adapted = {}
    for name, value in feed.items():
        target = wanted.get(name)
        dtype = getattr(value, "dtype", None)
        if target and dtype is not None and dtype.kind == "f" and dtype.name != target:
            value = value.astype(target)
        adapted[name] = value
    return adapted


def run_session(session: Any, feed: dict[str, Any], source: str = "model") -> list[Any]:
    """Run once, turning ORT's runtime errors (bad shapes, kernels) into one line."""
    try:
        return session.run(None, adapt_feed(session, feed))
    except Exception as exc:  # ORT raises its own (non-public) exception classes
        text = str(exc).strip()
        line = next((ln for ln in text.splitlines() if ln.strip()), type(exc).__name__)
        line = line.replace("[ONNXRuntimeError] : ", "").strip()
        raise OptimodelError(f"{source}: ONNX Runtime failed while running: {line}") from exc
