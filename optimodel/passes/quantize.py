"""quantize: int8 (dynamic or static) and int4 weight-only through onnxruntime.quantization.

ONNX Runtime's quantizers do the rewriting; this pass decides what they are asked for and
checks what comes out. Before: fold (Constant-node weights become initializers, which
quantize_dynamic needs), BatchNormalization folded into Conv, the opset converted where
the quantized form needs it, shape inference, never `quant_pre_process`. Settings follow
the target: uint8 activations with int8 weights (U8S8: on the CPU the fast VNNI path; on
CUDA, which dequantizes and runs float, the closer rounding), Q/DQ only for CUDA and
TensorRT, and symmetric int8 for TensorRT (it refuses anything else).
After: the checker, the op set against what the target provider can run, a CPU session,
and figures read back from the graph (what really runs in integer arithmetic, Q/DQ
pairs, layers left in float, weight bytes), because a quantizer that "succeeds" can
still leave most of a model in float. ONNX Runtime's quantizers write files: they work in
a private temporary folder that is removed afterwards, and their console output and log
lines are collected into the stats instead of printed.

`accuracy_budget` (dynamic and static) with `eval_data`: quantize fully, measure the drop
against the float model, and when it is over budget keep the most sensitive nodes in float
until it fits (`optimodel.quant.budget`: top-1 points with labels, (1 - cosine) x 100
without). A kept node runs in float with its weights still stored in int8 (same file size,
`optimodel.quant.weight_fallback`); only when no such configuration fits are they kept in
float too, or at once with `fallback="float"`. No fit raises GateFailed (exit 3) unless
`keep_best`, which returns the best candidate with `stats["accuracy_budget"]["fits"]`
False for the caller to write and fail.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from optimodel.errors import OptimodelError, UsageError
from optimodel.fusions.fused_conv import expand_fused_conv
from optimodel.graphs import copy_model
from optimodel.modelio import (
    external_folder,
    has_external_tensors,
    in_external_folder,
    infer_shapes,
    iter_graphs,
    near_protobuf_limit,
    write_streaming,
)
from optimodel.passes.base import Pass, PassResult, register_pass
from optimodel.quant import prepare
from optimodel.quant.compact import compact_qdq
from optimodel.quant.embeddings import embeddings_to_8bit
from optimodel.quant.outputs import float_matmul_outputs, float_outputs
from optimodel.quant.presets import PRESETS, preset_nodes, small_lookup_tables
from optimodel.quant.stats import COMPUTE_OPS, quantization_stats, weight_bytes
from optimodel.quant.targets import TARGETS, check_target
from optimodel.quant.weight_fallback import store_weights_int8

MODES = ("dynamic", "static", "weight-only")
# contrib ops from fusion (Attention, SkipLayerNorm) carry no inferred output type;
# they are float, and the quantizer needs to be told so
_DYNAMIC_EXTRA = {"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT}
FORMATS = ("qdq", "qoperator")
INT4_FORMATS = ("matmulnbits", "qdq")
CALIB_METHODS = ("minmax", "entropy", "percentile")
WEIGHT_TYPES = ("int8", "uint8")
# Dynamic int8 on the CPU: ONNX Runtime's IntegerOps set without Conv, because
# ConvInteger runs slower than fp32 there (static QDQ is the route for CNNs).
DYNAMIC_CPU_OPS = ["MatMul", "Attention", "LSTM", "Gather", "EmbedLayerNormalization"]
# Static Q/DQ on the CPU: the weighted layers plus ops that only move or clip values.
# ONNX Runtime's default also quantizes Add, Mul, Sigmoid, Softmax, ... (residuals,
# normalizations, gates): measured on magika, that took the output cosine to 0.02 where
# this set keeps 0.995 at the same speed (USER_ASKS item 9). Gather stores embedding
# tables in int8 (ONNX Runtime gathers the int8 rows): MiniLM 0.65x -> 0.26x of its float
# size at the same latency; small tables stay float (`presets.small_lookup_tables`).
STATIC_CPU_OPS = [
    "Conv",
    "ConvTranspose",
    "MatMul",
    "Gemm",
    "Gather",
    "MaxPool",
    "AveragePool",
    "Relu",
    "Clip",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Resize",
    "Concat",
    "Slice",
    "Split",
]
# Q/DQ for GPUs: the weighted layers TensorRT runs in int8 and propagates from.
GPU_STATIC_OPS = ["Conv", "ConvTranspose", "MatMul", "Gemm"]
QDQ_PER_CHANNEL_OPSET = 13
HISTOGRAM_MISSING = "Histogram has not been collected"
INT4_QDQ_OPSET = 21
NBITS_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"
MODE_DEFAULTS: dict[str, Any] = {
    "weight_type": "int8",
    "calib_method": "percentile",
    "calib_samples": 128,
    "format": "qdq",
    "symmetric_activations": False,
    "int8_outputs": False,
    "bits": 4,
    "block_size": 32,
    "symmetric_weights": True,
    "keep_head": True,
    "fallback": "int8-weights",
}
# Options that only mean something in some modes; setting one for another mode is refused.
MODE_OPTIONS = {
    "calib_data": ("static",),
    "calib_method": ("static",),
    "calib_samples": ("static",),
    "format": ("static",),
    "symmetric_activations": ("static",),
    "int8_outputs": ("static",),
    "weight_type": ("dynamic", "static"),
    "per_channel": ("dynamic", "static"),
    "bits": ("weight-only",),
    "block_size": ("weight-only",),
    "int4_format": ("weight-only",),
    "symmetric_weights": ("weight-only",),
    "keep_head": ("weight-only",),
    "accuracy_level": ("weight-only",),
    "accuracy_budget": ("dynamic", "static"),
    "fallback": ("dynamic", "static"),
}
# How a node the accuracy budget keeps out of int8 is written (quant/weight_fallback.py).
FALLBACKS = ("int8-weights", "float")


@contextlib.contextmanager
def _quiet_ort() -> Iterator[list[str]]:
    """Collect what ORT's quantizers print and log (warnings and up) instead of showing it."""
    import onnxruntime as ort

    captured: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage().strip()
            if record.levelno >= logging.WARNING and "pre-process" not in message:
                captured.append(message.splitlines()[0][:200] if message else "")

    root = logging.getLogger()
    nbits = logging.getLogger(NBITS_LOGGER)
    saved = (root.handlers[:], root.level, nbits.level)
    root.handlers = [_Collect()]
    root.setLevel(logging.WARNING)
    nbits.setLevel(logging.WARNING)
    ort.set_default_logger_severity(3)  # the calibrator's sessions log unused initializers
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield captured
    finally:
        ort.set_default_logger_severity(2)  # ONNX Runtime's default
        root.handlers = saved[0]
        root.setLevel(saved[1])
        nbits.setLevel(saved[2])


