"""prune: exact sparsity per layer and globally, N:M patterns, channel removal that really
shrinks the model and keeps it valid, the accuracy budget, and recovery on calibration data.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import typer
from onnx import numpy_helper

from optimodel.data import load_data, model_input_specs
from optimodel.errors import GateFailed, UsageError
from optimodel.evaluate import evaluate
from optimodel.inspection import estimate_macs
from optimodel.passes import get_pass
from optimodel.passes.base import PassResult
from optimodel.pipeline import run_passes
from optimodel.pruning import channel as ch
from optimodel.pruning.nm import check_nm, nm_violations
from tests.conftest import SAMPLES

PRUNABLE = ["mlp", "digits_cnn", "transformer_block"]
DIGITS = SAMPLES / "digits_cnn.onnx"
DIGITS_DATA = SAMPLES / "digits_test.npz"


def _load(name: str) -> onnx.ModelProto:
    return onnx.load(str(SAMPLES / f"{name}.onnx"))


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _feed(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in model_input_specs(model):
        dims = [d if isinstance(d, int) and d > 0 else (batch if i == 0 else 5)
                for i, d in enumerate(spec.shape)]  # fmt: skip
        feed[spec.name] = rng.random(dims, dtype=np.float32)
    return feed


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _valid(model: onnx.ModelProto, reference: onnx.ModelProto, batch: int = 2) -> None:
    """Checker (with strict shape inference) passes; runs in ORT with the same output shapes."""
    onnx.checker.check_model(model, full_check=True)
    feed = _feed(reference, batch)
    for got, want in zip(_run(model, feed), _run(reference, feed), strict=True):
        assert got.shape == want.shape
        assert np.all(np.isfinite(got))


def _accuracy(path: str) -> float:
    model = onnx.load(path)
    data = load_data(str(DIGITS_DATA), model_input_specs(model), batch_size=64)
    return float(evaluate(path, data).model["value"])  # type: ignore[index]


# ------------------------------------------------------------------ unstructured


@pytest.mark.parametrize("name", PRUNABLE)
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_unstructured_layer_scope_hits_the_request_in_every_layer(name, sparsity):
    model = _load(name)
    result = get_pass("prune", sparsity=sparsity, min_params=0).run(model)
    assert result.modified
    layers = result.stats["layers"]
    assert layers and all(abs(row["achieved"] - sparsity) <= 0.005 for row in layers), layers
    assert abs(result.stats["achieved_sparsity"] - sparsity) <= 0.005
    after = _weights(result.model)
    for row in layers:  # only weight inputs: biases keep every value
        assert np.count_nonzero(after[row["weight"]] == 0) == round(sparsity * row["params"])
    before = _weights(model)
    for name_, array in before.items():
        if name_ not in {row["weight"] for row in layers}:
            np.testing.assert_array_equal(after[name_], array)
    _valid(result.model, model)
    size = result.stats["compressed_bytes"]
    assert size["after"] < size["before"]


def test_compressed_size_in_pieces_matches_one_deflate_stream():
    """Deflating a large model in pieces on every core reports what one stream gives."""
    import zlib

    from optimodel.pruning.common import DEFLATE_PIECE, compressed_size

    rng = np.random.default_rng(0)
    weights = rng.standard_normal(3 * DEFLATE_PIECE // 4).astype(np.float32)
    weights[rng.random(weights.size) < 0.5] = 0.0  # half zeros, as pruning leaves them
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["w"], ["y"])],
        "g",
        [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [weights.size])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = onnx.helper.make_model(graph)
    one_stream = len(zlib.compress(model.SerializeToString(), 6))
    assert model.ByteSize() > 2 * DEFLATE_PIECE
    assert abs(compressed_size(model) - one_stream) <= 0.001 * one_stream


@pytest.mark.parametrize("name", PRUNABLE)
def test_unstructured_global_scope_hits_the_request_overall_and_wipes_out_no_layer(name):
    model = _load(name)
    result = get_pass("prune", sparsity=0.6, scope="global", min_params=0).run(model)
    stats = result.stats
    assert abs(stats["achieved_sparsity"] - 0.6) <= 0.005
    assert stats["normalization"].startswith("|w| / RMS")
    assert all(row["achieved"] <= 0.9 + 1e-9 for row in stats["layers"])
    assert all(row["achieved"] > 0 for row in stats["layers"])
    _valid(result.model, model)


def test_global_scope_normalizes_layers_of_different_scales():
    """A layer whose weights are 100x smaller is not emptied by one global threshold."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(32, 64)).astype(np.float32)
    w2 = (rng.normal(size=(64, 16)) / 100).astype(np.float32)
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [
                onnx.helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                onnx.helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2"),
            ],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 32])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 16])],
            [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    stats = get_pass("prune", sparsity=0.5, scope="global", min_params=0).run(model).stats
    by_weight = {row["weight"]: row["achieved"] for row in stats["layers"]}
    assert 0.35 < by_weight["w2"] < 0.65 and 0.35 < by_weight["w1"] < 0.65, by_weight
    assert abs(stats["achieved_sparsity"] - 0.5) <= 0.005


def test_shared_weight_is_pruned_once_and_exclusions_and_min_params_hold():
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 64] x) => (float[N, 64] y, float[N, 32] z)
        {
            a = MatMul(x, W)
            y = MatMul(a, W)
            z = MatMul(x, V)
        }"""
    )
    rng = np.random.default_rng(1)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.normal(size=(64, 32)).astype(np.float32), "V"),
        ]
    )
    result = get_pass("prune", sparsity=0.5).run(model)
    rows = {row["weight"]: row for row in result.stats["layers"]}
    assert len(rows["W"]["nodes"]) == 2 and abs(rows["W"]["achieved"] - 0.5) < 1e-3
    excluded = get_pass("prune", sparsity=0.5, exclude_ops=["MatMul"]).run(model)
    assert not excluded.modified and all("excluded" in d["reason"] for d in excluded.declined)
    by_node = get_pass("prune", sparsity=0.5, exclude_nodes=[model.graph.node[2].output[0]])
    assert [row["weight"] for row in by_node.run(model).stats["layers"]] == ["W"]
    small = get_pass("prune", sparsity=0.5, min_params=3000).run(model)
    assert [row["weight"] for row in small.stats["layers"]] == ["W"]
    assert any("--min-params" in d["reason"] for d in small.declined)


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError):
        get_pass("prune", granularity="block")
    with pytest.raises(UsageError):
        get_pass("prune", granularity="channel")  # no sparsity
    with pytest.raises(UsageError):
        get_pass("prune", granularity="2:4", sparsity=0.3)
    with pytest.raises(UsageError):
        get_pass("prune", sparsity=1.0)
    with pytest.raises(UsageError):
        get_pass("prune", granularity="channel", sparsity=0.3, accuracy_budget=1.0)
    with pytest.raises(UsageError, match="calib-samples"):
        get_pass("prune", sparsity=0.5, calib_samples=0)


def test_recovery_uses_up_to_calib_samples_of_the_data(prune_cli, tmp_path):
    """All 450 digits samples by default (the fit improves with data); fewer when asked."""
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    for extra, samples in (([], 450), (["--calib-samples", "100"], 100)):
        result = prune_cli("prune", DIGITS, "-o", out, "--sparsity", "0.5", "--force",
                           "--calib-data", DIGITS_DATA, "--report", report, *extra)  # fmt: skip
        assert result.exit_code == 0, result.output
        stats = next(p for p in json.loads(report.read_text())["passes"] if p["name"] == "prune")
        assert stats["stats"]["recovery"]["samples"] == samples


# ------------------------------------------------------------------ N:M


def test_check_nm_accepts_the_pattern_and_finds_violations():
    good = np.array([[1, 0, 2, 0, 0, 0, 3, 4]], dtype=np.float32)
    assert check_nm(good, 2, 4, axis=1)
    assert not check_nm(good.T.copy() + 1, 2, 4, axis=0)
    bad = good.copy()
    bad[0, 1] = 5
    assert not check_nm(bad, 2, 4, axis=1) and nm_violations(bad, 2, 4, axis=1) == 1
    assert nm_violations(np.ones((3, 6)), 2, 4, axis=1) == -1  # 6 is not a multiple of 4


@pytest.mark.parametrize("name", PRUNABLE)
def test_two_four_holds_on_every_pruned_weight_along_its_reduction_axis(name):
    model = _load(name)
    result = get_pass("prune", granularity="2:4", min_params=0).run(model)
    assert result.modified and result.stats["nm_check_passed"]
    after, before = _weights(result.model), _weights(model)
    expected_axis = {"Conv": 1, "MatMul": 0}
    for row in result.stats["layers"]:
        if row["op"] in expected_axis:
            assert row["axis"] == expected_axis[row["op"]]
        if row["op"] == "Gemm":  # sample models use transB=1: [N, K]
            assert row["axis"] == 1
        assert check_nm(after[row["weight"]], 2, 4, row["axis"])
        assert abs(row["achieved"] - 0.5) <= 0.005
        # the checker does see the dense original as a violation
        assert not check_nm(before[row["weight"]], 2, 4, row["axis"])
    _valid(result.model, model)


def test_nm_declines_a_reduction_dim_that_is_not_a_multiple_of_m():
    result = get_pass("prune", granularity="n:m", pattern="2:4", min_params=0).run(
        _load("digits_cnn")
    )
    reasons = {d["node"]: d["reason"] for d in result.declined}
    assert "not a multiple of 4" in reasons["stem_conv"]  # [16, 1, 3, 3]: C = 1


# ------------------------------------------------------------------ channel


def _digits_channel(**options) -> tuple[onnx.ModelProto, dict]:
    model = onnx.load(str(DIGITS))
    result = get_pass("prune", granularity="channel", sparsity=0.3, **options).run(model)
    assert result.modified
    return result.model, result.stats


def test_channel_30_percent_shrinks_the_digits_cnn_and_keeps_it_valid(tmp_path, capsys):
    original = onnx.load(str(DIGITS))
    pruned, stats = _digits_channel()
    onnx.checker.check_model(pruned, full_check=True)
    params = stats["parameters"]
    assert params["after"] <= 0.75 * params["before"]
    macs_before = estimate_macs(original)["total"]
    macs_after = estimate_macs(pruned)["total"]
    assert macs_after <= 0.75 * macs_before
    assert stats["macs"] == {
        "before": macs_before,
        "after": macs_after,
        "reduction": pytest.approx(1 - macs_after / macs_before),
    }
    assert stats["rewrite_check"]["exact"]
    # the residual group: stem and block2 lose the same channels; classifier rows follow
    groups = {tuple(g["sources"]): g for g in stats["groups"]}
    assert groups[("stem_conv", "block2_conv")]["kept"] == 8  # 11 rounded to a multiple of 8
    weights = _weights(pruned)
    assert weights["fc.weight"].shape == (10, 24)
    assert weights["stem.1.running_var"].shape == (8,)
    exact, exact_stats = _digits_channel(channel_multiple=1)
    assert [g["kept"] for g in exact_stats["groups"]] == [11, 11, 22]
    assert "multiple of 8" in exact_stats["note"]
    assert _weights(exact)["fc.weight"].shape == (10, 22)
    for batch in (1, 7):
        feed = {"input": np.random.default_rng(batch).random((batch, 1, 8, 8), np.float32)}
        (logits,) = _run(pruned, feed)
        assert logits.shape == (batch, 10)
    path = tmp_path / "pruned.onnx"
    onnx.save(pruned, str(path))
    drop = _accuracy(str(DIGITS)) - _accuracy(str(path))
    with capsys.disabled():
        print(f"\n[prune] digits CNN, channel 30% (no recovery): accuracy drop {drop:.2f} points")


def test_channel_pruning_rewrite_is_exact_on_every_sample_model():
    for name in PRUNABLE:
        model = _load(name)
        groups, _ = ch.find_groups(model)
        assert groups, name
        keeps = ch.plan_layer([ch.importance(g) for g in groups], [0.5] * len(groups))
        pruned = ch.apply_plan(model, groups, keeps)
        masked = ch.apply_plan(model, groups, keeps, mode="zero")
        _valid(pruned, model)
        feed = _feed(model, 3)
        for a, b in zip(_run(pruned, feed), _run(masked, feed), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_channels_reaching_outputs_reshape_or_layer_norm_are_left_alone():
    _, declined = ch.find_groups(_load("transformer_block"))
    reasons = {d["node"]: d["reason"] for d in declined}
    assert "graph output" in reasons["ffn_fc2_matmul"]
    assert "Shape" in reasons["attn_q_matmul"]
    assert "ReduceMean" in reasons["attn_out_matmul"]
    groups, declined = ch.find_groups(_load("digits_cnn"))
    assert {d["node"] for d in declined} == {"fc_gemm"}
    assert len(groups) == 3


def _conv_model(body: str, inits: dict[str, tuple[int, ...]], outputs: str) -> onnx.ModelProto:
    """A small opset-17 CNN in ONNX text with random initializers of the given shapes."""
    rng = np.random.default_rng(3)
    model = onnx.parser.parse_model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 6, 6] x) => ({outputs})
        {{ {body} }}"""
    )
    for name, shape in inits.items():
        array = rng.normal(size=shape).astype(np.float32)
        if name.endswith("var"):
            array = np.abs(array) + 0.5
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    return onnx.shape_inference.infer_shapes(model)


