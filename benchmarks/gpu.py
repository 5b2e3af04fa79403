"""GPU figures: the original and optimodel's outputs under ONNX Runtime's CUDA / TensorRT.

Two steps, so that the GPU machine needs neither the model caches nor PyTorch:

    python benchmarks/gpu.py prepare DIR [--models a,b]   # here: originals + their inputs
    python benchmarks/gpu.py measure DIR [--results RESULTS.md]  # on the GPU machine
    python benchmarks/gpu.py render DIR/gpu_results.json --results benchmarks/RESULTS.md

`measure` builds the optimized variants from each original with optimodel (fold + fuse
for standard ONNX or for ONNX Runtime, fp16, static int8 for `--target cuda`), then runs
every variant on each GPU provider that ONNX Runtime offers there. Latency is paired
(the original and every variant in shuffled rounds, ratios of medians; see measure.py),
fidelity is measured against the original fp32 model on the CPU, and the nodes each
provider was given are counted, so a variant that quietly runs on the CPU shows. A provider
that cannot start is recorded with its one-line reason, never replaced by CPU figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import Feed, fidelity, latency, run_all  # noqa: E402
from tools import one_line  # noqa: E402

from optimodel.runtime.bench import ASSIGNMENT_ENTRY, assignment_counts  # noqa: E402

GPU_PROVIDERS = {
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "cpu": "CPUExecutionProvider",  # a smoke run of this script on a machine without a GPU
}
DEFAULT_MODELS = "magika,ppocr_det,ppocr_rec,ppocr_cls,minilm"
ORT_GPU: dict[str, Any] = {"target": "ort", "enable": ["skip-layernorm"]}
# variant -> passes (name, options); None builds nothing (the original itself)
VARIANTS: dict[str, list[tuple[str, dict[str, Any]]] | None] = {
    "original": None,
    "fold+fuse (portable)": [("fold", {}), ("fuse", {"target": "portable"})],
    # SkipLayerNormalization: slow on ONNX Runtime's CPU, fast on CUDA
    "fold+fuse (ort)": [("fold", {}), ("fuse", ORT_GPU)],
    "fp16": [("fold", {}), ("fuse", {"target": "portable"}), ("fp16", {"keep_io_types": True})],
    "fuse (ort) + fp16": [
        ("fold", {}),
        ("fuse", ORT_GPU),
        ("fp16", {"keep_io_types": True}),
    ],
    "int8 static (target cuda)": [("quantize", {"mode": "static", "target": "cuda"})],
}
SECTION = "gpu"


# --------------------------------------------------------------------------- prepare


def _save_feeds(path: Path, latency_feed: Feed, evals: list[Feed], calib: list[Feed]) -> None:
    arrays = {f"latency/{k}": v for k, v in latency_feed.items()}
    for group, feeds in (("eval", evals), ("calib", calib)):
        for i, feed in enumerate(feeds):
            arrays.update({f"{group}{i}/{k}": v for k, v in feed.items()})
    np.savez_compressed(path, **arrays)


def _load_feeds(path: Path) -> tuple[Feed, list[Feed], list[Feed]]:
    groups: dict[str, Feed] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            group, name = key.split("/", 1)
            groups.setdefault(group, {})[name] = data[key]

    def ordered(prefix: str) -> list[Feed]:
        keys = sorted(
            (k for k in groups if k.startswith(prefix)), key=lambda k: int(k[len(prefix) :])
        )
        return [groups[k] for k in keys]

    return groups["latency"], ordered("eval"), ordered("calib")


def prepare(out: Path, names: list[str]) -> None:
    """Copy each original model and write its latency / eval / calibration feeds."""
    from models import CACHE, model_registry

    registry = model_registry()
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name in names:
        if name not in registry:
            print(f"note: {name} is not available here, left out", file=sys.stderr)
            continue
        bench = registry[name](CACHE)
        folder = out / name
        folder.mkdir(exist_ok=True)
        shutil.copyfile(bench.path, folder / "original.onnx")
        _save_feeds(folder / "feeds.npz", bench.latency_feed, bench.eval_feeds, bench.calib_feeds)
        manifest[name] = {"task": bench.task, "source": bench.source}
        print(f"prepared {name}")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


# --------------------------------------------------------------------------- measure


def _build(folder: Path, variant: str, calib: list[Feed]) -> Path:
    """The variant's model file, built from original.onnx with optimodel's passes."""
    from optimodel.passes import get_pass
    from optimodel.transform import transform_file

    passes = VARIANTS[variant]
    if passes is None:
        return folder / "original.onnx"
    out = folder / (variant.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx")
    if out.exists():
        return out
    calib_dir = folder / "calib"
    calib_dir.mkdir(exist_ok=True)
    for i, feed in enumerate(calib):
        np.savez(calib_dir / f"feed_{i:03d}.npz", **feed)
    built = []
    for name, options in passes:
        if name == "quantize":
            options = {**options, "calib_data": str(calib_dir)}
        if name == "fp16":
            options = {**options, "data": str(calib_dir)}
        built.append(get_pass(name, **options))
    transform_file(
        folder / "original.onnx", out, built, subcommand="bench", force=True, verify=False
    )
    return out


def _session(path: Path, provider: str | None) -> Any:
    """A session on `provider` (None: the CPU), the CPU behind a GPU for unsupported nodes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry(ASSIGNMENT_ENTRY, "1")
    chain = {
        None: ["cpu"],
        "cpu": ["cpu"],
        "cuda": ["cuda", "cpu"],
        "tensorrt": ["tensorrt", "cuda", "cpu"],
    }[provider]
    providers = [GPU_PROVIDERS[p] for p in chain]
    return ort.InferenceSession(str(path), options, providers=providers)


