"""ONNX Runtime's transformer fusions (target `ort`): Attention, LayerNorm, GELU and friends.

`onnxruntime.transformers` matches the attention subgraphs exporters emit far more
thoroughly than a hand-written matcher would, so the `ort` target delegates to it
(Python fusions only, `opt_level=0`, BERT rules with head count and hidden size
detected). The call runs on a copy with its logging captured; any failure declines
with the reason and leaves the model as it was. The result is made checker-clean:
the `com.microsoft` opset is imported, and a LayerNormalization left on its own below
opset 17 or a SimplifiedLayerNormalization (which ONNX Runtime accepts in the default
domain but the ONNX checker does not) is written out as standard ops again. The raw
attention mask format is used, so the fused model takes the same inputs with the same
meaning. Additive masks in a form ORT's matcher does not know (the dynamo exporter's
GatherND lookup) are rewritten first with the same numbers (`attention_mask`), and that
rewrite is kept only where Attention then fuses.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import onnx

from optimodel.fusions import GraphOutcome, GraphPattern, GraphView, register, shapes_only
from optimodel.fusions.attention_mask import MaskRewrite, normalize_attention_masks
from optimodel.fusions.layernorm import LAYERNORM_OPSET, expand_layernorm
from optimodel.fusions.residual_order import bias_after_residual
from optimodel.graphs import MS_DOMAIN, STANDARD_DOMAINS, copy_model, value_types
from optimodel.modelio import has_external_tensors, tensor_array

# Pattern name -> the ONNX Runtime ops that hold one such fusion each.
FUSED_OPS: dict[str, tuple[str, ...]] = {
    "attention": ("Attention", "MultiHeadAttention"),
    "layernorm": (
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
    ),
    "skip-layernorm": ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"),
    "gelu": ("Gelu", "FastGelu", "BiasGelu", "GemmFastGelu"),
    "bias-gelu": ("BiasGelu",),
    "embed-layernorm": ("EmbedLayerNormalization",),
}
# Loggers of onnxruntime.transformers whose lines explain a missed attention fusion, and
# the lowest level worth reading from each.
EXPLAINING_LOGGERS = {"fusion_attention": logging.DEBUG, "onnx_model_bert": logging.WARNING}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _captured() -> Iterator[_Capture]:
    """Route the optimizer's logging and prints into a buffer; a pass never prints."""
    capture = _Capture()
    root = logging.getLogger()
    saved_handlers, saved_levels = root.handlers[:], {}
    root.handlers = [capture]
    for name in EXPLAINING_LOGGERS:
        log = logging.getLogger(name)
        saved_levels[name] = log.level
        log.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield capture
    finally:
        root.handlers = saved_handlers
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


def _messages(capture: _Capture) -> list[str]:
    seen: list[str] = []
    for record in capture.records:
        level = EXPLAINING_LOGGERS.get(record.name)
        if level is not None and record.levelno >= level:
            text = record.getMessage().strip().splitlines()[0][:160]
            if text and text not in seen:
                seen.append(text)
    return seen


def _op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def _options(enabled: set[str]) -> Any:
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions

    options = FusionOptions("bert")
    options.enable_attention = "attention" in enabled
    options.enable_layer_norm = "layernorm" in enabled
    options.enable_skip_layer_norm = "skip-layernorm" in enabled
    options.enable_bias_skip_layer_norm = "skip-layernorm" in enabled
    options.enable_gelu = "gelu" in enabled
    options.enable_bias_gelu = "gelu" in enabled and "bias-gelu" in enabled
    options.enable_embed_layer_norm = "embed-layernorm" in enabled
    options.enable_gelu_approximation = False  # approximations change numbers
    options.enable_rotary_embeddings = False  # decoder-only LLM rules, slow to try on others
    options.attention_mask_format = AttentionMaskFormat.AttentionMask  # inputs keep meaning
    return options


def _standard_clean(model: onnx.ModelProto) -> None:
    """Import com.microsoft; write ops ONNX lacks at this opset back as standard ops.

    ONNX Runtime puts LayerNormalization (standard only from opset 17) and its own
    SimplifiedLayerNormalization in the default domain, where the ONNX checker refuses
    them. Those left on their own (not absorbed into a Skip* op) are expanded; the
    hand-written `layernorm` pattern then sees the decomposed form and says why it stays.
    """
    if any(n.domain == MS_DOMAIN for n in model.graph.node) and not any(
        o.domain == MS_DOMAIN for o in model.opset_import
    ):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    view = GraphView(model, {}, "ort")
    lacking = {"SimplifiedLayerNormalization"}
    if view.opset < LAYERNORM_OPSET:
        lacking.add("LayerNormalization")
    if not any(view.by_op.get(op) for op in lacking):
        return
    kept: list[onnx.NodeProto] = []
    for node in view.nodes:
        if node.op_type not in lacking or node.domain not in STANDARD_DOMAINS:
            kept.append(node)
            continue
        expanded = expand_layernorm(view, node)
        if expanded is None:
            raise ValueError(f"cannot write {node.op_type} '{node.name}' as standard ops")
        kept.extend(expanded[0])
        model.graph.initializer.extend(expanded[1])
    del model.graph.node[:]
    model.graph.node.extend(kept)