def test_depthwise_conv_flatten_and_concat_follow_the_rules():
    model = _conv_model(
        """
        a = Conv<kernel_shape = [1, 1]>(x, w1, b1)
        n = BatchNormalization(a, g1, be1, m1, var)
        r = Clip(n, lo, hi)
        d = Conv<group = 8, kernel_shape = [3, 3], pads = [1, 1, 1, 1]>(r, dw, db)
        s = HardSwish(d)
        p = MaxPool<kernel_shape = [2, 2], strides = [2, 2]>(s)
        f = Flatten<axis = 1>(p)
        y = Gemm<transB = 1>(f, fc, fcb)
        c1 = Conv<kernel_shape = [1, 1]>(x, w2)
        c2 = Conv<kernel_shape = [1, 1]>(x, w3)
        z = Concat<axis = 1>(c1, c2)
        """,
        {
            "w1": (8, 4, 1, 1),
            "b1": (8,),
            "g1": (8,),
            "be1": (8,),
            "m1": (8,),
            "var": (8,),
            "lo": (),
            "hi": (),
            "dw": (8, 1, 3, 3),
            "db": (8,),
            "fc": (5, 72),
            "fcb": (5,),
            "w2": (6, 4, 1, 1),
            "w3": (6, 4, 1, 1),
        },  # fmt: skip
        "float[N, 5] y, float[N, 12, 6, 6] z",
    )
    groups, declined = ch.find_groups(model)
    assert [g.label for g in groups] == ["a"]  # BN, Clip, depthwise, HardSwish, pool, Flatten
    assert {d["node"]: d["reason"] for d in declined}["c1"] == "its channels reach Concat 'z'"
    keeps = ch.plan_layer([ch.importance(g) for g in groups], [0.5])
    pruned = ch.apply_plan(model, groups, keeps)
    nodes = {n.output[0]: n for n in pruned.graph.node}
    assert onnx.helper.get_node_attr_value(nodes["d"], "group") == 4
    weights = _weights(pruned)
    assert weights["dw"].shape == (4, 1, 3, 3) and weights["var"].shape == (4,)
    assert weights["fc"].shape == (5, 36)  # channel c -> rows 9c .. 9c + 8 after Flatten
    # value_info was updated, so strict shape inference agrees with the stored shapes
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True)
    masked = ch.apply_plan(model, groups, keeps, mode="zero")
    feed = _feed(model, 3)
    for a, b in zip(_run(pruned, feed), _run(masked, feed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_channel_global_scope_ranks_across_groups():
    pruned, stats = _digits_channel(scope="global", channel_multiple=1)
    assert abs(stats["achieved_sparsity"] - 0.3) < 0.02
    assert all(0 < g["kept"] for g in stats["groups"])
    _valid(pruned, onnx.load(str(DIGITS)), batch=7)


def test_accuracy_budget_keeps_the_drop_within_one_point(tmp_path, capsys):
    pruned, stats = _digits_channel(accuracy_budget=1.0, eval_data=str(DIGITS_DATA))
    search = stats["accuracy_search"]
    assert search["fits"] and search["drop"] <= 1.0
    path = tmp_path / "budget.onnx"
    onnx.save(pruned, str(path))
    drop = _accuracy(str(DIGITS)) - _accuracy(str(path))
    assert drop <= 1.0
    assert stats["parameters"]["after"] < stats["parameters"]["before"]
    with capsys.disabled():
        print(
            f"\n[prune] digits CNN, channel 30% with --accuracy-budget 1: drop {drop:.2f} points, "
            f"channels removed {stats['achieved_sparsity']:.1%}, "
            f"MACs -{stats['macs']['reduction']:.1%}"
        )


def test_accuracy_budget_that_nothing_meets_is_a_gate_failure(tmp_path):
    """Labels equal to the MLP's own argmax: any pruning of its random weights moves some."""
    model = _load("mlp")
    rng = np.random.default_rng(0)
    features = rng.random((300, 32), dtype=np.float32)
    (probs,) = _run(model, {"features": features})
    data = tmp_path / "labels.npz"
    np.savez(data, features=features, labels=probs.argmax(axis=1).astype(np.int64))
    with pytest.raises(GateFailed) as info:
        get_pass(
            "prune",
            granularity="channel",
            sparsity=0.9,
            min_params=0,
            accuracy_budget=0.0,
            eval_data=str(data),
        ).run(model)
    assert info.value.exit_code == 3


def test_keep_best_writes_the_closest_configuration_and_still_exits_3(cli, tmp_path):
    model = SAMPLES / "mlp.onnx"
    rng = np.random.default_rng(0)
    features = rng.random((300, 32), dtype=np.float32)
    (probs,) = _run(_load("mlp"), {"features": features})
    data = tmp_path / "labels.npz"
    np.savez(data, features=features, labels=probs.argmax(axis=1).astype(np.int64))
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    args = ["prune", model, "-o", out, "--granularity", "channel", "--sparsity", "0.9",
            "--min-params", "0", "--accuracy-budget", "0", "--eval-data", data]  # fmt: skip
    refused = cli(*args)
    assert refused.exit_code == 3 and not out.exists()
    kept = cli(*args, "--keep-best", "--report", report)
    assert kept.exit_code == 3, kept.output
    assert "--keep-best" in kept.output and out.exists()
    written = json.loads(report.read_text())
    assert written["status"] == "gate_failed"
    search = next(p for p in written["passes"] if p["name"] == "prune")["stats"]["accuracy_search"]
    assert not search["fits"] and search["drop"] > 0
    onnx.checker.check_model(str(out))


def test_recovery_on_calibration_data_wins_back_accuracy(tmp_path, capsys):
    plain, _ = _digits_channel()
    refit, stats = _digits_channel(calib_data=str(DIGITS_DATA))
    assert stats["recovery"]["refit_layers"] >= 3
    for layer in stats["recovery"]["layers"]:
        assert layer["relative_error_after"] <= layer["relative_error_before"]
    onnx.checker.check_model(refit, full_check=True)
    paths = []
    for label, model in (("plain", plain), ("refit", refit)):
        path = tmp_path / f"{label}.onnx"
        onnx.save(model, str(path))
        paths.append(str(path))
    before, after = _accuracy(paths[0]), _accuracy(paths[1])
    assert after > before
    with capsys.disabled():
        print(
            f"\n[prune] digits CNN, channel 30%: accuracy {before:.1f}% -> {after:.1f}% "
            "with least-squares recovery (calibrated on the test split itself)"
        )


def test_unstructured_recovery_keeps_the_zeros(tmp_path):
    model = _load("mlp")
    calib = tmp_path / "calib.npz"
    np.savez(calib, features=np.random.default_rng(0).random((128, 32), dtype=np.float32))
    plain = get_pass("prune", sparsity=0.7, min_params=0, data=str(calib)).run(model)
    refit = get_pass("prune", sparsity=0.7, min_params=0, calib_data=str(calib)).run(model)
    for row in refit.stats["layers"]:
        assert abs(row["achieved"] - 0.7) <= 0.005
    assert refit.stats["recovery"]["refit_layers"] >= 1
    assert refit.stats["fidelity"]["cosine"] > plain.stats["fidelity"]["cosine"]


# ------------------------------------------------------------------ pipeline and CLI


def test_pipeline_accepts_every_granularity_on_the_digits_cnn():
    model = onnx.load(str(DIGITS))
    feeds = list(load_data(str(DIGITS_DATA), model_input_specs(model), num_samples=4))
    for options in (
        {"sparsity": 0.5},
        {"granularity": "2:4"},
        {"granularity": "channel", "sparsity": 0.3},
    ):
        out, records = run_passes(model, [get_pass("prune", **options)], batches=feeds)
        assert records[0].status == "ok", records[0].reason
        assert records[0].verification["tolerance"] == "none"
        onnx.checker.check_model(out, full_check=True)


@pytest.fixture
def prune_cli(cli):
    """The real CLI once `prune` is registered there; until then an app holding it."""
    from typer.testing import CliRunner

    from optimodel.cli import app as app_module
    from optimodel.cli import prune_cmd

    if any(c.name == "prune" for c in app_module.app.registered_commands):
        return cli
    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("prune")(prune_cmd.prune)
    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(app, [str(a) for a in args])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    return run


def test_cli_prune_writes_a_smaller_model_and_a_report(prune_cli, tmp_path):
    out = tmp_path / "pruned.onnx"
    report = tmp_path / "report.json"
    result = prune_cli(
        "prune", DIGITS, "-o", out, "--granularity", "channel", "--sparsity", "0.3",
        "--data", DIGITS_DATA, "--report", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "MACs" in result.stdout and "fc_gemm" in result.stdout
    data = json.loads(report.read_text())
    prune = next(p for p in data["passes"] if p["name"] == "prune")
    assert prune["stats"]["granularity"] == "channel"
    assert data["output_model"]["parameters"] < data["input_model"]["parameters"]
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    again = prune_cli("prune", DIGITS, "-o", out, "--sparsity", "0.5")
    assert again.exit_code == 1  # output exists, no --force
    bad = prune_cli("prune", DIGITS, "-o", tmp_path / "x.onnx", "--granularity", "rows")
    assert bad.exit_code == 2


def test_cli_accuracy_budget_failure_exits_3(prune_cli, tmp_path):
    model = _load("mlp")
    rng = np.random.default_rng(0)
    features = rng.random((300, 32), dtype=np.float32)
    (probs,) = _run(model, {"features": features})
    data = tmp_path / "labels.npz"
    np.savez(data, features=features, labels=probs.argmax(axis=1).astype(np.int64))
    result = prune_cli(
        "prune", SAMPLES / "mlp.onnx", "-o", tmp_path / "o.onnx", "--granularity", "channel",
        "--sparsity", "0.9", "--min-params", "0", "--accuracy-budget", "0",
        "--eval-data", data,
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    assert not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------ recovery: masks, ConvTranspose


def _single_layer(op: str, weight: np.ndarray, **attrs) -> onnx.ModelProto:
    from onnx import helper

    node = helper.make_node(op, ["x", "w"], ["y"], name="layer", **attrs)
    graph = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize(
    ("kernel", "strides", "pads", "output_padding"),
    [((2, 2), (2, 2), (0, 0, 0, 0), (0, 0)), ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1))],
)
def test_transposed_im2col_reproduces_onnx_runtime_conv_transpose(
    kernel, strides, pads, output_padding
):
    from optimodel.pruning.recovery import im2col_transposed

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3, 4, *kernel)).astype(np.float32)
    model = _single_layer("ConvTranspose", weight, kernel_shape=list(kernel),
                          strides=list(strides), pads=list(pads),
                          output_padding=list(output_padding))  # fmt: skip
    x = rng.standard_normal((2, 3, 5, 6)).astype(np.float32)
    (y,) = _run(model, {"x": x})
    rows = im2col_transposed(x.astype(np.float64), model.graph.node[0], kernel)
    m = weight.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, 4)
    got = (rows @ m).reshape(2, y.shape[2], y.shape[3], 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, y, atol=1e-5)


