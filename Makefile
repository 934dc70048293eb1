# Two entry points (see README): `make demo` runs the main job on built-in defaults,
# `make test` runs the test suite. Both create their virtual environments on first use.
PYTHON ?= python3
VENV ?= .venv
LSVENV ?= .lsvenv
LABEL_STUDIO_VERSION ?= 1.23.2
PIP_FLAGS ?= -q --disable-pip-version-check
CONSTRAINTS = -c requirements/constraints.txt

.PHONY: demo test install install-ls check-redis bench-pipeline gpu-deps clean

$(VENV)/.installed: pyproject.toml requirements/constraints.txt requirements/verl.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) $(CONSTRAINTS) -e '.[hf,export,train,test]'
	# verl's dataset loader and reward loop for the GRPO export's test, without verl's training stack
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps -r requirements/verl.txt
	touch $@

install: $(VENV)/.installed

# Label Studio pins Django and many packages: it gets a virtual environment of its own.
$(LSVENV)/.installed:
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

bench-pipeline: install check-redis
	$(VENV)/bin/python bench/pipeline.py

# What a bare GPU machine lacks (the project's wheels, redis-server, TRL, vLLM 0.24.0) as folders
# of .gpu/ that travel with device calls; docs/gpu.md says which call carries which.
gpu-deps:
	bash bench/gpu_deps/prepare.sh .gpu

clean:
	rm -rf $(VENV) $(LSVENV) out .pytest_cache .hypothesis