@register
class OrtTransformerFusion(GraphPattern):
    name = "ort-transformer"
    serves = tuple(FUSED_OPS)
    group = "transformer"
    targets = ("ort",)
    summary = "onnxruntime.transformers fusions: Attention, (Skip)LayerNorm, Gelu, BiasGelu"

    def run(
        self, model: onnx.ModelProto, enabled: set[str], types: dict[str, onnx.TypeProto]
    ) -> GraphOutcome:
        try:
            from onnxruntime.transformers.optimizer import optimize_model  # noqa: F401
        except ImportError as exc:
            return GraphOutcome(None, declined=[_decline(f"onnxruntime.transformers: {exc}")])
        # Masks in forms ORT's attention matcher does not know are rewritten first (same
        # numbers); the rewrite is kept only where attention then fuses.
        masks = MaskRewrite(None, 0, [])
        if "attention" in enabled:
            masks = normalize_attention_masks(model, types)
        if masks.model is None:
            return _fuse_with_ort(model, model, enabled, types, masks.declined)
        outcome = _fuse_with_ort(model, masks.model, enabled, types, masks.declined)
        if outcome.fired.get("attention"):
            outcome.info["attention_masks_rewritten"] = masks.rewritten
            return outcome
        plain = _fuse_with_ort(model, model, enabled, types, masks.declined)
        why = [d for d in outcome.declined if d["pattern"] == "attention"]
        plain.declined = why + [d for d in plain.declined if d["pattern"] != "attention"]
        return plain


def _fuse_with_ort(
    model: onnx.ModelProto,
    prepared: onnx.ModelProto,
    enabled: set[str],
    types: dict[str, onnx.TypeProto],
    mask_notes: list[str],
) -> GraphOutcome:
    """ORT's fusions run on `prepared` (`model` or an exact rewrite of it), judged
    against `model`: op counts, the checker and probe runs."""
    # ONNX Runtime re-runs its symbolic shape inference up to four times (seconds on
    # a large graph) only to keep SkipLayerNormalization off broadcasting Adds. So
    # run without it, then prove the new SkipLayerNormalization inputs have one
    # shape: by ONNX's inference, else by one symbolic inference of our own, else by
    # running ONNX Runtime's optimizer again with its checks on.
    result, stats, capture = _optimize(prepared, enabled, shape_inference=False)
    info: dict[str, Any] = {}
    unproven = _unproven_skips(prepared, result, types)
    if unproven:
        unproven = _unproven_at_probe_sizes(prepared, result)
    if unproven:
        unproven = _unproven_skips(prepared, result, {**types, **_symbolic_types(prepared)})
    if unproven:
        result, stats, capture = _optimize(prepared, enabled, shape_inference=True)
        info["ort_symbolic_shape_inference"] = True
    info["ort_fused_operators"] = {k: v for k, v in stats.items() if v}
    _standard_clean(result)
    if "skip-layernorm" not in enabled:
        moved = bias_after_residual(result)
        if moved:
            info["bias_after_residual"] = moved
    before, after = _op_counts(model), _op_counts(result)
    declined: list[dict[str, str]] = []
    attention_ops = FUSED_OPS["attention"]
    if "attention" in enabled and sum(after[op] - before[op] for op in attention_ops) <= 0:
        why = _messages(capture)
        reason = "; ".join(why[-3:]) if why else "no attention subgraph matched"
        reason = "; ".join([reason, *mask_notes[:2]])
        declined.append({"pattern": "attention", "node": "", "reason": reason})
    if after == before:
        return GraphOutcome(None, declined=declined, info=info)
    # serialized once for the checker and the probe session (seconds on a large model)
    payload = None if has_external_tensors(result) else result.SerializeToString()
    try:
        onnx.checker.check_model(payload if payload is not None else result)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        reason = f"the fused model fails the ONNX checker ({first}); nothing fused"
        return GraphOutcome(None, declined=[_decline(reason)], info=info)
    problem = _probe_differs(model, payload if payload is not None else result)
    if problem:
        reason = f"ONNX Runtime's fusions changed what the graph computes ({problem}); "
        return GraphOutcome(None, declined=[_decline(reason + "nothing fused")], info=info)
    fired = {
        name: max(0, sum(after[op] for op in ops) - sum(before[op] for op in ops))
        for name, ops in FUSED_OPS.items()
        if name in enabled
    }
    return GraphOutcome(
        result,
        fired={k: v for k, v in fired.items() if v},
        declined=declined,
        info=info,
        payload=payload,
    )


