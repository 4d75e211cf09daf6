# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test lint format migrate bootstrap worker demo-worker clean prove

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

migrate: $(STAMP)
	mkdir -p var
	$(BIN)/python manage.py migrate --noinput

bootstrap: migrate
	$(BIN)/python manage.py bootstrap_demo

run: bootstrap
	$(BIN)/python manage.py runserver $(HOST):$(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	mkdir -p var
	$(BIN)/python manage.py makemigrations --check --dry-run --settings=portal.settings_test
	$(BIN)/pytest $(PYTEST_ARGS)

worker: $(STAMP)
	$(BIN)/celery -A portal worker -Q default,mail -l info

demo-worker: $(STAMP)
	$(BIN)/celery -A portal worker -Q demo --pool threads --concurrency 16 -n demo@%h -l info

# Load, fault and hostile-input runs on a private stack (not part of `make test`, ~10 min).
prove: $(STAMP)
	$(BIN)/python -m prove

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
