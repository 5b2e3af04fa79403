"""How fold's time grows with graph size: synthetic graphs of 1k, 10k and 100k nodes.

Each graph is a chain of blocks `y = Relu(Add(Mul(x, c1), Identity(c2 * c3)))` whose
constant parts fold away, so every block exercises folding, no-op removal and dead
code elimination. Figures go to the Markdown table this prints (and RESULTS.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def synthetic(blocks: int) -> onnx.ModelProto:
    """A model of about 5 x blocks nodes, a quarter of them constant-foldable."""
    nodes, inits = [], []
    prev = "x"
    for i in range(blocks):
        inits += [
            numpy_helper.from_array(np.full(8, 1.0 + i % 7 * 1e-3, np.float32), f"c1_{i}"),
            numpy_helper.from_array(np.full(8, 0.5, np.float32), f"c2_{i}"),
            numpy_helper.from_array(np.full(8, 0.25, np.float32), f"c3_{i}"),
        ]
        nodes += [
            helper.make_node("Mul", [f"c2_{i}", f"c3_{i}"], [f"k_{i}"], name=f"k{i}"),
            helper.make_node("Identity", [f"k_{i}"], [f"ki_{i}"], name=f"i{i}"),
            helper.make_node("Mul", [prev, f"c1_{i}"], [f"m_{i}"], name=f"m{i}"),
            helper.make_node("Add", [f"m_{i}", f"ki_{i}"], [f"a_{i}"], name=f"a{i}"),
            helper.make_node("Relu", [f"a_{i}"], [f"r_{i}"], name=f"r{i}"),
        ]
        prev = f"r_{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def measure(sizes: list[int]) -> list[dict[str, float]]:
    from optimodel.passes import get_pass

    rows = []
    for nodes in sizes:
        model = synthetic(nodes // 5)
        start = time.perf_counter()
        result = get_pass("fold").run(model)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "nodes_before": len(model.graph.node),
                "nodes_after": len(result.model.graph.node),
                "seconds": seconds,
                "us_per_node": seconds / len(model.graph.node) * 1e6,
            }
        )
        print(
            f"{len(model.graph.node):>7} nodes -> {len(result.model.graph.node):>7} "
            f"in {seconds:.2f} s ({rows[-1]['us_per_node']:.1f} us/node)",
            flush=True,
        )
    return rows


def table(rows: list[dict[str, float]]) -> str:
    lines = [
        "## fold on synthetic graphs: time against size",
        "",
        "Chains of `Relu(Add(Mul(x, c1), Identity(c2 * c3)))` blocks (`benchmarks/scaling.py`);",
        "every block folds a constant product and drops an Identity. Roughly linear means the",
        "time per node stays flat as the graph grows tenfold.",
        "",
        "| nodes | after fold | seconds | µs per node |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['nodes_before']:,} | {r['nodes_after']:,} | {r['seconds']:.2f} | "
            f"{r['us_per_node']:.1f} |"
        )
    return "\n".join(lines)


def write_section(path: Path, text: str, name: str = "scaling") -> None:
    """Replace (or append) one marked section (`<!-- name:start -->`) of RESULTS.md."""
    old = path.read_text() if path.exists() else ""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text}\n{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--results", type=Path, help="RESULTS.md to update")
    args = parser.parse_args()
    rows = measure([int(s) for s in args.sizes.split(",")])
    text = table(rows)
    print("\n" + text)
    if args.results:
        write_section(args.results, text)


if __name__ == "__main__":
    main()
