# `make test` and `make study` work from a fresh clone: they create .venv when it is
# missing and re-install when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test study study-full figures gallery lab bench presets clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# Your own runs go to $(OUT)/ (git ignores local/): results in $(OUT)/studies/results,
# executed notebooks in $(OUT)/studies/runs, figures in $(OUT)/figures. The committed
# studies/results and figures/ are the reference runs (`make figures` redraws them).
# `make study OUT=.` adds to the reference instead (what a maintainer commits).
OUT ?= local

# The default study: notebooks run by papermill on the CPU on the embedded corpus, two at a
# time (one core each); a rerun skips the points already done.
study: $(STAMP)
	$(VENV)/bin/palmlite sweep studies/quick.yaml --workers 2 --out $(OUT)

# The resolving versions (IsoFLOP over 4 budgets, experts E = 1..16, the GLaM pair,
# ablations at 3 learning rates, 3 seeds): under three hours on 2 cores; resumable. Then
# Pathways' one model on three domains (notebook 11, 4 models x 3 seeds).
study-full: $(STAMP)
	$(VENV)/bin/palmlite sweep studies/full.yaml --workers 2 --out $(OUT)
	$(VENV)/bin/palmlite sweep studies/pathways.yaml --workers 2 --out $(OUT)

# Redraw the reference figures/ from the committed studies/results (no training).
figures: $(STAMP)
	$(VENV)/bin/palmlite figures studies/quick.yaml
	$(VENV)/bin/palmlite figures studies/full.yaml
	$(VENV)/bin/palmlite figures studies/pathways.yaml

# The notebooks executed with their default parameters into gallery/notebooks (committed,
# outputs included; notebooks/ stays output-free) and rendered to gallery/site/index.html.
gallery: $(STAMP)
	$(PY) -m palmlite.studies.gallery

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
