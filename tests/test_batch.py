"""batch: a recipe over a folder or glob in a process pool; failures listed, never fatal."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import onnx
import pytest
import typer

from optimodel.batch import (
    DIED,
    batch_exit_code,
    batch_optimize,
    find_models,
    optimize_one,
    plan_outputs,
)
from optimodel.errors import UsageError
from tests.conftest import SAMPLE_MODELS, SAMPLES, CliResult


def _app() -> typer.Typer:
    """The real app once `batch` is registered there; a one-command app until then."""
    from optimodel.cli import batch_cmd
    from optimodel.cli.app import app

    if any(c.name == "batch" for c in app.registered_commands):
        return app
    local = typer.Typer()

    @local.callback()
    def root() -> None:
        """Test app."""

    local.command("batch")(batch_cmd.batch)
    return local


@pytest.fixture
def batch_cli():
    from typer.testing import CliRunner

    runner = CliRunner()
    app = _app()

    def run(*args: str | Path) -> CliResult:
        result = runner.invoke(app, ["batch", *[str(a) for a in args]])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """Copies of the sample models plus a truncated (broken) one."""
    folder = tmp_path / "models"
    folder.mkdir()
    for model in SAMPLE_MODELS:
        shutil.copy(model, folder / model.name)
    data = (SAMPLES / "mlp.onnx").read_bytes()
    (folder / "broken_mlp.onnx").write_bytes(data[: len(data) // 2])
    return folder


def test_batch_folder_lists_the_broken_model_and_finishes_the_rest(batch_cli, models_dir, tmp_path):
    out = tmp_path / "out" / "nested"
    summary_json, summary_md = tmp_path / "batch.json", tmp_path / "batch.md"
    t0 = time.perf_counter()
    result = batch_cli(
        models_dir, "--out", out, "--jobs", "2", "--report", summary_json, "--report", summary_md
    )
    assert result.exit_code == 1, result.output
    assert "broken_mlp.onnx" in result.stderr and "failed" in result.stderr
    assert "broken_mlp.onnx" in result.stdout  # listed in the table
    summary = json.loads(summary_json.read_text())
    assert summary["status"] == "failed" and summary["jobs"] == 2
    assert summary["counts"] == {"ok": len(SAMPLE_MODELS), "failed": 1, "gate_failed": 0}
    rows = {Path(r["model"]).name: r for r in summary["models"]}
    broken = rows.pop("broken_mlp.onnx")
    assert broken["status"] == "failed" and "broken_mlp.onnx" in broken["error"]
    assert "\n" not in broken["error"] and "not a valid ONNX model" in broken["error"]
    assert not (out / "broken_mlp.onnx").exists()
    for model in SAMPLE_MODELS:
        row = rows[model.name]
        assert row["status"] == "ok", row
        assert row["nodes_after"] <= row["nodes_before"] and row["bytes_ratio"] > 0
        assert row["cosine"] == pytest.approx(1.0, abs=1e-5) and row["p50_ratio"] is None
        onnx.checker.check_model(str(out / model.name))
        report = json.loads((out / f"{model.stem}.report.json").read_text())
        assert report["status"] == "ok" and report["subcommand"] == "optimize"
        assert report["latency"] == []  # bench off by default in batch
    assert "broken_mlp.onnx" in summary_md.read_text()
    assert time.perf_counter() - t0 < 20


def test_glob_pattern(batch_cli, models_dir, tmp_path):
    out = tmp_path / "out"
    result = batch_cli(str(models_dir / "[fm]*.onnx"), "-o", out, "-j", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.onnx")) == ["foldable.onnx", "mlp.onnx"]
    assert (out / "mlp.report.json").is_file()
    again = batch_cli(str(models_dir / "mlp.onnx"), "-o", out)
    assert again.exit_code == 2 and "exist already (mlp.onnx)" in again.stderr
    assert "--force" in again.stderr


def test_empty_folder_is_a_clear_error(batch_cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = batch_cli(empty, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "no .onnx models found" in result.stderr and str(empty) in result.stderr
    assert not (tmp_path / "out").exists()


def test_out_equal_to_input_folder_is_refused(batch_cli, models_dir):
    before = {p.name: p.read_bytes() for p in models_dir.iterdir()}
    result = batch_cli(models_dir, "-o", models_dir, "--force")
    assert result.exit_code == 2
    assert "would overwrite the input" in result.stderr
    assert {p.name: p.read_bytes() for p in models_dir.iterdir()} == before


def test_recursive_and_name_collisions(tmp_path):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    shutil.copy(SAMPLES / "mlp.onnx", tmp_path / "a" / "mlp.onnx")
    shutil.copy(SAMPLES / "mlp.onnx", tmp_path / "a" / "sub" / "mlp.onnx")
    assert len(find_models(tmp_path / "a")) == 1
    models = find_models(tmp_path / "a", recursive=True)
    assert len(models) == 2
    with pytest.raises(UsageError, match="would both write mlp.onnx"):
        plan_outputs(models, tmp_path / "out")


def _dies_on_mlp(task: dict) -> dict:
    """A worker that is killed on one model (as by the OOM killer), fine on the others."""
    if Path(task["model"]).name == "mlp.onnx":
        os._exit(9)
    return optimize_one(task)


def test_a_dead_worker_fails_its_model_only(tmp_path):
    models = [SAMPLES / "mlp.onnx", SAMPLES / "foldable.onnx"]
    rows = batch_optimize(models, tmp_path / "out", "default", 2, worker=_dies_on_mlp)
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert DIED in rows[0]["error"] and "mlp.onnx" in rows[0]["error"]
    assert (tmp_path / "out" / "foldable.onnx").is_file()
    assert batch_exit_code(rows) == 1


def test_exit_codes():
    assert batch_exit_code([{"status": "ok"}]) == 0
    assert batch_exit_code([{"status": "ok"}, {"status": "gate_failed"}]) == 3
    assert batch_exit_code([{"status": "gate_failed"}, {"status": "failed"}]) == 1
