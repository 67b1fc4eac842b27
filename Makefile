# The README's commands. Each target creates or reuses the virtualenv in $(VENV) and installs what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.ppt_fast-installed
SOURCES := setup.py pyproject.toml scripts/install_audiocraft.sh $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)
NVCC ?= nvcc
CUDA_ARCHS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90

.PHONY: install demo test test-browser test-interpreter test-all check-cuda check-cuda-emulation bench bench-gpu gpu-check gpu-check-dry lint clean pretrain eval-default

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# torch pinned to 2.13.0 so pip takes the local CPU wheel; triton 3.9.0 for the interpreter lane.
# Order: everything installed with its dependencies first, the packages whose metadata pins what we never use (they
# go in with --no-deps) last. pip checks the installed packages' requirements after every install that resolves
# dependencies, and once audiocraft (pins torch==2.1.0) or musicnn (pins TensorFlow) is in, such an install prints
# "ERROR: pip's dependency resolver does not currently take into account ... requires torch==2.1.0": expected, but
# it reads as a failure. A --no-deps install runs no check, so none of those lines is printed.
$(STAMP): $(BIN)/python $(SOURCES)
	$(PIP) install -q torch==2.13.0 triton==3.9.0 numpy
	$(PIP) install -q pretty_midi==0.2.11.post0 mido==1.3.3
	$(PIP) install -q --no-build-isolation -e '.[test,app]'
	PIP="$(PIP)" bash scripts/install_audiocraft.sh
	# Evaluation: GM soundfont renderer + musicnn's checkpoints (its metadata pins TensorFlow, which is never needed:
	# the taggers run in PyTorch; tinysoundfont's pyaudio is only for live playback).
	$(PIP) install -q --no-deps tinysoundfont==0.3.7 musicnn==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ppt-fast demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The app and report.html in a real browser (tests/browser): headless Chromium from Debian's `chromium` package
# (installed here when missing; as root, as CI is; no browser is ever downloaded) driven by Playwright; screenshots in
# out/browser-artifacts/. Playwright with --no-deps (greenlet, its one requirement, pinned beside it), for the reason
# above: a resolving install after audiocraft's prints pip's expected but alarming resolver errors.
PLAYWRIGHT := playwright==1.65.2 greenlet==3.5.6
test-browser: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium (headless browser for the tests)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		chromium fonts-liberation fonts-dejavu-core; }
	$(PIP) install -q --no-deps $(PLAYWRIGHT)
	$(BIN)/python -m pytest -q -m browser tests/browser --browser-required

test-interpreter: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "interpreter and not slow"

# Compile-only check of the torch-free CUDA kernel files for sm_80 and sm_90 (nothing runs without a GPU).
check-cuda:
	@for f in $(wildcard csrc/cuda/*.cu); do \
		echo "nvcc $$f"; $(NVCC) -std=c++17 -O3 $(CUDA_ARCHS) -c $$f -o /dev/null || exit 1; \
	done

# Host emulation of the CUDA kernels and a load check of the CUDA binding against CPU torch (no GPU needed, slow).
check-cuda-emulation: $(STAMP)
	$(BIN)/python tests/cuda_emulation/run_emulation.py
	$(BIN)/python tests/cuda_emulation/check_bindings.py

test-all: test test-interpreter check-cuda

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --suite cpu

bench-gpu:
	python benchmarks/run.py --suite gpu

# The one prepared GPU check (scripts/gpu_check.sh: build, CUDA tests, compiled Triton, headline benchmarks; <= ~8 min),
# with the GPU machine's own python3; the dry run is the same script on CPU (.ci/run runs it).
gpu-check:
	bash scripts/gpu_check.sh

gpu-check-dry: $(STAMP)
	PY=$(BIN)/python bash scripts/gpu_check.sh --dry-run

# Re-make the embedded default model's weights (ppt_fast/assets/tiny-v8.pt); ~47 min on 2 CPU cores, resumable.
pretrain: $(STAMP)
	$(BIN)/ppt-fast pretrain

# Figures of the default model (codec round trip, sampling sweep, long clips, text control, prior preservation); ~36 min on 2 CPU cores.
eval-default: $(STAMP)
	$(BIN)/python -m ppt_fast.eval.default_model --out benchmarks/results/default-model-eval.json

lint: $(STAMP)
	$(BIN)/ruff check ppt_fast tests benchmarks

clean:
	rm -rf build ppt_fast/*.so .pytest_cache
