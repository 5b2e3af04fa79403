"""fp16: float32 -> float16 (or bfloat16) with a measured float32 fallback.

The mechanics live in `optimodel.precision` (schema-driven rewriting on protos, range
measurement, load checks); this pass builds the calibration feeds from its options,
runs the conversion and turns its findings into the pass's stats and "declined"
entries (one per node kept in float32, with why).

With `verify` the pass checks its own result on the verification feeds and refuses one
below the fp16 tolerance: the pipeline cannot, because a converted model may take
float16 inputs (the pipeline feeds float32), and bfloat16 models do not run on ONNX
Runtime's CPU provider at all (next to no bf16 kernels), so for bf16 the same plan is
checked emulated in float32, every bf16 tensor rounded to bf16.
"""

from __future__ import annotations

from typing import Any

import onnx

from optimodel.fusions.fused_conv import expand_fused_conv
from optimodel.graphs import copy_model
from optimodel.modelio import iter_graphs
from optimodel.passes.base import Pass, PassResult, register_pass

VERIFY_FEEDS = 2


@register_pass
class Fp16Pass(Pass):
    """Half-precision conversion that keeps in float32 what measurably must be."""

    name = "fp16"
    summary = "float16/bfloat16 conversion, float32 fallback for what overflows or breaks"
    tolerance = "fp16"
    defaults = {
        "bf16": False,
        "keep_io_types": False,
        "block_ops": [],  # added to the default block list
        "block_nodes": [],
        "default_block_list": True,
        "fallback": True,  # measure activations on data, keep what does not fit
        "data": None,  # calibration data: .npz, folder of .npz, or None/"random"
        "shapes": {},
        "int_range": (0, 255),
        "samples": 4,
        "overflow_margin": 0.5,
        "max_retries": 8,
        "refine": False,  # accuracy-driven extra fallback on the emulated model
        "verify": False,  # the pass checks its own result (see module doc)
    }

    def _feeds(self, model: onnx.ModelProto) -> tuple[list[dict[str, Any]] | None, str]:
        from optimodel.data import RANDOM, load_data, model_input_specs
        from optimodel.errors import DataError

        source = self.options["data"] or RANDOM
        try:
            dataset = load_data(
                source,
                model_input_specs(model),
                shapes=dict(self.options["shapes"] or {}),
                num_samples=int(self.options["samples"]),
                int_range=tuple(self.options["int_range"]),  # type: ignore[arg-type]
                seed=1 if str(source) == RANDOM else 0,  # not the verification feeds
            )
            return [b.feed for b in dataset], dataset.description
        except DataError as exc:
            if str(source) != RANDOM:
                raise
            return None, f"none ({exc.message})"

    def run(self, model: onnx.ModelProto) -> PassResult:
        from optimodel.precision import (
            BFLOAT16,
            DEFAULT_BLOCK_OPS,
            FLOAT16,
            MixedOptions,
            convert_mixed,
        )

        opts = self.options
        block = set(opts["block_ops"] or [])
        if opts["default_block_list"]:
            block |= DEFAULT_BLOCK_OPS
        options = MixedOptions(
            fmt=BFLOAT16 if opts["bf16"] else FLOAT16,
            keep_io_types=bool(opts["keep_io_types"]),
            block_ops=frozenset(block),
            block_nodes=frozenset(opts["block_nodes"] or []),
            fallback=bool(opts["fallback"]),
            overflow_margin=float(opts["overflow_margin"]),
            max_retries=int(opts["max_retries"]),
            refine=bool(opts["refine"]),
        )
        source, expanded = model, 0
        if any(n.op_type == "FusedConv" for g in iter_graphs(model.graph) for n in g.node):
            # FusedConv's CPU kernel is float32 only and its CUDA one runs Relu alone.
            source = copy_model(model)
            expanded = expand_fused_conv(source)
        feeds, description = self._feeds(source) if opts["fallback"] else (None, "not used")
        result = convert_mixed(source, feeds, options)
        stats: dict[str, Any] = dict(result.stats)
        stats["calibration_data"] = description
        stats["notes"] = list(result.notes)
        if expanded:
            stats["notes"].insert(0, f"{expanded} FusedConv -> Conv + activation")
        stats["kept"] = result.kept[:200]
        if opts["verify"]:
            bf16 = bool(opts["bf16"])
            stats["verification"] = self._verify(
                model, result.emulated if bf16 else result.model, emulated=bf16
            )
        declined = [
            {"pattern": k["op"], "node": k["node"], "reason": f"{k['category']}: {k['reason']}"}
            for k in result.kept
        ]
        modified = bool(stats["nodes_converted"] or stats["weights_converted"] or expanded)
        return PassResult(result.model, modified, stats, declined)

    def _verify(self, model: onnx.ModelProto, candidate: onnx.ModelProto, emulated: bool) -> dict:
        """Compare the result with the input on the verification feeds; raise if it diverges.

        Done here rather than by the pipeline because the converted model may take
        float16 inputs (the pipeline feeds float32) or, for bf16, not run on CPU at all.
        """
        from optimodel.data import load_data, model_input_specs
        from optimodel.errors import VerificationError
        from optimodel.precision.mixed import match_feed
        from optimodel.runtime.sessions import create_session, run_session
        from optimodel.verify import (
            OutputComparator,
            VerificationResult,
            get_tolerance,
            matched_outputs,
            output_names,
        )

        dataset = load_data(
            self.options["data"],
            model_input_specs(model),
            shapes=dict(self.options["shapes"] or {}),
            num_samples=VERIFY_FEEDS,
            int_range=tuple(self.options["int_range"]),  # type: ignore[arg-type]
        )
        what = "emulated bf16 model" if emulated else "converted model"
        ref = create_session(model, source="input model")
        cand = create_session(candidate, source=what)
        names = matched_outputs(ref, cand, what)
        comparator = OutputComparator(names)
        for batch in dataset:
            expected = run_session(ref, batch.feed, "input model")
            outs = run_session(cand, match_feed(candidate, batch.feed), what)
            got = dict(zip(output_names(cand), outs, strict=True))
            comparator.update(expected, [got[n] for n in names])
        diffs = comparator.results()
        result = VerificationResult(
            diffs,
            comparator.feeds,
            dataset.description,
            self.tolerance,
            get_tolerance(self.tolerance).violations(diffs),
        )
        if not result.ok:
            hint = (
                "random inputs can be unlike real ones (an all-background image, say): "
                "verify on real samples with --data; "
                if not self.options["data"] or str(self.options["data"]) == "random"
                else ""
            )
            raise VerificationError(
                f"pass 'fp16' ({what}) changed the model's outputs: "
                f"{'; '.join(result.violations[:3])}",
                f"{hint}keep the ops involved in float32 with --block-op, or try "
                "--accuracy-fallback",
            )
        data = result.to_dict()
        data["emulated"] = emulated
        return data
