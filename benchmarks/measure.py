"""Measurements: graph figures, ONNX Runtime CPU sessions, paired latency and load time,
fidelity against the original model.

Latency and load time are always measured for the original and every candidate of a
model together, in rounds whose order is shuffled, so that a noisy neighbour slows all
of them alike; a ratio is the median over rounds of candidate time / original time.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from optimodel.modelio import iter_graphs
from optimodel.quant.stats import weight_bytes

Feed = dict[str, np.ndarray]
STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml"}
PROVIDERS = ["CPUExecutionProvider"]
ort.set_default_logger_severity(3)  # errors only: graph warnings would drown the progress


def _model_bytes(path: Path, model: onnx.ModelProto) -> int:
    """The .onnx file plus every external data file it refers to."""
    files = set()
    for graph in iter_graphs(model.graph):
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                files.add(path.parent / info["location"])
    return path.stat().st_size + sum(f.stat().st_size for f in files if f.is_file())


def graph_stats(path: Path) -> dict[str, Any]:
    """Nodes (main graph + subgraphs), Constant and non-standard-domain nodes, bytes, checker."""
    model = onnx.load(str(path), load_external_data=False)
    nodes = [n for g in iter_graphs(model.graph) for n in g.node]
    try:
        onnx.checker.check_model(str(path))
        checker = "ok"
    except Exception as exc:  # the checker's verdict is a figure, not an error
        checker = "fails: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0][:140]
    return {
        "nodes": len(nodes),
        "constant_nodes": sum(n.op_type == "Constant" for n in nodes),
        "custom_domain_nodes": sum(n.domain not in STANDARD_DOMAINS for n in nodes),
        "bytes": _model_bytes(path, model),
        "matmul_weight_bytes": weight_bytes(model)["matmul"],
        "checker": checker,
    }


def session(path: Path, threads: int | None) -> ort.InferenceSession:
    """A CPU session with ORT's default optimizations; `threads` None keeps ORT's thread count.

    With more than one thread, spin-waiting is off: several sessions stay alive side by
    side here, and the workers of the session that ran last would otherwise spin on the
    cores the next one needs (2-3x slower and +-25% noise between identical copies).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = threads
    if threads != 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=PROVIDERS)


def run_all(sess: ort.InferenceSession, names: list[str], feeds: list[Feed]) -> list[np.ndarray]:
    """Each output concatenated over the feeds (flattened per feed)."""
    per_feed = [sess.run(names, feed) for feed in feeds]
    return [np.stack([o[i] for o in per_feed]) for i in range(len(names))]


def _ctc_lines(logits: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC decoding (blank = 0) of [..., T, classes] into label sequences."""
    best = logits.reshape(-1, *logits.shape[-2:]).argmax(-1)
    lines = []
    for row in best:
        collapsed = [int(c) for i, c in enumerate(row) if c != 0 and (i == 0 or c != row[i - 1])]
        lines.append(tuple(collapsed))
    return lines


def fidelity(ref: list[np.ndarray], cand: list[np.ndarray], task: str | None) -> dict[str, Any]:
    """Max abs diff and cosine over all outputs, plus the task's agreement figure."""
    max_abs = 0.0
    dots = ref_sq = cand_sq = 0.0
    for r, c in zip(ref, cand, strict=True):
        if r.shape != c.shape:
            raise ValueError(f"output shape {c.shape} differs from the original's {r.shape}")
        r64, c64 = r.astype(np.float64).ravel(), c.astype(np.float64).ravel()
        if r64.size:
            max_abs = max(max_abs, float(np.max(np.abs(r64 - c64))))
        dots += float(r64 @ c64)
        ref_sq += float(r64 @ r64)
        cand_sq += float(c64 @ c64)
    cosine = dots / math.sqrt(ref_sq * cand_sq) if ref_sq and cand_sq else float("nan")
    result: dict[str, Any] = {"max_abs_diff": max_abs, "cosine": cosine}
    first_ref, first_cand = ref[0], cand[0]
    if task == "classify":
        top_r = first_ref.reshape(-1, first_ref.shape[-1]).argmax(-1)
        top_c = first_cand.reshape(-1, first_cand.shape[-1]).argmax(-1)
        result["agreement"] = {"name": "top-1", "value": float(np.mean(top_r == top_c))}
    elif task == "ctc":
        lines_r, lines_c = _ctc_lines(first_ref), _ctc_lines(first_cand)
        same = sum(a == b for a, b in zip(lines_r, lines_c, strict=True))
        result["agreement"] = {"name": "lines", "value": same / len(lines_r)}
    elif task == "segment":
        mask_r, mask_c = first_ref > 0.3, first_cand > 0.3
        union = np.logical_or(mask_r, mask_c).sum()
        iou = float(np.logical_and(mask_r, mask_c).sum() / union) if union else 1.0
        result["agreement"] = {"name": "mask IoU", "value": iou}
    elif task == "embedding":
        # the last output holds one sentence embedding per row (MiniLM's mean pooling)
        emb_r, emb_c = ref[-1].astype(np.float64), cand[-1].astype(np.float64)
        norms = np.linalg.norm(emb_r, axis=-1) * np.linalg.norm(emb_c, axis=-1)
        per_row = (emb_r * emb_c).sum(-1) / np.maximum(norms, 1e-30)
        result["agreement"] = {
            "name": "embedding cosine",
            "value": float(per_row.mean()),
            "min": float(per_row.min()),
            "format": "cosine",
        }
    return result


def _paired(samples: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    out = {}
    for name, values in samples.items():
        ratios = [v / b for v, b in zip(values, samples[base], strict=True)]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        out[name] = {
            "median_ms": statistics.median(values) * 1e3,
            "ratio": statistics.median(ratios),
            "ratio_p25": quartiles[0],
            "ratio_p75": quartiles[-1],
            "samples": len(values),
        }
    return out


def latency(
    sessions: dict[str, ort.InferenceSession],
    feed: Feed,
    *,
    rounds: int,
    block_s: float,
    budget_s: float,
    base: str = "original",
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Paired latency: each round runs every session for one block, in shuffled order.

    A block is `inner` back-to-back runs (enough for ~`block_s` of the original); rounds
    are cut to fit `budget_s`, never below 5.
    """
    estimate = {}
    for name, sess in sessions.items():
        for _ in range(2):
            sess.run(None, feed)
        start = time.perf_counter()
        sess.run(None, feed)
        estimate[name] = time.perf_counter() - start
    inner = max(1, math.ceil(block_s / max(estimate[base], 1e-6)))
    per_round = inner * sum(estimate.values())
    rounds = max(5, min(rounds, int(budget_s / max(per_round, 1e-9))))
    order = list(sessions)
    shuffle = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            sess = sessions[name]
            start = time.perf_counter()
            for _ in range(inner):
                sess.run(None, feed)
            samples[name].append((time.perf_counter() - start) / inner)
    result = _paired(samples, base)
    for figures in result.values():
        figures["runs_per_sample"] = inner
    return result


def load_time(
    paths: dict[str, Path], *, reps: int, base: str = "original", seed: int = 0
) -> dict[str, dict[str, float]]:
    """Paired session creation time (default threads), `reps` shuffled rounds after a warm-up."""
    for path in paths.values():
        session(path, None)
    order = list(paths)
    shuffle = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(reps):
        shuffle.shuffle(order)
        for name in order:
            start = time.perf_counter()
            sess = session(paths[name], None)
            samples[name].append(time.perf_counter() - start)
            del sess
    return _paired(samples, base)
