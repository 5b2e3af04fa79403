"""fuse: operator fusion by named patterns (`optimodel.fusions`), verified as exact.

The preset picks pattern groups by what the graph holds (`auto`: CNN patterns when it
has convolutions, transformer patterns when it has attention-like MatMul + Softmax, a
decomposed LayerNorm or an Erf GELU; common patterns always). The target decides which ops a fusion
may produce: `ort` lets ONNX Runtime's transformer optimizer write com.microsoft ops
(Attention, BiasGelu, ...), `portable` keeps to standard ONNX. Patterns in
`OFF_BY_DEFAULT` (SkipLayerNormalization: slower than Add + LayerNormalization on ONNX
Runtime's CPU) run only when `enable` names them.

Local patterns run in rounds until none fires, so chains collapse and a second run
changes nothing. A pattern that does not apply says why (`declined`); one that raises
is declined as an internal error and the graph stays as it was before that match (a
failing whole-graph fusion is declined under its own name, e.g. `ort-transformer`).
The model need not be folded first: Constant-node weights count as constants. Fusions
work on the main graph; subgraph bodies are left as they are.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import onnx

from optimodel.errors import UsageError
from optimodel.fusions import (
    GROUPS,
    OFF_BY_DEFAULT,
    TARGETS,
    GraphView,
    Pattern,
    Rewrite,
    all_names,
    ensure_order,
    graph_patterns,
    node_patterns,
    node_reads,
    pattern_names,
    shapes_only,
)
from optimodel.graphs import (
    MS_DOMAIN,
    STANDARD_DOMAINS,
    copy_model,
    has_subgraph,
    rename_uses,
    value_types,
)
from optimodel.modelio import iter_tensors
from optimodel.passes.base import Pass, PassResult, register_pass

PRESETS = ("auto", "cnn", "transformer")
MAX_ROUNDS = 8
# Warned about when a transformer graph ends up without any of their fused ops.
WATCHED = {
    "attention": {"Attention", "MultiHeadAttention", "GroupQueryAttention"},
    "layernorm": {
        "LayerNormalization",
        "SkipLayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
    },
}
# Never removed even when nothing reads them: random draws differ from run to run.
NOT_REMOVABLE = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}


def _skip_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [str(v).strip() for v in value if str(v).strip()]


def detect_groups(view: GraphView) -> list[str]:
    """Pattern groups worth running on this graph (the `auto` preset)."""
    groups = []
    if _looks_transformer(view):
        groups.append("transformer")
    if view.by_op.get("Conv") or view.by_op.get("ConvTranspose"):
        groups.append("cnn")
    groups.append("common")
    return groups


def _looks_transformer(view: GraphView) -> bool:
    """Attention (MatMul of two activations + Softmax), a decomposed LayerNorm, or Erf GELU."""
    if view.by_op.get("Erf"):
        return True
    if view.by_op.get("Softmax") and any(
        view.const(m.input[0]) is None and view.const(m.input[1]) is None
        for m in view.by_op.get("MatMul", [])
    ):
        return True
    return any(
        any(r.op_type == "Sub" for r in view.readers(m.output[0]))
        for m in view.by_op.get("ReduceMean", [])
    )


def _infer(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """ONNX shape inference (on a copy without large weights: their values do not matter
    to shapes, and serializing them is most of the cost)."""
    light = shapes_only(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception:  # shape inference failing must not stop fusion; work without types
        return value_types(model)
    return {**value_types(model), **value_types(inferred)}


def _half_precision(model: onnx.ModelProto) -> bool:
    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return any(t.data_type in half for t in iter_tensors(model))


def _decline(pattern: str, node: onnx.NodeProto | None, reason: str) -> dict[str, str]:
    name = "" if node is None else node.name or (node.output[0] if node.output else "")
    return {"pattern": pattern, "node": name, "reason": reason}


def _unsafe(view: GraphView, rewrite: Rewrite) -> str | None:
    """Why applying the rewrite would lose a value still in use, if it would."""
    removed = {id(n) for n in rewrite.remove}
    produced = {o for n in rewrite.add for o in n.output}
    for key in rewrite.rename:
        if key in view.outputs:
            return f"value '{key}' is a graph output and cannot be bypassed"
    for node in rewrite.remove:
        for out in node.output:
            if not out or out in produced or out in rewrite.rename:
                continue
            if out in view.outputs:
                return f"matched value '{out}' is a graph output"
            if any(id(r) not in removed for r in view.readers(out)):
                return f"matched value '{out}' is used outside the pattern"
    return None


def _collect(
    pattern: Pattern,
    view: GraphView,
    declined: list[dict[str, str]],
    errors: list[dict[str, str]],
) -> list[Rewrite]:
    """Every non-overlapping match of one pattern; overlapping ones wait for the next round."""
    claimed: set[int] = set()
    rewrites: list[Rewrite] = []
    for op_type in pattern.anchors:
        for node in view.by_op.get(op_type, []):
            if id(node) in claimed:
                continue
            try:
                found = pattern.match(view, node)
            except Exception as exc:  # a pattern bug must decline, never lose the model
                reason = f"internal error {type(exc).__name__}: {str(exc)[:160]}"
                errors.append(_decline(pattern.name, node, reason))
                continue
            if found is None:
                continue
            if isinstance(found, str):
                declined.append(_decline(pattern.name, node, found))
                continue
            ids = {id(n) for n in found.remove}
            if ids & claimed:
                continue
            problem = _unsafe(view, found)
            if problem:
                declined.append(_decline(pattern.name, node, problem))
                continue
            claimed |= ids
            rewrites.append(found)
    return rewrites


def _apply(graph: onnx.GraphProto, view: GraphView, rewrites: list[Rewrite]) -> set[str]:
    """Swap matched nodes for their replacements in place; returns the values they read."""
    order = {id(n): i for i, n in enumerate(view.nodes)}
    removed: set[int] = set()
    place: dict[int, list[onnx.NodeProto]] = {}
    touched: set[str] = set()
    for rw in rewrites:
        removed.update(id(n) for n in rw.remove)
        last = max(rw.remove, key=lambda n: order[id(n)])
        place[id(last)] = rw.add
        touched.update(i for n in rw.remove for i in n.input if i)
    nodes: list[onnx.NodeProto] = []
    for node in view.nodes:
        if id(node) in removed:
            nodes.extend(place.get(id(node), ()))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(t for rw in rewrites for t in rw.initializers)
    renames = {k: v for rw in rewrites for k, v in rw.rename.items()}
    for old, new in renames.items():
        seen = {old}
        while new in renames and new not in seen:  # chains: a -> b -> c
            seen.add(new)
            new = renames[new]
        rename_uses(graph, old, new)
        touched.add(new)
    return touched


def _drop_unused(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove what fused nodes read and nothing reads any more: initializers, Shape chains.

    Only values upstream of a fusion are considered, and only standard-domain nodes
    without subgraphs or randomness go, so the pass never does fold's job elsewhere.
    """
    outputs = {o.name for o in graph.output}
    inputs = {i.name for i in graph.input}
    initializers = {t.name for t in graph.initializer}
    nodes = list(graph.node)
    reads: Counter[str] = Counter()
    for node in nodes:
        reads.update(node_reads(node))
    producer = {o: n for n in nodes for o in n.output if o}
    dead_nodes: set[int] = set()
    dead_inits: set[str] = set()
    pending = list(candidates)
    while pending:
        name = pending.pop()
        if reads[name] > 0 or name in outputs or name in inputs:
            continue
        node = producer.get(name)
        if node is None:
            if name in initializers:
                dead_inits.add(name)
            continue
        if (
            id(node) in dead_nodes
            or node.domain not in STANDARD_DOMAINS
            or node.op_type in NOT_REMOVABLE
            or has_subgraph(node)
            or any(reads[o] > 0 or o in outputs for o in node.output if o)
        ):
            continue
        dead_nodes.add(id(node))
        for read in node_reads(node):
            reads[read] -= 1
            pending.append(read)
    if dead_inits:
        kept_inits = [t for t in graph.initializer if t.name not in dead_inits]
        del graph.initializer[:]
        graph.initializer.extend(kept_inits)
    if dead_nodes:
        kept = [n for n in nodes if id(n) not in dead_nodes]
        del graph.node[:]
        graph.node.extend(kept)


