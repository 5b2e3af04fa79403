"""Float outputs after static int8: the Q/DQ pairs between a model's last weighted layers
and its graph outputs are taken out, and (CPU) those after MatMul / Gemm outputs.

Static calibration fixes each activation's range from the calibration samples. Where the
range is too short for real inputs, an int8 tensor clips; inside the network the next layer
absorbs some of that, but at the outputs the clipped values are the answer. Measured on
magika (static int8, 8 calibration files): on one calibration set the logits reached 10.2
while real files reached 21.8, the int8 logits clipped and 6 of 64 confident predictions
flipped; the same logits quantized alone in the float model reproduce exactly those 6.

Only Q/DQ pairs on the way from a graph output back to the first weighted layer are
removed, so that layer's input and weights stay int8 (the size is unchanged) and only its
output is float. It runs in float only when that layer is cheap: the rewrite is made when
the weighted layers reached do at most `MAX_OUTPUT_SHARE` of the MACs together (a
classifier's head, a detector's last convolution), never for a heavy last layer.

After a MatMul or Gemm, ONNX Runtime's CPU provider needs no output Q/DQ to stay in int8
(MatMulIntegerToFloat, QGemm with a float output), and rounding each projection of a
transformer to int8 is where static int8 loses most: on MiniLM, embedding cosine 0.944
with them and 0.990 without, at 0.53x the float latency instead of 0.57x. The optimized
graph ONNX Runtime builds is checked: a layer it would run on dequantized weights instead
keeps its pair.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx

from optimodel.graphs import (
    consumers,
    copy_model,
    drop_unread_initializers,
    rename_all_uses,
    rename_uses,
    subgraph_references,
)
from optimodel.quant.presets import DATA_FIRST, SHAPE_ONLY, WEIGHTED, mac_shares

MAX_OUTPUT_SHARE = 0.01  # of all MACs: the layers writing the outputs, together


def _writers(graph: onnx.GraphProto) -> dict[str, str]:
    return {o: n.op_type for n in graph.node for o in n.output}


def _exact(
    pair: tuple[onnx.NodeProto, onnx.NodeProto], now: dict[str, str], before: dict[str, str]
) -> bool:
    """Whether dropping the pair only drops rounding. ONNX Runtime's quantizer deletes a
    Relu or Clip in front of a Q whose range already clamps (the tensor keeps its name, now
    written by the layer itself): that pair holds the activation and must stay."""
    quant, dequant = pair
    source = quant.input[0]
    if source not in now:  # a graph input: one in the float model too
        return source not in before
    name = source if source in before else dequant.output[0]
    return name in before and before[name] == now.get(source)


def _pairs_before_outputs(
    graph: onnx.GraphProto,
) -> tuple[list[tuple[onnx.NodeProto, onnx.NodeProto]], list[onnx.NodeProto]]:
    """(QuantizeLinear, DequantizeLinear) pairs met walking back from the graph outputs
    through unweighted nodes, and the weighted nodes where the walk stopped."""
    producers = {o: n for n in graph.node for o in n.output}
    readers = consumers(graph)
    pairs: dict[int, tuple[onnx.NodeProto, onnx.NodeProto]] = {}
    heads: dict[int, onnx.NodeProto] = {}
    seen: set[str] = set()
    queue = deque(o.name for o in graph.output)
    while queue:
        value = queue.popleft()
        if value in seen or value not in producers:
            continue
        seen.add(value)
        node = producers[value]
        if node.op_type in WEIGHTED:
            heads[id(node)] = node
            continue
        if node.op_type in SHAPE_ONLY:
            continue
        if node.op_type == "DequantizeLinear":
            quant = producers.get(node.input[0])
            if quant is not None and quant.op_type == "QuantizeLinear":
                if len(readers.get(quant.output[0], [])) == 1:
                    pairs[id(node)] = (quant, node)
                queue.append(quant.input[0])
            continue  # a DQ of a stored int8 weight: nothing upstream
        data = node.input[:1] if node.op_type in DATA_FIRST else node.input
        queue.extend(name for name in data if name)
    return list(pairs.values()), list(heads.values())


def float_outputs(
    model: onnx.ModelProto,
    reference: onnx.ModelProto,
    feed: dict[str, np.ndarray] | None = None,
) -> tuple[onnx.ModelProto, list[str]]:
    """Remove the Q/DQ pairs between the last cheap weighted layers and the outputs, in
    place (`reference`: the float model that was quantized); the names of the tensors left
    in float (empty: nothing changed)."""
    graph = model.graph
    pairs, heads = _pairs_before_outputs(graph)
    now, before = _writers(graph), _writers(reference.graph)
    pairs = [pair for pair in pairs if _exact(pair, now, before)]
    if not pairs:
        return model, []
    shares = mac_shares(model, feed)
    if sum(shares.get(h.name, 0.0) for h in heads) > MAX_OUTPUT_SHARE:
        return model, []
    outputs = {o.name for o in graph.output}
    written = {o for n in graph.node for o in n.output}
    nested = subgraph_references(graph)
    drop: set[int] = set()
    kept: list[str] = []
    for quant, dequant in pairs:
        source, target = quant.input[0], dequant.output[0]
        drop.add(id(quant))
        kept.append(target if target in outputs else source)
        if target in outputs and (source not in written or source in outputs or source in nested):
            # a graph input, another output or read by a body: copied under the output's name
            dequant.op_type, dequant.domain = "Identity", ""
            dequant.input[:] = [source]
            del dequant.attribute[:]
            continue
        drop.add(id(dequant))
        if target in outputs:
            # the graph output keeps its name: whoever wrote `source` now writes `target`
            for node in graph.node:
                node.output[:] = [target if o == source else o for o in node.output]
                if id(node) not in drop:
                    node.input[:] = [target if i == source else i for i in node.input]
        else:
            rename_uses(graph, target, source)
    _remove_nodes(graph, drop)
    return model, kept


MATMUL_OPS = ("MatMul", "Gemm")


def _remove_nodes(graph: onnx.GraphProto, drop: set[int]) -> None:
    """Remove the nodes whose id() is in `drop`, then the initializers left unread."""
    nodes = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unread_initializers(graph)


def _pairs_after(
    graph: onnx.GraphProto, ops: tuple[str, ...], skip: set[str]
) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(QuantizeLinear, DequantizeLinear) pairs right after a node of `ops` (by output)."""
    producers = {o: n for n in graph.node for o in n.output}
    readers = consumers(graph)
    pairs = []
    for quant in graph.node:
        if quant.op_type != "QuantizeLinear":
            continue
        writer = producers.get(quant.input[0])
        if writer is None or writer.op_type not in ops or writer.name in skip:
            continue
        after = readers.get(quant.output[0], [])
        if len(after) == 1 and after[0].op_type == "DequantizeLinear":
            pairs.append((quant, after[0]))
    return pairs


