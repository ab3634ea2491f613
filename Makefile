# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The web viewer's front-end packages (Leaflet), from the npm registry, pinned by package-lock.json.
VIEWER := pipeline/service/viewer
VIEWER_STAMP := $(VIEWER)/node_modules/.installed
# Debian's packages the tests need: Chromium for the viewer's browser test; Node.js and npm for the viewer.
# And what the install needs: a C++ compiler and Python's headers to build pydensecrf2 (dense CRF
# refinement), which PyPI has as source only.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends

.PHONY: demo test test-fast lint bench clean debian build-deps

$(STAMP): pyproject.toml | build-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

debian:
	@command -v chromium >/dev/null || $(APT) chromium || ($(SUDO) apt-get update -q && $(APT) chromium)
	@command -v npm >/dev/null || $(APT) nodejs npm || ($(SUDO) apt-get update -q && $(APT) nodejs npm)

build-deps:
	@command -v g++ >/dev/null || $(APT) g++ || ($(SUDO) apt-get update -q && $(APT) g++)
	@test -f "$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" \
		|| $(APT) python3-dev || ($(SUDO) apt-get update -q && $(APT) python3-dev)

$(VIEWER_STAMP): $(VIEWER)/package-lock.json | debian
	cd $(VIEWER) && npm ci --no-audit --no-fund --loglevel=error --ignore-scripts
	touch $(VIEWER_STAMP)

# Servers the tests start on 127.0.0.1 that come from npm: Azurite (Azure Blob Storage).
SERVERS := tests/servers
SERVERS_STAMP := $(SERVERS)/node_modules/.installed
$(SERVERS_STAMP): $(SERVERS)/package-lock.json | debian
	cd $(SERVERS) && npm ci --no-audit --no-fund --loglevel=error
	touch $(SERVERS_STAMP)

demo: $(STAMP) $(VIEWER_STAMP)
	$(BIN)/tessera demo --workdir demo

# Two pytest workers: most slow tests wait on process starts (Ray, MLflow, servers) as much as they compute.
# Modules in the order tests/conftest.py gives (longest first), not xdist's (most tests first).
# OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads sleep rather than spin when idle, so two workers
# training at once share the 2 cores instead of fighting over them (a 60-step run beside another:
# 37-39 s against 69-88 s spinning). It changes no result, only how threads wait.
PYTEST = OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test: $(STAMP) $(VIEWER_STAMP) $(SERVERS_STAMP) | debian
	$(PYTEST)

test-fast: $(STAMP) $(VIEWER_STAMP) $(SERVERS_STAMP) | debian
	$(PYTEST) -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check pipeline jobs tests bench
	$(BIN)/mypy pipeline jobs

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf demo .pytest_cache .mypy_cache .ruff_cache
