"""The README's console examples are run, and their shown output must still appear."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

BLOCK = re.compile(r"```console\n(.*?)```", re.S)


def _examples() -> list[tuple[str, list[str]]]:
    text = (ROOT / "README.md").read_text()
    examples = []
    for block in BLOCK.findall(text):
        lines = block.splitlines()
        command = lines[0].removeprefix("$ ").strip()
        expected = [
            ln.strip()
            for ln in lines[1:]
            if ln.strip() and ln.strip() != "..." and not re.search(r"\d s \|", ln)
        ]
        examples.append((command, expected))
    return examples


@pytest.mark.parametrize("command,expected", _examples(), ids=lambda v: str(v)[:40])
def test_readme_example(command, expected):
    args = shlex.split(command)
    assert args[0] == "optimodel"
    env = dict(os.environ, COLUMNS="80", NO_COLOR="1", TERM="dumb")
    proc = subprocess.run(
        [sys.executable, "-m", "optimodel", *args[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    shown = {ln.strip() for ln in proc.stdout.splitlines()}
    missing = [ln for ln in expected if ln not in shown]
    assert not missing, f"README output is stale for `{command}`: {missing}"
