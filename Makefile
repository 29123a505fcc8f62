# The two commands of the README's quickstart, each installing what it needs into .venv.
#   make demo   the whole system end to end on Fashion-MNIST (prepare, train, evaluate, figures)
#   make test   the whole test suite (and the linter)
#   make gpu-check   on a machine with one CUDA GPU: pytest -m gpu and the GPU benchmarks,
#                    summarised in gpu-check.json (alexnet/bench/gpu_check.py)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GPU_STAMP := $(VENV)/.installed-gpu
PYTEST_ARGS ?= -n 2

.PHONY: demo test lint bench gpu-check clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,onnx,openvino,faiss]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/alexnet demo

test: $(STAMP)
	$(BIN)/ruff check alexnet tests
	$(BIN)/ruff format --check alexnet tests
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check alexnet tests
	$(BIN)/ruff format --check alexnet tests

bench: $(STAMP)
	$(BIN)/alexnet bench --model small
	$(BIN)/alexnet bench --model paper

# torchvision (for nvJPEG) only in the build that matches the installed torch, never a newer
# torch; where there is none, the check reports nvJPEG as unavailable and decodes on the CPU.
$(GPU_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,jpeg]'
	-$(BIN)/python -m pip install --quiet torchvision \
		"torch==$$($(BIN)/python -c 'import torch; print(torch.__version__.split("+")[0])')"
	touch $(GPU_STAMP)

gpu-check: $(GPU_STAMP)
	$(BIN)/python -m alexnet.bench.gpu_check --out gpu-check.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