def _nbits_module() -> Any:
    """ORT's MatMulNBits quantizer module; importing it calls logging.basicConfig: undone."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    except ImportError as exc:
        raise OptimodelError(
            "weight-only quantization needs onnxruntime's MatMulNBitsQuantizer "
            "(onnxruntime >= 1.20); upgrade onnxruntime"
        ) from exc
    finally:
        root.handlers = saved[0]
        root.setLevel(saved[1])
    return matmul_nbits_quantizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _save(model: onnx.ModelProto, path: Path) -> bool:
    """Write a model for ORT's file-based quantizers; external data above the 2 GB limit."""
    if has_external_tensors(model) and external_folder(model) is not None:
        write_streaming(model, path, f"{path.name}.data")  # lazily loaded: file to file
        return True
    big = near_protobuf_limit(model)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=big,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
    )
    return big


def _takes_calibration_cache(quantize_static: Any) -> bool:
    """Recent ONNX Runtime releases take `calibration_cache_path`; older ones recalibrate."""
    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    return sum(1 for _ in iter_graphs(model.graph)) > 1


def _dynamic_extra(model: onnx.ModelProto) -> dict[str, Any]:
    """quantize_dynamic's options; weights inside If / Loop / Scan bodies are quantized too
    (ONNX Runtime's quantizer walks subgraphs only when asked, and only in dynamic mode)."""
    return {**_DYNAMIC_EXTRA, "EnableSubgraph": _has_subgraphs(model)}


def _node_names(model: onnx.ModelProto) -> set[str]:
    return {n.name for g in iter_graphs(model.graph) for n in g.node if n.name}


# Measured on an H100 with onnxruntime-gpu 1.31 (benchmarks/RESULTS.md, GPU section).
CUDA_INT8_NOTE = (
    "ONNX Runtime's CUDA provider runs most Q/DQ models as dequantize + float kernels: "
    "expect a smaller file, not a faster one (PP-OCR, magika and MiniLM ran 1.2-2x slower "
    "than float on an H100); int8 speed on NVIDIA GPUs comes from --target tensorrt, and "
    "on CUDA from `optimodel fp16` and `fuse --target ort`"
)


