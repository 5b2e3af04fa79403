"""Every command that reads a model, on every hostile input: a clean end, never a crash.

Contract: exit 1 (2 for usage) with one clear line naming the file, or success; never a
traceback; no output file left behind on failure; the input byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.make_bad_inputs import build_corpus

COMMANDS = {
    "inspect": lambda m, out: ["inspect", m, "--json"],
    "eval": lambda m, out: ["eval", m, "--report", out.with_suffix(".json")],
    "fold": lambda m, out: ["fold", m, "-o", out],
    "bench": lambda m, out: [
        "bench",
        m,
        "--runs",
        "2",
        "--warmup",
        "0",
        "--report",
        out.with_suffix(".json"),
    ],
    "fuse": lambda m, out: ["fuse", m, "-o", out],
    "quantize": lambda m, out: ["quantize", m, "-o", out, "--mode", "dynamic"],
    "prune": lambda m, out: ["prune", m, "-o", out, "--sparsity", "0.5", "--min-params", "1"],
    "fp16": lambda m, out: ["fp16", m, "-o", out],
    "optimize": lambda m, out: ["optimize", m, "-o", out, "--no-bench"],
    "compare": lambda m, out: ["compare", m, m, "--layers", "--report", out.with_suffix(".json")],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("hostile"))


def _digest(path: Path) -> str | None:
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return None


def test_corpus_is_large_enough(corpus):
    assert len(corpus) >= 30


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_hostile_input(cli, corpus, tmp_path, command):
    problems = []
    for case in corpus:
        out = tmp_path / f"{case.name}.{command}.onnx"
        before = _digest(case.path)
        result = cli(*COMMANDS[command](case.path, out))
        code = result.exit_code
        text = result.output
        allowed = case.allowed(command)
        if code not in allowed and not (code == 1 and allowed == {0, 1}):
            problems.append(f"{case.name}: exit {code}, expected {sorted(allowed)}: {text[-300:]}")
        if "Traceback" in text or "internal error" in text:
            problems.append(f"{case.name}: crashed: {text[-300:]}")
        if _digest(case.path) != before:
            problems.append(f"{case.name}: input changed")
        if code != 0:
            lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
            if not lines or not lines[0].startswith("error:") or len(lines) > 2:
                problems.append(f"{case.name}: not one clear error line: {result.stderr!r}")
            elif case.path.name not in lines[0] and case.path.parent.name not in lines[0]:
                problems.append(f"{case.name}: error does not name the file: {lines[0]}")
            leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(case.name)]
            if leftovers:
                problems.append(f"{case.name}: left files behind: {leftovers}")
    assert not problems, "\n".join(problems)
