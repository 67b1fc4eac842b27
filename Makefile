# The README's commands. Each target creates or reuses the virtualenv in $(VENV) and installs what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.ppt_fast-installed
SOURCES := setup.py pyproject.toml scripts/install_audiocraft.sh $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)
NVCC ?= nvcc
CUDA_ARCHS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

.PHONY: install demo test test-interpreter test-all check-cuda bench bench-gpu lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# torch pinned to 2.13.0 so pip takes the local CPU wheel; triton 3.9.0 for the interpreter lane.
$(STAMP): $(BIN)/python $(SOURCES)
	$(PIP) install -q torch==2.13.0 triton==3.9.0 numpy
	PIP="$(PIP)" bash scripts/install_audiocraft.sh
	$(PIP) install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ppt-fast demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-interpreter: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m interpreter

# Compile-only check of the torch-free CUDA kernel files for sm_80 and sm_90 (nothing runs without a GPU).
check-cuda:
	@for f in $(wildcard csrc/cuda/*.cu); do \
		echo "nvcc $$f"; $(NVCC) -std=c++17 -O3 $(CUDA_ARCHS) -c $$f -o /dev/null || exit 1; \
	done

test-all: test test-interpreter check-cuda

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --suite cpu

bench-gpu:
	python benchmarks/run.py --suite gpu

lint: $(STAMP)
	$(BIN)/ruff check ppt_fast tests benchmarks

clean:
	rm -rf build ppt_fast/*.so .pytest_cache