def _calib_folder(tmp_path, name: str, feeds: list[dict[str, np.ndarray]]) -> str:
    folder = tmp_path / name
    folder.mkdir()
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i}.npz", **feed)
    return str(folder)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_conv_transpose_is_refit_and_gets_closer_to_the_dense_layer(tmp_path):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((8, 6, 2, 2)).astype(np.float32)
    model = _single_layer("ConvTranspose", weight, kernel_shape=[2, 2], strides=[2, 2])
    mix = rng.standard_normal((8, 3))  # real activations are correlated: 8 channels, 3 causes

    def sample() -> np.ndarray:
        latent = rng.standard_normal((1, 3, 6, 6))
        x = np.einsum("ck,bkhw->bchw", mix, latent) + 0.05 * rng.standard_normal((1, 8, 6, 6))
        return x.astype(np.float32)

    feeds = [{"x": sample()} for _ in range(4)]
    calib = _calib_folder(tmp_path, "calib", feeds)
    plain = get_pass("prune", sparsity=0.5, min_params=1).run(model)
    refit = get_pass("prune", sparsity=0.5, min_params=1, calib_data=calib).run(model)
    layers = refit.stats["recovery"]["layers"]
    assert (
        layers[0]["refit"]
        and layers[0]["relative_error_after"] < layers[0]["relative_error_before"]
    )
    assert refit.stats["achieved_sparsity"] == pytest.approx(0.5, abs=0.005)
    held_out = {"x": sample()}
    (dense,) = _run(model, held_out)
    assert _cosine(_run(refit.model, held_out)[0], dense) > _cosine(
        _run(plain.model, held_out)[0], dense
    )


