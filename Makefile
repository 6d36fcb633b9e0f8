# The two commands of the README. Both set up first, so a fresh clone needs nothing else.
PYTHON ?= python3

.PHONY: setup demo test lint

setup:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"

demo: setup
	lens demo

test: setup
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks
