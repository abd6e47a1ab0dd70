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

# The main job on an embedded default (no server needed): train an MF teacher (d=400) on
# $(RCEKD_DATA_DIR), distil a d=20 MF student from it with RCE-KD, train the same student alone, and
# print the three test results. Artifacts go to runs/demo/.
DEMO := runs/demo
run: install
	@test -f $(DEMO)/teacher/manifest.json || $(VENV)/bin/rcekd train --data $(RCEKD_DATA_DIR) --model mf \
		--dim 400 --sparse false --weight-decay 1e-3 --trajectory-every 10 --out $(DEMO)/teacher --overwrite
	$(VENV)/bin/rcekd distill --data $(RCEKD_DATA_DIR) --teacher $(DEMO)/teacher --method rcekd --dim 20 \
		--out $(DEMO)/student-rcekd --overwrite
	$(VENV)/bin/rcekd distill --data $(RCEKD_DATA_DIR) --teacher $(DEMO)/teacher --method none --dim 20 \
		--out $(DEMO)/student-alone --overwrite
	@$(PY) -m rcekd.report $(DEMO)/teacher $(DEMO)/student-rcekd $(DEMO)/student-alone

test: install
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
