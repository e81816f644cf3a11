# Two entry points for a fresh machine (see README.md):
#   make demo   install, then the whole job end to end on generated demo data
#   make test   install, then the test suite, the import layers (lint-imports) and the docs' strict build
# and for CI / releases:
#   make wheel-check   build the wheel, install it (not editable) into a fresh venv, run the job outside the clone
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
K      := $(BIN)/kagglecmr
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: install demo test lint docs wheel-check clean-demo

$(BIN)/kagglecmr: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/kagglecmr

demo: install
	$(K) demo-data data/demo --force
	$(K) make-folds --data data/demo --out folds/demo.csv --force
	$(K) encode data/demo/val/mask --out submissions/demo-val-masks.csv --force
	$(K) score submissions/demo-val-masks.csv --data data/demo
	$(K) train --fold 0..4 --config demo --data data/demo --folds folds/demo.csv --name demo --force --quiet
	rm -f submissions/demo-oof.csv
	$(K) ensemble --runs runs/demo --data data/demo --split oof --tta --out submissions/demo-oof.csv
	$(K) score submissions/demo-oof.csv --data data/demo
	$(K) ensemble --runs runs/demo --data data/demo --tta --save-masks runs/demo/test-masks

test: install
	$(BIN)/python -m pytest -q
	$(BIN)/lint-imports
	$(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

lint: install
	$(BIN)/ruff check kagglecmr tests benchmarks examples docs
	$(BIN)/lint-imports

docs: install
	$(BIN)/mkdocs build --strict

wheel-check: install
	PYTHON=$(BIN)/python bash .ci/wheel-check

clean-demo:
	rm -rf data/demo folds/demo.csv runs/demo submissions/demo-*
