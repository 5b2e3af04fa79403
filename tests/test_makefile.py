"""The Makefile's batch target processes every model of a folder in parallel (make -j)."""

from __future__ import annotations

import json
import shutil
import subprocess

import onnx
import pytest

from optimodel.pipeline import count_nodes
from tests.conftest import ROOT, SAMPLE_MODELS


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_batch_parallel(tmp_path):
    if not (ROOT / ".venv" / ".installed").exists():
        pytest.skip("run through `make test` so .venv exists")
    out = tmp_path / "batch"
    proc = subprocess.run(
        ["make", "-j2", "batch", f"BATCH_OUT={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    produced = sorted(out.glob("*.onnx"))
    assert [p.stem for p in produced] == [p.stem for p in SAMPLE_MODELS]
    for path, model_path in zip(produced, SAMPLE_MODELS, strict=True):
        onnx.checker.check_model(onnx.load(str(path)))
        report = json.loads((out / f"{path.stem}.report.json").read_text())
        assert report["status"] == "ok" and report["verification"]["ok"]
        assert report["input_model"]["nodes"] == count_nodes(onnx.load(str(model_path)))
        assert report["output_model"]["nodes"] <= report["input_model"]["nodes"]
    assert not list(out.glob(".*tmp*"))
