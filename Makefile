# Two commands matter: `make run` serves the site, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: run test lint format bench soak observatory mutation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	@echo "secure_app: open http://localhost:$(PORT)"
	PORT=$(PORT) $(BIN)/gunicorn -c gunicorn.conf.py

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(VENV)/.installed-test
	$(BIN)/python bench/store.py
	$(BIN)/python bench/sync_writes.py
	$(BIN)/python bench/http_load.py

soak: $(VENV)/.installed-test
	$(BIN)/python bench/soak.py

observatory: $(VENV)/.installed-test
	bench/observatory.sh

# Mutation score per security module (scripts/mutation.py); MODULES="auth forms" narrows it.
mutation: $(VENV)/.installed-test
	$(BIN)/python scripts/mutation.py $(MODULES)

clean:
	rm -rf mutants $(VENV) .pytest_cache .hypothesis .ruff_cache
