"""Shared fixtures: sample model paths, a CLI runner, tiny models built in ONNX text."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
SAMPLE_MODELS = sorted(SAMPLES.glob("*.onnx"))


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def cli():
    """Run `optimodel ARGS...` in-process; returns exit code, stdout and stderr."""
    from optimodel.cli.app import app

    runner = CliRunner()

    def run(*args: str) -> CliResult:
        result = runner.invoke(app, [str(a) for a in args])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


def run_subprocess(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m optimodel ARGS...` as a real process (real exit code and streams)."""
    return subprocess.run(
        [sys.executable, "-m", "optimodel", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        timeout=120,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def parse_model(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def tiny_model() -> onnx.ModelProto:
    """y = Relu(x @ W + b) with a dynamic batch."""
    return parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        tiny (float[N, 4] x) => (float[N, 3] y)
        <float[4, 3] W = {1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1}, float[3] b = {0.5, -0.5, 0}>
        {
            h = MatMul(x, W)
            z = Add(h, b)
            y = Relu(z)
        }
        """
    )
