# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA ?= $(abspath ../shared/data)
RCEKD_DATA_DIR ?= $(SHARED_DATA)/citeulike
export RCEKD_DATA_DIR

.PHONY: install run test lint clean

install: $(VENV)/.installed

# torch==2.13.0 first: it is the CPU build on local disk, and the project's range accepts it,
# so nothing pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The main job on an embedded default: train an MF teacher and its d=20 student-alone baseline on
# $(RCEKD_DATA_DIR) and print both test metrics.
run: install
	$(VENV)/bin/rcekd train --data $(RCEKD_DATA_DIR) --model mf --dim 400 --out runs/demo/teacher --overwrite
	$(VENV)/bin/rcekd train --data $(RCEKD_DATA_DIR) --model mf --dim 20 --role student --out runs/demo/student-alone --overwrite

test: install
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
