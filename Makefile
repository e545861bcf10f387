# The two quick-start entry points (README.md) and what they need. Each target sets up the
# virtual environment it uses, so both work on a fresh machine.
#   make demo   - build, then run the main job (python -m tpssm demo)
#   make test   - build (CPU kernels + every CUDA source when nvcc is present), then the CPU suite
#   make test-cuda-emu - the CUDA kernels' GPU tests, their code emulated on the CPU
#   make test-cuda-emu-asan - the emulated kernels under AddressSanitizer (sanitize_cases.py)

VENV ?= .venv
PYTHON ?= python3
TORCH_VERSION ?= 2.14.1
# The nvcc on PATH may be a wrapper script, from which torch guesses CUDA_HOME wrong: prefer the
# toolkit's standard link.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda) $(patsubst %/bin/nvcc,%,$(shell command -v nvcc 2>/dev/null)))
export CUDA_HOME
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS

PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup build test test-cuda-emu test-cuda-emu-asan demo FORCE

$(VENV)/.deps-installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==$(TORCH_VERSION)
	# NCCL from the nvidia-nccl wheel that matches torch's CUDA major (the one torch loads).
	$(PY) -m pip install pybind11 ninja setuptools wheel numpy pytest pytest-timeout pytest-xdist \
		safetensors transformers==5.18.0 matplotlib \
		$$($(PY) -c 'import torch; v = torch.version.cuda; print("nvidia-nccl-cu" + v.split(".")[0] if v else "")')
	touch $@

setup: $(VENV)/.deps-installed

# Rebuilt only when a source or a build switch changed (an editable pip build always starts from
# scratch). The switches setup.py reads are kept in a file rewritten only when they differ, so
# `TORCH_CUDA_ARCH_LIST=9.0 make build` after a default build rebuilds.
BUILD_STAMP := $(VENV)/.tpssm-built
BUILD_SWITCHES := $(VENV)/.tpssm-build-switches
SWITCHES := TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) TPSSM_SKIP_CUDA_BUILD=$(TPSSM_SKIP_CUDA_BUILD) TPSSM_REQUIRE_CUDA_BUILD=$(TPSSM_REQUIRE_CUDA_BUILD) CUDA_HOME=$(CUDA_HOME)
$(BUILD_SWITCHES): $(VENV)/.deps-installed FORCE
	@echo '$(SWITCHES)' | cmp -s - $@ || echo '$(SWITCHES)' > $@

# The extension is built in place (python/tpssm/_C*.so), one for the tree whichever VENV built it:
# after a build for another VENV (another torch) this one's stamp no longer holds.
BUILT_FOR := build/.tpssm-built-for-venv
$(BUILT_FOR): FORCE
	@mkdir -p build
	@echo '$(abspath $(VENV))' | cmp -s - $@ || echo '$(abspath $(VENV))' > $@

$(BUILD_STAMP): $(VENV)/.deps-installed $(BUILD_SWITCHES) $(BUILT_FOR) setup.py pyproject.toml \
		$(shell find csrc -type f)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

FORCE:

build: $(BUILD_STAMP)

test: build
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The CUDA kernels' own code run on the CPU (tools/cuda_emu): their GPU tests without a GPU.
EMU_TESTS := tests/test_ops_cuda.py tests/test_norm_ops_cuda.py tests/test_attention_ops_cuda.py \
	tests/test_linear_ops_cuda.py tests/test_programmatic_launch_cuda.py
test-cuda-emu: build
	PYTHONPATH=tools/cuda_emu $(PY) -m pytest $(EMU_TESTS) -p emu_plugin -k "not large" $(PYTEST_ARGS)

# The same kernels built with AddressSanitizer: sanitize_cases.py's boundary and malformed-index
# cases (tools/cuda_emu/test_sanitize_cases.py) and the emulated tests; an access past any tensor
# fails the run. libstdc++ is preloaded with the runtime so that ASan's exception interceptor
# finds the real __cxa_throw; pytest captures at the sys level so that a report printed before
# ASan exits is seen. The sanitize cases come first, so that with -n their long groups start
# early.
ASAN_ENV := EMU_ASAN=1 ASAN_OPTIONS=detect_leaks=0 \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)"
test-cuda-emu-asan: build
	$(ASAN_ENV) PYTHONPATH=tools/cuda_emu $(PY) -m pytest tools/cuda_emu/test_sanitize_cases.py \
		$(EMU_TESTS) -p emu_plugin -k "not large" --capture=sys $(PYTEST_ARGS)

demo: build
	$(PY) -m tpssm demo
