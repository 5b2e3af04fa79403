"""How much calibration data pruning recovery needs: MiniLM at 50% unstructured.

Least-squares recovery re-fits each layer on recorded activations, so its result depends
on how many calibration samples it sees and whether they resemble the data the model will
serve. This study prunes all-MiniLM-L6-v2 (benchmarks/minilm.py) to 50% with recovery on
growing calibration sets and measures the sentence-embedding cosine against the dense
model on held-out sentences of the same kind, plus the main benchmark's 12 general-English
sentences (another domain).

The text is English prose from Python's own documentation (the `pydoc_data` topics and the
docstrings of standard-library modules): real sentences that ship with Python, so nothing
is downloaded. Takes about 15 minutes on 2 cores; not part of `make bench`
(`make bench-prune-data`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import minilm
import numpy as np
from scaling import write_section

HELD_OUT = 300
SIZES = (100, 300, 1000, 2500)
BUDGET = 2.0  # (1 - cosine) x 100: the budget row asks for cosine >= 0.98
BUDGET_SENTENCES = 100  # --eval-data of the budget row (each search trial runs them all)
LOWER = (0.4, 1000)  # a lower sparsity with recovery: (sparsity, calibration sentences)
SKIP_MODULES = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "test"}
_NOISE = re.compile(r"[{}\[\]<>=*_|`#\\]|::|\(\)|>>>|\.\.\.|https?:")


def _sentences(text: str) -> list[str]:
    """Plain prose sentences of `text` (no code, no markup), 7 words and more."""
    text = re.sub(r"\s+", " ", text)
    out = []
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        if (
            40 <= len(s) <= 200
            and s[0].isupper()
            and s[-1] in ".?!"
            and len(s.split()) >= 7
            and not _NOISE.search(s)
        ):
            out.append(s)
    return out


def python_doc_sentences() -> list[str]:
    """Distinct sentences from Python's documentation topics and stdlib docstrings."""
    import pydoc_data.topics as topics

    seen: dict[str, None] = {}
    for key in sorted(topics.topics):
        seen.update(dict.fromkeys(_sentences(topics.topics[key])))
    warnings.filterwarnings("ignore")
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # platform-specific modules that do not import here
            continue
        seen.update(dict.fromkeys(_sentences(inspect.getdoc(module) or "")))
        for attr, obj in sorted(vars(module).items()):
            if not attr.startswith("_") and getattr(obj, "__module__", None) == name:
                seen.update(dict.fromkeys(_sentences(inspect.getdoc(obj) or "")))
    return list(seen)


def _feeds_folder(folder: Path, sentences: list[str]) -> Path:
    """One .npz feed per sentence at its own length (as a user tokenizes one sentence)."""
    tokens = minilm.tokenize(sentences)
    lengths = tokens["attention_mask"].sum(axis=1)
    folder.mkdir(parents=True)
    for i in range(len(sentences)):
        feed = {k: v[i : i + 1, : int(lengths[i])] for k, v in tokens.items()}
        np.savez(folder / f"feed_{i:05d}.npz", **feed)
    return folder


def _embeddings(path: Path, sentences: list[str]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["sentence_embedding"], minilm.tokenize(sentences))[0]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _prune(src: Path, out: Path, options: dict[str, object]) -> tuple[float, dict]:
    """fold + prune as `optimodel prune` runs them: (seconds, the prune pass's stats)."""
    from optimodel.passes import get_pass
    from optimodel.transform import transform_file

    started = time.perf_counter()
    run = transform_file(
        src,
        out,
        [get_pass("fold"), get_pass("prune", **options)],
        subcommand="bench",
        verify=False,
        force=True,
    )
    seconds = time.perf_counter() - started
    stats = next(p["stats"] for p in run.passes if p["name"] == "prune")
    return seconds, stats


class Judge:
    """Scores pruned models against the dense one on the held-out and the general-English
    sentences (the dense embeddings computed once)."""

    def __init__(self, src: Path, held: list[str], general: list[str]) -> None:
        self.held, self.general = held, general
        self.dense_held = _embeddings(src, held)
        self.dense_general = _embeddings(src, general)

    def row(self, size: int, out: Path, seconds: float, stats: dict) -> dict[str, object]:
        on_held = _cosines(self.dense_held, _embeddings(out, self.held))
        on_general = _cosines(self.dense_general, _embeddings(out, self.general))
        return {
            "calibration": size,
            "held_mean": float(on_held.mean()),
            "held_min": float(on_held.min()),
            "general_mean": float(on_general.mean()),
            "seconds": seconds,
            "sparsity": float(stats["achieved_sparsity"]),
        }


