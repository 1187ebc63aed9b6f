# Two commands a user needs: `make run` (the study, quick profile) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The tested versions (torch 2.14.1 and torchvision 0.29.1 among them, which pip takes from
# this machine's disk) are pinned in constraints.txt; pyproject.toml holds the ranges.
PIP_INSTALL := $(BIN)/python -m pip install --quiet -c constraints.txt

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP_INSTALL) -e .
	touch $@

# The tests drive the Dask task runner, the PostgreSQL-backed stack and S3 storage too.
$(VENV)/.installed-dev: pyproject.toml constraints.txt $(VENV)/.installed
	$(PIP_INSTALL) -e '.[dev,dask,postgres,s3]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/aemnist run $(ARGS)

# Two test workers: one process leaves a third of two cores idle while servers start and
# workers poll (bench/README.md, "The test suite"). Each worker takes whole modules.
TEST_WORKERS ?= 2

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) aemnist-runs
