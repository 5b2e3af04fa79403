"""The Makefile's batch target processes every model of a folder in parallel (make -j)."""

from __future__ import annotations

import json
import shutil
import subprocess

import onnx
import pytest

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
    produced = sorted(out.glob("*.inspect.json"))
    assert [p.name.removesuffix(".inspect.json") for p in produced] == [
        p.stem for p in SAMPLE_MODELS
    ]
    for path, model_path in zip(produced, SAMPLE_MODELS, strict=True):
        info = json.loads(path.read_text())
        assert info["nodes"] == len(onnx.load(str(model_path)).graph.node)
    assert not list(out.glob("*.tmp"))
