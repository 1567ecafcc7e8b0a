# patchlife: `make run` serves the embedded default model, `make test` runs the test suite.
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/patchlife bench --backbone vit_micro_patch8_64 --batch-size 32

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check model service tests
	$(BIN)/mypy model service

bench: $(STAMP)
	$(BIN)/patchlife bench --backbone deit_small_patch16_224 --keep-rate 0.7 --batch-size 32

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