def test_saliency_mask_keeps_small_weights_on_loud_inputs(tmp_path):
    """Magnitude drops the small weights of input 0; that input is 10x louder than the
    rest, so those weights carry more of the output: saliency keeps them."""
    from optimodel.pruning.recovery import saliency_support

    rng = np.random.default_rng(2)
    weight = np.where(rng.random((8, 4)) < 0.5, -1.0, 1.0).astype(np.float32)
    weight[0] *= 0.2
    x = rng.standard_normal((256, 8))
    x[:, 0] *= 10.0
    h = x.T @ x
    keep = saliency_support(h, weight.astype(np.float64), zeros=16)
    assert keep[0].all()  # the quiet-looking row survives
    assert int((~keep).sum()) == 16
    # and through the pass: the layer's error with re-selection is no worse than without
    model = _single_layer("MatMul", weight)
    feeds = [{"x": x[i * 64 : (i + 1) * 64].astype(np.float32)} for i in range(4)]
    calib = _calib_folder(tmp_path, "calib", feeds)
    result = get_pass("prune", sparsity=0.5, min_params=1, calib_data=calib).run(model)
    info = result.stats["recovery"]["layers"][0]
    assert info["mask"] == "saliency"
    pruned = numpy_helper.to_array(result.model.graph.initializer[0])
    assert np.count_nonzero(pruned == 0) == 16 and np.all(pruned[0] != 0)
    # the same magnitude-pruned layer re-fit on its magnitude mask fits worse
    from optimodel.pruning import recovery

    plain = get_pass("prune", sparsity=0.5, min_params=1).run(model).model
    batches = list(load_data(calib, model_input_specs(model)))
    _, summary = recovery.refit(model, plain, batches, outputs=["y"], keep_zeros=True)
    magnitude_error = summary["layers"][0]["relative_error_after"]
    assert info["relative_error_after"] < magnitude_error