def _case(
    src: Path, judge: Judge, pool: list[str], sparsity: float, size: int, budget: bool = False
) -> dict[str, object]:
    """Prune to `sparsity` with recovery on the first `size` pool sentences (0: none), or,
    with `budget`, back off by `--accuracy-budget BUDGET` judged on the last
    BUDGET_SENTENCES of the pool; the row judged on the held-out sentences."""
    with tempfile.TemporaryDirectory(prefix="prune-calib-") as tmp:
        options: dict[str, object] = {"sparsity": sparsity}
        if size:
            folder = _feeds_folder(Path(tmp) / "calib", pool[:size])
            options.update(calib_data=str(folder), calib_samples=size)
        if budget:
            folder = _feeds_folder(Path(tmp) / "eval", pool[-BUDGET_SENTENCES:])
            options.update(accuracy_budget=BUDGET, eval_data=str(folder))
        out = Path(tmp) / "model.onnx"
        seconds, stats = _prune(src, out, options)
        row = judge.row(-1 if budget else size, out, seconds, stats)
    if budget:
        row["trials"] = int(stats["accuracy_search"]["trials"])
    print(row, flush=True)
    return row


def measure(cache: Path, sizes: tuple[int, ...]) -> list[dict[str, object]]:
    """One row per calibration size at 50% (0: plain magnitude pruning, no recovery), the
    LOWER row, then the fidelity-budget row: plain pruning backed off until cosine >= 0.98
    on other sentences.
    """
    src = minilm.export_minilm(cache, "torchscript")
    pool = python_doc_sentences()
    np.random.default_rng(0).shuffle(pool)
    held, pool = pool[:HELD_OUT], pool[HELD_OUT:]
    judge = Judge(src, held, minilm.SENTENCES[: minilm.EVAL_SENTENCES])
    rows: list[dict[str, object]] = []
    for size in (0, *sizes):
        if size > len(pool):
            print(f"only {len(pool)} calibration sentences; {size} skipped", file=sys.stderr)
            continue
        rows.append(_case(src, judge, pool, 0.5, size))
    rows.append(_case(src, judge, pool, *LOWER))
    rows.append(_case(src, judge, pool, 0.5, 0, budget=True))
    return rows


def table(rows: list[dict[str, object]], pool: int) -> str:
    lines = [
        "## Pruning recovery and calibration data (MiniLM, unstructured)",
        "",
        "`benchmarks/prune_calibration.py`: all-MiniLM-L6-v2 pruned (50% unless the sparsity "
        "column says otherwise) with `--calib-data` of N sentences from Python's documentation "
        f"({pool} distinct ones, "
        f"{HELD_OUT} held out); sentence-embedding cosine against the dense model on the "
        f"{HELD_OUT} held-out sentences and on the main benchmark's "
        f"{minilm.EVAL_SENTENCES} general-English sentences (another domain). "
        "Prune time is relative to the run without recovery.",
        "",
        "| calibration sentences | sparsity | held-out cosine (mean) | held-out cosine (min) "
        "| general-English cosine | prune time |",
        "|---|---|---|---|---|---|",
    ]
    base = float(rows[0]["seconds"]) if rows else 1.0
    for row in rows:
        if row["calibration"] == -1:
            label = (
                f"none, `--accuracy-budget {BUDGET:g}` on {BUDGET_SENTENCES} other sentences "
                f"({row['trials']} trials)"
            )
        elif row["calibration"] == 0:
            label = "none (plain magnitude)"
        else:
            label = str(row["calibration"])
        lines.append(
            f"| {label} | {float(row['sparsity']):.1%} | {row['held_mean']:.3f} "
            f"| {row['held_min']:.3f} | {row['general_mean']:.3f} "
            f"| {float(row['seconds']) / base:.0f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache")
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES))
    parser.add_argument("--results", type=Path, help="RESULTS.md to update")
    args = parser.parse_args()
    lacking = minilm.missing()
    if lacking:
        raise SystemExit(f"needs {', '.join(lacking)}: benchmarks/requirements-transformer.txt")
    sizes = tuple(int(s) for s in args.sizes.split(","))
    rows = measure(args.cache, sizes)
    text = table(rows, len(python_doc_sentences()))
    print(text)
    if args.results:
        write_section(args.results, text, name="prune-calibration")


if __name__ == "__main__":
    main()
