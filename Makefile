# Entry points: `make test` and `make demo` (see README.md). Everything runs from .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The browser tests need Chromium: `make test-browser` installs it and runs them.
PYTEST_ARGS ?= -m "not browser"
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test lint typecheck pytest demo docs bench build clean venv chromium test-browser screenshots serve

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[test,browser,lint,docs,bench,ci]"
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

# Debian's chromium, for Playwright (its own browser download is not used).
chromium:
	@[ -x $(CHROMIUM) ] || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

test-browser: $(STAMP) chromium
	LEAKGUARD_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest -m browser -p no:randomly

# The admin pages' screenshots in the docs (docs/admin.md), taken by the browser tests.
screenshots: $(STAMP) chromium
	LEAKGUARD_CHROMIUM=$(CHROMIUM) LEAKGUARD_SCREENSHOTS=docs/_static/admin \
		$(BIN)/python -m pytest -m browser -p no:randomly -q

demo: $(STAMP)
	cd testproject && ../$(BIN)/python manage.py migrate --noinput -v 0
	$(BIN)/python testproject/demo.py

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

# testproject with what `make demo` recorded, to browse the admin pages.
serve: $(STAMP)
	cd testproject && ../$(BIN)/python manage.py runserver 127.0.0.1:8000

bench: $(STAMP)
	$(BIN)/python bench/run.py

build: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --quiet

clean:
	rm -rf $(VENV) .tox dist build docs/_build .coverage .coverage.* .mypy_cache .ruff_cache
