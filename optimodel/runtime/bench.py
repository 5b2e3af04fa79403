"""Latency through ONNX Runtime: one session per model, the same feed, honest figures.

What each figure is:

- `session_load_s`: wall time to build the InferenceSession (graph optimization, provider
  partitioning and, for TensorRT, the engine build unless it comes from the engine cache).
- `first_run_ms`: the first inference alone (lazy allocations, CUDA / cuDNN autotuning).
- steady state (`p50_ms` ... `min_ms`, `throughput`): `time.perf_counter()` around each
  `session.run` (or `run_with_iobinding`) after `warmup` untimed runs, the same feed every
  time. Throughput is samples per second of compute: batch x runs / sum of the latencies.
- `peak_rss_mb`: peak resident memory of the process while the session was built and run
  (Linux: the `VmHWM` high-water mark of /proc/self/status, reset before each model through
  /proc/self/clear_refs; elsewhere `ru_maxrss`). `rss_delta_mb` is that peak minus the
  resident memory just before the session was built: what this model cost in host memory.
  GPU memory is not included.
- `nodes_by_provider`: how many graph nodes each execution provider took. ONNX Runtime
  >= 1.24 records the partitioning itself (`session.record_ep_graph_assignment_info`, read
  with `get_provider_graph_assignment_info`; nodes of a TensorRT subgraph count one by one);
  older versions profile the first run (`enable_profiling`, one `kernel_time` event per
  executed node with its `provider`), stop profiling, and delete the profile file, so only
  nodes that really ran are counted (one branch of an `If`) and fused kernels count once;
  there `first_run_ms` carries the profiler's small overhead, the timed runs do not.
  `nodes_by_provider_source` says which of the two produced the counts.

A session that quietly dropped a requested accelerator (CUDA libraries missing, every node
rejected) is marked `fell_back`; its figures are CPU figures and are labelled so.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from optimodel.errors import OptimodelError, UsageError
from optimodel.runtime.sessions import PROVIDERS, SessionConfig, create_session

CPU = PROVIDERS["cpu"]
CUDA = PROVIDERS["cuda"]
TENSORRT = PROVIDERS["tensorrt"]
ACCELERATORS = (CUDA, TENSORRT)
ASSIGNMENT_ENTRY = "session.record_ep_graph_assignment_info"
NODE_COUNT_METHODS = ("auto", "assignment", "profile", "none")


# --------------------------------------------------------------------------- providers


def provider_options(
    providers: Sequence[str],
    *,
    device_id: int | None = None,
    trt_fp16: bool = False,
    trt_int8: bool = False,
    trt_engine_cache: str | os.PathLike[str] | None = None,
    trt_workspace_gb: float | None = None,
) -> dict[str, dict[str, str]]:
    """ORT provider options from command-line flags; a flag for an absent provider is refused.

    Refusing (rather than ignoring) `--trt-fp16` without `--provider tensorrt` keeps a
    benchmark from silently measuring something other than what was asked.
    """
    keys = [p.strip().lower() for p in providers]
    trt_flags = {
        "--trt-fp16": trt_fp16,
        "--trt-int8": trt_int8,
        "--trt-engine-cache": trt_engine_cache is not None,
        "--trt-workspace-gb": trt_workspace_gb is not None,
    }
    given = [flag for flag, on in trt_flags.items() if on]
    if given and "tensorrt" not in keys:
        raise UsageError(f"{', '.join(given)} need(s) --provider tensorrt")
    if device_id is not None and not {"cuda", "tensorrt"} & set(keys):
        raise UsageError("--device-id needs --provider cuda or --provider tensorrt")
    if trt_workspace_gb is not None and trt_workspace_gb <= 0:
        raise UsageError(f"--trt-workspace-gb {trt_workspace_gb}: must be positive")
    options: dict[str, dict[str, str]] = {}
    if "cuda" in keys:
        options[CUDA] = {} if device_id is None else {"device_id": str(device_id)}
    if "tensorrt" in keys:
        trt: dict[str, str] = {} if device_id is None else {"device_id": str(device_id)}
        if trt_fp16:
            trt["trt_fp16_enable"] = "True"
        if trt_int8:
            trt["trt_int8_enable"] = "True"
        if trt_engine_cache is not None:
            trt["trt_engine_cache_enable"] = "True"
            trt["trt_engine_cache_path"] = str(trt_engine_cache)
        if trt_workspace_gb is not None:
            trt["trt_max_workspace_size"] = str(int(trt_workspace_gb * 2**30))
        options[TENSORRT] = trt
    return {name: opts for name, opts in options.items() if opts}


def check_no_fallback(providers: Sequence[str], no_fallback: bool) -> None:
    """`--no-fallback` forbids the CPU provider, so it needs an accelerator and no `cpu`."""
    if not no_fallback:
        return
    keys = [p.strip().lower() for p in providers]
    if "cpu" in keys or not {"cuda", "tensorrt"} & set(keys):
        raise UsageError(
            "--no-fallback forbids the CPU provider: use it with --provider cuda and/or "
            "tensorrt, without --provider cpu"
        )


def fell_back_providers(
    requested: Sequence[str],
    active: Sequence[str],
    nodes_by_provider: Mapping[str, int] | None = None,
) -> list[str]:
    """Requested providers the session does not really use (ORT names).

    A provider missing from `session.get_providers()` was dropped at session creation. When
    node counts are known and no requested accelerator took a single node, the run is a CPU
    run too, whatever `get_providers()` claims.
    """
    wanted = [PROVIDERS.get(p.strip().lower(), p) for p in requested]
    have = set(active)
    dropped = [p for p in wanted if p not in have]
    kept = [p for p in wanted if p in ACCELERATORS and p in have]
    if kept and nodes_by_provider is not None and nodes_by_provider:
        if sum(nodes_by_provider.get(p, 0) for p in kept) == 0:
            dropped += kept
    return dropped


SHORT_NAMES = {"TensorrtExecutionProvider": "TensorRT"}


def short_provider(name: str) -> str:
    """CUDAExecutionProvider -> CUDA, TensorrtExecutionProvider -> TensorRT, for tables."""
    return SHORT_NAMES.get(name, name.removesuffix("ExecutionProvider"))


def provider_label(row: Mapping[str, Any]) -> str:
    """The provider as a table shows it: `cuda`, or `cuda→CPU (fell back)`."""
    requested = str(row.get("provider", ""))
    if not row.get("fell_back"):
        return requested
    nodes = row.get("nodes_by_provider") or {}
    ran = [p for p, n in nodes.items() if n] or list(row.get("providers_active") or [CPU])
    dropped = set(row.get("fell_back_providers") or [])
    ran = [p for p in ran if p not in dropped] or [CPU]
    return f"{requested}→{'+'.join(short_provider(p) for p in ran)} (fell back)"


# --------------------------------------------------------------------------- memory


def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark so the next peak is this model's (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _maxrss_kb() -> int:
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value // 1024 if sys.platform == "darwin" else value  # bytes on macOS


class PeakMemory:
    """Peak resident memory of the process from `start()` to `peak_mb()`."""

    def start(self) -> None:
        gc.collect()
        self.exact = _reset_peak_rss()
        self.before_kb = _proc_status_kb("VmRSS") or _maxrss_kb()
        self.maxrss_before_kb = _maxrss_kb()
        self.samples_kb = [self.before_kb]

    def sample(self) -> None:
        """Note the current RSS: a lower bound on the peak when the mark cannot be reset."""
        current = _proc_status_kb("VmRSS")
        if current is not None:
            self.samples_kb.append(current)

    def peak_mb(self) -> tuple[float | None, float | None]:
        """(peak RSS MB, peak minus RSS before start MB); None where it cannot be told."""
        self.sample()
        hwm = _proc_status_kb("VmHWM")
        if self.exact and hwm is not None:
            peak = hwm
        else:  # the process peak only counts if this model raised it
            maxrss = _maxrss_kb()
            peak = max([*self.samples_kb, maxrss if maxrss > self.maxrss_before_kb else 0])
        if not peak:
            return None, None
        return round(peak / 1024, 2), round(max(peak - self.before_kb, 0) / 1024, 2)


# --------------------------------------------------------------------------- node placement


def has_assignment_api() -> bool:
    """ONNX Runtime >= 1.24 can report which provider each node was assigned to."""
    import onnxruntime as ort

    return hasattr(ort.InferenceSession, "get_provider_graph_assignment_info")


def assignment_counts(session: Any) -> dict[str, int] | None:
    getter = getattr(session, "get_provider_graph_assignment_info", None)
    if getter is None:
        return None
    try:
        subgraphs = getter()
    except Exception:  # not recorded, or an ORT without the API
        return None
    counts: Counter[str] = Counter()
    for subgraph in subgraphs:
        counts[subgraph.ep_name] += len(subgraph.get_nodes())
    return dict(counts) if counts else None


def profile_node_counts(profile: str | os.PathLike[str]) -> dict[str, int]:
    """Distinct executed nodes per provider in an ORT profile (its `kernel_time` events)."""
    try:
        events = json.loads(Path(profile).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OptimodelError(f"{profile}: cannot read the ONNX Runtime profile: {exc}") from exc
    nodes: set[tuple[str, str]] = set()
    for event in events if isinstance(events, list) else []:
        args = event.get("args") or {}
        name = str(event.get("name", ""))
        if event.get("cat") == "Node" and name.endswith("_kernel_time") and "provider" in args:
            nodes.add((str(args["provider"]), name))
    return dict(Counter(provider for provider, _ in nodes))


# --------------------------------------------------------------------------- running


def _statistics(latencies_s: Sequence[float], batch: int) -> dict[str, float]:
    ms = np.asarray(latencies_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    total_s = float(ms.sum()) / 1e3
    return {
        "p50_ms": round(float(p50), 4),
        "p90_ms": round(float(p90), 4),
        "p99_ms": round(float(p99), 4),
        "mean_ms": round(float(ms.mean()), 4),
        "min_ms": round(float(ms.min()), 4),
        "max_ms": round(float(ms.max()), 4),
        "std_ms": round(float(ms.std()), 4),
        "throughput": round(batch * len(ms) / total_s, 2) if total_s > 0 else math.inf,
        # the latency distribution, every 5th percentile, for plots
        "percentiles_ms": [round(float(v), 4) for v in np.percentile(ms, range(0, 101, 5))],
    }


def _io_device(active: Sequence[str], options: Mapping[str, Mapping[str, str]]) -> tuple[str, int]:
    """Where bound inputs and outputs live: the accelerator that runs, else the host."""
    for name in active:
        if name in ACCELERATORS:
            return "cuda", int(options.get(name, {}).get("device_id", 0))
    return "cpu", 0


def _runner(
    session: Any, feed: dict[str, np.ndarray], io_binding: bool, device: tuple[str, int]
) -> Callable[[], Any]:
    """A zero-argument run: `session.run`, or a prepared IO binding (inputs copied once)."""
    if not io_binding:
        return lambda: session.run(None, feed)
    import onnxruntime as ort

    kind, device_id = device
    binding = session.io_binding()
    for name, value in feed.items():
        binding.bind_ortvalue_input(
            name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), kind, device_id)
        )
    for output in session.get_outputs():
        binding.bind_output(output.name, kind, device_id)
    return lambda: session.run_with_iobinding(binding)


def _run_error(source: str, exc: Exception) -> OptimodelError:
    text = str(exc).strip()
    line = next((ln for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    line = line.replace("[ONNXRuntimeError] : ", "").strip()
    return OptimodelError(f"{source}: ONNX Runtime failed while running: {line}")


def feed_batch_size(feed: Mapping[str, np.ndarray]) -> int:
    """Samples in one feed: the leading dimension of its first input (1 for scalars)."""
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and np.ndim(first) else 1


def benchmark_model(
    path: str | os.PathLike[str],
    config: SessionConfig,
    feed: dict[str, np.ndarray],
    *,
    runs: int = 100,
    warmup: int = 10,
    duration: float | None = None,
    io_binding: bool | None = None,
    node_counts: str = "auto",
    on_run: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Build a session, time it on one feed, and return one row of figures (module doc).

    `duration` (seconds) replaces `runs`: timed runs go on until it has passed (at least
    one). `io_binding=None` binds only where it pays: when an accelerator runs the model,
    so host-to-device copies of the inputs stay out of the steady-state figure.
    """
    if runs < 1:
        raise UsageError(f"--runs {runs}: must be at least 1")
    if warmup < 0:
        raise UsageError(f"--warmup {warmup}: must be 0 or more")
    if duration is not None and not duration > 0:
        raise UsageError(f"--duration {duration}: must be a positive number of seconds")
    if node_counts not in NODE_COUNT_METHODS:
        raise UsageError(f"unknown node count method '{node_counts}'")
    source = str(path)
    tick = on_run or (lambda: None)
    profile_dir: str | None = None
    session_config = config
    method = node_counts
    if method == "auto":  # the recorded partitioning where ORT has it, else a profiled run
        method = "assignment" if has_assignment_api() else "profile"
    if method == "assignment":
        entries = {**config.session_entries, ASSIGNMENT_ENTRY: "1"}
        session_config = replace(config, session_entries=entries)
    elif method == "profile":
        profile_dir = tempfile.mkdtemp(prefix="optimodel-profile-")
        session_config = replace(config, profile_prefix=str(Path(profile_dir) / "profile"))
    memory = PeakMemory()
    session = None
    try:
        memory.start()
        t0 = time.perf_counter()
        session = create_session(path, session_config, source=source)
        load_s = time.perf_counter() - t0
        memory.sample()
        active = list(session.get_providers())
        nodes: dict[str, int] | None = None
        nodes_source: str | None = None
        if method == "assignment":
            nodes = assignment_counts(session)
            nodes_source = "assignment" if nodes is not None else None
        device = _io_device(active, config.provider_options)
        use_binding = device[0] != "cpu" if io_binding is None else io_binding
        try:
            run = _runner(session, feed, use_binding, device)
            t0 = time.perf_counter()
            run()
            first_ms = (time.perf_counter() - t0) * 1e3
            tick()
            if profile_dir is not None:
                profile = session.end_profiling()  # also stops profiling the timed runs
                nodes, nodes_source = profile_node_counts(profile), "profile"
            for _ in range(warmup):
                run()
                tick()
            latencies = array("d")
            clock = time.perf_counter
            started = clock()
            while True:
                t0 = clock()
                run()
                latencies.append(clock() - t0)
                tick()
                if duration is None:
                    if len(latencies) >= runs:
                        break
                elif clock() - started >= duration:
                    break
            elapsed = clock() - started
        except OptimodelError:
            raise
        except Exception as exc:  # ORT raises its own (non-public) exception classes
            raise _run_error(source, exc) from exc
        peak_mb, delta_mb = memory.peak_mb()
    finally:
        session = None
        if profile_dir is not None:
            shutil.rmtree(profile_dir, ignore_errors=True)
    batch = feed_batch_size(feed)
    dropped = fell_back_providers(config.providers, active, nodes)
    row: dict[str, Any] = {
        "model": source,
        "provider": ",".join(p.strip().lower() for p in config.providers),
        "providers_requested": [PROVIDERS.get(p.strip().lower(), p) for p in config.providers],
        "providers_active": active,
        "fell_back": bool(dropped),
        "fell_back_providers": dropped,
        "threads": config.threads,
        "batch_size": batch,
        "input_shapes": {name: list(np.shape(value)) for name, value in feed.items()},
        "runs": len(latencies),
        "warmup": warmup,
        "duration_s": duration,
        "elapsed_s": round(elapsed, 4),
        **_statistics(latencies, batch),
        "session_load_s": round(load_s, 4),
        "first_run_ms": round(first_ms, 4),
        "peak_rss_mb": peak_mb,
        "rss_delta_mb": delta_mb,
        "nodes_by_provider": nodes or {},
        "nodes_by_provider_source": nodes_source,
        "io_binding": use_binding,
        "graph_optimization": config.optimization,
        "no_fallback": config.no_fallback,
        "provider_options": {k: dict(v) for k, v in config.provider_options.items()},
        "latency_ratio": 1.0,
        "load_ratio": 1.0,
    }
    row["provider_display"] = provider_label(row)
    return row


