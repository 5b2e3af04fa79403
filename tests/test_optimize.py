"""optimize: recipes validated with line numbers, run end to end, one offline HTML report."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import onnx
import pytest

from optimodel.recipes import load_recipe, recipe_names
from tests.conftest import SAMPLES

DIGITS = SAMPLES / "digits_cnn.onnx"
DIGITS_DATA = SAMPLES / "digits_test.npz"


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


# shipped recipe -> (sample model it is meant for, data)
RECIPE_SAMPLES = {
    "default": ("digits_cnn.onnx", DIGITS_DATA),
    "cnn-int8": ("digits_cnn.onnx", DIGITS_DATA),
    "prune-channel-int8": ("digits_cnn.onnx", DIGITS_DATA),
    "transformer-int8": ("transformer_block.onnx", None),
    "int4-weight-only": ("transformer_block.onnx", None),
    "fp16-gpu": ("transformer_block.onnx", None),
    "fp16-cuda": ("transformer_block.onnx", None),
}


def test_shipped_recipes_validate():
    names = recipe_names()
    assert set(RECIPE_SAMPLES) <= set(names)
    for name in names:
        recipe = load_recipe(name, data=str(DIGITS_DATA))
        assert recipe.steps and recipe.build()


@pytest.mark.parametrize("name", sorted(RECIPE_SAMPLES))
def test_every_shipped_recipe_runs_on_its_sample(cli, tmp_path, name):
    model, data = RECIPE_SAMPLES[name]
    report = tmp_path / "r.json"
    args = [
        "optimize",
        SAMPLES / model,
        "-o",
        tmp_path / "o.onnx",
        "-c",
        name,
        "--runs",
        "5",
        "--quiet",
        "--report",
        report,
    ]
    if data:
        args += ["--data", data, "--max-drop", "1"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    out = json.loads(report.read_text())
    assert out["status"] == "ok" and out["verification"]["ok"]
    assert [s["stage"] for s in out["stages"]] == [
        "input",
        *[p["name"] for p in out["recipe"]["passes"]],
        "output",
    ]
    assert all(s.get("status", "ok") == "ok" for s in out["stages"])
    if data:
        assert out["accuracy"]["drop"] <= 1.0
    if name == "fp16-cuda":  # CUDA's SkipLayerNormalization is fast: the recipe turns it on
        ops = {n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node}
        assert {"SkipLayerNormalization", "Attention"} <= ops


def test_default_recipe_on_digits_with_gate_and_reports(cli, tmp_path):
    out = tmp_path / "digits.opt.onnx"
    html_path, json_path = tmp_path / "r.html", tmp_path / "r.json"
    result = cli(
        "optimize",
        DIGITS,
        "-o",
        out,
        "--data",
        DIGITS_DATA,
        "--max-drop",
        "0.5",
        "--runs",
        "20",
        "--report",
        html_path,
        "--report",
        json_path,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(json_path.read_text())
    assert [s["stage"] for s in data["stages"]][0] == "input"
    assert data["stages"][-1]["stage"] == "output"
    assert data["output_model"]["nodes"] < data["input_model"]["nodes"]  # BN fused into Conv
    assert data["accuracy"]["drop"] == pytest.approx(0.0)
    assert data["gates"][0]["passed"]
    assert len(data["latency"]) == 2 and data["latency"][0]["latency_ratio"] == 1.0
    page = html_path.read_text()
    parser = _Collect()
    parser.feed(page)
    assert parser.tags.count("svg") >= 3  # latency, size, accuracy-vs-latency
    assert not parser.urls  # nothing to fetch: opens offline
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_set_overrides_recipe_option(cli, tmp_path):
    out = tmp_path / "o.onnx"
    report = tmp_path / "r.json"
    result = cli(
        "optimize",
        SAMPLES / "foldable.onnx",
        "-o",
        out,
        "--no-bench",
        "--set",
        "fold.max_constant_bytes=0",
        "--report",
        report,
    )
    assert result.exit_code == 0, result.output
    recipe = json.loads(report.read_text())["recipe"]
    assert recipe["passes"][0]["options"] == {"max_constant_bytes": 0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("passes:\n  - fold\n  - no-such-pass\n", ":3: unknown pass 'no-such-pass'"),
        ("passes:\n  - fold:\n      bogus: 1\n", ":2: pass 'fold' has no option(s) bogus"),
        ("name: x\ncolour: red\npasses: [fold]\n", ":2: unknown key 'colour'"),
        ("passes:\n  - !!python/object/apply:os.system ['echo hi']\n", "plain data only"),
        ("passes: [fold\n", "not valid YAML"),
        ("name: nothing\n", "has no 'passes'"),
        ("bench:\n  turbo: true\npasses: [fold]\n", "unknown 'bench' setting(s) turbo"),
    ],
)
def test_bad_recipe_is_one_clear_error(cli, tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    out = tmp_path / "o.onnx"
    result = cli("optimize", DIGITS, "-o", out, "--config", recipe)
    assert result.exit_code == 2, result.output
    assert message in result.output and "bad.yaml" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_unknown_recipe_name_lists_shipped_ones(cli, tmp_path):
    result = cli("optimize", DIGITS, "-o", tmp_path / "o.onnx", "--config", "nope")
    assert result.exit_code == 2 and "default" in result.output
