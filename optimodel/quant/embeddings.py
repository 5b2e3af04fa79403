"""8-bit embedding tables for weight-only quantization: Gather -> GatherBlockQuantized.

int4 weight-only quantizes MatMul weights; a transformer's word-embedding table is read
by a Gather and would stay float, and on MiniLM that table is half the file (the int4
file was 0.60x of the float one). ONNX Runtime's own quantizer writes int4 tables only,
which is too coarse for embeddings, so the table is stored here as uint8 in blocks of
`block_size` along the hidden axis, one scale and zero point per block, read by ONNX
Runtime's GatherBlockQuantized (com.microsoft, bits=8): only the gathered rows are
dequantized. Small tables (position, token type) stay float, as in static mode.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from optimodel.graphs import MS_DOMAIN, attr, consumers, drop_unread_initializers, fresh_name
from optimodel.modelio import tensor_array
from optimodel.quant.presets import SMALL_TABLE_ELEMENTS

OP = "GatherBlockQuantized"


def _quantize(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric uint8 per block of `block` values along the last axis."""
    rows, width = table.shape
    blocks = table.reshape(rows, width // block, block).astype(np.float64)
    low = np.minimum(blocks.min(-1), 0.0)
    high = np.maximum(blocks.max(-1), 0.0)
    scale = (high - low) / 255.0
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-low / scale), 0, 255)
    q = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, 255)
    return q.astype(np.uint8).reshape(rows, width), scale.astype(np.float32), zero.astype(np.uint8)


def embeddings_to_8bit(
    model: onnx.ModelProto, block: int, exclude: Iterable[str] = ()
) -> list[str]:
    """Rewrite, in place, each main-graph Gather of a large 2-D float32 table (axis 0,
    width a multiple of `block`, read by nothing else) as GatherBlockQuantized with 8 bits.
    Returns the Gather nodes rewritten."""
    graph = model.graph
    skip = set(exclude)
    inits = {t.name: t for t in graph.initializer}
    readers = consumers(graph)
    fed = {i.name for i in graph.input}
    taken = set(inits) | {o for n in graph.node for o in n.output}
    done: list[str] = []
    for index, node in enumerate(graph.node):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.name in skip:
            continue
        table = inits.get(node.input[0])
        if table is None or table.name in fed or len(readers.get(table.name, [])) != 1:
            continue
        dims = list(table.dims)
        if table.data_type != onnx.TensorProto.FLOAT or len(dims) != 2:
            continue
        if dims[0] * dims[1] < SMALL_TABLE_ELEMENTS or dims[1] % block:
            continue
        if attr(node, "axis", 0) not in (0, -2):
            continue
        q, scale, zero = _quantize(tensor_array(table), block)
        base = table.name
        tensors = [
            numpy_helper.from_array(array, fresh_name(f"{base}{suffix}", taken))
            for array, suffix in ((q, "_u8"), (scale, "_u8_scale"), (zero, "_u8_zero_point"))
        ]
        graph.initializer.extend(tensors)
        new = onnx.helper.make_node(
            OP,
            [tensors[0].name, node.input[1], tensors[1].name, tensors[2].name],
            list(node.output),
            name=node.name,
            domain=MS_DOMAIN,
            bits=8,
            block_size=block,
            gather_axis=0,
            quantize_axis=1,
        )
        graph.node[index].CopyFrom(new)
        done.append(node.name or base)
    if done:
        drop_unread_initializers(graph)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return done