def _probe_differs(before: onnx.ModelProto, after: onnx.ModelProto | bytes) -> str | None:
    """Run both graphs on probe inputs; a description of a difference, or None.

    ORT's pattern matchers assume exporter-shaped graphs: a Reshape target with batch and
    sequence swapped still fuses into Attention, with other output shapes. The probes
    use batch 1 and 2 with sequence 32 (distinct, so such swaps show) and 0/1 integers
    (valid ids, masks and token types), so the check holds even under --no-verify.
    """
    import numpy as np

    from optimodel.data import load_data, model_input_specs
    from optimodel.errors import OptimodelError
    from optimodel.runtime.sessions import SessionConfig, create_session, run_session

    specs = model_input_specs(before)
    # The graphs as written are what is compared: ORT's own rewrites would only add load time.
    config = SessionConfig(optimization="disable")
    ref_session = after_session = None
    for batch_size in (1, 2):
        try:
            data = load_data(
                "random", specs, batch_size=batch_size, num_samples=1, int_range=(0, 1)
            )
            feed = next(iter(data)).feed
            ref_session = ref_session or create_session(before, config, source="before fusion")
            ref = run_session(ref_session, feed)
        except OptimodelError:
            continue  # the input does not run on this probe: the pipeline judges it
        try:
            after_session = after_session or create_session(after, config, source="after fusion")
            got = run_session(after_session, feed)
        except OptimodelError as exc:
            return f"the fused graph fails on a probe input: {exc.message[:120]}"
        names = [o.name for o in ref_session.get_outputs()]
        for name, a, b in zip(names, ref, got, strict=False):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape:
                return f"output '{name}' has shape {list(b.shape)}, not {list(a.shape)}"
            if a.dtype.kind == "f":
                bound = 1e-4 + 1e-3 * float(np.abs(a).max(initial=0.0))
                if float(np.abs(a.astype(np.float64) - b).max(initial=0.0)) > bound:
                    return f"output '{name}' differs on a probe input"
    return None


def _constant(model: onnx.ModelProto, name: str) -> Any:
    for init in model.graph.initializer:
        if init.name == name:
            return tensor_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    return tensor_array(a.t)
    return None


def _last_dim(model: onnx.ModelProto, producer: dict[str, Any], name: str) -> int | None:
    """Last entry of a 4-D Reshape target: a constant, or the constant tail of a Concat."""
    shape = _constant(model, name)
    if shape is not None:
        return int(shape[-1]) if shape.ndim == 1 and len(shape) == 4 else None
    concat = producer.get(name)
    if concat is None or concat.op_type != "Concat" or not concat.input:
        return None
    tail = _constant(model, concat.input[-1])
    if tail is None or tail.size == 0:
        return None
    return int(tail.reshape(-1)[-1])


def attention_dims(model: onnx.ModelProto) -> tuple[int, int]:
    """(num_heads, hidden_size) read from the graph, or (0, 0) to let ORT detect them.

    ORT detects them from the Reshape that splits heads, which fails when an exporter
    writes the head count as -1 (`view(batch, seq, -1, head_size)`, transformers >= 5).
    Here: head size from that Reshape's last dim, hidden size from the projection weight
    feeding it (MatMul [hidden, hidden], possibly through a bias Add).
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    found: Counter[tuple[int, int]] = Counter()
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        head_size = _last_dim(model, producer, node.input[1])
        if head_size is None or head_size <= 0:
            continue
        source = producer.get(node.input[0])
        if source is not None and source.op_type == "Add":
            source = next(
                (
                    producer[i]
                    for i in source.input
                    if i in producer and producer[i].op_type == "MatMul"
                ),
                None,
            )
        if source is None or source.op_type != "MatMul":
            continue
        weight = _constant(model, source.input[1])
        if weight is None or weight.ndim != 2:
            continue
        hidden = int(weight.shape[1])
        if hidden % head_size == 0 and hidden // head_size > 1:
            found[(hidden // head_size, hidden)] += 1
    if not found:
        return 0, 0
    return found.most_common(1)[0][0]


def _optimize(
    model: onnx.ModelProto, enabled: set[str], *, shape_inference: bool
) -> tuple[onnx.ModelProto, dict[str, int], _Capture]:
    """One run of ONNX Runtime's BERT fusions on a copy, logging captured."""
    from onnxruntime.transformers.optimizer import optimize_model

    options = _options(enabled)
    options.enable_shape_inference = shape_inference
    num_heads, hidden_size = attention_dims(model)
    with _captured() as capture:
        optimizer = optimize_model(
            copy_model(model),
            model_type="bert",
            num_heads=num_heads,
            hidden_size=hidden_size,
            optimization_options=options,
            opt_level=0,
        )
        stats = optimizer.get_fused_operator_statistics()
    result: onnx.ModelProto = optimizer.model
    result.producer_name, result.producer_version = model.producer_name, model.producer_version
    return result, stats, capture


