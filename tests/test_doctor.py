"""`optimodel doctor`: the real environment, plus known-bad combinations on made-up inputs."""

from __future__ import annotations

import json
import os

import typer
from typer.testing import CliRunner

from optimodel.cli import doctor_cmd
from optimodel.runtime.doctor import (
    compatibility_warnings,
    int8_advice,
    read_cpu_features,
    version_tuple,
)


def _app() -> typer.Typer:
    """The real app once `doctor` is registered there; until then one of its own."""
    from optimodel.cli.app import app

    if any(cmd.name == "doctor" for cmd in app.registered_commands):
        return app
    own = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    own.command("doctor")(doctor_cmd.doctor)
    own.command("version")(lambda: None)  # a second command keeps `doctor` a subcommand
    return own


def doctor(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(_app(), ["doctor", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_json_has_versions_and_providers() -> None:
    import onnxruntime

    code, out, err = doctor("--json")
    assert code == 0, err
    info = json.loads(out)
    for name in ("optimodel", "python", "onnx", "onnxruntime", "protobuf", "numpy"):
        assert info["versions"][name], name
    assert info["versions"]["onnxruntime"] == onnxruntime.__version__
    assert "CPUExecutionProvider" in info["providers"]
    assert info["provider_support"]["cpu"] is True
    assert isinstance(info["onnxruntime_gpu_installed"], bool)
    assert info["cpu"]["int8"] and isinstance(info["cpu"]["flags"], dict)
    assert isinstance(info["warnings"], list)


def test_tables_render_and_exit_zero() -> None:
    code, out, err = doctor()
    assert code == 0, err
    assert "Execution providers" in out and "int8" in out


X86 = "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse4_2 avx avx2 fma f16c {extra}\n"


def test_cpu_flags_and_int8_advice() -> None:
    vnni = read_cpu_features(X86.format(extra="avx512f avx512_vnni"))
    assert vnni["model"] == "Test CPU"
    assert vnni["flags"]["avx512_vnni"] and not vnni["flags"]["amx_int8"]
    assert "VNNI" in int8_advice(vnni["flags"]) and "U8S8" in int8_advice(vnni["flags"])
    plain = read_cpu_features(X86.format(extra=""))
    assert "reduce_range" in int8_advice(plain["flags"])
    assert "shrink" in int8_advice({})


def test_known_bad_combinations_are_warned() -> None:
    good = {"numpy": "2.1.0", "onnxruntime": "1.20.0", "onnx": "1.17.0", "protobuf": "5.28.0"}
    assert compatibility_warnings(good, {"onnxruntime": "1.20.0"}, ["CPUExecutionProvider"]) == []

    both = compatibility_warnings(
        good, {"onnxruntime": "1.20.0", "onnxruntime-gpu": "1.20.0"}, ["CPUExecutionProvider"]
    )
    assert len(both) == 2  # two wheels in one module, and the GPU one lost its providers
    assert "overwrite each other" in both[0]

    old_ort = compatibility_warnings(
        good | {"onnxruntime": "1.18.1"}, {"onnxruntime": "1.18.1"}, []
    )
    assert any("NumPy 2" in w or "NumPy 2.1.0" in w for w in old_ort)

    old_proto = compatibility_warnings(good | {"protobuf": "3.19.6"}, {}, [])
    assert any("protobuf 3.19.6" in w for w in old_proto)

    broken = compatibility_warnings(good, {}, [], {"onnx": "ImportError: bad protobuf"})
    assert any("import onnx" in w for w in broken)


def test_version_tuple() -> None:
    assert version_tuple("1.19.2") == (1, 19, 2)
    assert version_tuple("2.0.0rc1") == (2, 0, 0)
    assert version_tuple(None) == ()


def test_provider_probe_starts_a_real_session_and_says_why_not() -> None:
    import onnxruntime as ort

    from optimodel.runtime.provider_probe import probe_provider

    assert probe_provider("CPUExecutionProvider") is None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "not in this ONNX Runtime build" in (probe_provider("CUDAExecutionProvider") or "")


def test_provider_failure_reason_is_read_from_what_onnxruntime_prints() -> None:
    from optimodel.runtime.provider_probe import captured_output, failure_reason

    log = (
        "\x1b[1;31m2026-11-22 18:35:52 [E:onnxruntime:Default, provider_bridge_ort.cc:2430] "
        "Failed to load library libonnxruntime_providers_tensorrt.so with error: "
        "libnvinfer.so.10: cannot open shared object file: No such file or directory\n\x1b[m\n"
        "*************** EP Error ***************\nEP Error Please install TensorRT libraries\n"
        " when using ['TensorrtExecutionProvider']\n"
    )
    with captured_output() as text:
        os.write(2, log.encode())
        print("from python")
    assert "from python" in text[0] and "libnvinfer" in text[0]
    assert failure_reason(text[0]) == (
        "libnvinfer.so.10: cannot open shared object file: No such file or directory"
    )
    assert failure_reason("EP Error CUDA failure 100: no CUDA-capable device\n when using") == (
        "CUDA failure 100: no CUDA-capable device"
    )
    assert failure_reason("nothing telling") is None
