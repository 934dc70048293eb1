# Two entry points (see README): `make demo` runs the main job on built-in defaults,
# `make test` runs the test suite. Both create their virtual environments on first use.
PYTHON ?= python3
VENV ?= .venv
LSVENV ?= .lsvenv
LABEL_STUDIO_VERSION ?= 1.23.2
# pip prints what it collects and a progress bar per download: the first install takes minutes
PIP_FLAGS ?= --disable-pip-version-check --progress-bar on
CONSTRAINTS = -c requirements/constraints.txt

.PHONY: demo test test-docker install install-ls check-python check-redis bench-pipeline gpu-deps clean

# python3 -m venv fails on Debian/Ubuntu without the python3-venv package: say so before anything else
check-python:
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { echo "$(PYTHON) cannot create virtual environments: apt-get install -y python3-venv (Debian/Ubuntu)"; exit 1; }

$(VENV)/.installed: pyproject.toml requirements/constraints.txt requirements/verl.txt
	@$(MAKE) --no-print-directory check-python
	@echo "==> [1/3] creating $(VENV) (first run only)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	@echo "==> [2/3] installing egm-assist with torch, transformers and the test tools (first run only: several minutes, about 6 GB)"
	$(VENV)/bin/pip install $(PIP_FLAGS) $(CONSTRAINTS) -e '.[hf,export,train,test,sdk]'
	@echo "==> [3/3] verl's dataset loader and reward loop, for the GRPO export's test (no training stack)"
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps -r requirements/verl.txt
	touch $@

install: $(VENV)/.installed

# Label Studio pins Django and many packages: it gets a virtual environment of its own.
$(LSVENV)/.installed:
	@$(MAKE) --no-print-directory check-python
	@echo "==> creating $(LSVENV) with label-studio==$(LABEL_STUDIO_VERSION) for the end-to-end tests (first run only: a few minutes, about 1 GB)"
	$(PYTHON) -m venv $(LSVENV)
	$(LSVENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(LSVENV)/bin/pip install $(PIP_FLAGS) label-studio==$(LABEL_STUDIO_VERSION) "sentry-sdk>=2.16,<3"
	touch $@

install-ls: $(LSVENV)/.installed

check-redis:
	@command -v redis-server >/dev/null || { echo "redis-server is required: apt-get install -y redis-server (or brew install redis)"; exit 1; }

demo: install check-redis
	$(VENV)/bin/egm-assist demo

test: install install-ls check-redis
	$(VENV)/bin/pytest -q

# The compose stack built and driven end to end (tests/docker/test_stack.py, docs/deployment.md
# "Testing the stack"): needs root or a running Docker daemon, Docker Compose 2.24.4+, and a Debian
# mirror and PyPI for the image builds. Not part of `make test` (nor CI): about 50 min on 2 cores
# from nothing (the Label Studio stand-in), 11 with the base images kept, 3.5 with every image built.
test-docker: install
	EGM_TEST_DOCKER=1 $(VENV)/bin/pytest -q tests/docker/test_stack.py

bench-pipeline: install check-redis
	$(VENV)/bin/python bench/queue_overhead.py

# What a bare GPU machine lacks (the project's wheels, redis-server, TRL, vLLM 0.24.0) as folders
# of .gpu/ that travel with device calls; docs/gpu.md says which call carries which.
gpu-deps:
	bash bench/gpu_deps/prepare.sh .gpu

# everything the commands and tests create here (the demo's tiny model is cached in ~/.cache/egm-assist)
clean:
	rm -rf $(VENV) $(LSVENV) out .egm .pytest_cache .hypothesis *.egg-info build dist