# ------------------------------------------------------------------------ sensitivity


@pytest.mark.parametrize("granularity", ["unstructured", "channel"])
def test_sensitivity_table_prunes_each_unit_alone_at_each_level(cli, tmp_path, granularity):
    out = tmp_path / "p.onnx"
    result = cli("prune", SAMPLES / "digits_cnn.onnx", "-o", out, "--sparsity", "0.5",
                 "--granularity", granularity, "--sensitivity", "0.25,0.75",
                 "--eval-data", SAMPLES / "digits_test.npz", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    stats = next(p for p in json.loads(result.stdout)["passes"] if p["name"] == "prune")["stats"]
    table = stats["sensitivity"]
    assert table["levels"] == [0.25, 0.75] and table["metric"] == "top1"
    assert table["baseline"] == pytest.approx(100.0)
    assert len(table["rows"]) >= 2
    assert table["evaluations"] == 2 * len(table["rows"])
    assert all(len(r["drops"]) == 2 and all(np.isfinite(r["drops"])) for r in table["rows"])
    # pruning a layer harder costs more: the worst unit at 75% loses more than at 25%
    worst_low = max(r["drops"][0] for r in table["rows"])
    worst_high = max(r["drops"][1] for r in table["rows"])
    assert worst_high > worst_low
    # the model itself is still pruned as asked
    assert stats["achieved_sparsity"] == pytest.approx(0.5, abs=0.07)
    assert out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sensitivity", "0.5"], "--eval-data"),
        (["--sensitivity", "0.5,1.5", "--eval-data", "x.npz"], "(0, 1)"),
        (["--sensitivity", "half", "--eval-data", "x.npz"], "sparsities"),
        (["--granularity", "2:4", "--sensitivity", "0.5", "--eval-data", "x.npz"], "unstructured"),
    ],
)
def test_sensitivity_usage_errors(cli, tmp_path, extra, message):
    out = tmp_path / "p.onnx"
    sparsity = [] if "2:4" in extra else ["--sparsity", "0.5"]
    result = cli("prune", SAMPLES / "digits_cnn.onnx", "-o", out, *sparsity, *extra)
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def _residual_mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """h = Relu(x @ W1 + b1); out = h + (h @ W2 + b2): transformer-style MatMul -> bias
    Add layers (the bias in its own Add), one of them before a residual Add."""
    from onnx import helper

    d = 16
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="bias1"),
        helper.make_node("Relu", ["a1"], ["h"], name="relu"),
        helper.make_node("MatMul", ["h", "w2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["b2", "m2"], ["a2"], name="bias2"),
        helper.make_node("Add", ["h", "a2"], ["y"], name="residual"),
    ]
    inits = {
        "w1": rng.standard_normal((d, d)) / 4,
        "b1": rng.standard_normal(d) / 4,
        "w2": rng.standard_normal((d, d)) / 4,
        "b2": rng.standard_normal(d) / 4,
    }
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, d])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, d])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_matmul_recovery_corrects_the_bias_add(tmp_path):
    from optimodel.pruning import recovery

    rng = np.random.default_rng(3)
    model = _residual_mlp(rng)
    first, second = recovery._layer(model, "m1"), recovery._layer(model, "m2")
    assert first is not None and first.bias_name == "b1"
    assert second is not None and second.bias_name == "b2"  # Add(b2, m2): either side

    mix = rng.standard_normal((16, 4))  # correlated inputs with a non-zero mean

    def sample(rows: int) -> np.ndarray:
        latent = rng.standard_normal((rows, 4))
        return (1.0 + latent @ mix.T + 0.05 * rng.standard_normal((rows, 16))).astype(np.float32)

    calib = _calib_folder(tmp_path, "calib", [{"x": sample(64)} for _ in range(6)])
    plain = get_pass("prune", sparsity=0.5, min_params=1).run(model)
    refit = get_pass("prune", sparsity=0.5, min_params=1, calib_data=calib).run(model)
    after = {t.name: numpy_helper.to_array(t) for t in refit.model.graph.initializer}
    before = _weights(model)
    assert not np.allclose(after["b1"], before["b1"]) and not np.allclose(
        after["b2"], before["b2"]
    )  # both bias Adds took part in the fit
    assert refit.stats["achieved_sparsity"] == pytest.approx(0.5, abs=0.005)
    for name in ("w1", "w2"):  # pruned zeros stay zeros
        assert np.count_nonzero(after[name] == 0) >= before[name].size // 2
    held_out = {"x": sample(256)}
    (dense,) = _run(model, held_out)
    (got,) = _run(refit.model, held_out)
    (zeroed,) = _run(plain.model, held_out)
    assert _cosine(got, dense) > _cosine(zeroed, dense)
    error = float(np.mean((got - dense) ** 2))
    assert error < 0.5 * float(np.mean((zeroed - dense) ** 2))