def _ratio(value: Any, base: Any) -> float | None:
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)) or base <= 0:
        return None
    return round(value / base, 4)


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratios to the first row: `latency_ratio` of p50s, `load_ratio` of session load times.

    Below 1.0 means faster than the first model (the baseline, which gets exactly 1.0).
    """
    if not rows:
        return rows
    base = rows[0]
    for row in rows:
        row["latency_ratio"] = 1.0 if row is base else _ratio(row["p50_ms"], base["p50_ms"])
        row["load_ratio"] = (
            1.0 if row is base else _ratio(row["session_load_s"], base["session_load_s"])
        )
    return rows


def fallback_message(row: Mapping[str, Any]) -> str:
    """The loud line for a session that dropped a requested accelerator."""
    dropped = [short_provider(p) for p in row.get("fell_back_providers") or []]
    label = str(row.get("provider_display") or provider_label(row))
    ran = label.rpartition("→")[2].removesuffix(" (fell back)") or "CPU"
    return (
        f"{row['model']}: requested {', '.join(dropped) or row.get('provider')} but the session "
        f"ran on {ran}: these are {ran} figures; check the CUDA / cuDNN / TensorRT libraries "
        "(`optimodel doctor`), or pass --no-fallback to fail at session creation"
    )


def placement_note(row: Mapping[str, Any]) -> str | None:
    """A note when an accelerator runs the model but some nodes stayed on the CPU."""
    nodes = row.get("nodes_by_provider") or {}
    if row.get("fell_back") or not any(nodes.get(p) for p in ACCELERATORS):
        return None
    on_cpu = nodes.get(CPU, 0)
    if not on_cpu:
        return None
    return (
        f"{row['model']}: {on_cpu} of {sum(nodes.values())} nodes run on the CPU (no kernel "
        "on the requested provider); copies between devices may weigh on the latency"
    )
