# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA ?= $(abspath ../shared/data)

.PHONY: install run run-cli test lint clean

install: $(VENV)/.installed

# torch==2.13.0 first: it is the CPU build on local disk, and the project's range accepts it,
# so nothing pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The main job on an embedded default (no server needed): the API (uvicorn) and a real Celery worker
# process on SQLite broker/backend/registry. On first start it trains a demo teacher, distils a d=20
# student with RCE-KD, activates it and prints the URLs and the teacher-vs-student table. Data:
# RCEKD_DATA_DIR (e.g. ../shared/data/citeulike: the README's MF d=400 teacher, ~30 min on 2 cores),
# else a synthetic dataset it generates (~2 min). State lives in runs/service/; RCEKD_PORT (8000).
run: install
	$(PY) -m app.embedded

# The same science through the CLI only, on CiteULike: MF d=400 teacher → RCE-KD student and the
# student alone, then the three test results. Artifacts go to runs/demo/.
CITEULIKE ?= $(SHARED_DATA)/citeulike
DEMO := runs/demo
run-cli: install
	@test -f $(DEMO)/teacher/manifest.json || $(VENV)/bin/rcekd train --data $(CITEULIKE) --model mf \
		--dim 400 --sparse false --weight-decay 1e-3 --trajectory-every 10 --out $(DEMO)/teacher --overwrite
	$(VENV)/bin/rcekd distill --data $(CITEULIKE) --teacher $(DEMO)/teacher --method rcekd --dim 20 \
		--out $(DEMO)/student-rcekd --overwrite
	$(VENV)/bin/rcekd distill --data $(CITEULIKE) --teacher $(DEMO)/teacher --method none --dim 20 \
		--out $(DEMO)/student-alone --overwrite
	@$(PY) -m rcekd.report $(DEMO)/teacher $(DEMO)/student-rcekd $(DEMO)/student-alone

test: install
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