def test_too_few_calibration_rows_choose_a_stronger_damping(tmp_path, monkeypatch):
    """32 rows for a 48-input layer: an undamped fit chases the noise of those rows. The
    damping picked on held-out feeds (which the saliency mask uses too) predicts new
    inputs better than the weakest candidate alone; below WIDE_SEARCH_SAMPLES samples
    the choice is kept to the short list."""
    from optimodel.pruning import recovery

    rng = np.random.default_rng(5)
    weight = rng.standard_normal((48, 8)).astype(np.float32)
    model = _single_layer("MatMul", weight)
    mix = rng.standard_normal((48, 6))

    def sample(rows: int) -> np.ndarray:
        latent = rng.standard_normal((rows, 6))
        return (latent @ mix.T + 0.5 * rng.standard_normal((rows, 48))).astype(np.float32)

    feeds = recovery.WIDE_SEARCH_SAMPLES
    calib = _calib_folder(tmp_path, "calib", [{"x": sample(1)} for _ in range(feeds)])
    few = _calib_folder(tmp_path, "few", [{"x": sample(1)} for _ in range(feeds - 1)])
    held_out = {"x": sample(512)}
    (dense,) = _run(model, held_out)

    def fit(folder: str = calib) -> tuple[float, float]:
        result = get_pass("prune", sparsity=0.5, min_params=1, calib_data=folder).run(model)
        error = float(np.mean((_run(result.model, held_out)[0] - dense) ** 2))
        return error, result.stats["recovery"]["layers"][0]["damping"]

    chosen_error, chosen = fit()
    monkeypatch.setattr(recovery, "FEW_SAMPLES_DAMPINGS", (0.05,))  # in no other list
    assert fit(few)[1] == 0.05 and fit()[1] == chosen
    monkeypatch.setattr(recovery, "DAMPINGS", (recovery.DAMPINGS[0],))
    weakest_error, weakest = fit()
    assert chosen > weakest
    assert chosen_error < weakest_error


