"""prune: magnitude (unstructured), N:M and channel pruning, saying what each one buys.

- `unstructured` zeros the smallest weights. Dense kernels do the same work with zeros, so
  the gain is the compressed size (reported as deflate of the serialized model), not speed.
- `n:m` (e.g. 2:4) keeps the n largest of every m weights along the reduction axis: the
  layout sparse tensor cores use; ONNX Runtime's own kernels do not exploit it.
- `channel` removes whole output channels and shrinks every dependent tensor, so the model
  has fewer parameters and MACs and runs faster on any backend.

Pruning changes outputs by design, so the pipeline verifies this pass with tolerance
"none"; the pass reports its own fidelity (cosine against the input) and, for `channel`,
checks the rewrite itself exactly: the pruned model must equal the original with the
removed channels' rows zeroed in the layers that read them. `accuracy_budget` with
`eval_data` backs off the most sensitive units until the measured drop fits (task points
with labels, (1 - cosine) x 100 against the input model without).
"""

from __future__ import annotations

import math
import tempfile
from typing import Any

import numpy as np
import onnx

from optimodel.errors import GateFailed, OptimodelError, UsageError
from optimodel.fusions.fused_conv import expand_fused_conv
from optimodel.graphs import copy_model
from optimodel.modelio import tensor_array
from optimodel.passes.base import Pass, PassResult, register_pass
from optimodel.pruning import channel as ch
from optimodel.pruning.common import (
    compressed_size,
    count_parameters,
    find_layer_weights,
    write_initializer,
)
from optimodel.pruning.magnitude import global_counts, layer_counts, prune_unstructured
from optimodel.pruning.nm import check_nm, parse_pattern, prune_nm
from optimodel.pruning.search import AccuracyProbe, backoff_search, ladders, sensitivity_table

GRANULARITIES = ("unstructured", "channel", "n:m")
FIDELITY_FEEDS = 2  # random feeds when no data is given
FIDELITY_SAMPLES = 64  # samples taken from --eval-data / --calib-data
# Recovery keeps improving with calibration data (benchmarks/prune_calibration.py: MiniLM
# 50%, held-out embedding cosine 0.947 from 100 sentences, 0.960 from 300, 0.968 from
# 1,000, 0.971 from 2,500), so the cap is high; the statistics kept do not grow with it.
CALIB_SAMPLES = 1024


def parse_granularity(granularity: str, pattern: str | None) -> tuple[str, tuple[int, int] | None]:
    """'unstructured' | 'channel' | 'n:m' (with pattern) | '2:4' -> (kind, (n, m) or None)."""
    text = (granularity or "").strip().lower()
    if text in ("unstructured", "channel"):
        if pattern:
            raise UsageError(f"--pattern applies to --granularity n:m, not '{granularity}'")
        return text, None
    if text in ("n:m", "nm"):
        if not pattern:
            raise UsageError("--granularity n:m needs --pattern N:M, e.g. --pattern 2:4")
        return "n:m", parse_pattern(pattern)
    if ":" in text:
        nm = parse_pattern(text)
        if pattern and parse_pattern(pattern) != nm:
            raise UsageError(f"--granularity {granularity} conflicts with --pattern {pattern}")
        return "n:m", nm
    raise UsageError(
        f"unknown --granularity '{granularity}'; choose unstructured, channel, n:m or N:M (2:4)"
    )


