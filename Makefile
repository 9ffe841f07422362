# The two commands of the README, each doing the whole set-up on first use:
#   make run    the main job (python mmie.py; pass flags with ARGS="--auto_config --adaptive_unlearning")
#   make test   the test suite (CPU, offline)
# The virtual environment is .venv; torch is the CPU build where no CUDA device is present (nvidia-smi finds
# none), the default (CUDA) build otherwise; then requirements.txt.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
READY := $(VENV)/.mmie-installed
ARGS ?=
PYTEST_ARGS ?= -q -n 2 --dist loadfile  # two workers (pytest-xdist), a test file each at a time

$(READY): requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "make: CUDA device found: installing torch (CUDA build)"; \
		$(PYTHON) -m pip install -q "torch>=2.13"; \
	else \
		echo "make: no CUDA device: installing torch 2.13.0 (CPU build)"; \
		$(PYTHON) -m pip install -q torch==2.13.0; \
	fi
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $(READY)

run: $(READY)
	$(PYTHON) mmie.py $(ARGS)

test: $(READY)
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest $(PYTEST_ARGS)

bench: $(READY)
	$(PYTHON) scripts/bench.py $(ARGS)

.PHONY: run test bench
