# Two commands: `make demo` and `make test`. Both create .venv if needed and install into it.
# CPU path: the CPU wheel of torch (TORCH=torch==2.13.0) goes in first, so nothing pulls a CUDA
# build. GPU users: install your CUDA torch into .venv first (see README); it is then kept.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lrec-installed
OUT    ?= runs/demo

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.hpp csrc/*.inc)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lrec-fast demo --out $(OUT)

lint: setup
	$(VENV)/bin/ruff check lrec_fast tests benchmarks setup.py csrc
	$(VENV)/bin/ruff format --check lrec_fast tests benchmarks setup.py csrc
	$(VENV)/bin/mypy lrec_fast

test: lint
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m pip install -q "faiss-cpu>=1.8"
	find lrec_fast -name "*.nb[ic]" -delete  # compile fresh for this machine
	$(PY) -m pytest benchmarks --benchmark-enable --benchmark-columns=median,iqr,ops --benchmark-max-time=0.5

clean:
	rm -rf $(VENV) build *.egg-info lrec_fast/*.so
	find lrec_fast -name '*.nb[ic]' -delete  # numba's on-disk kernel cache
