# flanmoe_nb: the two commands are `make run` and `make test`; both set up .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines pin the CPU wheel. GPU nodes: install a CUDA build of torch into .venv first
# (see README), then `make install TORCH_SPEC=` keeps it.
TORCH_SPEC ?= torch==2.13.0
KERNEL_NAME ?= flanmoe_nb
STAMP := $(VENV)/.flanmoe-installed
CPP_SOURCES := $(wildcard cpp/*.cpp cpp/*.h cpp/*.inc cpp/cuda/*.cu cpp/cuda/*.cuh)
PYTEST_ARGS ?=

.PHONY: FORCE install system-deps run test test-py test-nbs docs lab export clean-nbs check-sync bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

# nbdev-export rewrites pyproject.toml with the same text: depend on its content, not its mtime.
PYPROJECT_HASH := $(VENV)/.pyproject-sha256
$(PYPROJECT_HASH): FORCE | $(BIN)/python
	@sha256sum pyproject.toml | cmp -s - $@ || sha256sum pyproject.toml > $@

$(STAMP): $(BIN)/python $(PYPROJECT_HASH) setup.py $(CPP_SOURCES)
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q pybind11 ninja "setuptools>=77" wheel
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[dev,docs]'
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL_NAME) --display-name "Python (flanmoe_nb)" >/dev/null
	@touch $(STAMP)

install: $(STAMP)

## Debian's chromium, for the docs-site browser test (which skips without it). Needs root.
system-deps:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is not installed: the docs-site browser test will skip (sudo apt-get install chromium)"; fi; fi

## The main job on the embedded tiny default (RUN_ARGS=--replay-kernels: the lab book's kernel paths).
RUN_ARGS ?=
run: install
	$(BIN)/flanmoe run $(RUN_ARGS)

## Test suite: pytest, then the notebooks themselves (nbdev-test).
test: install test-py test-nbs

test-py: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-nbs: install
	$(BIN)/nbdev-test --n-workers 2 --do-print --timing

docs: install
	$(BIN)/flanmoe docs

## JupyterLab on the notebooks; as root (containers) it needs --allow-root.
LAB_ARGS ?=
lab: install
	$(BIN)/jupyter lab --notebook-dir=nbs $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)

bench: install
	$(BIN)/flanmoe bench moe
	$(BIN)/flanmoe bench train

## Notebook <-> library hygiene (CI runs check-sync).
export: install
	$(BIN)/nbdev-export

clean-nbs: install
	$(BIN)/nbdev-clean

check-sync: install
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean
	$(BIN)/flanmoe docs --readme-only >/dev/null
	@if [ -n "$$(git status --porcelain -- flanmoe_nb nbs README.md)" ]; then \
	  echo "notebooks, library and README are out of step (run nbdev-export, nbdev-clean and"; \
	  echo "flanmoe docs --readme-only, then commit):"; \
	  git status --porcelain -- flanmoe_nb nbs README.md; git diff --stat -- flanmoe_nb nbs README.md; exit 1; fi

clean:
	rm -rf build flanmoe_nb/_C*.so flanmoe_nb/_build_info.json _docs _proc
