# Entry points: `make test` and `make demo` (see README.md). Everything runs from .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: test lint typecheck pytest demo docs bench build clean venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[test,lint,docs,bench,ci]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	PYTHONPATH=$(CURDIR):$(CURDIR)/testproject $(BIN)/mypy

pytest: $(STAMP)
	rm -f .coverage .coverage.*
	$(BIN)/coverage run -m pytest $(PYTEST_ARGS)
	$(BIN)/coverage combine --quiet
	$(BIN)/coverage report

test: lint typecheck pytest

demo: $(STAMP)
	cd testproject && ../$(BIN)/python manage.py migrate --noinput -v 0
	$(BIN)/python testproject/demo.py

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

bench: $(STAMP)
	$(BIN)/python bench/run.py

build: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --quiet

clean:
	rm -rf $(VENV) .tox dist build docs/_build .coverage .coverage.* .mypy_cache .ruff_cache
