"""A model above protobuf's 2 GB limit through inspect, fold and quantize: peak memory.

The synthetic model is an MLP of square MatMul layers whose weights live in one
external data file (written tensor by tensor, never held whole in memory), plus a few
foldable nodes (a constant product, an Identity, a Shape->Gather->Reshape chain) so
`fold` has work to do. Each command runs in its own process; its peak resident memory
comes from the kernel (`wait4`), and is reported as a multiple of the model's size.
onnxslim (when installed) and ONNX Runtime's own quantize_dynamic run on the same file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

WIDTH = 4096


def make_huge_model(path: Path, total_bytes: int, width: int = WIDTH) -> int:
    """Write an MLP of about `total_bytes` of float32 weights; returns the bytes written.

    Weights are streamed into `<path>.data`; only the graph is built in memory.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = f"{path.name}.data"
    layer_bytes = width * width * 4
    layers = max(1, -(-total_bytes // layer_bytes))
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    offset = 0
    scale = np.float32(1.0 / np.sqrt(width))
    with open(path.parent / data_name, "wb") as handle:
        prev = "x"
        for i in range(layers):
            weight = (rng.standard_normal((width, width), dtype=np.float32) * scale).tobytes()
            handle.write(weight)
            tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[width, width])
            tensor.data_location = TensorProto.EXTERNAL
            entries = {"location": data_name, "offset": offset, "length": len(weight)}
            for key, value in entries.items():
                tensor.external_data.add(key=key, value=str(value))
            offset += len(weight)
            inits.append(tensor)
            inits.append(numpy_helper.from_array(np.full(width, 0.01, np.float32), f"b{i}"))
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"], name=f"mm{i}"))
            nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"))
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    # foldable tail: out = Reshape(prev * (c1 * c2), [Shape(prev)[0], -1])
    inits += [
        numpy_helper.from_array(np.full(width, 0.5, np.float32), "c1"),
        numpy_helper.from_array(np.full(width, 2.0, np.float32), "c2"),
        numpy_helper.from_array(np.array([0], np.int64), "idx0"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
    ]
    nodes += [
        helper.make_node("Mul", ["c1", "c2"], ["c12"], name="const_mul"),
        helper.make_node("Identity", ["c12"], ["c12_id"], name="identity"),
        helper.make_node("Mul", [prev, "c12_id"], ["scaled"], name="scale"),
        helper.make_node("Shape", ["scaled"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "idx0"], ["batch"], name="gather", axis=0),
        helper.make_node("Concat", ["batch", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["scaled", "target"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "huge_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return offset


def run_measured(args: list[str]) -> tuple[int, float, int, str]:
    """Run a command; returns exit code, seconds, peak RSS in bytes and its last line."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = proc.stdout.read().strip().splitlines()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    return code, seconds, usage.ru_maxrss * 1024, lines[-1] if lines else ""


def measure(folder: Path, total_bytes: int, peers: bool = True) -> list[dict[str, object]]:
    model = folder / "huge.onnx"
    weights = make_huge_model(model, total_bytes)
    size = weights + model.stat().st_size
    python = [sys.executable, "-m", "optimodel"]
    commands = {
        "inspect": [*python, "inspect", str(model)],
        "fold": [*python, "fold", str(model), "-o", str(folder / "fold.onnx")],
        "quantize --mode dynamic": [
            *python,
            "quantize",
            str(model),
            "--mode",
            "dynamic",
            "-o",
            str(folder / "int8.onnx"),
        ],
    }
    # peers on the same file, same process measurement
    others = {
        "peer: onnxslim": [
            sys.executable, "-m", "onnxslim", str(model), str(folder / "slim.onnx"),
            "--save-as-external-data",
        ],
        "peer: ORT quantize_dynamic": [
            sys.executable, "-c",
            "import sys; from onnxruntime.quantization import quantize_dynamic; "
            "quantize_dynamic(sys.argv[1], sys.argv[2], use_external_data_format=True)",
            str(model), str(folder / "ort_int8.onnx"),
        ],
    }  # fmt: skip
    if importlib.util.find_spec("onnxslim") is None:
        del others["peer: onnxslim"]
    if peers:
        commands.update(others)
    outputs = {
        "fold": folder / "fold.onnx",
        "quantize --mode dynamic": folder / "int8.onnx",
        "peer: onnxslim": folder / "slim.onnx",
        "peer: ORT quantize_dynamic": folder / "ort_int8.onnx",
    }
    rows = []
    for name, args in commands.items():
        code, seconds, peak, last = run_measured(args)
        written = outputs.get(name)
        rows.append(
            {
                "command": name,
                "exit": code,
                "seconds": round(seconds, 1),
                "peak_rss_gib": round(peak / 2**30, 2),
                "peak_over_size": round(peak / size, 2),
                "output_gib": round(_files_bytes(written) / 2**30, 2) if written else None,
                "last_line": last[:160],
            }
        )
        print(rows[-1], flush=True)
    return [{"model_gib": round(size / 2**30, 2)}, *rows]


def _files_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    data = path.with_name(f"{path.name}.data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def render(rows: list[dict[str, object]]) -> str:
    head, *cmds = rows
    lines = [
        "## A model above 2 GB: peak memory",
        "",
        f"Synthetic MLP, {head['model_gib']} GiB of float32 weights in external data",
        "(`benchmarks/huge.py`, `make bench-huge`); each command in its own process, peak RSS",
        "from the kernel; onnxslim and ONNX Runtime's `quantize_dynamic` on the same file in",
        "the same run. Goal: at most 1.5x the model's size.",
        "",
        "| command | exit | seconds | peak RSS GiB | peak / model size | output GiB |",
        "|---|---|---|---|---|---|",
    ]
    for row in cmds:
        lines.append(
            f"| `{row['command']}` | {row['exit']} | {row['seconds']} | {row['peak_rss_gib']} "
            f"| {row['peak_over_size']}x | {row['output_gib'] if row['output_gib'] else '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.2, help="weight bytes, in GiB")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: temp)")
    parser.add_argument("--results", type=Path, help="RESULTS.md to update")
    parser.add_argument("--no-peers", action="store_true", help="optimodel's commands only")
    args = parser.parse_args()
    total = int(args.gib * 2**30)
    if args.dir:
        text = render(measure(args.dir, total, not args.no_peers))
    else:
        with tempfile.TemporaryDirectory(prefix="optimodel-huge-") as tmp:
            text = render(measure(Path(tmp), total, not args.no_peers))
    print(text)
    if args.results:
        from benchmarks.scaling import write_section

        write_section(args.results, text, name="huge")


if __name__ == "__main__":
    main()