def _drop_pairs(
    graph: onnx.GraphProto, pairs: list[tuple[onnx.NodeProto, onnx.NodeProto]]
) -> list[str]:
    """Remove Q/DQ pairs whose DQ output is not a graph output: readers take the float."""
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    drop: set[int] = set()
    for quant, dequant in pairs:
        if dequant.output[0] in outputs:
            continue
        rename[dequant.output[0]] = quant.input[0]
        drop.update((id(quant), id(dequant)))
    rename_all_uses(graph, rename)
    _remove_nodes(graph, drop)
    return sorted(set(rename.values()))


def cpu_optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph ONNX Runtime's CPU provider runs: the model after all its optimizations.
    ONNX Runtime's own errors propagate."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        options.optimized_model_filepath = str(path)
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(path))


def dequantized_weights(model: onnx.ModelProto) -> set[str]:
    """Stored int8 weights ONNX Runtime's CPU provider dequantizes to run a float MatMul or
    Gemm: its optimized graph still has DequantizeLinear(weight) -> MatMul/Gemm there."""
    optimized = cpu_optimized(model)
    stored = {t.name for t in optimized.graph.initializer}
    producers = {o: n for n in optimized.graph.node for o in n.output}
    found = set()
    for node in optimized.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "FusedMatMul", "FusedGemm"):
            continue
        for name in node.input[:2]:
            dq = producers.get(name)
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in stored:
                found.add(dq.input[0])
    return found


def float_matmul_outputs(
    model: onnx.ModelProto, reference: onnx.ModelProto, *, cpu_check: bool = True
) -> tuple[onnx.ModelProto, list[str]]:
    """A copy with the Q/DQ pairs after MatMul / Gemm outputs removed, where ONNX Runtime
    still runs those layers on int8 (MatMulIntegerToFloat, QGemm with a float output);
    the names of the tensors left in float (empty: `model` returned as it was).

    Where ONNX Runtime would instead dequantize a layer's weights and run it in float (with
    fixed shapes it may turn a 3-D MatMul and its bias Add into a float Gemm first), that
    layer keeps its Q/DQ pair. A model ONNX Runtime cannot load here (custom ops) is left
    as it was.

    `cpu_check=False` (the CUDA target) removes them all: ONNX Runtime's CUDA provider has
    no int8 MatMul behind Q/DQ (it dequantizes and runs float), so a pair there only rounds
    and costs two kernels. MiniLM, static int8 for CUDA: sentence-embedding cosine 0.849
    with the pairs, 0.982 without (measured through the CPU provider, same numbers).
    """
    now, written = _writers(model.graph), _writers(reference.graph)
    skip: set[str] = set()
    before: set[str] | None = None
    for _ in range(2):
        candidate = copy_model(model)
        pairs = _pairs_after(candidate.graph, MATMUL_OPS, skip)
        kept = _drop_pairs(candidate.graph, [p for p in pairs if _exact(p, now, written)])
        if not kept:
            return model, []
        if not cpu_check:
            return candidate, kept
        try:
            before = dequantized_weights(model) if before is None else before
            slow = dequantized_weights(candidate) - before
        except Exception:  # ORT's own error: no check, so no rewrite
            return model, []
        if not slow:
            return candidate, kept
        dequantized = {
            n.output[0]
            for n in candidate.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in slow
        }
        skip |= {n.name for n in candidate.graph.node if dequantized.intersection(n.input)}
    return model, []
