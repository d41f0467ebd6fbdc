# make demo: build the sample slide and run the main job on it.
# make test: lint + the whole test suite.
# Both create the environment they need first (.venv, pinned CPU torch, Xvfb libs).
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-out

.PHONY: setup test lint demo clean bench

$(STAMP): pyproject.toml constraints.txt scripts/setup-env.sh
	VENV=$(VENV) ./scripts/setup-env.sh
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) lint
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/zoomin demo --out $(DEMO_DIR)

bench: $(STAMP)
	xvfb-run -a $(BIN)/python -m benchmarks.slide_io

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache $(DEMO_DIR)
