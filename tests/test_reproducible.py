"""The same command on the same input writes a byte-identical model, for every pass."""

from __future__ import annotations

import hashlib

import pytest

from optimodel.cli.app import app
from tests.conftest import SAMPLES

# pass name -> (sample model, extra CLI options)
CASES = {
    "fold": ("foldable.onnx", []),
    "fuse": ("transformer_block.onnx", []),
    "quantize": ("digits_cnn.onnx", ["--mode", "dynamic"]),
    "prune": ("mlp.onnx", ["--sparsity", "0.5"]),
    "fp16": ("transformer_block.onnx", []),
    "optimize": ("digits_cnn.onnx", ["--no-bench"]),
}


COMMANDS = {c.name for c in app.registered_commands}


@pytest.mark.parametrize("name", [n for n in CASES if n in COMMANDS])
def test_same_command_same_bytes(cli, tmp_path, name):
    model, extra = CASES[name]
    out = tmp_path / "out.onnx"
    digests = []
    for _ in range(2):
        result = cli(name, SAMPLES / model, "-o", out, "--force", "--quiet", *extra)
        assert result.exit_code == 0, result.output
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
