# Two commands matter: `make run` serves the site, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: run test test-postgres lint format bench soak observatory mutation clean

# The request tests once more with every app on PostgreSQL. Not repeated: the
# store's own tests (they run on both backends already), and the tests of the
# perimeter, the templates and pure functions (they register and log in, but
# what they test happens before or without the store).
POSTGRES_PASS := -m "not browser and not slow and not text_database" tests \
	--ignore=tests/browser --ignore=tests/test_store.py --ignore=tests/test_store_contract.py \
	--ignore=tests/test_store_stateful.py --ignore=tests/test_store_processes.py \
	--ignore=tests/test_store_faults.py --ignore=tests/test_store_postgres.py \
	--ignore=tests/test_transfer.py --ignore=tests/test_content_types.py \
	--ignore=tests/test_fuzz_bodies.py --ignore=tests/test_uploads.py \
	--ignore=tests/test_passwords.py --ignore=tests/test_security_headers.py \
	--ignore=tests/test_templates.py --ignore=tests/test_mail.py

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
ifeq ($(PYTEST_ARGS),)
	$(MAKE) --no-print-directory test-postgres
endif

test-postgres: $(VENV)/.installed-test
	SECURE_APP_TEST_DATABASE=postgres $(BIN)/python -m pytest $(POSTGRES_PASS)

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