def parse_levels(value: Any) -> list[float]:
    """`0.25,0.5,0.75` (or a list) -> sparsities for --sensitivity, each in (0, 1)."""
    if value in (None, "", []):
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        levels = [float(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise UsageError(f"--sensitivity {value}: give sparsities such as 0.25,0.5,0.75") from None
    if not levels or any(not 0.0 < v < 1.0 for v in levels):
        raise UsageError(f"--sensitivity {value}: every level must be in (0, 1)")
    return levels


def _sparsity(array: np.ndarray) -> float:
    return float(np.count_nonzero(array == 0)) / array.size if array.size else 0.0


def _model_zeros(model: onnx.ModelProto) -> tuple[int, int]:
    """Zero and total elements of the float initializers of the main graph."""

    from optimodel.pruning.common import FLOAT_TYPES

    zeros = total = 0
    for tensor in model.graph.initializer:
        if tensor.data_type in FLOAT_TYPES and tensor.data_location != onnx.TensorProto.EXTERNAL:
            array = tensor_array(tensor)
            zeros += int(np.count_nonzero(array == 0))
            total += array.size
    return zeros, total


def _channel_ladder(ratio: float, channels: int, multiple: int) -> list[float]:
    """Search rungs for one group, one per distinct kept-channel count (rounding to a
    multiple can map several ratios onto the same count)."""
    rungs: list[float] = []
    seen: set[int] = set()
    for ratio_ in ladders([ratio])[0]:
        kept = ch.keep_count(channels, int(round(ratio_ * channels)), multiple)
        if kept not in seen:
            seen.add(kept)
            rungs.append(1 - kept / channels)
    return rungs if rungs[-1] == 0.0 else [*rungs, 0.0]


@register_pass
class PrunePass(Pass):
    """Prune weights or channels to a requested sparsity; report size, MACs and fidelity."""

    name = "prune"
    summary = "magnitude / N:M / channel pruning; channel really removes channels"
    tolerance = "none"
    defaults = {
        "sparsity": None,
        "granularity": "unstructured",
        "pattern": None,
        "scope": "layer",
        "norm": "l1",
        "min_params": 1024,
        "max_layer_sparsity": 0.9,
        "channel_multiple": 8,
        "exclude_nodes": [],
        "exclude_ops": [],
        "accuracy_budget": None,
        "eval_data": None,
        "eval_batch_size": 64,
        "max_trials": 60,
        "calib_data": None,
        "calib_samples": CALIB_SAMPLES,
        "data": None,
        "shapes": {},
        "check_rewrite": True,
        "sensitivity": None,
        "keep_best": False,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        self.kind, self.nm = parse_granularity(str(o["granularity"]), o["pattern"])
        if o["scope"] not in ("layer", "global"):
            raise UsageError(f"unknown --scope '{o['scope']}'; choose layer or global")
        if o["norm"] not in ("l1", "l2"):
            raise UsageError(f"unknown --norm '{o['norm']}'; choose l1 or l2")
        sparsity = o["sparsity"]
        if self.nm is not None:
            implied = 1 - self.nm[0] / self.nm[1]
            if sparsity is not None and abs(float(sparsity) - implied) > 1e-6:
                raise UsageError(
                    f"--sparsity {sparsity} conflicts with pattern {self.nm[0]}:{self.nm[1]}, "
                    f"which is {implied:g} sparse; leave --sparsity out"
                )
            self.sparsity = implied
        else:
            if sparsity is None:
                raise UsageError(f"--granularity {self.kind} needs --sparsity S (0 <= S < 1)")
            self.sparsity = float(sparsity)
            if not 0.0 <= self.sparsity < 1.0:
                raise UsageError(f"--sparsity must be in [0, 1), got {sparsity}")
        if o["accuracy_budget"] is not None:
            if not o["eval_data"]:
                raise UsageError(
                    "--accuracy-budget needs --eval-data (with 'labels': task points; "
                    "without: (1 - cosine) x 100 against the unpruned model)"
                )
            if float(o["accuracy_budget"]) < 0:
                raise UsageError("--accuracy-budget must be >= 0 points")
        self.levels = parse_levels(o["sensitivity"])
        if self.levels and not o["eval_data"]:
            raise UsageError("--sensitivity needs --eval-data to measure each unit on")
        if self.levels and self.nm is not None:
            raise UsageError("--sensitivity applies to unstructured and channel pruning")
        if int(o["calib_samples"]) < 1:
            raise UsageError(f"--calib-samples {o['calib_samples']}: must be at least 1")
        if int(o["channel_multiple"]) < 1:
            raise UsageError("--channel-multiple must be >= 1")
        if not 0.0 < float(o["max_layer_sparsity"]) <= 1.0:
            raise UsageError("max_layer_sparsity must be in (0, 1]")
        self._calib: list[Any] | None = None
        self._sensitivity: dict[str, Any] | None = None

    # ----------------------------------------------------------------- helpers

    def _excluded(self) -> tuple[set[str], set[str]]:
        return set(self.options["exclude_nodes"] or []), set(self.options["exclude_ops"] or [])

    def _batches(self, model: onnx.ModelProto, source: str | None, samples: int) -> list[Any]:
        """Feeds from a data file (`samples` of them, 16 a feed) or a few random ones."""
        from optimodel.data import load_data, model_input_specs

        random = source in (None, "random")
        data = load_data(
            source,
            model_input_specs(model),
            shapes=dict(self.options["shapes"] or {}),
            num_samples=FIDELITY_FEEDS if random else samples,
            batch_size=1 if random else 16,
        )
        return list(data)

    def _fidelity(
        self, original: onnx.ModelProto, pruned: onnx.ModelProto, batches: list[Any]
    ) -> dict[str, Any]:
        """Cosine / max abs diff of every output against the input model."""
        from optimodel.verify import verify_models

        try:
            result = verify_models(original, pruned, batches, tolerance="none")
        except OptimodelError as exc:
            return {"error": exc.message}
        return {
            "feeds": result.feeds,
            "cosine": result.worst_cosine,
            "max_abs": result.worst_max_abs,
            "outputs": {
                o.name: {"cosine": o.cosine, "max_abs": o.max_abs, "top1": o.top1_agreement}
                for o in result.outputs
            },
        }

    def _probe(self, model: onnx.ModelProto, workdir: str) -> AccuracyProbe:
        from optimodel.data import load_data, model_input_specs

        dataset = load_data(
            self.options["eval_data"],
            model_input_specs(model),
            shapes=dict(self.options["shapes"] or {}),
            batch_size=int(self.options["eval_batch_size"]),
        )
        return AccuracyProbe(model, dataset, workdir)

    # ----------------------------------------------------------------- run

    def run(self, model: onnx.ModelProto) -> PassResult:
        original = copy_model(model)
        expand_fused_conv(original)  # channel rules and re-fits read Conv, not FusedConv
        with tempfile.TemporaryDirectory(prefix="optimodel-prune-") as workdir:
            if self.kind == "channel":
                pruned, stats, declined = self._channel(original, workdir)
            else:
                pruned, stats, declined = self._weights(original, workdir)
        stats["parameters"] = {
            "before": count_parameters(original),
            "after": count_parameters(pruned),
        }
        zeros_before, total_before = _model_zeros(original)
        zeros_after, total_after = _model_zeros(pruned)
        stats["nonzero_parameters"] = {
            "before": total_before - zeros_before,
            "after": total_after - zeros_after,
        }
        stats["model_sparsity"] = zeros_after / total_after if total_after else 0.0
        if self._sensitivity is not None:
            stats["sensitivity"] = self._sensitivity
        before, after = compressed_size(original), compressed_size(pruned)
        stats["compressed_bytes"] = {
            "before": before,
            "after": after,
            "ratio": after / before if before else 1.0,
        }
        modified = stats.get("units_pruned", 0) > 0
        if modified:
            source = self.options["eval_data"] or self.options["data"] or self.options["calib_data"]
            try:
                batches = self._batches(original, source, FIDELITY_SAMPLES)
                stats["fidelity"] = self._fidelity(original, pruned, batches)
            except OptimodelError as exc:
                stats["fidelity"] = {"error": exc.message}
        return PassResult(pruned if modified else original, modified, stats, declined)

    # ----------------------------------------------------------------- weights

    def _weights(
        self, model: onnx.ModelProto, workdir: str
    ) -> tuple[onnx.ModelProto, dict[str, Any], list[dict[str, str]]]:
        """Unstructured or N:M zeros in the layers' weight initializers."""
        exclude_nodes, exclude_ops = self._excluded()
        layers, declined = find_layer_weights(
            model,
            exclude_nodes=exclude_nodes,
            exclude_ops=exclude_ops,
            min_params=int(self.options["min_params"]),
        )
        axes: list[int] = []
        if self.nm is not None:
            n, m = self.nm
            usable = []
            for layer in layers:
                reduction = {u.reduction_axis for u in layer.uses}
                label = ", ".join(layer.nodes)
                if len(reduction) != 1:
                    reason = "its readers reduce over different axes"
                elif layer.array.shape[next(iter(reduction))] % m:
                    k = layer.array.shape[next(iter(reduction))]
                    reason = f"reduction dim {k} is not a multiple of {m}"
                else:
                    usable.append(layer)
                    axes.append(next(iter(reduction)))
                    continue
                declined.append({"pattern": f"{n}:{m}", "node": label, "reason": reason})
            layers = usable
            start = [1.0] * len(layers)
        elif self.options["scope"] == "global":
            counts = global_counts(
                [la.array for la in layers],
                self.sparsity,
                float(self.options["max_layer_sparsity"]),
            )
            start = [c / la.array.size for c, la in zip(counts, layers, strict=True)]
        else:
            start = [self.sparsity] * len(layers)

        def zeroed(ratios: list[float]) -> onnx.ModelProto:
            out = copy_model(model)
            for i, (layer, ratio) in enumerate(zip(layers, ratios, strict=True)):
                if ratio <= 0:
                    continue
                if self.nm is not None:
                    pruned = prune_nm(layer.array, self.nm[0], self.nm[1], axes[i])
                else:
                    count = layer_counts([layer.array.size], ratio)[0]
                    pruned = prune_unstructured(layer.array, count)
                write_initializer(out.graph, layer.name, pruned)
            return out

        def refit(ratios: list[float]) -> tuple[onnx.ModelProto, dict[str, Any] | None]:
            out = zeroed(ratios)
            if not self.options["calib_data"]:
                return out, None
            outputs = [
                u.node.output[0]
                for la, r in zip(layers, ratios, strict=True)
                if r > 0
                for u in la.uses
            ]
            return self._recover(
                model, out, outputs=outputs, keep_zeros=True, reselect=self.nm is None
            )

        def build(ratios: list[float]) -> onnx.ModelProto:
            return refit(ratios)[0]

        ratios, search = self._search(
            model, [", ".join(la.nodes) for la in layers], start, build, workdir
        )
        pruned_model, recovery = refit(ratios)
        arrays = {t.name: t for t in pruned_model.graph.initializer}

        rows = []
        zeros = total = 0
        for i, (layer, ratio) in enumerate(zip(layers, ratios, strict=True)):
            after = tensor_array(arrays[layer.name])
            row: dict[str, Any] = {
                "weight": layer.name,
                "nodes": layer.nodes,
                "op": layer.op,
                "shape": list(layer.array.shape),
                "params": int(layer.array.size),
                "requested": (self.sparsity if ratio > 0 else 0.0) if self.nm else ratio,
                "before": _sparsity(layer.array),
                "achieved": _sparsity(after),
            }
            if self.nm is not None:
                row["axis"] = axes[i]
                row["nm_check"] = ratio == 0 or check_nm(after, self.nm[0], self.nm[1], axes[i])
            rows.append(row)
            # every candidate layer counts, also those a budget search left dense
            zeros += int(np.count_nonzero(after == 0))
            total += after.size
        stats: dict[str, Any] = {
            "granularity": "n:m" if self.nm else "unstructured",
            "scope": "layer" if self.nm else self.options["scope"],
            "requested_sparsity": self.sparsity,
            "achieved_sparsity": zeros / total if total else 0.0,
            "units_pruned": sum(1 for r in ratios if r > 0),
            "layers": rows,
            "note": (
                "dense kernels do the same work with zeros: expect no speed-up; the gain is "
                "the compressed size"
                if not self.nm
                else f"{self.nm[0]}:{self.nm[1]} pays off only on backends with N:M sparse "
                "kernels (e.g. TensorRT sparse weights); ONNX Runtime runs it dense"
            ),
        }
        if self.options["scope"] == "global" and not self.nm:
            stats["normalization"] = "|w| / RMS(layer weight)"
        if self.nm:
            stats["pattern"] = f"{self.nm[0]}:{self.nm[1]}"
            stats["nm_check_passed"] = all(r.get("nm_check", True) for r in rows)
        if search is not None:
            stats["accuracy_search"] = search
        if recovery is not None:
            stats["recovery"] = recovery
        return pruned_model, stats, declined

    # ----------------------------------------------------------------- channels

    def _channel(
        self, model: onnx.ModelProto, workdir: str
    ) -> tuple[onnx.ModelProto, dict[str, Any], list[dict[str, str]]]:
        """Remove output channels group by group, with their dependent tensors."""
        from optimodel.inspection import estimate_macs

        exclude_nodes, exclude_ops = self._excluded()
        groups, declined = ch.find_groups(
            model,
            exclude_nodes=exclude_nodes,
            exclude_ops=exclude_ops,
            min_params=int(self.options["min_params"]),
        )
        scores = [ch.importance(g, str(self.options["norm"])) for g in groups]
        multiple = int(self.options["channel_multiple"])
        if self.options["scope"] == "global":
            keeps = ch.plan_global(
                scores, self.sparsity, float(self.options["max_layer_sparsity"]), multiple
            )
            start = [1 - k.size / g.channels for k, g in zip(keeps, groups, strict=True)]
        else:
            start = [self.sparsity] * len(groups)

        def refit(
            keeps: list[np.ndarray], out: onnx.ModelProto
        ) -> tuple[onnx.ModelProto, dict[str, Any] | None]:
            if not self.options["calib_data"]:
                return out, None
            outputs, out_keep = [], {}
            for group, keep in zip(groups, keeps, strict=True):
                if keep.size == group.channels:
                    continue
                outputs += [model.graph.node[op.node].output[0] for op in group.slices if op.sink]
                for source in group.sources:
                    out_keep[model.graph.node[source.node].output[0]] = keep
            return self._recover(model, out, outputs=outputs, keep_zeros=False, out_keep=out_keep)

        def build(ratios: list[float]) -> onnx.ModelProto:
            keeps = ch.plan_layer(scores, ratios, multiple)
            return refit(keeps, ch.apply_plan(model, groups, keeps))[0]

        ladder = [
            _channel_ladder(r, g.channels, multiple) for r, g in zip(start, groups, strict=True)
        ]
        ratios, search = self._search(
            model, [g.label for g in groups], start, build, workdir, levels=ladder
        )
        keeps = ch.plan_layer(scores, ratios, multiple)
        pruned = ch.apply_plan(model, groups, keeps)
        rows = [
            {
                "sources": [s.label for s in g.sources],
                "sinks": g.sinks,
                "channels": g.channels,
                "kept": int(k.size),
                "requested": r,
                "achieved": 1 - k.size / g.channels,
            }
            for g, k, r in zip(groups, keeps, ratios, strict=True)
        ]
        total = sum(g.channels for g in groups)
        removed = sum(g.channels - k.size for g, k in zip(groups, keeps, strict=True))
        shapes = {k: tuple(v) for k, v in dict(self.options["shapes"] or {}).items()}
        macs_before = estimate_macs(model, shapes)["total"]
        macs_after = estimate_macs(pruned, shapes)["total"]
        stats: dict[str, Any] = {
            "granularity": "channel",
            "scope": self.options["scope"],
            "norm": self.options["norm"],
            "requested_sparsity": self.sparsity,
            "achieved_sparsity": removed / total if total else 0.0,
            "channels": {"before": total, "removed": int(removed)},
            "units_pruned": sum(
                1 for g, k in zip(groups, keeps, strict=True) if k.size < g.channels
            ),
            "groups": rows,
            "macs": {
                "before": macs_before,
                "after": macs_after,
                "reduction": 1 - macs_after / macs_before if macs_before else 0.0,
            },
            "channel_multiple": multiple,
            "importance": (
                f"{self.options['norm']} norm of each source's output weights times its "
                "BatchNorm |gamma|/sqrt(var+eps), mean-normalized per source"
            ),
        }
        odd = [r["kept"] for r in rows if r["kept"] < r["channels"] and r["kept"] % 8]
        if odd and multiple == 1:
            stats["note"] = (
                f"{len(odd)} pruned group(s) keep a channel count that is not a multiple of 8; "
                "CPU conv kernels work in blocks of 8/16 channels, so such layers can run no "
                "faster (or slower) despite fewer MACs: try --channel-multiple 8 and measure "
                "with `optimodel bench`"
            )
        if search is not None:
            stats["accuracy_search"] = search
        if removed and self.options["check_rewrite"]:
            stats["rewrite_check"] = self._check_rewrite(model, groups, keeps, pruned)
        if removed:
            pruned, recovery = refit(keeps, pruned)
            if recovery is not None:
                stats["recovery"] = recovery
        return pruned, stats, declined

    def _check_rewrite(
        self,
        model: onnx.ModelProto,
        groups: list[ch.ChannelGroup],
        keeps: list[np.ndarray],
        pruned: onnx.ModelProto,
    ) -> dict[str, Any]:
        """The pruned model must match the original with the dropped rows zeroed, exactly."""
        from optimodel.verify import Tolerance, verify_models

        masked = ch.apply_plan(model, groups, keeps, mode="zero")
        # float32 sums in a different order; no cosine bound, which means nothing on outputs
        # that random inputs drive to ~0 (a detector's sigmoid map)
        bound = Tolerance("rewrite", atol=1e-4, rtol=1e-4, min_cosine=-1.0)
        try:
            batches = self._batches(model, None, FIDELITY_FEEDS)
            result = verify_models(masked, pruned, batches, tolerance=bound)
        except OptimodelError as exc:  # the model cannot run here: say so, do not guess
            return {"checked": False, "reason": exc.message}
        if not result.ok:
            # a wrong rewrite is a bug in this pass: the pipeline keeps the input model
            raise RuntimeError(
                "channel rewrite is not exact against the masked model: "
                + "; ".join(result.violations[:2])
            )
        return {"checked": True, "exact": True, "max_abs": result.worst_max_abs}

    # ----------------------------------------------------------------- search

    def _search(
        self,
        model: onnx.ModelProto,
        units: list[str],
        start: list[float],
        build: Any,
        workdir: str,
        levels: list[list[float]] | None = None,
    ) -> tuple[list[float], dict[str, Any] | None]:
        """Ratios to apply: `start`, or what the accuracy-budget search settles on."""
        if self.levels and units:
            probe = self._probe(model, workdir)
            self._sensitivity = sensitivity_table(
                units,
                self.levels,
                build,
                probe.drop,
                baseline=probe.baseline,
                metric=probe.metric,
                unit=probe.unit,
            )
        budget = self.options["accuracy_budget"]
        if budget is None or not units:
            return start, None
        probe = self._probe(model, workdir)
        if levels is None:
            levels = [[r, 0.0] for r in start] if self.nm else ladders(start)
        result = backoff_search(
            units,
            levels,
            build,
            probe.drop,
            float(budget),
            baseline=probe.baseline,
            max_trials=int(self.options["max_trials"]),
        )
        summary = result.to_dict(units)
        summary["metric"] = probe.metric
        summary["unit"] = probe.unit
        summary["budget"] = float(budget)
        if not result.fits and self.options["keep_best"] and result.ratios:
            return result.ratios, summary  # the closest configuration; the caller fails
        if not result.fits:
            best = "" if math.isinf(result.drop) else f"; the best lost {result.drop:.2f}"
            raise GateFailed(
                f"no pruning within a drop of {float(budget):g} {probe.unit} was found in "
                f"{len(result.trials)} trials{best}",
                hint="allow a larger --accuracy-budget, a lower --sparsity, or exclude layers",
            )
        return result.ratios, summary

    # ----------------------------------------------------------------- recovery

    def _recover(
        self, original: onnx.ModelProto, pruned: onnx.ModelProto, **how: Any
    ) -> tuple[onnx.ModelProto, dict[str, Any]]:
        """Least-squares re-fit of the surviving weights on calibration activations."""
        from optimodel.pruning import recovery

        if self._calib is None:
            self._calib = self._batches(
                original, self.options["calib_data"], int(self.options["calib_samples"])
            )
        return recovery.refit(original, pruned, self._calib, **how)