def test_matmul_bias_is_left_alone_where_others_read_it_or_it_is_not_a_bias():
    from onnx import helper

    from optimodel.pruning import recovery

    rng = np.random.default_rng(6)
    model = _residual_mlp(rng)
    inits = {t.name: t for t in model.graph.initializer}
    assert recovery._layer(model, "m2").bias_name == "b2"
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)  # x @ W2 is a graph output too: its bias must not move
    exposed.graph.output.append(helper.make_tensor_value_info("m2", onnx.TensorProto.FLOAT, None))
    assert recovery._layer(exposed, "m2").bias is None
    shared = onnx.ModelProto()
    shared.CopyFrom(model)  # b2 read by a second Add
    shared.graph.node.append(helper.make_node("Add", ["y", "b2"], ["y2"], name="again"))
    assert recovery._layer(shared, "m2").bias is None
    for shape, found in (((1, 1, 16), True), ((4, 16), False), ((16, 1), False)):
        other = onnx.ModelProto()
        other.CopyFrom(model)
        value = np.resize(numpy_helper.to_array(inits["b2"]), shape).astype(np.float32)
        for t in other.graph.initializer:
            if t.name == "b2":
                t.CopyFrom(numpy_helper.from_array(value, "b2"))
        assert (recovery._layer(other, "m2").bias is not None) == found, shape


def test_channel_pruning_keeps_a_bias_that_only_the_pruned_model_sees_as_its_own(tmp_path):
    """A MatMul's bias in a Constant node is no bias of the layer in the original; channel
    slicing turns it into an initializer of its own. The fit must not pull it to zero."""
    from onnx import helper

    rng = np.random.default_rng(0)
    d = 16

    def f(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / 3).astype(np.float32)

    b2 = f(d) + 2.0
    nodes = [
        helper.make_node("Constant", [], ["b2"], value=numpy_helper.from_array(b2)),
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["a2"], name="add2"),
        helper.make_node("Relu", ["a2"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w3"], ["y"], name="mm3"),
    ]
    inits = {"w1": f(8, d), "b1": f(d), "w2": f(d, d), "w3": f(d, 4)}
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8

    def feed(n: int) -> dict[str, np.ndarray]:
        return {"x": rng.standard_normal((n, 8)).astype(np.float32)}

    calib = _calib_folder(tmp_path, "calib", [feed(32) for _ in range(8)])
    options = {"granularity": "channel", "sparsity": 0.5, "min_params": 1, "channel_multiple": 1}
    plain = get_pass("prune", **options).run(model)
    refit = get_pass("prune", **options, calib_data=calib).run(model)
    held_out = feed(512)
    (dense,) = _run(model, held_out)
    plain_error = float(np.mean((_run(plain.model, held_out)[0] - dense) ** 2))
    refit_error = float(np.mean((_run(refit.model, held_out)[0] - dense) ** 2))
    assert refit_error < 0.1 * plain_error


def test_a_refit_that_predicts_held_out_feeds_worse_is_not_kept(tmp_path, monkeypatch):
    """16 rows of unstructured inputs for a 16-input layer: the fit matches its own rows
    and misses new ones. The layer as magnitude-pruned is kept, and it is the better one."""
    from optimodel.pruning import recovery

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 4)).astype(np.float32)
    model = _single_layer("MatMul", weight)
    feeds = [{"x": rng.standard_normal((2, 16)).astype(np.float32)} for _ in range(8)]
    calib = _calib_folder(tmp_path, "calib", feeds)
    held_out = {"x": rng.standard_normal((512, 16)).astype(np.float32)}
    (dense,) = _run(model, held_out)

    def fit() -> tuple[float, PassResult]:
        result = get_pass("prune", sparsity=0.5, min_params=1, calib_data=calib).run(model)
        error = float(np.mean((_run(result.model, held_out)[0] - dense) ** 2))
        return error, result

    kept_error, kept = fit()
    layer = kept.stats["recovery"]["layers"][0]
    assert not layer["refit"] and "held-out" in layer["reason"]
    assert layer["relative_error_after"] < layer["relative_error_before"]  # on its own rows
    plain = get_pass("prune", sparsity=0.5, min_params=1).run(model).model
    np.testing.assert_array_equal(_weights(kept.model)["w"], _weights(plain)["w"])
    fit_all = recovery._fit
    monkeypatch.setattr(recovery, "_fit", lambda *a, **k: (*fit_all(*a, **k)[:3], None))
    forced_error, forced = fit()
    assert forced.stats["recovery"]["layers"][0]["refit"]
    assert kept_error < 0.8 * forced_error


# ------------------------------------------------------- fidelity budget (no labels)


def _unlabelled_block_data(tmp_path) -> tuple[onnx.ModelProto, object, np.ndarray]:
    """The transformer block sample and 48 unlabelled [1, 8, 64] inputs in a .npz file."""
    model = _load("transformer_block")
    states = np.random.default_rng(3).standard_normal((48, 8, 64)).astype(np.float32)
    path = tmp_path / "states.npz"
    np.savez(path, hidden_states=states)
    return model, path, states