def _same_dims(a: onnx.TypeProto | None, b: onnx.TypeProto | None) -> bool:
    """Both 3-D with every dim equal: the same number or the same symbol."""
    if a is None or b is None or not a.tensor_type.HasField("shape"):
        return False
    if not b.tensor_type.HasField("shape"):
        return False
    da, db = a.tensor_type.shape.dim, b.tensor_type.shape.dim
    if len(da) != 3 or len(db) != 3:
        return False
    for x, y in zip(da, db, strict=True):
        if x.HasField("dim_value") and y.HasField("dim_value"):
            if x.dim_value != y.dim_value:
                return False
        elif not (x.dim_param and x.dim_param == y.dim_param):
            return False
    return True


def _unproven_skips(
    model: onnx.ModelProto, result: onnx.ModelProto, types: dict[str, onnx.TypeProto]
) -> list[str]:
    """New SkipLayerNormalization nodes not shown to add two tensors of one shape."""
    known = {n.name for n in model.graph.node}
    return [
        node.name
        for node in result.graph.node
        if node.op_type.startswith("Skip")
        and node.op_type.endswith("LayerNormalization")
        and node.name not in known
        and (
            len(node.input) < 2
            or not _same_dims(types.get(node.input[0]), types.get(node.input[1]))
        )
    ]


# Concrete sizes for every dynamic input dim: two, so that a broadcasting Add cannot hide
# behind a size that happens to match (a dim of 1 against a broadcast 1).
PROBE_SIZES = (29, 37)


def _unproven_at_probe_sizes(model: onnx.ModelProto, result: onnx.ModelProto) -> list[str]:
    """New skips whose two inputs do not have one shape at every probe size.

    ONNX Runtime's symbolic inference with the dynamic dims fixed: 0.04 s on PP-OCR rec,
    where symbolic dims (sympy) take 0.4 s. What this cannot show, symbols decide.
    """
    unproven: set[str] = set()
    for size in PROBE_SIZES:
        types = _symbolic_types(model, size)
        if not types:
            return _unproven_skips(model, result, {})
        now = _unproven_skips(model, result, types)
        if now:  # an input a fusion made (EmbedLayerNormalization's): the fused graph's type
            now = _unproven_skips(model, result, {**_symbolic_types(result, size), **types})
        unproven.update(now)
    return sorted(unproven)


def _symbolic_types(model: onnx.ModelProto, size: int | None = None) -> dict[str, onnx.TypeProto]:
    """Types from ONNX Runtime's symbolic shape inference, or {}.

    `size`: every dynamic input dim set to it first (concrete dims, fast); else the dims
    stay symbols (expressions of the input dims).
    """
    # The transformers package's own entry: `onnxruntime.tools` imports torch when present.
    from onnxruntime.transformers.shape_infer_helper import SymbolicShapeInferenceHelper

    light = shapes_only(model)
    if size is not None:
        for value in light.graph.input:
            shape = value.type.tensor_type.shape if value.type.HasField("tensor_type") else None
            for dim in shape.dim if shape is not None else ():
                if not dim.HasField("dim_value"):
                    dim.Clear()
                    dim.dim_value = size
    try:
        with _captured():
            inferred = SymbolicShapeInferenceHelper.infer_shapes(
                light, auto_merge=True, guess_output_rank=False
            )
    except Exception:  # it refuses some graphs (custom ops); then the slow path decides
        return {}
    return value_types(inferred) if inferred is not None else {}


def _decline(reason: str) -> dict[str, str]:
    return {"pattern": "ort-transformer", "node": "", "reason": reason}