def _import_domains(model: onnx.ModelProto) -> bool:
    """Import the com.microsoft opset when a fusion wrote one of its ops; whether it did."""
    used = {n.domain for n in model.graph.node}
    imported = {o.domain for o in model.opset_import}
    if MS_DOMAIN in used and MS_DOMAIN not in imported:
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
        return True
    return False


class _Run:
    """State of one fuse run: the model being rewritten and what each pattern did."""

    def __init__(
        self,
        model: onnx.ModelProto,
        types: dict[str, onnx.TypeProto],
        target: str,
        groups: list[str],
        enabled: set[str],
    ) -> None:
        self.model, self.types, self.target = model, types, target
        self.groups, self.enabled = groups, enabled
        self.fired: Counter[str] = Counter()
        self.declined: list[dict[str, str]] = []
        self.errors: list[dict[str, str]] = []
        self.info: dict[str, Any] = {}
        self.changed = False
        self.round = 0
        self.payload: bytes | None = None  # the current model's bytes, while they hold

    def graph_patterns(self) -> None:
        """Whole-graph fusions first (ONNX Runtime's transformer optimizer)."""
        for gp in graph_patterns():
            served = set(gp.serves) & self.enabled
            if gp.group not in self.groups or self.target not in gp.targets or not served:
                continue
            try:
                outcome = gp.run(self.model, served, self.types)
            except Exception as exc:  # a library failure declines; the model stays as it was
                reason = f"failed: {type(exc).__name__}: {str(exc).strip()[:200]}"
                self.errors.append(_decline(gp.name, None, reason))
                continue
            self.fired.update(outcome.fired)
            self.declined.extend(outcome.declined)
            self.info.update(outcome.info)
            if outcome.model is not None:
                self.model, self.changed = outcome.model, True
                self.payload = outcome.payload
                # Kept names keep their meaning, so types known before still hold where
                # inference cannot see through com.microsoft ops.
                self.types = {**self.types, **_infer(self.model)}

    def rounds(self, limit: int) -> None:
        """Local patterns until none fires; declines are those of the final graph."""
        patterns = [
            p for p in node_patterns() if p.name in self.enabled and self.target in p.targets
        ]
        names = all_names(self.model)
        last: list[dict[str, str]] = []
        refine = False
        while self.round < limit:
            self.round += 1
            if refine:  # constant shapes written last round resolve more ranks
                self.types = {**self.types, **_infer(self.model)}
            last, fired, view, refine = [], 0, None, False
            for pattern in patterns:
                if view is None:
                    view = GraphView(self.model, self.types, self.target, names)
                rewrites = _collect(pattern, view, last, self.errors)
                if rewrites:
                    touched = _apply(self.model.graph, view, rewrites)
                    _drop_unused(self.model.graph, touched)
                    self.fired[pattern.name] += len(rewrites)
                    fired += len(rewrites)
                    refine = refine or pattern.refines_types
                    view, self.changed, self.payload = None, True, None
            if not fired:
                break
        self.declined.extend(last)


