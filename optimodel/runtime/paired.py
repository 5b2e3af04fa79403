"""Is model B faster than model A here? Interleaved timing, so machine noise cancels.

Timing A fully, then B, lets a burst of load on a shared machine land on one of them
only. Here both sessions are built first, then rounds alternate A and B; each round's
ratio is its median(B) / median(A) and the answer is the median of the round ratios.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from optimodel.runtime.sessions import SessionConfig, create_session, run_session


@dataclass(frozen=True)
class PairedTiming:
    """Median latencies of two models on one feed and the ratio of B to A."""

    a_ms: float
    b_ms: float
    ratio: float
    rounds: int
    runs_per_round: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "a_p50_ms": round(self.a_ms, 4),
            "b_p50_ms": round(self.b_ms, 4),
            "ratio": round(self.ratio, 4),
            "rounds": self.rounds,
            "runs_per_round": self.runs_per_round,
            "method": "interleaved rounds, median of per-round median ratios",
        }


def _time_runs(session: Any, feed: dict[str, np.ndarray], runs: int, source: str) -> float:
    """Median seconds of `runs` runs."""
    clock = time.perf_counter
    samples = []
    for _ in range(runs):
        t0 = clock()
        run_session(session, feed, source)
        samples.append(clock() - t0)
    return statistics.median(samples)


def paired_timing(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    feed: dict[str, np.ndarray],
    config: SessionConfig | None = None,
    *,
    rounds: int = 7,
    round_seconds: float = 0.1,
    max_runs: int = 200,
) -> PairedTiming:
    """Time `a` and `b` on one feed in alternating rounds; B's latency as a ratio of A's.

    Each round runs each model for about `round_seconds` (at least 3 runs, at most
    `max_runs`), sized from a first calibration run, after a warm-up of both.
    """
    sessions = [create_session(path, config, source=str(path)) for path in (a, b)]
    names = [str(a), str(b)]
    for session, name in zip(sessions, names, strict=True):  # warm up: first runs allocate
        for _ in range(3):
            run_session(session, feed, name)
    single = max(_time_runs(s, feed, 3, n) for s, n in zip(sessions, names, strict=True))
    runs = int(min(max_runs, max(3, round_seconds / max(single, 1e-6))))
    ratios, a_times, b_times = [], [], []
    for index in range(rounds):
        order = (0, 1) if index % 2 == 0 else (1, 0)  # alternate who goes first
        medians = {i: _time_runs(sessions[i], feed, runs, names[i]) for i in order}
        a_times.append(medians[0])
        b_times.append(medians[1])
        ratios.append(medians[1] / max(medians[0], 1e-12))
    return PairedTiming(
        a_ms=statistics.median(a_times) * 1e3,
        b_ms=statistics.median(b_times) * 1e3,
        ratio=statistics.median(ratios),
        rounds=rounds,
        runs_per_round=runs,
    )
