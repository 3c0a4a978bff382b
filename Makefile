# mmfusion — `make demo` trains + evaluates the quickstart model; `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint venv clean browser

venv: $(STAMP)

# torch is pinned to the 2.13.0 CPU wheel that pip finds locally (a bare `torch` would pull a CUDA build);
# everything else comes from pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,pretrained]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mmfusion train --config configs/quickstart.yaml --overwrite

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# The demo-page test drives headless Chromium (Debian package); installed here when missing and we are root.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1; } || \
	  echo "chromium not installed (needs root + apt): the demo page browser test will fail"

test: $(STAMP) browser
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache

-include benchmarks/bench.mk