@register_pass
class FusePass(Pass):
    """Named, skippable fusions that keep the model's outputs exactly."""

    name = "fuse"
    summary = (
        "Conv+BN, Conv+Mul/Add, Pad+Conv, MatMul+Add->Gemm, Transpose/Reshape chains, "
        "LayerNorm / GELU / SkipLayerNorm / Attention"
    )
    tolerance = "exact"
    defaults = {
        "preset": "auto",
        "target": "ort",
        "skip": [],
        "enable": [],
        "max_rounds": MAX_ROUNDS,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["preset"] not in PRESETS:
            raise UsageError(
                f"fuse: unknown preset '{self.options['preset']}'; use {', '.join(PRESETS)}"
            )
        if self.options["target"] not in TARGETS:
            raise UsageError(
                f"fuse: unknown target '{self.options['target']}'; use {', '.join(TARGETS)}"
            )
        self.options["skip"] = _skip_list(self.options["skip"])
        self.options["enable"] = _skip_list(self.options["enable"])
        known = pattern_names()
        unknown = [s for s in self.options["skip"] if s not in known]
        if unknown:
            raise UsageError(
                f"fuse: unknown pattern(s) {', '.join(unknown)}; patterns: {', '.join(known)}"
            )
        odd = [s for s in self.options["enable"] if s not in OFF_BY_DEFAULT]
        if odd:
            raise UsageError(
                f"fuse: --enable {', '.join(odd)}: only patterns off by default can be "
                f"turned on ({', '.join(OFF_BY_DEFAULT)}); the others run unless --skip"
            )

    def run(self, model: onnx.ModelProto) -> PassResult:
        # Folding weights changes where fp16/bf16 rounds, so a half-precision model is
        # held to the fp16 yardstick; float32 models stay exact.
        self.tolerance = "fp16" if _half_precision(model) else type(self).tolerance
        target, skip = str(self.options["target"]), set(self.options["skip"])
        preset = str(self.options["preset"])
        types = _infer(model)
        groups = (
            detect_groups(GraphView(model, types, target))
            if preset == "auto"
            else [g for g in GROUPS if g in (preset, "common")]
        )
        off = set(OFF_BY_DEFAULT) - set(self.options["enable"])
        enabled = {n for n, g in pattern_names().items() if g in groups and n not in skip | off}
        # Whole-graph fusions read the input and return a new model; the local rounds
        # rewrite in place, so they get a copy (0.06 s per 90 MB) only if still needed.
        run = _Run(model, types, target, groups, enabled)
        run.graph_patterns()
        if run.model is model:
            run.model = copy_model(model)
        run.rounds(int(self.options["max_rounds"]))
        if run.changed:
            if ensure_order(run.model.graph) | _import_domains(run.model):
                run.payload = None
        runnable = {p.name for p in node_patterns() if target in p.targets}
        for gp in graph_patterns():
            if target in gp.targets:
                runnable.update(gp.serves)
        declined = _unique(run.declined + run.errors)
        stats: dict[str, Any] = {
            "preset": preset,
            "target": target,
            "groups": groups,
            "fired": {n: run.fired.get(n, 0) for n in sorted(enabled & runnable)},
            "rounds": run.round,
        }
        if skip:
            stats["skipped"] = sorted(skip)
        held = sorted(n for n in off if n in runnable and pattern_names()[n] in groups)
        if held:
            stats["off_by_default"] = {n: OFF_BY_DEFAULT[n] for n in held}
        if self.tolerance != type(self).tolerance:
            stats["tolerance"] = f"{self.tolerance} (half-precision weights round differently)"
        stats.update(run.info)
        present = {n.op_type for n in run.model.graph.node}
        warnings = self._warnings(groups, enabled, run.fired, declined, target, present)
        warnings += [
            f"--enable {n}: it writes com.microsoft ops, so it runs with --target ort only"
            for n in self.options["enable"]
            if n not in runnable
        ]
        if warnings:
            stats["warnings"] = warnings
        return PassResult(run.model, run.changed, stats, declined, payload=run.payload)

    @staticmethod
    def _warnings(
        groups: list[str],
        enabled: set[str],
        fired: Counter[str],
        declined: list[dict[str, str]],
        target: str,
        present: set[str],
    ) -> list[str]:
        """Say so when a transformer graph has no fused Attention or LayerNorm after the pass."""
        if "transformer" not in groups:
            return []
        warnings = []
        for name, fused_ops in WATCHED.items():
            if name not in enabled or fired.get(name) or present & fused_ops:
                continue
            if name == "attention" and target == "portable":
                warnings.append(
                    "attention not fused: standard ONNX has no Attention op before opset 23; "
                    "--target ort fuses it into ONNX Runtime's Attention"
                )
                continue
            why = next((d["reason"] for d in declined if d["pattern"] == name), None)
            warnings.append(f"{name} fused 0 times" + (f": {why}" if why else ""))
        return warnings


def _unique(entries: list[dict[str, str]]) -> list[dict[str, str]]:
    seen: set[tuple[str, str, str]] = set()
    out = []
    for e in entries:
        key = (e["pattern"], e["node"], e["reason"])
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out
