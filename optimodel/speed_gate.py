"""The speed gate: an optimized model that is not faster is never shipped silently.

`quantize --if-slower` and `optimize --if-slower` (or a recipe's `bench: {if_slower: ...}`)
time the input and the output interleaved on one feed (`runtime/paired.py`), on the
provider the model is meant for, and when the output's latency ratio is above the limit
they warn, write the input model unchanged instead (`keep-float` / `keep-input`), or
remove the output and fail (exit 3). A GPU target is timed on that GPU or not at all: a
CPU figure says nothing of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimodel.errors import GateFailed, UsageError
from optimodel.report import Report
from optimodel.runtime.sessions import PROVIDERS, SessionConfig

# An output this much slower than the input is flagged (timing noise is ~ +-3 %).
SLOWER_THAN = 1.05
# What to do when the output is slower than the limit; "keep" writes the input instead.
POLICIES = ("warn", "keep", "fail")


@dataclass
class TimingConfig:
    """Where the models are timed: the target's provider if it starts here."""

    session: SessionConfig
    where: str  # "this CPU at 1 thread(s)", "CUDA"
    note: str | None = None  # said when the target's provider could not be used


def timing_config(
    target: str, threads: int, strict: bool, flag: str = "--if-slower"
) -> TimingConfig:
    """Time on the provider the model is made for; a CPU figure says nothing of a GPU.

    With `strict` (a speed gate) a GPU target whose provider does not start here is an
    error before any work; otherwise the CPU is used and that is said in `note`.
    """
    cpu = TimingConfig(SessionConfig(threads=threads), f"this CPU at {threads} thread(s)")
    if target == "cpu":
        return cpu
    from optimodel.runtime.bench import short_provider
    from optimodel.runtime.provider_probe import probe_provider

    name = PROVIDERS[target]
    reason = probe_provider(name)
    if reason is None:
        return TimingConfig(SessionConfig(providers=[target]), short_provider(name))
    if strict:
        raise UsageError(
            f"{flag} times the model where it will run, but the {target} provider does "
            f"not start here ({reason})",
            hint=f"run on a machine with {short_provider(name)}, or drop {flag}",
        )
    cpu.note = (
        f"timed on the CPU: the {target} provider does not start here ({reason}); "
        f"these are not {short_provider(name)} figures"
    )
    return cpu


def remove_output(path: Path) -> None:
    """The output and its external data file, if any."""
    for leftover in (path, Path(f"{path}.data")):
        if leftover.is_file():
            leftover.unlink()


def apply_speed_gate(
    report: Report,
    source: Path,
    target: Path,
    original: Any,
    feed: dict[str, Any],
    config: TimingConfig,
    policy: str,
    limit: float,
    *,
    what: str = "quantized",
    keep_name: str = "keep-float",
) -> list[str]:
    """Is the output faster than the input here? If not, act on `policy`; returns warnings."""
    from optimodel.modelio import Provenance, save_model
    from optimodel.report import model_record
    from optimodel.runtime.paired import paired_timing

    where = config.where
    timing = paired_timing(source, target, feed, config.session)
    slower = timing.ratio > limit
    gate: dict[str, Any] = {
        "name": "latency",
        "metric": f"p50 latency, {what} / input ({where}, interleaved)",
        "limit": limit,
        "measured": round(timing.ratio, 4),
        "unit": "ratio",
        "passed": not slower,
        "timing": timing.to_dict(),
    }
    report.gates.append(gate)
    if not slower:
        return []
    said = (
        f"the {what} model is {timing.ratio:.2f}x the input's latency on {where} "
        f"(p50 {timing.a_ms:.3f} -> {timing.b_ms:.3f} ms, limit {limit:g}x)"
    )
    kept = "kept-float" if keep_name == "keep-float" else "kept-input"
    gate["outcome"] = {"warn": "warned", "fail": "failed", "keep": kept}[policy]
    if policy == "warn":
        gate["action"] = f"wrote the {what} model (--if-slower warn)"
        return [said]
    produced = report.output_model
    if policy == "fail":
        remove_output(target)
        report.output_model = None
        report.status = "gate_failed"
        gate["action"] = f"removed the {what} model (--if-slower fail)"
        return [said + "; nothing was written"]
    save_model(original, target, input_path=source, force=True,
               provenance=Provenance.from_argv(passes=(keep_name,)))  # fmt: skip
    report.output_model = model_record(target, original)
    report.variants.append({"name": f"{what} (not kept)", "model": produced,
                            "latency_ratio": round(timing.ratio, 4),
                            "latency": report.latency,
                            "verification": report.verification})  # fmt: skip
    report.latency = []  # those rows timed the rejected model, which is not the output
    described = (report.verification or {}).get("data", "no data")
    report.verification = {"ok": True, "tolerance": "exact", "feeds": 0, "outputs": [],
                           "violations": [], "data": f"{described}; the output is the input",
                           "note": "the output is the input model"}  # fmt: skip
    if keep_name == "keep-float":
        gate["action"] = "kept the float input model (--if-slower keep-float)"
        return [said + f"; kept the float model instead: {target} is the input, unquantized"]
    gate["action"] = f"kept the input model (--if-slower {keep_name})"
    return [said + f"; kept the input model instead: {target} is the input, unchanged"]


def speed_failure(report: Report, limit: float, what: str, hint: str) -> GateFailed:
    """The exit-3 error after `apply_speed_gate` removed a slower output."""
    failure = GateFailed(
        f"the {what} model is not faster than the input here (latency ratio "
        f"{report.gates[-1]['measured']:.2f}x > {limit:g}x); nothing was written",
        hint=hint,
    )
    failure.report = report  # type: ignore[attr-defined]
    return failure