def _rows(feed: Feed) -> int:
    return int(next(iter(feed.values())).shape[0])


def _batch_feed(evals: list[Feed], session: Any, most: int = 8) -> Feed | None:
    """Up to `most` eval inputs as one batch, where the model takes one (GPUs want batches)."""
    if not evals:
        return None
    if _rows(evals[0]) > 1:
        return evals[0]
    same = [f for f in evals[:most] if all(f[k].shape == evals[0][k].shape for k in evals[0])]
    if len(same) < 2:
        return None
    batch = {k: np.concatenate([f[k] for f in same]) for k in evals[0]}
    try:
        session.run(None, batch)
    except Exception:  # a fixed batch dimension: batch 1 only
        return None
    return batch


def measure_model(folder: Path, task: str | None, provider: str, budget_s: float) -> dict[str, Any]:
    """Every variant of one model on one provider: placement, fidelity, paired latency."""
    latency_feed, evals, calib = _load_feeds(folder / "feeds.npz")
    reference_session = _session(folder / "original.onnx", None)
    names = [o.name for o in reference_session.get_outputs()]
    reference = run_all(reference_session, names, evals)
    rows: dict[str, dict[str, Any]] = {}
    sessions = {}
    for variant in VARIANTS:
        row: dict[str, Any] = {}
        rows[variant] = row
        try:
            start = time.perf_counter()
            path = _build(folder, variant, calib)
            row["build_s"] = time.perf_counter() - start
            row["bytes"] = path.stat().st_size
            start = time.perf_counter()
            sess = _session(path, provider)
            row["load_s"] = time.perf_counter() - start
            row["providers"] = sess.get_providers()
            row["placement"] = assignment_counts(sess)
            row["fidelity"] = fidelity(reference, run_all(sess, names, evals), task)
            sessions[variant] = sess
        except Exception as exc:  # a variant that fails is a figure, not a stop
            row["error"] = one_line(exc)
    if "original" in sessions:
        timed = latency(sessions, latency_feed, rounds=30, block_s=0.05, budget_s=budget_s)
        for variant, figures in timed.items():
            rows[variant]["latency"] = figures
        batch = _batch_feed(evals, sessions["original"])
        if batch is not None:
            timed = latency(sessions, batch, rounds=20, block_s=0.05, budget_s=budget_s / 2)
            for variant, figures in timed.items():
                rows[variant]["batch_latency"] = {**figures, "batch": _rows(batch)}
    versus_cpu = None
    if "original" in sessions and provider != "cpu":
        pair = {"original": _session(folder / "original.onnx", None), "gpu": sessions["original"]}
        timed = latency(pair, latency_feed, rounds=10, block_s=0.05, budget_s=budget_s / 3)
        versus_cpu = timed["gpu"]
    return {"variants": rows, "original_gpu_vs_cpu": versus_cpu}


def _device() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        return out.splitlines()[0] if out else "no GPU found"
    except (OSError, subprocess.SubprocessError):
        return "no GPU found (nvidia-smi not available)"


def _probe(provider: str) -> str | None:
    """None when the provider starts a session here, else the one-line reason."""
    from optimodel.runtime.provider_probe import probe_provider

    return probe_provider(GPU_PROVIDERS[provider])


def measure(folder: Path, providers: list[str], budget_s: float) -> dict[str, Any]:
    import onnxruntime as ort

    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    result: dict[str, Any] = {
        "device": _device(),
        "onnxruntime": ort.__version__,
        "available": ort.get_available_providers(),
        "cpu": platform.processor() or platform.machine(),
        "providers": {},
    }
    for provider in providers:
        reason = _probe(provider)
        entry: dict[str, Any] = {"unavailable": reason, "models": {}}
        result["providers"][provider] = entry
        if reason:
            print(f"{provider}: unavailable: {reason}", file=sys.stderr)
            continue
        for name, info in manifest.items():
            print(f"{provider}: {name} ...", file=sys.stderr, flush=True)
            try:
                entry["models"][name] = measure_model(
                    folder / name, info["task"], provider, budget_s
                )
            except Exception as exc:  # one model's failure is recorded, the rest still run
                entry["models"][name] = {"error": one_line(exc), "variants": {}}
    return result


