# optimodel: set-up, the main job, tests, lint, benchmarks and batch conversion.
# Works on a machine with only Python 3.11 and make: `make run`, `make test`.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SAMPLE := sample_models/digits_cnn.onnx
OUT    ?= out
GPU_DIR ?= benchmarks/.cache/gpu

# Batch conversion: every model in BATCH_IN optimized in parallel with `make -j batch`.
BATCH_IN     ?= sample_models
BATCH_OUT    ?= $(OUT)/batch
BATCH_RECIPE ?= default
BATCH_MODELS  := $(wildcard $(BATCH_IN)/*.onnx)
BATCH_TARGETS := $(patsubst $(BATCH_IN)/%.onnx,$(BATCH_OUT)/%.onnx,$(BATCH_MODELS))

.PHONY: setup run test test-all lint bench bench-huge bench-gpu bench-prune-data batch models clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	@mkdir -p $(OUT)
	$(BIN)/optimodel inspect $(SAMPLE)
	$(BIN)/optimodel optimize $(SAMPLE) -o $(OUT)/digits_cnn.opt.onnx --force --config default \
		--data sample_models/digits_test.npz --max-drop 0.5 \
		--report $(OUT)/digits_cnn.report.json --report $(OUT)/digits_cnn.report.md \
		--report $(OUT)/digits_cnn.report.html

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check optimodel tests sample_models benchmarks
	$(BIN)/ruff format --check optimodel tests sample_models benchmarks

BENCH_STAMP := $(VENV)/.bench-installed

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/scaling.py --results benchmarks/RESULTS.md

# A 2.25 GiB model through inspect, fold and quantize against peers: about 4 minutes and
# 8 GB of temporary disk, so not part of `make bench`.
bench-huge: $(BENCH_STAMP)
	PYTHONPATH=. $(BIN)/python benchmarks/huge.py --gib 2.2 --results benchmarks/RESULTS.md

# MiniLM pruned to 50% with recovery on 100 to 2,500 calibration sentences: how much data
# the least-squares fit needs (about 15 minutes; needs benchmarks/requirements-transformer.txt).
bench-prune-data: $(BENCH_STAMP)
	$(BIN)/python benchmarks/prune_calibration.py --results benchmarks/RESULTS.md

# On a machine with onnxruntime-gpu and a GPU: originals, optimodel's variants, timed on
# CUDA (and TensorRT where its libraries load); `benchmarks/gpu.py prepare` and `measure`
# run the two halves on two machines.
bench-gpu: $(BENCH_STAMP)
	$(BIN)/python benchmarks/gpu.py prepare $(GPU_DIR)
	$(BIN)/python benchmarks/gpu.py measure $(GPU_DIR) --results benchmarks/RESULTS.md

$(BENCH_STAMP): $(STAMP) benchmarks/requirements.txt
	$(BIN)/python -m pip install --quiet -r benchmarks/requirements.txt
	touch $(BENCH_STAMP)

batch: $(BATCH_TARGETS)
	@echo "batch: $(words $(BATCH_TARGETS)) model(s) -> $(BATCH_OUT)"

$(BATCH_OUT)/%.onnx: $(BATCH_IN)/%.onnx | $(STAMP)
	@mkdir -p $(BATCH_OUT)
	$(BIN)/optimodel optimize $< -o $@ --force --config $(BATCH_RECIPE) --no-bench --quiet \
		--report $(BATCH_OUT)/$*.report.json

models:
	$(BIN)/python sample_models/make_models.py

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
