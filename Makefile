# The two commands of the README's quickstart, each installing what it needs into .venv:
#   make demo    the whole system end to end on Fashion-MNIST (prepare, train, evaluate, figures)
#   make test    the whole test suite, the linter and the formatter's check
# and, beside them:
#   make test-torch214   the suite again on torch 2.14.1 with torchvision 0.29.1 (.venv-torch214)
#   make gpu-check       on a machine with a CUDA GPU: with that machine's own Python and torch,
#                        installing nothing (alexnet/bench/gpu_check.py; gpu-check.json)
#   make bench           training and inference speed against the strongest peers
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2
VENV214 := .venv-torch214

.PHONY: demo test test-torch214 lint bench gpu-check clean

# torch is pinned for this environment by constraints.txt (the package accepts a range)
$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,onnx,openvino,faiss]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/alexnet demo

test: $(STAMP)
	$(BIN)/ruff check alexnet tests
	$(BIN)/ruff format --check alexnet tests
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

$(VENV214)/.installed: pyproject.toml Makefile constraints-torch214.txt
	$(PYTHON) -m venv $(VENV214)
	$(VENV214)/bin/python -m pip install --quiet --upgrade pip
	$(VENV214)/bin/python -m pip install --quiet -c constraints-torch214.txt \
		-e '.[test,onnx,openvino,faiss]' torchvision
	touch $(VENV214)/.installed

test-torch214: $(VENV214)/.installed
	$(VENV214)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check alexnet tests
	$(BIN)/ruff format --check alexnet tests

bench: $(STAMP)
	$(BIN)/alexnet bench --model small
	$(BIN)/alexnet bench --model paper

# No install: the Python it runs with must have a CUDA build of torch (the GPU machine's own).
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) -m alexnet.bench.gpu_check --out gpu-check.json

clean:
	rm -rf $(VENV) $(VENV214) .pytest_cache .ruff_cache