# --------------------------------------------------------------------------- render


def _fmt_ratio(figures: dict[str, Any] | None) -> str:
    if not figures:
        return "-"
    return f"{figures['ratio']:.2f}x [{figures['ratio_p25']:.2f}-{figures['ratio_p75']:.2f}]"


def _fmt_fidelity(fid: dict[str, Any] | None) -> str:
    if not fid:
        return "-"
    text = f"cos {fid['cosine']:.5f}"
    agreement = fid.get("agreement")
    if agreement:
        value = agreement["value"]
        shown = f"{value:.4f}" if agreement.get("format") == "cosine" else f"{value:.0%}"
        text += f", {agreement['name']} {shown}"
    return text


def _fmt_placement(row: dict[str, Any], provider: str) -> str:
    counts = row.get("placement")
    if not counts:
        return "-"
    gpu = counts.get(GPU_PROVIDERS[provider], 0)
    total = sum(counts.values())
    return f"{gpu}/{total} on {provider}"


def render(result: dict[str, Any]) -> str:
    lines = [
        "## GPU (ONNX Runtime CUDA / TensorRT)",
        "",
        f"Device: **{result['device']}**; ONNX Runtime {result['onnxruntime']} "
        f"(providers in the build: {', '.join(result['available'])}). Made by "
        "`benchmarks/gpu.py`: every variant is built by optimodel from the original, run "
        "on the provider, timed paired with the original on the same provider (median "
        "ratio, [p25-p75]); fidelity is against the original fp32 model on the CPU. "
        "These are GPU figures; the CPU tables above are a different machine.",
        "",
    ]
    for provider, entry in result["providers"].items():
        if entry["unavailable"]:
            lines += [f"**{provider}**: not measured: {entry['unavailable']}.", ""]
            continue
        lines += [
            f"### {provider}",
            "",
            "| model | variant | latency vs original | ms | batched: vs original | ms | "
            "fidelity | nodes on GPU | size |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, figures in entry["models"].items():
            if "error" in figures:
                lines.append(f"| {name} | - | fails: {figures['error']} | | | | | | |")
            speedup = figures.get("original_gpu_vs_cpu")
            for variant, row in figures["variants"].items():
                if "error" in row:
                    lines.append(f"| {name} | {variant} | fails: {row['error']} | | | | | | |")
                    continue
                label = variant
                if variant == "original" and speedup:
                    label += f" (GPU/CPU time {speedup['ratio']:.2f}x)"
                cells = [name, label]
                for key in ("latency", "batch_latency"):
                    lat = row.get(key)
                    ms = f"{lat['median_ms']:.3f}" if lat else "-"
                    if lat and key == "batch_latency":
                        ms += f" (batch {lat['batch']})"
                    cells += [_fmt_ratio(lat), ms]
                cells += [
                    _fmt_fidelity(row.get("fidelity")),
                    _fmt_placement(row, provider),
                    f"{row['bytes'] / 1e6:.2f} MB",
                ]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    prep = sub.add_parser("prepare", help="originals and their inputs into DIR")
    prep.add_argument("dir", type=Path)
    prep.add_argument("--models", default=DEFAULT_MODELS)
    meas = sub.add_parser("measure", help="build variants and run them on the GPU providers")
    meas.add_argument("dir", type=Path)
    meas.add_argument("--providers", default="cuda,tensorrt")
    meas.add_argument("--budget", type=float, default=20.0, help="seconds of timing per model")
    meas.add_argument("--results", type=Path, help="also write the section into this RESULTS.md")
    again = sub.add_parser("render", help="the Markdown section again, from a results JSON")
    again.add_argument("json", type=Path)
    again.add_argument("--results", type=Path, help="write the section into this RESULTS.md")
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.dir, [m for m in args.models.split(",") if m])
        return 0
    if args.step == "render":
        text = render(json.loads(args.json.read_text(encoding="utf-8")))
        print(text)
        if args.results:
            from scaling import write_section

            write_section(args.results, text, SECTION)
        return 0
    providers = [p for p in args.providers.split(",") if p]
    result = measure(args.dir, providers, args.budget)
    (args.dir / "gpu_results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    text = render(result)
    (args.dir / "gpu_results.md").write_text(text, encoding="utf-8")
    print(text)
    if args.results:
        from scaling import write_section

        write_section(args.results, text, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