@register_pass
class QuantizePass(Pass):
    """Quantize with onnxruntime.quantization; the options are `optimodel quantize`'s."""

    name = "quantize"
    summary = "int8 dynamic / static (calibrated) or int4 weight-only, via onnxruntime"
    tolerance = "int8"
    # None: the mode's own default (MODE_DEFAULTS), so an option given for the wrong mode
    # is told apart from one left alone.
    defaults: dict[str, Any] = {
        "mode": "dynamic",
        "target": "cpu",
        "per_channel": None,
        "weight_type": None,
        "op_types": None,
        "exclude_ops": (),
        "exclude_nodes": (),
        "exclude_preset": "none",  # quant/presets.py: stem | heads | ends
        "int8_outputs": None,  # static: keep Q/DQ on the outputs too (quant/outputs.py)
        "calib_data": None,
        "calib_method": None,
        "calib_samples": None,
        "format": None,
        "symmetric_activations": None,
        "bits": None,
        "block_size": None,
        "int4_format": None,
        "symmetric_weights": None,
        "keep_head": None,
        "accuracy_level": None,
        "shapes": None,
        "int_range": (0, 255),
        "accuracy_budget": None,
        "eval_data": None,
        "eval_samples": None,
        "max_trials": None,
        "keep_best": False,
        "fallback": None,  # what the budget keeps out of int8: FALLBACKS
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._per_channel = False
        self._excluded: list[str] = []
        # set while the accuracy budget runs: every trial calibrates the same tensors on
        # the same data, so the first one's ranges are saved there and read back
        self._calibration_cache: Path | None = None
        self._validate()
        if self.options["accuracy_budget"] is not None:
            # the budget is the accuracy contract: verification reports, never refuses
            self.tolerance = "none"  # type: ignore[misc]

    # ------------------------------------------------------------------ options

    def _validate(self) -> None:
        """Refuse bad values and combinations now, before any model is loaded."""
        o = self.options
        mode = o["mode"]
        if mode not in MODES:
            raise UsageError(f"--mode '{mode}': choose from {', '.join(MODES)}")
        for key, modes in MODE_OPTIONS.items():
            if mode not in modes and o[key] not in (None, False, ()):
                raise UsageError(
                    f"--{key.replace('_', '-')} applies to --mode {' / '.join(modes)}, "
                    f"not --mode {mode}"
                )
        if o["fallback"] is not None and o["accuracy_budget"] is None:
            raise UsageError("--fallback says how --accuracy-budget keeps nodes; it needs it")
        for key, value in MODE_DEFAULTS.items():
            if o[key] is None:
                o[key] = value
        # Per-channel weights by default: per-tensor lost too much on real models (static
        # PP-OCR rec output cosine 0.77 per-tensor, 0.96 per-channel; dynamic MiniLM
        # embedding cosine 0.962 -> 0.993, magika top-1 98.4% -> 100%) at no measured cost.
        self.per_channel_asked = o["per_channel"] is not None or o["target"] == "tensorrt"
        if o["per_channel"] is None:
            o["per_channel"] = mode in ("static", "dynamic")
        if o["target"] == "tensorrt":
            o["per_channel"] = True
        for key, choices in (
            ("target", TARGETS),
            ("format", FORMATS),
            ("calib_method", CALIB_METHODS),
            ("weight_type", WEIGHT_TYPES),
            ("fallback", FALLBACKS),
        ):
            if o[key] not in choices:
                flag = key.replace("_", "-")
                raise UsageError(f"--{flag} '{o[key]}': choose from {', '.join(choices)}")
        target = o["target"]
        if o["accuracy_budget"] is not None:
            if not o["eval_data"]:
                raise UsageError(
                    "--accuracy-budget needs --eval-data: a .npz with 'labels' (top-1 points) "
                    "or without (fidelity: (1 - cosine) x 100)"
                )
            if float(o["accuracy_budget"]) < 0:
                raise UsageError("--accuracy-budget must be >= 0")
            if o["max_trials"] is not None and int(o["max_trials"]) < 1:
                raise UsageError(f"--max-trials {o['max_trials']}: must be at least 1")
        elif o["eval_data"] or o["keep_best"] or o["max_trials"] is not None:
            raise UsageError("--eval-data, --max-trials and --keep-best need --accuracy-budget")
        if mode == "dynamic" and target != "cpu":
            raise UsageError(
                f"--mode dynamic makes ConvInteger / MatMulInteger / DynamicQuantizeLinear, "
                f"which the {target} provider cannot run; use --mode static (QDQ) or "
                "--mode weight-only for GPUs"
            )
        if mode == "static":
            if not o["calib_data"]:
                raise UsageError(
                    "--mode static needs --calib-data: a .npz (samples stacked), a folder of "
                    "one-feed .npz files, or 'random' (only for trying things out)"
                )
            if int(o["calib_samples"]) < 1:
                raise UsageError(f"--calib-samples {o['calib_samples']}: must be at least 1")
            if target != "cpu" and o["format"] != "qdq":
                raise UsageError(
                    f"--format qoperator makes QLinear* ops the {target} provider cannot run; "
                    "use --format qdq"
                )
            if target == "tensorrt" and o["weight_type"] != "int8":
                raise UsageError("TensorRT takes int8 weights only; drop --weight-type uint8")
        if mode == "weight-only":
            bits, block = int(o["bits"]), int(o["block_size"])
            if bits not in (4, 8):
                raise UsageError(f"--bits {bits}: weight-only supports 4 or 8")
            if block < 16 or block & (block - 1):
                raise UsageError(f"--block-size {block}: must be a power of two, at least 16")
            fmt = o["int4_format"] or ("qdq" if target == "tensorrt" else "matmulnbits")
            if fmt not in INT4_FORMATS:
                raise UsageError(f"--int4-format '{fmt}': choose from {', '.join(INT4_FORMATS)}")
            if fmt == "qdq" and bits != 4:
                raise UsageError(
                    "--int4-format qdq supports --bits 4 only (onnxruntime's quantizer)"
                )
            if fmt == "matmulnbits" and target == "tensorrt":
                raise UsageError(
                    "MatMulNBits is a com.microsoft op TensorRT cannot run; use --int4-format qdq"
                )
            self.options["int4_format"] = fmt

    def _op_types(self) -> list[str]:
        """The op types handed to ORT for this mode and target, minus --exclude-op."""
        o = self.options
        mode, target = o["mode"], o["target"]
        if o["op_types"]:
            ops = list(o["op_types"])
        elif mode == "dynamic":
            ops = list(DYNAMIC_CPU_OPS)
        elif mode == "static":
            ops = list(STATIC_CPU_OPS if target == "cpu" else GPU_STATIC_OPS)
        else:
            ops = ["MatMul"]
        excluded = set(o["exclude_ops"] or ())
        return [op for op in ops if op not in excluded]

    # ------------------------------------------------------------------ run

    def run(self, model: onnx.ModelProto) -> PassResult:
        mode = self.options["mode"]
        self._per_channel = bool(self.options["per_channel"])
        warnings: list[str] = []
        if self.options["target"] == "cuda" and mode == "static":
            warnings.append(CUDA_INT8_NOTE)
        steps: list[str] = []
        work = copy_model(model)
        expanded = expand_fused_conv(work)
        if expanded:  # ORT's quantizers know Conv, not its fused form
            steps.append(f"{expanded} FusedConv -> Conv + activation")
        work = prepare.fold(work)
        steps.append("fold")
        if mode != "weight-only":
            work, how = prepare.fold_batchnorm(work)
            steps.append(f"batch-norm folding: {how}")
        else:
            work, gemms = prepare.gemm_to_matmul(work)
            if gemms:
                steps.append(f"{gemms} Gemm -> MatMul + Add (the int4 quantizer takes MatMul)")
        needed = self._needed_opset()
        if needed:
            before = prepare.opset_of(work)
            try:
                work = prepare.convert_opset(work, needed[0], needed[1])
            except OptimodelError as exc:
                if mode != "static" or self.per_channel_asked:
                    raise
                self._per_channel = False  # the default, not a request: fall back
                warnings.append(f"{exc.message}; quantized per-tensor instead")
            if prepare.opset_of(work) != before:
                steps.append(f"opset {before} -> {prepare.opset_of(work)} (onnx.version_converter)")
        work, problem = prepare.shape_inference(work)
        if problem:
            warnings.append(f"{problem}; onnxruntime's quantizer may skip untyped tensors")
        prepare.name_nodes(work)
        self._excluded = self._resolve_exclusions(work, warnings)
        bytes_before = weight_bytes(work)
        budget: dict[str, Any] | None = None
        log: list[str] = []
        if self.options["accuracy_budget"] is None:
            result, details = self._quantize(work, list(self._excluded), warnings, log)
            self._check_output(result)
        else:
            result, details, budget = self._budget_search(model, work, warnings, log)
            self._excluded = list(self._excluded) + list(budget["kept_float"])
        warnings[:] = list(dict.fromkeys(warnings))  # each budget trial calibrates again
        stats = self._stats(work, result, bytes_before, steps, details, warnings, log)
        if budget is not None:
            stats["accuracy_budget"] = budget
        return PassResult(result, True, stats)

    def _quantize(
        self, work: onnx.ModelProto, excluded: list[str], warnings: list[str], log: list[str]
    ) -> tuple[onnx.ModelProto, dict]:
        """One run of ONNX Runtime's quantizer with these nodes kept in float."""
        mode = self.options["mode"]
        saved = self._excluded
        self._excluded = excluded
        with tempfile.TemporaryDirectory(prefix="optimodel-quantize-") as tmp, _quiet_ort() as got:
            try:
                if mode == "dynamic":
                    return self._dynamic(work, Path(tmp))
                if mode == "static":
                    return self._static(work, Path(tmp), warnings)
                return self._weight_only(work, warnings)
            except OptimodelError:
                raise
            except MemoryError:
                raise OptimodelError(
                    f"{mode} quantization ran out of memory; "
                    + ("lower --calib-samples" if mode == "static" else "try a smaller model")
                ) from None
            except Exception as exc:  # ORT's quantizers raise anything from assert to KeyError
                raise OptimodelError(
                    f"onnxruntime.quantization failed ({mode}): {type(exc).__name__}: "
                    f"{_first_line(exc)}",
                    hint="exclude the failing node with --exclude-node, or report the model",
                ) from exc
            finally:
                self._excluded = saved
                log.extend(m for m in got if m not in log)

    def _budget_search(
        self,
        model: onnx.ModelProto,
        work: onnx.ModelProto,
        warnings: list[str],
        log: list[str],
    ) -> tuple[onnx.ModelProto, dict, dict[str, Any]]:
        """Quantize, then keep sensitive nodes in float until the drop fits the budget."""
        from optimodel.data import RANDOM, load_data, model_input_specs
        from optimodel.errors import GateFailed
        from optimodel.quant import budget as search

        o = self.options
        dataset = load_data(
            o["eval_data"],
            model_input_specs(model),
            shapes=o["shapes"],
            num_samples=o["eval_samples"],
            int_range=tuple(o["int_range"]),  # type: ignore[arg-type]
        )
        if str(o["eval_data"]) == RANDOM:
            warnings.append(
                "--eval-data random: the budget is a fidelity figure on random inputs, not "
                "accuracy on real data"
            )
        feeds = list(dataset)
        first_feed = feeds[0].feed
        details_of: dict[int, dict] = {}
        user_excluded = list(self._excluded)

        def quantizer(fallback: str) -> Callable[[list[str]], onnx.ModelProto]:
            def quantize(kept: list[str]) -> onnx.ModelProto:
                result, details = self._quantize(work, user_excluded + kept, warnings, log)
                if kept and fallback == "int8-weights":
                    details["int8_weight_fallback"] = store_weights_int8(result, kept)
                self._check_output(result)
                details_of[id(result)] = details
                return result

            return quantize

        def rank(full: onnx.ModelProto) -> list[dict[str, Any]]:
            candidates = [n for n in search.quantized_nodes(work, full) if n not in user_excluded]
            return search.rank_nodes(
                work,
                full,
                candidates,
                feeds[: search.RANK_FEEDS],
                keep_consumers=o["mode"] == "static",
            )

        with tempfile.TemporaryDirectory(prefix="optimodel-budget-") as tmp:
            probe = search.DropProbe(model, dataset, tmp)
            self._calibration_cache = Path(tmp)
            found = None
            try:
                # int8 weights first (no bigger a file); when rounding the kept layers'
                # weights is itself too much, the same ranking again with them in float
                for fallback in FALLBACKS[FALLBACKS.index(o["fallback"]) :]:
                    found = search.search(
                        budget=float(o["accuracy_budget"]),
                        quantize=quantizer(fallback),
                        measure=probe.measure,
                        latency=lambda m: search.latency_p50_ms(m, first_feed),
                        rank=rank,
                        max_trials=int(o["max_trials"] or search.DEFAULT_MAX_TRIALS),
                        metric=probe.metric,
                        unit=probe.unit,
                        baseline=probe.baseline,
                        fallback=lambda m: (
                            "int8-weights"
                            if details_of[id(m)].get("int8_weight_fallback")
                            else "float"
                        ),
                        previous=found,
                    )
                    stored = any(t.fallback == "int8-weights" for t in found.trials)
                    if found.fits or not found.ranking or not stored:
                        break  # (nothing stored in int8: the float search would repeat it)
            finally:
                self._calibration_cache = None
            assert found is not None
        summary = found.to_dict()
        summary["eval_data"] = dataset.description
        best = found.best.model
        assert best is not None
        summary["fallback"] = found.best.fallback if found.best.kept_float else None
        summary["int8_weight_fallback"] = details_of[id(best)].get("int8_weight_fallback", [])
        if not found.fits:
            kept = len(found.best.kept_float)
            message = (
                f"no quantization within an accuracy drop of {found.budget:g} "
                f"{probe.unit} was found in {len(found.trials)} trial(s); the best dropped "
                f"{found.best.drop:.3g} with {kept} node(s) kept in float"
            )
            if not o["keep_best"]:
                raise GateFailed(
                    message + "; nothing was written",
                    hint="allow a larger --accuracy-budget or --max-trials, calibrate on more "
                    "typical --calib-data, or pass --keep-best to write the best candidate",
                )
            summary["message"] = message
        return best, details_of[id(best)], summary

    def _needed_opset(self) -> tuple[int, str] | None:
        o = self.options
        if o["mode"] == "weight-only" and o["int4_format"] == "qdq":
            return INT4_QDQ_OPSET, "int4 DequantizeLinear (--int4-format qdq)"
        if o["mode"] == "static" and o["format"] == "qdq" and self._per_channel:
            return QDQ_PER_CHANNEL_OPSET, "per-channel Q/DQ (the axis attribute)"
        return None

    def _resolve_exclusions(self, model: onnx.ModelProto, warnings: list[str]) -> list[str]:
        """Exclusions as nodes of the prepared model: a layer fusion renamed X -> X_1 is found."""
        names = _node_names(model)
        resolved, missing = [], []
        for name in self.options["exclude_nodes"] or ():
            renamed = [n for n in names if re.fullmatch(re.escape(name) + r"_\d+", n)]
            if name in names:
                resolved.append(name)
            elif len(renamed) == 1:
                resolved.append(renamed[0])
                warnings.append(f"--exclude-node {name}: excluded {renamed[0]} (renamed by fusion)")
            else:
                missing.append(name)
        if missing:
            layers = sorted(
                n.name for g in iter_graphs(model.graph) for n in g.node if n.op_type in COMPUTE_OPS
            )
            raise UsageError(
                f"--exclude-node {', '.join(missing)}: no such node after folding and fusion "
                f"(layers that can be excluded: {', '.join(layers[:8]) or 'none'}"
                f"{', ...' if len(layers) > 8 else ''})"
            )
        preset = str(self.options["exclude_preset"] or "none")
        if preset not in PRESETS:
            raise UsageError(f"--exclude-preset {preset}: choose from {', '.join(PRESETS)}")
        sample = self._sample_feed(model) if preset != "none" else None
        kept = [n for n in preset_nodes(model, preset, sample) if n not in resolved]
        if kept:
            resolved.extend(kept)
            warnings.append(f"--exclude-preset {preset}: kept {', '.join(kept)} in float")
        default_ops = not self.options["op_types"]
        if self.options["mode"] == "static" and default_ops and "Gather" in self._op_types():
            # the default op set stores lookup tables in int8, but small ones stay float
            resolved.extend(n for n in small_lookup_tables(model) if n not in resolved)
        present = {n.op_type for g in iter_graphs(model.graph) for n in g.node}
        absent = [op for op in self.options["exclude_ops"] or () if op not in present]
        if absent:
            warnings.append(f"--exclude-op {', '.join(absent)}: no such op in the model")
        return resolved

    def _sample_feed(self, model: onnx.ModelProto) -> dict[str, Any] | None:
        """The first calibration or evaluation sample (None for random data)."""
        from optimodel.data import RANDOM, load_data, model_input_specs

        o = self.options
        source = o["calib_data"] or o["eval_data"]
        if not source or str(source) == RANDOM:
            return None
        try:
            first = next(iter(load_data(str(source), model_input_specs(model), num_samples=1)))
        except (OptimodelError, StopIteration):
            return None  # the calibration step reports bad data in one line
        return first.feed

    # ------------------------------------------------------------------ modes

    def _dynamic(self, model: onnx.ModelProto, tmp: Path) -> tuple[onnx.ModelProto, dict]:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        o = self.options
        src, out = tmp / "input.onnx", tmp / "quantized.onnx"
        ops = self._op_types()
        details = {
            "format": "integer ops (DynamicQuantizeLinear + MatMulInteger / ConvInteger)",
            "activations": "uint8, quantized at run time per tensor",
            "weights": f"{o['weight_type']} {'per-channel' if o['per_channel'] else 'per-tensor'}",
            "op_types": ops,
        }
        if has_external_tensors(model) and external_folder(model) is not None:
            return self._dynamic_lazy(model, ops), details
        big = _save(model, src)
        quantize_dynamic(
            str(src),
            str(out),
            op_types_to_quantize=ops,
            per_channel=bool(o["per_channel"]),
            reduce_range=False,
            weight_type=QuantType.QInt8 if o["weight_type"] == "int8" else QuantType.QUInt8,
            nodes_to_exclude=list(self._excluded),
            use_external_data_format=big,
            extra_options=_dynamic_extra(model),
        )
        return onnx.load(str(out)), details

    def _dynamic_lazy(self, model: onnx.ModelProto, ops: list[str]) -> onnx.ModelProto:
        """quantize_dynamic's own steps on a model whose weights stay in their file.

        `quantize_dynamic` loads every float weight before quantizing any (about three
        times the model's size at its peak); ONNX Runtime's quantizer driven on the
        lazily loaded graph reads one weight at a time, so the peak is the int8 result.
        """
        from unittest import mock

        from onnxruntime.quantization import QuantType, onnx_quantizer
        from onnxruntime.quantization.quant_utils import (
            QuantizationMode,
            add_infer_metadata,
            update_opset_version,
        )

        def reload_in_memory(graph: onnx.ModelProto) -> onnx.ModelProto:
            # ORT's version saves the model and reloads it with every weight in memory
            inferred, _ = infer_shapes(graph)
            add_infer_metadata(inferred)
            return inferred

        o = self.options
        weight_type = QuantType.QInt8 if o["weight_type"] == "int8" else QuantType.QUInt8
        work = update_opset_version(reload_in_memory(model), weight_type)
        with (
            mock.patch.object(
                onnx_quantizer, "save_and_reload_model_with_shape_infer", reload_in_memory
            ),
            in_external_folder(model),  # ORT reads each weight relative to the working folder
        ):
            quantizer = onnx_quantizer.ONNXQuantizer(
                work,
                bool(o["per_channel"]),
                False,  # reduce_range
                QuantizationMode.IntegerOps,
                False,  # static
                weight_type,
                QuantType.QUInt8,  # dynamic activations are uint8
                None,
                [],
                list(self._excluded),
                ops,
                _dynamic_extra(model),
            )
            quantizer.quantize_model()
        return quantizer.model.model

    def _static(
        self, model: onnx.ModelProto, tmp: Path, warnings: list[str]
    ) -> tuple[onnx.ModelProto, dict]:
        from onnxruntime.quantization import CalibrationMethod

        from optimodel.quant.calibration import calibration_reader

        o = self.options
        target = o["target"]
        calibration = calibration_reader(
            o["calib_data"],
            model,
            samples=int(o["calib_samples"]),
            shapes=o["shapes"],
            int_range=tuple(o["int_range"]),  # type: ignore[arg-type]
        )
        warnings.extend(calibration.warnings)
        reader = calibration.reader
        # CUDA dequantizes Q/DQ and runs float: uint8 with a zero point rounds closer
        # (MiniLM last_hidden_state cosine 0.967 with int8, 0.982 with uint8)
        symmetric = bool(o["symmetric_activations"]) or target == "tensorrt"
        if target == "cpu" and o["symmetric_activations"]:
            warnings.append(
                "int8 activations (S8S8) run slower than uint8 (U8S8) on x86 CPUs; drop "
                "--symmetric-activations unless the deployment target needs it"
            )
        extra: dict[str, Any] = {
            "CalibStridedMinMax": calibration.chunk,
            "ActivationSymmetric": symmetric,
            "WeightSymmetric": o["weight_type"] == "int8",
            "DefaultTensorType": TensorProto.FLOAT,  # untyped contrib-op outputs are float
        }
        if target == "tensorrt":
            extra["QuantizeBias"] = False  # TensorRT dequantizes int8 only, never int32 bias
        src, out = tmp / "input.onnx", tmp / "quantized.onnx"
        big = _save(model, src)
        methods = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }
        used = o["calib_method"]
        missing = (
            "calibration left some tensors without a histogram (control flow whose branches "
            "the samples did not all take); calibrated with minmax instead"
        )
        if used != "minmax" and f"{used} {missing}" in warnings:
            used = "minmax"  # an earlier budget trial found it out: do not try again
        try:
            self._quantize_static(src, out, reader, methods[used], symmetric, big, extra)
        except ValueError as exc:
            if used == "minmax" or HISTOGRAM_MISSING not in str(exc):
                raise
            # A tensor the histogram never saw (a branch of an If that no sample took):
            # ONNX Runtime's histogram calibrators give up, min/max does not.
            warnings.append(f"{used} {missing}")
            used = "minmax"
            reader.set_range(0, len(reader))
            self._quantize_static(src, out, reader, methods[used], symmetric, big, extra)
        result = onnx.load(str(out))
        kept_float: list[str] = []
        if o["format"] == "qdq" and not o["int8_outputs"]:
            result, kept_float = float_outputs(result, model, self._sample_feed(model))
            if target in ("cpu", "cuda") and not big:
                result, after_matmul = float_matmul_outputs(
                    result, model, cpu_check=target == "cpu"
                )
                kept_float += after_matmul
        compacted = compact_qdq(result, model, target, big) if o["format"] == "qdq" else {}
        details = {
            "format": o["format"],
            "float_outputs": kept_float,
            "compacted": compacted,
            "activations": "int8 symmetric" if symmetric else "uint8 asymmetric",
            "weights": o["weight_type"] + (" per-channel" if self._per_channel else " per-tensor"),
            "op_types": self._op_types(),
            "calibration": {"method": used, **calibration.describe()},
        }
        return result, details

    def _quantize_static(
        self,
        src: Path,
        out: Path,
        reader: Any,
        method: Any,
        symmetric: bool,
        big: bool,
        extra: dict[str, Any],
    ) -> None:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        o = self.options
        cache: dict[str, Any] = {}
        if self._calibration_cache is not None and _takes_calibration_cache(quantize_static):
            name = f"calibration-{str(method).rsplit('.', 1)[-1].lower()}.json"
            cache["calibration_cache_path"] = str(self._calibration_cache / name)
        quantize_static(
            str(src),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ if o["format"] == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=self._op_types(),
            per_channel=self._per_channel,
            reduce_range=False,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8 if o["weight_type"] == "int8" else QuantType.QUInt8,
            nodes_to_exclude=list(self._excluded),
            use_external_data_format=big,
            calibrate_method=method,
            calibration_providers=["CPUExecutionProvider"],
            extra_options=extra,
            **cache,
        )

    def _weight_only(
        self, model: onnx.ModelProto, warnings: list[str]
    ) -> tuple[onnx.ModelProto, dict]:
        nbits = _nbits_module()
        from onnxruntime.quantization import QuantFormat

        o = self.options
        bits, fmt = int(o["bits"]), o["int4_format"]
        level = o["accuracy_level"]
        if level is None and fmt == "matmulnbits":
            # 4: int8 activations inside MatMulNBits, the fast CPU kernel; GPUs ignore it.
            level = 4 if o["target"] == "cpu" else 0
        excluded = list(self._excluded)
        heads = prepare.head_matmuls(model) if o["keep_head"] and bits == 4 else []
        heads = [h for h in heads if h not in excluded]

        def quantize(source: onnx.ModelProto, nbits_: int, exclude: list[str]) -> onnx.ModelProto:
            config = nbits.DefaultWeightOnlyQuantConfig(
                block_size=int(o["block_size"]),
                is_symmetric=bool(o["symmetric_weights"]),
                accuracy_level=level if fmt == "matmulnbits" else None,
                quant_format=QuantFormat.QOperator if fmt == "matmulnbits" else QuantFormat.QDQ,
                op_types_to_quantize=tuple(self._op_types()),
                bits=nbits_,
            )
            with in_external_folder(source):  # lazily loaded weights: read from their folder
                quantizer = nbits.MatMulNBitsQuantizer(
                    source, nodes_to_exclude=exclude, algo_config=config
                )
                quantizer.process()
            return quantizer.model.model

        result = quantize(model, bits, excluded + heads)
        head_precision = "float"
        if heads and fmt == "matmulnbits":
            others = sorted(_node_names(result) - set(heads))
            result = quantize(result, 8, others)
            head_precision = "8-bit MatMulNBits"
        if heads:
            warnings.append(
                f"kept {', '.join(heads)} (LM-head-like last projection) at {head_precision}; "
                "keep_head=False quantizes it too"
            )
        tables: list[str] = []
        if fmt == "matmulnbits" and o["target"] == "cpu":  # GatherBlockQuantized: ORT's
            tables = embeddings_to_8bit(result, int(o["block_size"]), excluded)
        weights = {t.name for t in model.graph.initializer}
        embeddings = [
            n.name
            for n in model.graph.node
            if n.op_type == "Gather" and n.input[0] in weights and n.name not in tables
        ]
        details = {
            "format": "MatMulNBits (com.microsoft)"
            if fmt == "matmulnbits"
            else "DequantizeLinear(int4) -> MatMul (opset 21)",
            "weights": f"{bits}-bit {'symmetric' if o['symmetric_weights'] else 'asymmetric'}, "
            f"blocks of {o['block_size']} along K",
            "activations": (
                f"float; quantized to int8 inside MatMulNBits (accuracy_level {level})"
                if level == 4
                else f"float (accuracy_level {level or 0})"
            ),
            "op_types": self._op_types(),
            "head_nodes": heads,
            "head_precision": head_precision if heads else None,
            "embeddings_kept_float": embeddings,
            "embeddings_8bit": tables,
        }
        return result, details

    # ------------------------------------------------------------------ checks and figures

    def _check_output(self, model: onnx.ModelProto) -> None:
        """Refuse to hand on a model that is invalid, or that the target cannot run."""
        from optimodel.modelio import check_model
        from optimodel.runtime.sessions import create_session

        check_model(model, "quantized model")
        check_target(model, self.options["target"])
        create_session(model, source="quantized model")  # CPU: the contrib ops resolve

    def _stats(
        self,
        prepared: onnx.ModelProto,
        result: onnx.ModelProto,
        bytes_before: dict[str, int],
        steps: list[str],
        details: dict[str, Any],
        warnings: list[str],
        log: list[str],
    ) -> dict[str, Any]:
        o = self.options
        figures = quantization_stats(result)
        after = weight_bytes(result)
        dynamic_convs = (
            sum(1 for g in iter_graphs(result.graph) for n in g.node if n.op_type == "Conv")
            if o["mode"] == "dynamic" and not o["op_types"]
            else 0
        )
        if figures["quantized_total"] == 0:
            left = figures["float_compute_nodes"]
            warnings.append(
                "nothing was quantized"
                + (f": {left} weighted layer(s) stay in float" if left else "")
                + (
                    " (layers inside If/Loop bodies: only --mode dynamic reaches them)"
                    if _has_subgraphs(result) and o["mode"] != "dynamic"
                    else ""
                )
                + (" (Conv is left to --mode static on the CPU)" if dynamic_convs else "")
            )
        elif dynamic_convs:
            warnings.append(
                f"{dynamic_convs} Conv layer(s) left in float: ConvInteger runs slower than fp32 "
                "on the CPU; use --mode static for CNNs (or --op Conv to force it)"
            )
        if after["all"] > bytes_before["all"]:
            warnings.append(
                f"layer weights grew from {bytes_before['all']:,} to {after['all']:,} bytes"
            )
        ratio = after["all"] / bytes_before["all"] if bytes_before["all"] else None
        matmul_ratio = after["matmul"] / bytes_before["matmul"] if bytes_before["matmul"] else None
        return {
            "mode": o["mode"],
            "target": o["target"],
            **details,
            "preprocessing": steps,
            "excluded_nodes": list(self._excluded),
            "excluded_op_types": list(o["exclude_ops"] or ()),
            **figures,
            "weight_bytes_before": bytes_before["all"],
            "weight_bytes_after": after["all"],
            "weight_bytes_ratio": round(ratio, 4) if ratio is not None else None,
            "matmul_weight_bytes_before": bytes_before["matmul"],
            "matmul_weight_bytes_after": after["matmul"],
            "matmul_weight_bytes_ratio": round(matmul_ratio, 4) if matmul_ratio else None,
            "warnings": warnings,
            "onnxruntime_log": sorted(set(log))[:10],
        }
