# optimodel: set-up, the main job, tests, lint, benchmarks and batch conversion.
# Works on a machine with only Python 3.11 and make: `make run`, `make test`.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SAMPLE := sample_models/digits_cnn.onnx
OUT    ?= out

# Batch conversion: every model in BATCH_IN processed in parallel with `make -j batch`.
BATCH_IN  ?= sample_models
BATCH_OUT ?= $(OUT)/batch
BATCH_MODELS  := $(wildcard $(BATCH_IN)/*.onnx)
BATCH_TARGETS := $(patsubst $(BATCH_IN)/%.onnx,$(BATCH_OUT)/%.inspect.json,$(BATCH_MODELS))

.PHONY: setup run test test-all lint bench batch models clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	@mkdir -p $(OUT)
	$(BIN)/optimodel inspect $(SAMPLE)
	$(BIN)/optimodel eval $(SAMPLE) --data sample_models/digits_test.npz \
		--report $(OUT)/digits_cnn.report.json --report $(OUT)/digits_cnn.report.md

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check optimodel tests sample_models benchmarks
	$(BIN)/ruff format --check optimodel tests sample_models benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

batch: $(BATCH_TARGETS)
	@echo "batch: $(words $(BATCH_TARGETS)) model(s) -> $(BATCH_OUT)"

$(BATCH_OUT)/%.inspect.json: $(BATCH_IN)/%.onnx | $(STAMP)
	@mkdir -p $(BATCH_OUT)
	$(BIN)/optimodel inspect $< --json > $@.tmp && mv $@.tmp $@

models:
	$(BIN)/python sample_models/make_models.py

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
