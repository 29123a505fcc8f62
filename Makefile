# The two commands of the README's quickstart, each installing what it needs into .venv.
#   make demo   the whole system end to end on Fashion-MNIST (prepare, train, evaluate, figures)
#   make test   the whole test suite (and the linter)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,onnx,openvino,faiss]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/alexnet demo

test: $(STAMP)
	$(BIN)/ruff check alexnet tests
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check alexnet tests
	$(BIN)/ruff format --check alexnet tests

bench: $(STAMP)
	$(BIN)/alexnet bench --model small
	$(BIN)/alexnet bench --model paper

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
