# `make test` and `make study` work from a fresh clone: they create .venv when it is
# missing and re-install when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test study study-full figures lab bench presets clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# The default study: notebooks run by papermill on the CPU on the embedded corpus, two at a
# time (one core each); results in studies/results/quick-*.jsonl (completed points are
# skipped), figures in figures/.
study: $(STAMP)
	$(VENV)/bin/palmlite sweep studies/quick.yaml --workers 2

# The resolving versions (IsoFLOP over 4 budgets, experts E = 1..16, ablations at 3 learning
# rates, 2-3 seeds): under three hours on 2 cores; resumable, so it can run in pieces.
study-full: $(STAMP)
	$(VENV)/bin/palmlite sweep studies/full.yaml --workers 2

# Redraw the default study's figures from its committed results (no training).
figures: $(STAMP)
	$(VENV)/bin/palmlite figures studies/quick.yaml

# JupyterLab on the notebooks (installed into .venv with palmlite, ipywidgets included).
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) benchmarks/forward.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/tokenizer.py
	$(PY) benchmarks/moe.py
	$(PY) benchmarks/sharding.py

presets: $(STAMP)
	$(VENV)/bin/palmlite presets

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
