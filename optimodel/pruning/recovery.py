"""Data-aware recovery: re-fit the weights a pruned layer kept so its output matches the
unpruned layer on calibration data (layer-wise least squares, as in OBC / SparseGPT and
the channel-pruning reconstruction of He et al. 2017).

For each layer, in graph order, the input activations are recorded in the *pruned* model
(so drift from layers already changed is compensated) and the target is the *original*
layer's output on the original activations. With X the pruned inputs (Conv through im2col,
plus a ones column for the bias) and Y the targets, the kept weights solve
(X^T X + damping) W = X^T Y, column by column on each column's surviving support, so
zeros stay zeros. Only the statistics X^T X and X^T Y are kept, batch by batch, never the
activations of the whole data. A re-fit that does not predict held-out feeds better is dropped.

For unstructured pruning the layer also chooses *which* weights to zero from the same
statistics: the OBS saliency w^2 / [H^-1]_ii (OBC / SparseGPT) ranks a weight by the
output error its removal alone causes (same count of zeros as the magnitude mask). The
damping, which the saliency uses too, is chosen per layer on held-out feeds. Conv,
ConvTranspose (through its transposed im2col), Gemm and MatMul (with the bias of the Add
after it) are re-fit; grouped (depthwise) Conv is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from optimodel.graphs import attr, consumers, copy_model, subgraph_references
from optimodel.modelio import tensor_array
from optimodel.runtime.sessions import point_to_external_data

MAX_ROWS_PER_FEED = 4096  # im2col rows sampled per feed and layer (keeps X^T X cheap)
DAMPING = 0.01  # fraction of the mean diagonal of X^T X added to it (the default)
# Candidate dampings, chosen per layer on held-out feeds: little calibration data for a
# wide layer (MiniLM: 102 sentences give 1,521 rows for 1,536 inputs) needs more pull
# toward the old weights; on MiniLM most layers pick 0.3, some 1 or 3. With few samples
# the held-out halves are too small to judge that many: on PP-OCR rec (8 text lines) the
# wide choice lowered the output cosine from 0.990 to 0.983, so few samples get two.
DAMPINGS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
FEW_SAMPLES_DAMPINGS = (0.01, 0.1)
WIDE_SEARCH_SAMPLES = 32  # calibration samples (over all feeds) for the wide set
DAMPING_COLUMNS = 64  # output columns the damping is judged on


@dataclass
class _Layer:
    """A node seen as y = x @ M + b with M of shape [K, N].

    A MatMul's bias is the constant of the Add that follows it, when that Add alone uses it.
    """

    node: onnx.NodeProto
    weight: np.ndarray
    bias: np.ndarray | None
    bias_name: str | None

    @property
    def op(self) -> str:
        return self.node.op_type


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _layer(model: onnx.ModelProto, output: str) -> _Layer | None:
    inits = _initializers(model)
    node = next((n for n in model.graph.node if output in n.output), None)
    if node is None or len(node.input) < 2 or node.input[1] not in inits:
        return None
    if node.op_type in ("Conv", "ConvTranspose"):
        if len(inits[node.input[1]].dims) != 4:
            return None
        if attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return None
        if node.op_type == "ConvTranspose" and (
            attr(node, "group", 1) != 1 or attr(node, "output_shape", None) is not None
        ):
            return None
    elif node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return None
    elif node.op_type != "MatMul" or len(inits[node.input[1]].dims) != 2:
        return None
    weight = tensor_array(inits[node.input[1]])
    if node.op_type == "MatMul":
        return _matmul_layer(model, node, weight, inits)
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    bias = None
    if bias_name is not None:
        if bias_name not in inits:
            return None
        bias = tensor_array(inits[bias_name])
    return _Layer(node, weight, bias, bias_name)


def _matmul_layer(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    weight: np.ndarray,
    inits: dict[str, onnx.TensorProto],
) -> _Layer:
    """A MatMul with the bias of the Add after it (x @ W + b, a constant that Add alone
    uses), so bias correction reaches MatMul layers too (transformer exports keep the
    bias in a separate Add)."""
    layer = _Layer(node, weight, None, None)
    uses = consumers(model.graph)
    users = uses.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add" or len(users[0].input) != 2:
        return layer
    add = users[0]
    const = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    if const not in inits:
        return layer
    # x @ W itself must be read by nothing else (a graph output, a subgraph), and the
    # constant by no other node: both would see the bias move into the weights
    elsewhere = subgraph_references(model.graph) | {o.name for o in model.graph.output}
    if node.output[0] in elsewhere or const in elsewhere:
        return layer
    bias = tensor_array(inits[const])
    shared = len(uses.get(const, [])) > 1
    if shared or bias.size != weight.shape[1] or bias.shape[-1:] != (weight.shape[1],):
        return layer
    layer.bias, layer.bias_name = bias, const
    return layer


def _add_bias(model: onnx.ModelProto, layer: _Layer) -> None:
    """Give a Conv / Gemm a zero bias input so bias correction has somewhere to go."""
    n = (
        layer.weight.shape[0]
        if layer.op == "Conv" or attr(layer.node, "transB", 0)
        else (layer.weight.shape[1])  # MatMul / Gemm [K, N], ConvTranspose [C, O, kh, kw]
    )
    taken = {t.name for t in model.graph.initializer} | {
        o for node in model.graph.node for o in node.output
    }
    name, k = f"{layer.node.input[1]}_bias", 1
    while name in taken:
        k += 1
        name = f"{layer.node.input[1]}_bias{k}"
    zeros = np.zeros(n, dtype=layer.weight.dtype)
    model.graph.initializer.append(numpy_helper.from_array(zeros, name))
    while len(layer.node.input) < 2:
        layer.node.input.append("")
    layer.node.input.append(name)
    layer.bias, layer.bias_name = zeros, name


def _matrix(layer: _Layer) -> tuple[np.ndarray, np.ndarray | None]:
    """(M [K, N], bias [N] or None) in float64 so that y = x @ M + bias."""
    w = layer.weight.astype(np.float64)
    if layer.op == "Conv":
        m = w.reshape(w.shape[0], -1).T
    elif layer.op == "ConvTranspose":  # y = rows @ M, rows from im2col_transposed
        m = w.transpose(0, 2, 3, 1).reshape(-1, w.shape[1])
    elif layer.op == "Gemm":
        m = (w.T if attr(layer.node, "transB", 0) else w) * float(attr(layer.node, "alpha", 1.0))
    else:
        m = w
    bias = None
    if layer.bias is not None:
        b = layer.bias.astype(np.float64)
        if layer.op == "Gemm":
            b = b * float(attr(layer.node, "beta", 1.0))
        bias = (
            np.broadcast_to(b.reshape(-1), (m.shape[1],)).copy()
            if b.size in (1, m.shape[1])
            else None
        )
    return m, bias


def _unmatrix(layer: _Layer, m: np.ndarray) -> np.ndarray:
    if layer.op == "Conv":
        return m.T.reshape(layer.weight.shape).astype(layer.weight.dtype)
    if layer.op == "ConvTranspose":
        c, o, kh, kw = layer.weight.shape
        return m.reshape(c, kh, kw, o).transpose(0, 3, 1, 2).astype(layer.weight.dtype)
    if layer.op == "Gemm":
        m = m / float(attr(layer.node, "alpha", 1.0))
        return (m.T if attr(layer.node, "transB", 0) else m).astype(layer.weight.dtype)
    return m.astype(layer.weight.dtype)


def im2col(x: np.ndarray, node: onnx.NodeProto, kernel: Sequence[int]) -> np.ndarray:
    """[B, C, H, W] -> [B*Ho*Wo, C*kh*kw] patches in the order of a Conv weight's rows."""
    kh, kw = kernel
    sh, sw = attr(node, "strides", [1, 1])  # type: ignore[misc]
    dh, dw = attr(node, "dilations", [1, 1])  # type: ignore[misc]
    pt, pl, pb, pr = attr(node, "pads", [0, 0, 0, 0])  # type: ignore[misc]
    x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    b, c, h, w = x.shape
    ho = (h - dh * (kh - 1) - 1) // sh + 1
    wo = (w - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((b, ho, wo, c, kh, kw), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = x[
                :,
                :,
                i * dh : i * dh + sh * (ho - 1) + 1 : sh,
                j * dw : j * dw + sw * (wo - 1) + 1 : sw,
            ]
            cols[:, :, :, :, i, j] = patch.transpose(0, 2, 3, 1)
    return cols.reshape(b * ho * wo, c * kh * kw)


def im2col_transposed(x: np.ndarray, node: onnx.NodeProto, kernel: Sequence[int]) -> np.ndarray:
    """[B, C, H, W] -> [B*Ho*Wo, C*kh*kw]: for each output pixel of a ConvTranspose, the
    input values each kernel tap brings to it (zero where none), so y = rows @ M."""
    kh, kw = kernel
    sh, sw = attr(node, "strides", [1, 1])  # type: ignore[misc]
    dh, dw = attr(node, "dilations", [1, 1])  # type: ignore[misc]
    pt, pl, pb, pr = attr(node, "pads", [0, 0, 0, 0])  # type: ignore[misc]
    oph, opw = attr(node, "output_padding", [0, 0])  # type: ignore[misc]
    b, c, h, w = x.shape
    ho = sh * (h - 1) + oph + (kh - 1) * dh + 1 - pt - pb
    wo = sw * (w - 1) + opw + (kw - 1) * dw + 1 - pl - pr
    cols = np.zeros((b, c, kh, kw, ho, wo), dtype=x.dtype)

    def taps(size_out: int, pad: int, k: int, d: int, s: int, size_in: int) -> Any:
        at = np.arange(size_out) + pad - k * d  # input index * stride for each output
        valid = (at >= 0) & (at % s == 0) & (at // s < size_in)
        return np.flatnonzero(valid), at[valid] // s

    for i in range(kh):
        out_y, in_y = taps(ho, pt, i, dh, sh, h)
        for j in range(kw):
            out_x, in_x = taps(wo, pl, j, dw, sw, w)
            view = cols[:, :, i, j]
            view[:, :, out_y[:, None], out_x[None, :]] = x[:, :, in_y[:, None], in_x[None, :]]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(b * ho * wo, c * kh * kw)


def _rows(layer: _Layer, x: np.ndarray) -> np.ndarray:
    if layer.op == "ConvTranspose":
        return im2col_transposed(x, layer.node, layer.weight.shape[2:])
    if layer.op == "Conv":
        return im2col(x, layer.node, layer.weight.shape[2:])
    return x.reshape(-1, x.shape[-1])


def _upstream(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy holding only the nodes that `names` depend on, with `names` as its outputs,
    so recording an early layer's input does not run the rest of the network.
    """
    needed: set[int] = set()
    stack = list(names)
    seen: set[str] = set()
    position = {o: i for i, n in enumerate(model.graph.node) for o in n.output if o}
    while stack:
        name = stack.pop()
        if name in seen or name not in position:
            continue
        seen.add(name)
        i = position[name]
        if i in needed:
            continue
        needed.add(i)
        stack.extend(x for x in model.graph.node[i].input if x)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    kept = [n for i, n in enumerate(model.graph.node) if i in needed]
    del probe.graph.node[:]
    probe.graph.node.extend(kept)
    used = {x for n in kept for x in n.input}
    inits = [t for t in model.graph.initializer if t.name in used]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(inits)
    del probe.graph.output[:]
    for name in names:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    return probe


def _record(
    model: onnx.ModelProto, names: list[str], batches: Sequence[Any]
) -> list[list[np.ndarray]]:
    """Values of intermediate tensors `names` for every feed."""
    import onnxruntime as ort

    probe = _upstream(model, names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    point_to_external_data(probe, options)
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    wanted = {i.name for i in session.get_inputs()}
    return [session.run(names, {k: v for k, v in b.feed.items() if k in wanted}) for b in batches]


def _solve(
    h: np.ndarray,
    g: np.ndarray,
    prior: np.ndarray,
    support: np.ndarray | None,
    damping: float = DAMPING,
) -> np.ndarray:
    """Least squares per column, damped toward the current weights (directions the data
    never excites keep their values instead of collapsing to zero); rows outside a
    column's support stay zero.
    """
    damp = damping * float(np.mean(np.diag(h))) + 1e-12
    reg = h + damp * np.eye(h.shape[0])
    rhs = g + damp * prior
    if support is None or support.all():
        return np.linalg.solve(reg, rhs)
    out = np.zeros_like(g)
    for j in range(g.shape[1]):
        keep = np.flatnonzero(support[:, j])
        if keep.size:
            sub = np.take(np.take(reg, keep, axis=0), keep, axis=1)  # faster than np.ix_
            out[keep, j] = np.linalg.solve(sub, rhs[keep, j])
    return out


def saliency_support(
    h: np.ndarray,
    dense: np.ndarray,
    zeros: int,
    per_column: bool = False,
    damping: float = DAMPING,
) -> np.ndarray:
    """Keep-mask with `zeros` weights dropped, chosen by how much dropping each one alone
    raises the layer's output error (the OBS saliency w^2 / [H^-1]_ii of OBC / SparseGPT),
    not by |w|: a small weight on a strongly excited input can matter more than a large
    one on a quiet input.
    """
    k = dense.shape[0]
    damp = damping * float(np.mean(np.diag(h[:k, :k]))) + 1e-12
    inverse_diag = np.diag(np.linalg.inv(h[:k, :k] + damp * np.eye(k)))
    score = dense * dense / np.maximum(inverse_diag, 1e-30)[:, None]
    keep = np.ones(dense.shape, dtype=bool)
    if zeros <= 0:
        return keep
    if per_column:
        per = zeros // dense.shape[1]
        extra = zeros - per * dense.shape[1]
        for j in range(dense.shape[1]):
            count = per + (1 if j < extra else 0)
            if count:
                keep[np.argpartition(score[:, j], count - 1)[:count], j] = False
        return keep
    flat = score.ravel()
    keep.ravel()[np.argpartition(flat, min(zeros, flat.size) - 1)[:zeros]] = False
    return keep


def _error(h: np.ndarray, g: np.ndarray, yy: float, w: np.ndarray) -> float:
    """||X W - Y||^2 from the accumulated statistics."""
    return float(np.sum(w * (h @ w)) - 2.0 * np.sum(w * g) + yy)


def _groups(node: onnx.NodeProto) -> int:
    return int(attr(node, "group", 1)) if node.op_type.startswith("Conv") else 1


Stats = tuple[np.ndarray, np.ndarray, float, int]


def _statistics(
    before: _Layer,
    after: _Layer,
    original: onnx.ModelProto,
    work: onnx.ModelProto,
    batches: Sequence[Any],
    out_keep: np.ndarray | None,
    rng: np.random.Generator,
) -> list[Stats]:
    """X^T X, X^T Y, |Y|^2 and the row count, accumulated feed by feed, for the even and
    the odd feeds apart (one fits, the other judges the damping; their sum is the fit).

    X: the layer's inputs in the pruned model (a ones column for the bias); Y: the dense
    layer's outputs on the original inputs (only the kept channels, with `out_keep`).
    """
    x_orig = _record(original, [before.node.input[0]], batches)
    x_new = _record(work, [after.node.input[0]], batches)
    m_orig, b_orig = _matrix(before)
    m_new, b_new = _matrix(after)
    use_bias = b_new is not None
    size = m_new.shape[0] + (1 if use_bias else 0)
    halves: list[list[Any]] = [
        [np.zeros((size, size)), np.zeros((size, m_new.shape[1])), 0.0, 0] for _ in range(2)
    ]
    # Rows wait in a buffer until there are MAX_ROWS_PER_FEED of them: one product over
    # many short feeds (sentences) costs less than a (size x size) update per feed.
    pending: list[list[tuple[np.ndarray, np.ndarray]]] = [[], []]
    waiting = [0, 0]  # rows in each buffer

    def flush(side: int) -> None:
        if not pending[side]:
            return
        rn = np.vstack([r for r, _ in pending[side]])
        y = np.vstack([t for _, t in pending[side]])
        pending[side].clear()
        waiting[side] = 0
        acc = halves[side]
        acc[0] += rn.T @ rn
        acc[1] += rn.T @ y
        acc[2] += float(np.sum(y * y))
        acc[3] += rn.shape[0]

    for index, ((xo,), (xn,)) in enumerate(zip(x_orig, x_new, strict=True)):
        ro = _rows(before, xo.astype(np.float64))
        rn = _rows(after, xn.astype(np.float64))
        if ro.shape[0] > MAX_ROWS_PER_FEED:
            pick = rng.choice(ro.shape[0], MAX_ROWS_PER_FEED, replace=False)
            ro, rn = ro[pick], rn[pick]
        y = ro @ m_orig + (b_orig if b_orig is not None else 0.0)
        if out_keep is not None:
            y = y[:, out_keep]
        if use_bias:
            rn = np.hstack([rn, np.ones((rn.shape[0], 1))])
        side = index % 2
        pending[side].append((rn, y))
        waiting[side] += rn.shape[0]
        if waiting[side] >= MAX_ROWS_PER_FEED:
            flush(side)
    flush(0)
    flush(1)
    return [(a[0], a[1], a[2], a[3]) for a in halves]


def _fit(
    halves: list[Stats],
    current: np.ndarray,
    dense: np.ndarray,
    use_bias: bool,
    keep_zeros: bool,
    reselect: bool,
    samples: int = WIDE_SEARCH_SAMPLES,
) -> tuple[np.ndarray, str, float, bool | None]:
    """Re-fit one layer: its weights, the mask (with `reselect`), the damping, and whether
    the fit made on the even feeds predicts the odd ones better than the layer as pruned
    (None without feeds on both sides). A fit can lower the error on its own rows and
    still generalize worse: on the random-input MLP sample, 8 feeds of 16-input layers.

    With `reselect` the zeros are the OBS-saliency choice (same count as magnitude's; it
    re-fit closer on every layer of PP-OCR det/rec and MiniLM we measured), spread evenly
    over the output columns, as Wanda compares weights per output: held-out cosine
    against the dense model, layer-wide vs per output, PP-OCR det 0.9877 vs 0.9899, rec
    0.9888 vs 0.9892, MiniLM embeddings 0.864 vs 0.873 (8 calibration sentences) and
    0.925 vs 0.930 (102). The damping is the candidate whose mask and fit, both made on
    the even feeds alone, best predict the odd ones; the final mask and fit use all feeds.
    With the candidates 0.01-3 rather than 0.01 / 0.1, each with its own mask, MiniLM's
    embedding cosine on 300 held-out sentences from another domain (Python's docs) went
    from 0.870 to 0.884, and on the 12 benchmark sentences from 0.929 to 0.932.
    """
    (ha, ga, yya, na), (hb, gb, yyb, nb) = halves
    h, g = ha + hb, ga + gb
    k = dense.shape[0]
    support = None
    mask = "dense"
    if keep_zeros:
        support = current != 0
        if use_bias:
            support[-1, :] = True
        mask = "magnitude"
    zeros = int(np.count_nonzero(current[:k] == 0))
    reselect = reselect and keep_zeros and dense.shape == current[:k].shape

    def masked(stats: np.ndarray, damping: float) -> tuple[np.ndarray, np.ndarray | None]:
        """The starting weights and support for one damping (saliency uses it as well)."""
        if not reselect or support is None:
            return current, support
        keep = saliency_support(stats, dense, zeros, per_column=True, damping=damping)
        start, where = current.copy(), support.copy()
        start[:k] = np.where(keep, dense, 0.0)
        where[:k] = keep
        return start, where

    damping = DAMPING
    generalizes = None
    if na and nb:  # feeds on both sides: let held-out data pick the damping
        # judged on a fixed sample of output columns: each column is its own least-squares
        # problem, so a sample ranks the dampings as all would, at a fraction of the solves
        cols = np.arange(g.shape[1])
        if cols.size > DAMPING_COLUMNS:
            cols = np.sort(np.random.default_rng(0).choice(cols, DAMPING_COLUMNS, replace=False))
        candidates = DAMPINGS if samples >= WIDE_SEARCH_SAMPLES else FEW_SAMPLES_DAMPINGS
        scores = {}
        for d in candidates:
            start, where = masked(ha, d)
            part = None if where is None else where[:, cols]
            fitted = _solve(ha, ga[:, cols], start[:, cols], part, d)
            scores[d] = _error(hb, gb[:, cols], yyb, fitted)
        damping = min(scores, key=lambda d: (scores[d], d))
        generalizes = scores[damping] < _error(hb, gb[:, cols], yyb, current[:, cols])
    start, where = masked(h, damping)
    if reselect:
        mask = "saliency"
    return _solve(h, g, start, where, damping), mask, damping, generalizes


def _store(
    work: onnx.ModelProto, after: _Layer, solved: np.ndarray, k: int, use_bias: bool
) -> None:
    """Write a re-fit layer's weight (the first k rows of `solved`) and bias back."""
    inits = _initializers(work)
    weight = _flush_subnormals(_unmatrix(after, solved[:k]))
    inits[after.node.input[1]].CopyFrom(numpy_helper.from_array(weight, after.node.input[1]))
    if use_bias and after.bias_name is not None and after.bias is not None:
        bias = solved[-1]
        if after.op == "Gemm":
            bias = bias / float(attr(after.node, "beta", 1.0))
        bias = bias.reshape(after.bias.shape) if after.bias.size == bias.size else bias
        inits[after.bias_name].CopyFrom(
            numpy_helper.from_array(
                _flush_subnormals(bias.astype(after.bias.dtype)), after.bias_name
            )
        )


def _flush_subnormals(array: np.ndarray) -> np.ndarray:
    """Zero the values too small for a normal float of the array's type. A least-squares fit
    can leave some (PP-OCRv4 rec at 50%: 7,042 weights near 1e-40), and CPU arithmetic on
    subnormals is slow: that model ran 3.6x slower than before pruning until they were 0.
    """
    if array.dtype.kind != "f":
        return array
    out = array.copy()
    out[np.abs(out) < np.finfo(out.dtype).tiny] = 0
    return out


def refit(
    original: onnx.ModelProto,
    pruned: onnx.ModelProto,
    batches: Sequence[Any],
    *,
    outputs: Sequence[str],
    keep_zeros: bool,
    out_keep: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    reselect: bool = False,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Re-fit the layers producing `outputs` (in graph order) on the calibration feeds.

    `keep_zeros` keeps every zero weight zero (unstructured / N:M); `out_keep` names the
    original output channels a layer kept when its own outputs were pruned too.
    `reselect` (unstructured) lets each layer choose which of its weights to zero by
    saliency on its recorded inputs, same count as the magnitude mask, when that lowers
    the layer's error before the re-fit.
    """
    out_keep = out_keep or {}
    work = copy_model(pruned)
    order = {o: i for i, n in enumerate(work.graph.node) for o in n.output}
    rows_info: list[dict[str, Any]] = []
    rng = np.random.default_rng(seed)
    samples = sum(b.size for b in batches)
    for output in sorted(set(outputs), key=lambda o: order.get(o, 0)):
        before, after = _layer(original, output), _layer(work, output)
        if before is None or after is None or before.op != after.op:
            rows_info.append({"output": output, "refit": False, "reason": "unsupported layer"})
            continue
        if before.op == "MatMul" and (before.bias is None) != (after.bias is None):
            # pruning can turn a Constant-node or shared bias into a bias of the layer's own
            # (channel slicing): fit with no bias rather than toward a target without it
            for layer in (before, after):
                layer.bias = layer.bias_name = None
        if _groups(after.node) > 1:
            # a depthwise re-fit matches each layer better yet lowered PP-OCR rec's fidelity
            # (cosine 0.989 -> 0.982; det unchanged): its 9 weights per channel overfit
            rows_info.append({"output": output, "refit": False, "reason": "grouped conv"})
            continue
        if after.bias is None and after.op in ("Conv", "ConvTranspose", "Gemm"):
            _add_bias(work, after)  # bias correction needs a bias to correct
        halves = _statistics(before, after, original, work, batches, out_keep.get(output), rng)
        h, g = halves[0][0] + halves[1][0], halves[0][1] + halves[1][1]
        yy, count = halves[0][2] + halves[1][2], halves[0][3] + halves[1][3]
        m_new, b_new = _matrix(after)
        m_orig, _ = _matrix(before)
        use_bias = b_new is not None
        current = np.vstack([m_new, b_new[None, :]]) if use_bias else m_new
        solved, mask, damping, generalizes = _fit(
            halves, current, m_orig, use_bias, keep_zeros, reselect, samples
        )
        err_before, err_after = _error(h, g, yy, current), _error(h, g, yy, solved)
        accept = err_after < err_before and generalizes is not False
        info = {
            "output": output,
            "node": after.node.name,
            "rows": count,
            "relative_error_before": err_before / yy if yy else 0.0,
            "relative_error_after": err_after / yy if yy else 0.0,
            "refit": accept,
            "damping": damping,
        }
        if generalizes is False:
            info["reason"] = "the fit predicts held-out feeds worse than the pruned layer"
        if keep_zeros and reselect:
            info["mask"] = mask
        rows_info.append(info)
        if accept:
            _store(work, after, solved, m_new.shape[0], use_bias)
    summary = {
        "method": "layer-wise damped least squares on calibration activations (+ bias)"
        + ("; zeros chosen by OBS saliency, per output" if reselect else "")
        + "; damping per layer on held-out feeds",
        "feeds": len(batches),
        "samples": samples,
        "layers": rows_info,
        "refit_layers": sum(1 for r in rows_info if r.get("refit")),
    }
    return work, summary
