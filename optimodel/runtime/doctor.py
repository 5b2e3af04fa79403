"""What this environment can run, and the known ways it is broken.

Most "ONNX Runtime is slow / crashes / ignores my GPU" reports come from the environment,
not the model: two ONNX Runtime wheels sharing one `onnxruntime` module, a protobuf that
the installed onnx was not built for, NumPy 2 under an ONNX Runtime built for NumPy 1, or
a CPU without the instructions int8 kernels need. `diagnose()` gathers those facts in
one JSON-ready dict; nothing here raises.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
import platform
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from optimodel import __version__

# Wheels that all install the same `onnxruntime` module; two of them overwrite each other.
ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
    "onnxruntime-rocm",
    "onnxruntime-training",
    "onnxruntime-silicon",
    "ort-nightly",
    "ort-nightly-gpu",
)
X86_FEATURES = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "amx_fp16",
)
ARM_FEATURES = ("asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _module_version(module: str) -> tuple[str | None, str | None]:
    """(version, import error) of a module: a module that fails to import is a finding."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # any import failure is what doctor exists to report
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"{type(exc).__name__}: {line}"
    return str(getattr(mod, "__version__", None) or ""), None


def version_tuple(text: str | None) -> tuple[int, ...]:
    """'1.19.2' -> (1, 19, 2); leading numeric parts only ('2.0.0rc1' -> (2, 0, 0))."""
    parts = []
    for piece in (text or "").split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def read_cpu_features(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model and the instruction-set flags that matter for ONNX Runtime kernels."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    model = None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None:
            model = value.strip() or None
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    arch = platform.machine().lower()
    known = ARM_FEATURES if arch in ("aarch64", "arm64") or "asimd" in flags else X86_FEATURES
    return {
        "model": model or platform.processor() or None,
        "arch": arch,
        "cores": os.cpu_count(),
        "flags_read": bool(flags),
        "flags": {name: name in flags for name in known},
    }


def int8_advice(flags: Mapping[str, bool]) -> str:
    """What the CPU means for int8 quantization with ONNX Runtime."""
    if flags.get("amx_int8"):
        return (
            "AMX-INT8: the fastest CPU int8 path; int8 quantization (U8S8 / S8S8) should pay off "
            "well."
        )
    if flags.get("avx512_vnni") or flags.get("avx_vnni"):
        return (
            "VNNI: fast U8S8 int8 (VPDPBUSD dot products); int8 quantization (QDQ or QOperator, "
            "uint8 activations and int8 weights) should run clearly faster than fp32."
        )
    if flags.get("i8mm") or flags.get("asimddp"):
        return "ARM int8 dot products (SDOT/UDOT, i8mm): int8 quantization should be faster."
    if flags.get("avx2") or flags.get("avx512f"):
        return (
            "no VNNI: int8 runs on AVX2/AVX-512 VPMADDUBSW, which can saturate with U8S8; "
            "quantize with reduce_range (or uint8 weights) and expect a smaller speed-up."
        )
    return (
        "no int8 dot-product instructions found: int8 quantization will mostly shrink the "
        "model, with little speed-up on this CPU."
    )


def fp16_advice(flags: Mapping[str, bool]) -> str:
    """What the CPU means for fp16 / bf16 models on the CPU provider."""
    if flags.get("avx512_fp16") or flags.get("amx_fp16") or flags.get("asimdhp"):
        return "native fp16 arithmetic: some fp16 kernels can run without conversions."
    if flags.get("amx_bf16") or flags.get("avx512_bf16") or flags.get("bf16"):
        extra = " (f16c converts fp16 quickly)" if flags.get("f16c") else ""
        return (
            f"bf16 instructions{extra}; fp16 models on the CPU provider mostly save size, they "
            "are rarely faster than fp32: fp16 pays off on GPUs."
        )
    if flags.get("f16c"):
        return (
            "f16c converts fp16 <-> fp32 quickly; fp16 models on the CPU provider mostly save "
            "size, they are rarely faster than fp32: fp16 pays off on GPUs."
        )
    return "no fp16 support: fp16 models run through conversions on this CPU."


def _unmet_requirements(dist: str, installed: Mapping[str, str | None]) -> list[str]:
    """Requirements of `dist` (e.g. onnx's protobuf>=X) that the environment breaks."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:  # packaging comes with onnxruntime; without it, skip the check
        return []
    problems = []
    for text in metadata.requires(dist) or []:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        have = installed.get(req.name.lower()) or _dist_version(req.name)
        if req.marker is not None or have is None or not req.specifier:
            continue
        if not req.specifier.contains(have, prereleases=True):
            problems.append(f"{dist} requires {req.name}{req.specifier} but {have} is installed")
    return problems


def compatibility_warnings(
    versions: Mapping[str, str | None],
    ort_packages: Mapping[str, str],
    providers: Iterable[str],
    import_errors: Mapping[str, str] | None = None,
) -> list[str]:
    """Known-bad combinations, each as one sentence saying what to do."""
    warnings: list[str] = []
    for module, error in (import_errors or {}).items():
        warnings.append(f"`import {module}` fails ({error}); reinstall it in this environment")
    if len(ort_packages) > 1:
        names = ", ".join(f"{k} {v}" for k, v in ort_packages.items())
        keep = "onnxruntime-gpu" if "onnxruntime-gpu" in ort_packages else "one of them"
        warnings.append(
            f"several ONNX Runtime packages are installed ({names}); they share the "
            f"`onnxruntime` module and overwrite each other: uninstall all of them, then "
            f"install {keep} alone"
        )
    numpy_v, ort_v = (
        version_tuple(versions.get("numpy")),
        version_tuple(versions.get("onnxruntime")),
    )
    if numpy_v >= (2,) and ort_v and ort_v < (1, 19):
        warnings.append(
            f"NumPy {versions['numpy']} with onnxruntime {versions['onnxruntime']}: ONNX Runtime "
            "before 1.19 is built for NumPy 1 and fails to import or crashes; upgrade "
            "onnxruntime (>= 1.19) or install 'numpy<2'"
        )
    proto_v, onnx_v = version_tuple(versions.get("protobuf")), version_tuple(versions.get("onnx"))
    if proto_v and onnx_v and proto_v < (3, 20, 2) and onnx_v >= (1, 13):
        warnings.append(
            f"protobuf {versions['protobuf']} is too old for onnx {versions['onnx']} "
            "(needs >= 3.20.2); upgrade protobuf"
        )
    if "onnxruntime-gpu" in ort_packages and not set(GPU_PROVIDERS) & set(providers):
        warnings.append(
            "onnxruntime-gpu is installed but offers no CUDA or TensorRT provider; another "
            "ONNX Runtime package probably overwrote it: reinstall onnxruntime-gpu alone"
        )
    return warnings


def diagnose(cpuinfo: str | None = None) -> dict[str, Any]:
    """Versions, providers, CPU features and warnings, as a JSON-ready dict."""
    import_errors: dict[str, str] = {}
    versions: dict[str, str | None] = {
        "optimodel": __version__,
        "python": platform.python_version(),
    }
    for module, dist in (("onnx", "onnx"), ("onnxruntime", None), ("numpy", "numpy")):
        version, error = _module_version(module)
        if error:
            import_errors[module] = error
        versions[module] = version or (_dist_version(dist) if dist else None)
    versions["protobuf"] = _dist_version("protobuf")
    ort_packages = {name: version for name in ORT_DISTRIBUTIONS if (version := _dist_version(name))}
    providers: list[str] = []
    if "onnxruntime" not in import_errors:
        try:
            import onnxruntime as ort

            providers = list(ort.get_available_providers())
        except Exception as exc:  # a broken install is a finding, not a crash
            import_errors["onnxruntime"] = f"{type(exc).__name__}: {exc}"
    warnings = compatibility_warnings(versions, ort_packages, providers, import_errors)
    installed = {k.lower(): v for k, v in versions.items() if v}
    for dist in ("onnx", *ort_packages):
        if _dist_version(dist):
            warnings.extend(_unmet_requirements(dist, installed))
    notes = []
    problems: dict[str, str] = {}
    for key, name in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        if name in providers:
            from optimodel.runtime.provider_probe import probe_provider

            reason = probe_provider(name)
            if reason:
                problems[key] = reason
    cpu = read_cpu_features(cpuinfo)
    if not cpu["flags_read"]:
        notes.append("CPU flags could not be read on this platform; the int8 advice is a guess")
    cpu["int8"] = int8_advice(cpu["flags"])
    cpu["fp16"] = fp16_advice(cpu["flags"])
    return {
        "versions": versions,
        "onnxruntime_packages": ort_packages,
        "onnxruntime_gpu_installed": "onnxruntime-gpu" in ort_packages,
        "providers": providers,
        # listed in the build and, for the GPU ones, seen starting a session here
        "provider_support": {
            "cpu": "CPUExecutionProvider" in providers,
            "cuda": "CUDAExecutionProvider" in providers and "cuda" not in problems,
            "tensorrt": "TensorrtExecutionProvider" in providers and "tensorrt" not in problems,
        },
        "provider_problems": problems,
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
        },
        "cpu": cpu,
        "warnings": warnings,
        "notes": notes,
    }