def _model_cosine(a: onnx.ModelProto, b: onnx.ModelProto, states: np.ndarray) -> float:
    """Cosine of the two models' outputs over all the data (as `optimodel eval` measures
    fidelity), computed here directly."""
    (x,), (y,) = _run(a, {"hidden_states": states}), _run(b, {"hidden_states": states})
    x, y = x.ravel().astype(np.float64), y.ravel().astype(np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_accuracy_budget_without_labels_is_a_fidelity_budget(tmp_path):
    """An embedding-like model has no labels: a budget of 2 asks for cosine >= 0.98 against
    the unpruned model, and the search backs off until the pruned model gets there."""
    model, data, states = _unlabelled_block_data(tmp_path)
    asked = get_pass("prune", sparsity=0.8, min_params=0).run(model)
    assert _model_cosine(model, asked.model, states) < 0.98  # 80% everywhere is over budget
    result = get_pass(
        "prune", sparsity=0.8, min_params=0, accuracy_budget=2.0, eval_data=str(data)
    ).run(model)
    search = result.stats["accuracy_search"]
    assert search["metric"] == "fidelity" and search["unit"] == "(1 - cosine) x 100"
    assert search["fits"] and search["baseline"] == pytest.approx(100.0)
    assert 0.0 <= search["drop"] <= 2.0
    # the search's figure is the cosine a user measures on the same data
    measured = _model_cosine(model, result.model, states)
    assert measured >= 0.98
    assert 0 < result.stats["achieved_sparsity"] < 0.8
    assert any(layer["achieved"] > 0.5 for layer in result.stats["layers"])
    onnx.checker.check_model(result.model, full_check=True)


def test_fidelity_budget_that_nothing_meets_exits_3_naming_the_unit(prune_cli, tmp_path):
    _, data, _ = _unlabelled_block_data(tmp_path)
    src, out = SAMPLES / "transformer_block.onnx", tmp_path / "p.onnx"
    result = prune_cli("prune", src, "-o", out, "--sparsity", "0.9", "--min-params", "0",
                       "--accuracy-budget", "0", "--eval-data", data)  # fmt: skip
    assert result.exit_code == 3, result.output
    assert "(1 - cosine) x 100" in result.output
    assert not out.exists()


def test_sensitivity_without_labels_ranks_units_by_fidelity(cli, tmp_path):
    model, data, states = _unlabelled_block_data(tmp_path)
    src, out = SAMPLES / "transformer_block.onnx", tmp_path / "p.onnx"
    result = cli("prune", src, "-o", out, "--sparsity", "0.5", "--min-params", "0",
                 "--sensitivity", "0.25,0.9", "--eval-data", data, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    stats = next(p for p in json.loads(result.stdout)["passes"] if p["name"] == "prune")["stats"]
    table = stats["sensitivity"]
    assert table["metric"] == "fidelity" and table["baseline"] == pytest.approx(100.0)
    assert len(table["rows"]) >= 4
    for row in table["rows"]:
        assert 0.0 <= row["drops"][0] <= row["drops"][1]  # 90% alone costs more than 25%
    # each figure is (1 - cosine) x 100 of that unit alone: check the worst one directly
    worst = max(table["rows"], key=lambda r: r["drops"][1])
    weights = [w for w in stats["layers"] if ", ".join(w["nodes"]) == worst["unit"]]
    assert len(weights) == 1
    alone = get_pass("prune", sparsity=0.9, min_params=0,
                     exclude_nodes=[n for w in stats["layers"] if w is not weights[0]
                                    for n in w["nodes"]]).run(model).model  # fmt: skip
    assert (1 - _model_cosine(model, alone, states)) * 100 == pytest.approx(
        worst["drops"][1], rel=0.05
    )


def test_backoff_search_with_many_units_steps_several_at_once_and_fits():
    """36 units (MiniLM's layer count) of unequal sensitivity, 60 trials: one unit a rung at
    a time would need 144 back-off steps; moving several per step fits within the trials,
    and the fit keeps the least sensitive units pruned."""
    from onnx import helper

    from optimodel.pruning.search import backoff_search, ladders

    weights = np.linspace(0.1, 4.0, 36)  # unit i costs weights[i] * ratio^2 points

    def build(ratios: list[float]) -> onnx.ModelProto:
        graph = helper.make_graph([], "g", [], [], doc_string=json.dumps(ratios))
        return helper.make_model(graph)

    def drop_of(model: onnx.ModelProto) -> float:
        ratios = np.array(json.loads(model.graph.doc_string))
        return float(np.sum(weights * ratios**2))

    units = [f"layer{i}" for i in range(36)]
    start = [0.5] * 36
    assert drop_of(build(start)) > 10.0
    result = backoff_search(units, ladders(start), build, drop_of, 10.0, baseline=0.0)
    assert result.fits and result.drop <= 10.0 and len(result.trials) <= 60
    ratios = np.array(result.ratios)
    assert ratios.mean() > 0.2  # most of the pruning survives
    assert ratios[:6].mean() > ratios[-6:].mean()  # the cheap units keep more of it
    assert any("(+" in t["kind"] for t in result.trials)  # several units per step


def test_refit_weights_hold_no_subnormal_floats():
    """CPU arithmetic on subnormal floats is slow (a re-fit PP-OCR rec ran 3.6x slower with
    7,042 weights near 1e-40): they are written as 0, every normal value as it is."""
    from optimodel.pruning.recovery import _flush_subnormals

    tiny = np.finfo(np.float32).tiny
    values = np.array([1e-40, -3e-42, tiny, -tiny, 0.5, 0.0], dtype=np.float32)
    flushed = _flush_subnormals(values)
    np.testing.assert_array_equal(flushed, [0, 0, tiny, -tiny, 0.5, 0])
    assert values[0] != 0  # the input is not changed
    ints = np.array([1, 2], dtype=np.int64)
    assert _flush_subnormals(ints) is ints
    refit, _ = _digits_channel(calib_data=str(DIGITS_DATA))
    for t in refit.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype.kind == "f":
            assert not np.any((a != 0) & (np.abs(a) < np.finfo(a.dtype).tiny)), t.name
