# The two commands of the README's Quick start: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where pip finds the CPU build of torch on a machine without CUDA. Unset, pip's own configuration decides
# (on the project's build machines torch==2.13.0 is the CPU build, on local disk).
TORCH_INDEX ?=

# GGUF=0 skips the gguf extra (llama-cpp-python compiles llama.cpp: about 7 minutes on 2 cores, once); its tests
# then skip and say why.
GGUF ?= 1

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing the default torch build"; \
	else \
		echo "no CUDA GPU: installing the CPU build of torch"; \
		$(BIN)/pip install -q "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# Train the tiny demo recipe (embedded model + bundled sample, offline, CPU), then print the summary.
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/qlora-pipeline train recipes/tiny-starling-medtuned-qlora.yaml --overwrite

$(VENV)/.gguf-installed: $(VENV)/.installed
	@echo "installing the gguf extra: llama-cpp-python builds llama.cpp from source (about 7 minutes on 2 cores, once)"
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q -e ".[dev,gguf]"
	touch $@

# The test suite, offline. Tests marked shared_data use ../shared/data when it is there and say why they skip if not;
# the GGUF tests need the gguf extra (GGUF=0 leaves it out) and Go for Ollama's template engine (.ci/run installs it).
test: setup $(if $(filter 1,$(GGUF)),$(VENV)/.gguf-installed)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra --durations=15
