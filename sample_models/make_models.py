"""Generate the sample ONNX models used by optimodel's docs, tests and benchmarks.

Run from the repository root::

    pip install torch==2.13.0 scikit-learn
    python sample_models/make_models.py

Outputs are written next to this script. Graphs are built by hand with
``onnx.helper`` (opset 17, IR version 8). Only the digits CNN is trained (with
PyTorch on scikit-learn's bundled digits data); all other weights come from a
fixed NumPy RNG. Every run produces byte-identical files.
"""

import io
import math
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OUT_DIR = Path(__file__).resolve().parent
OPSET = 17
IR_VERSION = 8
PRODUCER = "optimodel-samples"
MAX_BYTES = 1 << 20
SEED = 0


# --------------------------------------------------------------------------- helpers


class GraphBuilder:
    """Collects nodes and initializers; each node output is named ``<node name>_out``."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def init(self, name: str, array: np.ndarray | float | int) -> str:
        """Add an initializer and return its name."""
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, n_out: int = 1, **attrs: Any) -> str:
        """Add a node with a single output (or ``n_out`` outputs, first returned)."""
        outputs = [f"{name}_out"] + [f"{name}_out{i}" for i in range(1, n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def graph(
        self,
        name: str,
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
        doc: str = "",
    ) -> onnx.GraphProto:
        return helper.make_graph(
            self.nodes, name, inputs, outputs, initializer=self.initializers, doc_string=doc
        )


def f32(array: np.ndarray | float) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def i64(array: np.ndarray | list[int] | int) -> np.ndarray:
    return np.asarray(array, dtype=np.int64)


def make_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph, producer_name=PRODUCER, opset_imports=[helper.make_opsetid("", OPSET)]
    )
    model.ir_version = IR_VERSION
    return model


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Yield all nodes, including those inside If/Loop subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            for sub in attr.graphs:
                yield from iter_nodes(sub)


def concrete_shape(value: onnx.ValueInfoProto, dims: dict[str, int]) -> list[int]:
    shape = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else dims[d.dim_param] for d in shape]


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # silence the expected "unused initializer" warning
    sess = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return sess.run(None, feeds)


def check_model(
    model: onnx.ModelProto,
    reference: Callable[..., np.ndarray] | None,
    dim_sets: list[dict[str, int]],
) -> None:
    """Full checker, unique node names, size, ORT run on random inputs vs. optional reference."""
    onnx.checker.check_model(model, full_check=True)
    names = [n.name for n in iter_nodes(model.graph)]
    assert all(names), "every node needs a name"
    assert len(names) == len(set(names)), "node names must be unique"
    assert len(model.SerializeToString()) < MAX_BYTES, "model too large"
    rng = np.random.default_rng(1234)
    for dims in dim_sets:
        feeds = {
            v.name: rng.standard_normal(concrete_shape(v, dims)).astype(np.float32)
            for v in model.graph.input
        }
        outputs = run_ort(model, feeds)
        for out_info, got in zip(model.graph.output, outputs, strict=True):
            assert list(got.shape) == concrete_shape(out_info, dims), (out_info.name, got.shape)
            assert np.isfinite(got).all(), out_info.name
        if reference is not None:
            np.testing.assert_allclose(outputs[0], reference(**feeds), rtol=1e-4, atol=1e-5)


def save_model(model: onnx.ModelProto, file_name: str) -> tuple[str, int, int]:
    data = model.SerializeToString()
    (OUT_DIR / file_name).write_bytes(data)
    return file_name, len(data), sum(1 for _ in iter_nodes(model.graph))


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps (byte-reproducible)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


# --------------------------------------------------------------------------- 1. digits CNN


def train_digits() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Train a small residual CNN on sklearn digits; return weights, test data, torch logits."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )

    def conv_bn(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)]

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(*conv_bn(1, 16), nn.ReLU())
            self.block = nn.Sequential(*conv_bn(16, 16), nn.ReLU(), *conv_bn(16, 16))
            self.head = nn.Sequential(*conv_bn(16, 32), nn.ReLU())
            self.fc = nn.Linear(32, 10)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            t = self.stem(t)
            t = torch.relu(t + self.block(t))
            t = nn.functional.max_pool2d(t, 2)
            t = self.head(t)
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(t, 1), 1))

    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    epochs, batch_size = 40, 32
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    gen = torch.Generator().manual_seed(SEED)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), batch_size):
            idx = perm[start : start + batch_size]
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(x_test)).numpy()
    weights = {k: v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    return weights, x_test.astype(np.float32), y_test.astype(np.int64), logits


def build_digits_cnn(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    b = GraphBuilder()

    def conv_bn(x: str, conv: str, bn: str, name: str) -> str:
        wt = b.init(f"{conv}.weight", w[f"{conv}.weight"])
        bias = b.init(f"{conv}.bias", w[f"{conv}.bias"])
        h = b.op("Conv", [x, wt, bias], f"{name}_conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        bn_inputs = [
            b.init(f"{bn}.{p}", w[f"{bn}.{p}"])
            for p in ("weight", "bias", "running_mean", "running_var")
        ]
        return b.op("BatchNormalization", [h, *bn_inputs], f"{name}_bn", epsilon=1e-5, momentum=0.9)

    h = b.op("Relu", [conv_bn("input", "stem.0", "stem.1", "stem")], "stem_relu")
    r = b.op("Relu", [conv_bn(h, "block.0", "block.1", "block1")], "block1_relu")
    r = conv_bn(r, "block.3", "block.4", "block2")
    h = b.op("Add", [h, r], "block_residual_add")
    h = b.op("Relu", [h], "block_relu")
    h = b.op("MaxPool", [h], "pool", kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("Relu", [conv_bn(h, "head.0", "head.1", "head")], "head_relu")
    h = b.op("GlobalAveragePool", [h], "global_avg_pool")
    h = b.op("Flatten", [h], "flatten", axis=1)
    fc_w, fc_b = b.init("fc.weight", w["fc.weight"]), b.init("fc.bias", w["fc.bias"])
    b.nodes.append(helper.make_node("Gemm", [h, fc_w, fc_b], ["logits"], name="fc_gemm", transB=1))
    graph = b.graph(
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        "Residual CNN trained on sklearn digits (8x8, pixels/16); outputs class logits.",
    )
    return make_model(graph)


def make_digits() -> tuple[onnx.ModelProto, float, int]:
    weights, x_test, y_test, torch_logits = train_digits()
    model = build_digits_cnn(weights)
    onnx.checker.check_model(model, full_check=True)
    ort_logits = run_ort(model, {"input": x_test})[0]
    np.testing.assert_allclose(ort_logits, torch_logits, rtol=1e-4, atol=1e-4)
    torch_acc = float((torch_logits.argmax(1) == y_test).mean())
    ort_acc = float((ort_logits.argmax(1) == y_test).mean())
    print(
        f"digits: torch test accuracy {torch_acc:.4f}, ORT test accuracy {ort_acc:.4f}, "
        f"N={len(y_test)}"
    )
    assert torch_acc == ort_acc and ort_acc >= 0.95, (torch_acc, ort_acc)
    check_model(model, None, [{"batch": 2}])
    save_npz(OUT_DIR / "digits_test.npz", {"input": x_test, "labels": y_test})
    return model, ort_acc, len(y_test)


# --------------------------------------------------------------------------- 2. transformer


HIDDEN, HEADS, HEAD_DIM, FFN = 64, 4, 16, 256
LN_EPS = 1e-5


def transformer_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    w: dict[str, np.ndarray] = {}
    for ln in ("ln1", "ln2"):
        w[f"{ln}.weight"] = f32(1.0 + 0.1 * rng.standard_normal(HIDDEN))
        w[f"{ln}.bias"] = f32(0.05 * rng.standard_normal(HIDDEN))
    for proj, (din, dout) in {
        "attn.q": (HIDDEN, HIDDEN),
        "attn.k": (HIDDEN, HIDDEN),
        "attn.v": (HIDDEN, HIDDEN),
        "attn.out": (HIDDEN, HIDDEN),
        "ffn.fc1": (HIDDEN, FFN),
        "ffn.fc2": (FFN, HIDDEN),
    }.items():
        w[f"{proj}.weight"] = f32(0.08 * rng.standard_normal((din, dout)))  # MatMul layout
        w[f"{proj}.bias"] = f32(0.05 * rng.standard_normal(dout))
    return w


def transformer_reference(w: dict[str, np.ndarray], hidden_states: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    def ln(x: np.ndarray, p: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + LN_EPS) * w[f"{p}.weight"] + w[f"{p}.bias"]

    def lin(x: np.ndarray, p: str) -> np.ndarray:
        return x @ w[f"{p}.weight"] + w[f"{p}.bias"]

    x = hidden_states.astype(np.float64)
    bsz, seq, _ = x.shape
    h = ln(x, "ln1")
    q, k, v = (
        lin(h, p).reshape(bsz, seq, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
        for p in ("attn.q", "attn.k", "attn.v")
    )
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(HEAD_DIM)
    s = np.exp(s - s.max(-1, keepdims=True))
    ctx = (s / s.sum(-1, keepdims=True)) @ v
    x = x + lin(ctx.transpose(0, 2, 1, 3).reshape(bsz, seq, HIDDEN), "attn.out")
    f = lin(ln(x, "ln2"), "ffn.fc1")
    f = 0.5 * f * (1.0 + erf(f / math.sqrt(2.0)))
    return (x + lin(f, "ffn.fc2")).astype(np.float32)


def build_transformer(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    b = GraphBuilder()
    for k, v in w.items():
        b.init(k, v)
    idx0, idx1 = b.init("const_idx_0", i64(0)), b.init("const_idx_1", i64(1))
    axes0 = b.init("const_unsqueeze_axes", i64([0]))
    heads_shape = b.init("const_heads_shape", i64([HEADS, HEAD_DIM]))
    hidden_shape = b.init("const_hidden_shape", i64([HIDDEN]))
    two, eps = b.init("const_two", f32(2.0)), b.init("const_ln_eps", f32(LN_EPS))
    scale = b.init("const_attn_scale", f32(math.sqrt(HEAD_DIM)))
    sqrt2 = b.init("const_sqrt2", f32(math.sqrt(2.0)))
    one, half = b.init("const_one", f32(1.0)), b.init("const_half", f32(0.5))

    def layer_norm(x: str, p: str) -> str:
        mean = b.op("ReduceMean", [x], f"{p}_mean", axes=[-1], keepdims=1)
        centered = b.op("Sub", [x, mean], f"{p}_sub")
        sq = b.op("Pow", [centered, two], f"{p}_pow")
        var = b.op("ReduceMean", [sq], f"{p}_var", axes=[-1], keepdims=1)
        std = b.op("Sqrt", [b.op("Add", [var, eps], f"{p}_add_eps")], f"{p}_sqrt")
        normed = b.op("Div", [centered, std], f"{p}_div")
        scaled = b.op("Mul", [normed, f"{p}.weight"], f"{p}_mul_gamma")
        return b.op("Add", [scaled, f"{p}.bias"], f"{p}_add_beta")

    def linear(x: str, p: str, name: str) -> str:
        mm = b.op("MatMul", [x, f"{p}.weight"], f"{name}_matmul")
        return b.op("Add", [mm, f"{p}.bias"], f"{name}_add_bias")

    def dynamic_shape(t: str, tail: str, name: str) -> str:
        """Shape(t)[0], Shape(t)[1] concatenated with a constant tail (exporter style)."""
        dims = []
        for i, idx in enumerate((idx0, idx1)):
            shape = b.op("Shape", [t], f"{name}_shape{i}")
            dim = b.op("Gather", [shape, idx], f"{name}_gather{i}", axis=0)
            dims.append(b.op("Unsqueeze", [dim, axes0], f"{name}_unsqueeze{i}"))
        return b.op("Concat", [*dims, tail], f"{name}_concat", axis=0)

    def split_heads(t: str, name: str, perm: list[int]) -> str:
        r = b.op("Reshape", [t, dynamic_shape(t, heads_shape, name)], f"{name}_reshape")
        return b.op("Transpose", [r], f"{name}_transpose", perm=perm)

    x = "hidden_states"
    h = layer_norm(x, "ln1")
    q = split_heads(linear(h, "attn.q", "attn_q"), "attn_q_heads", [0, 2, 1, 3])
    k = split_heads(linear(h, "attn.k", "attn_k"), "attn_k_heads", [0, 2, 3, 1])
    v = split_heads(linear(h, "attn.v", "attn_v"), "attn_v_heads", [0, 2, 1, 3])
    scores = b.op("MatMul", [q, k], "attn_scores_matmul")
    scores = b.op("Div", [scores, scale], "attn_scores_scale")
    probs = b.op("Softmax", [scores], "attn_softmax", axis=-1)
    ctx = b.op("MatMul", [probs, v], "attn_context_matmul")
    ctx = b.op("Transpose", [ctx], "attn_context_transpose", perm=[0, 2, 1, 3])
    ctx_shape = dynamic_shape(ctx, hidden_shape, "attn_merge_heads")
    ctx = b.op("Reshape", [ctx, ctx_shape], "attn_merge_heads_reshape")
    attn = linear(ctx, "attn.out", "attn_out")
    x = b.op("Add", [x, attn], "attn_residual_add")
    f = linear(layer_norm(x, "ln2"), "ffn.fc1", "ffn_fc1")
    g = b.op("Erf", [b.op("Div", [f, sqrt2], "gelu_div_sqrt2")], "gelu_erf")
    g = b.op("Add", [g, one], "gelu_add_one")
    g = b.op("Mul", [f, g], "gelu_mul_x")
    g = b.op("Mul", [g, half], "gelu_mul_half")
    f = linear(g, "ffn.fc2", "ffn_fc2")
    b.nodes.append(helper.make_node("Add", [x, f], ["output"], name="ffn_residual_add"))
    dims = ["batch", "sequence", HIDDEN]
    graph = b.graph(
        "transformer_block",
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, dims)],
        "Pre-LN transformer encoder block (4 heads, hidden 64, FFN 256) in exporter form.",
    )
    return make_model(graph)


# --------------------------------------------------------------------------- 3. foldable


def foldable_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED + 3)
    return {
        "w_raw": f32(0.2 * rng.standard_normal((8, 16))),  # [out, in], transposed at run time
        "bias": f32(0.1 * rng.standard_normal(8)),
        "unused_weight": f32(rng.standard_normal((32, 32))),
    }


W_SCALE, FILL_VALUE = 0.5, 0.25


def foldable_reference(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = x @ (w["w_raw"].T * W_SCALE) + w["bias"]
    r = np.maximum(h, 0.0)
    return (r + r + w["bias"] + FILL_VALUE).astype(np.float32)


def build_foldable(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    b = GraphBuilder()

    def const(name: str, arr: np.ndarray) -> str:
        return b.op("Constant", [], name, value=numpy_helper.from_array(arr, f"{name}_value"))

    # Weight computed at run time from constants: Transpose(W) * scale.
    w_raw = const("const_w_raw", w["w_raw"])
    w_t = b.op("Transpose", [w_raw], "weight_transpose", perm=[1, 0])
    w_eff = b.op("Mul", [w_t, const("const_w_scale", f32(W_SCALE))], "weight_scale_mul")
    # No-op chain on the input.
    h = b.op("Identity", ["x"], "input_identity")
    h = b.op("Cast", [h], "cast_same_type", to=TensorProto.FLOAT)
    h = b.op("Dropout", [h], "dropout_inference")
    shape = b.op("Shape", [h], "flatten_shape")
    batch = b.op("Gather", [shape, b.init("const_idx_0", i64(0))], "flatten_gather_batch", axis=0)
    batch = b.op("Unsqueeze", [batch, b.init("const_axes_0", i64([0]))], "flatten_unsqueeze")
    target = b.op(
        "Concat", [batch, b.init("const_feature_dim", i64([16]))], "flatten_concat", axis=0
    )
    h = b.op("Reshape", [h, target], "flatten_reshape")
    h = b.op("Transpose", [h], "transpose_identity_perm", perm=[0, 1])
    # Linear layer, then a duplicated subexpression (two identical Relu nodes).
    b.init("bias", w["bias"])
    b.init("bias_duplicate", w["bias"].copy())
    h = b.op("MatMul", [h, w_eff], "fc_matmul")
    h = b.op("Add", [h, "bias"], "fc_add_bias")
    r1 = b.op("Relu", [h], "relu_a")
    r2 = b.op("Relu", [h], "relu_b")
    h = b.op("Add", [r1, r2], "sum_relus")
    h = b.op("Add", [h, "bias_duplicate"], "add_bias_duplicate")
    # Constant fill via ConstantOfShape -> Expand feeding an Add.
    fill = b.op(
        "ConstantOfShape",
        [const("const_fill_shape", i64([8]))],
        "fill_constant_of_shape",
        value=numpy_helper.from_array(f32([FILL_VALUE]), "fill_value"),
    )
    fill = b.op("Expand", [fill, const("const_expand_shape", i64([1, 8]))], "fill_expand")
    h = b.op("Add", [h, fill], "add_fill")
    # Dead branch: nothing consumes these outputs.
    dead = b.op("Sigmoid", ["x"], "dead_sigmoid")
    b.op("Mul", [dead, const("const_dead_scale", f32(3.0))], "dead_mul")
    b.init("unused_weight", w["unused_weight"])
    # Reshape to the same (static) shape.
    b.nodes.append(
        helper.make_node(
            "Reshape",
            [h, b.init("const_out_shape", i64([-1, 8]))],
            ["y"],
            name="reshape_same_shape",
        )
    )
    graph = b.graph(
        "foldable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        "MLP with constant-foldable subgraphs, no-op nodes, duplicates and dead code.",
    )
    return make_model(graph)


# --------------------------------------------------------------------------- 4. control flow


LOOP_TRIPS = 3


def control_flow_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED + 4)
    return {
        "then_weight": f32(0.3 * rng.standard_normal((8, 8))),
        "else_weight": f32(0.3 * rng.standard_normal((8, 8))),
        "loop_weight": f32(0.3 * rng.standard_normal((8, 8))),
        "loop_bias": f32(0.1 * rng.standard_normal(8)),
    }


def control_flow_reference(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.maximum(x @ w["then_weight"], 0) if x.sum() > 0 else np.tanh(x @ w["else_weight"])
    for _ in range(LOOP_TRIPS):
        h = np.maximum(h @ w["loop_weight"] + w["loop_bias"], 0)
    return h.astype(np.float32)


def build_control_flow(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    b = GraphBuilder()
    feat = ["batch", 8]

    then_b = GraphBuilder()
    then_out = then_b.op(
        "Relu", [then_b.op("MatMul", ["x", "then_weight"], "then_matmul")], "then_relu"
    )
    then_graph = then_b.graph(
        "then_branch", [], [helper.make_tensor_value_info(then_out, TensorProto.FLOAT, feat)]
    )
    else_b = GraphBuilder()
    else_b.init("else_weight", w["else_weight"])  # initializer local to the subgraph
    else_out = else_b.op(
        "Tanh", [else_b.op("MatMul", ["x", "else_weight"], "else_matmul")], "else_tanh"
    )
    else_graph = else_b.graph(
        "else_branch", [], [helper.make_tensor_value_info(else_out, TensorProto.FLOAT, feat)]
    )

    b.init("then_weight", w["then_weight"])
    total = b.op("ReduceSum", ["x"], "cond_reduce_sum", keepdims=0)
    cond = b.op("Greater", [total, b.init("const_zero", f32(0.0))], "cond_greater")
    branch = b.op("If", [cond], "branch_if", then_branch=then_graph, else_branch=else_graph)

    body = GraphBuilder()
    mm = body.op("MatMul", ["loop_h_in", "loop_weight"], "loop_matmul")
    h_next = body.op("Relu", [body.op("Add", [mm, "loop_bias"], "loop_add_bias")], "loop_relu")
    cond_next = body.op("Identity", ["loop_cond_in"], "loop_cond_identity")
    body_graph = body.graph(
        "loop_body",
        [
            helper.make_tensor_value_info("loop_iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("loop_cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("loop_h_in", TensorProto.FLOAT, feat),
        ],
        [
            helper.make_tensor_value_info(cond_next, TensorProto.BOOL, []),
            helper.make_tensor_value_info(h_next, TensorProto.FLOAT, feat),
        ],
    )
    b.init("loop_weight", w["loop_weight"])
    b.init("loop_bias", w["loop_bias"])
    trips = b.init("loop_trip_count", i64(LOOP_TRIPS))
    keep_going = b.init("loop_cond_init", np.array(True))
    b.nodes.append(
        helper.make_node(
            "Loop", [trips, keep_going, branch], ["y"], name="repeat_loop", body=body_graph
        )
    )
    graph = b.graph(
        "control_flow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, feat)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, feat)],
        "If (sum(x) > 0 ? relu(x@W1) : tanh(x@W2)) followed by a 3-step Loop relu(h@W+b).",
    )
    return make_model(graph)


# --------------------------------------------------------------------------- 5. MLP


MLP_DIMS = [32, 64, 64, 10]


def mlp_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED + 5)
    w: dict[str, np.ndarray] = {}
    for i, (din, dout) in enumerate(zip(MLP_DIMS[:-1], MLP_DIMS[1:], strict=True)):
        w[f"fc{i + 1}.weight"] = f32(rng.standard_normal((dout, din)) / math.sqrt(din))
        w[f"fc{i + 1}.bias"] = f32(0.1 * rng.standard_normal(dout))
    return w


def mlp_reference(w: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    h = features.astype(np.float64)
    for i in range(1, 4):
        h = h @ w[f"fc{i}.weight"].T + w[f"fc{i}.bias"]
        if i < 3:
            h = np.maximum(h, 0)
    e = np.exp(h - h.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def build_mlp(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    b = GraphBuilder()
    h = "features"
    for i in range(1, 4):
        wt, bias = (
            b.init(f"fc{i}.weight", w[f"fc{i}.weight"]),
            b.init(f"fc{i}.bias", w[f"fc{i}.bias"]),
        )
        h = b.op("Gemm", [h, wt, bias], f"fc{i}_gemm", transB=1)
        if i < 3:
            h = b.op("Relu", [h], f"fc{i}_relu")
    b.nodes.append(helper.make_node("Softmax", [h], ["probabilities"], name="softmax", axis=-1))
    graph = b.graph(
        "mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        "MLP 32-64-64-10 with ReLU and softmax.",
    )
    return make_model(graph)


# --------------------------------------------------------------------------- main


def op_histogram(model: onnx.ModelProto) -> str:
    counts = Counter(n.op_type for n in iter_nodes(model.graph))
    return ", ".join(f"{op}={n}" for op, n in sorted(counts.items()))


def main() -> None:
    summary: list[tuple[str, int, int]] = []
    built: list[tuple[str, onnx.ModelProto]] = []

    digits, acc, n_test = make_digits()
    built.append(("digits_cnn.onnx", digits))

    tw = transformer_weights()
    transformer = build_transformer(tw)
    check_model(
        transformer,
        lambda hidden_states: transformer_reference(tw, hidden_states),
        [{"batch": 2, "sequence": 5}, {"batch": 1, "sequence": 7}],
    )
    built.append(("transformer_block.onnx", transformer))

    fw = foldable_weights()
    foldable = build_foldable(fw)
    check_model(foldable, lambda x: foldable_reference(fw, x), [{"batch": 2}])
    built.append(("foldable.onnx", foldable))

    cw = control_flow_weights()
    control = build_control_flow(cw)
    check_model(control, lambda x: control_flow_reference(cw, x), [{"batch": 2}])
    # Exercise both If branches explicitly.
    for sign in (1.0, -1.0):
        x = sign * np.abs(np.random.default_rng(7).standard_normal((2, 8))).astype(np.float32)
        np.testing.assert_allclose(
            run_ort(control, {"x": x})[0], control_flow_reference(cw, x), rtol=1e-4, atol=1e-5
        )
    built.append(("control_flow.onnx", control))

    mw = mlp_weights()
    mlp = build_mlp(mw)
    check_model(mlp, lambda features: mlp_reference(mw, features), [{"batch": 2}])
    built.append(("mlp.onnx", mlp))

    for file_name, model in built:
        summary.append(save_model(model, file_name))
    npz_bytes = (OUT_DIR / "digits_test.npz").stat().st_size

    print(f"{'file':<24}{'bytes':>10}{'nodes':>8}  ops")
    for (file_name, size, nodes), (_, model) in zip(summary, built, strict=True):
        print(f"{file_name:<24}{size:>10}{nodes:>8}  {op_histogram(model)}")
    print(f"{'digits_test.npz':<24}{npz_bytes:>10}")
    print(f"digits_cnn test accuracy: {acc:.4f} ({round(acc * n_test)}/{n_test})")


if __name__ == "__main__":
    main()
