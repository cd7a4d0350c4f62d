# `make test` and `make study` work from a fresh clone: they create .venv when it is
# missing and re-install when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test study bench presets clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

study: $(STAMP)
	@echo "make study arrives with the notebooks-and-studies issue (#6): no study exists yet." >&2
	@exit 1

bench: $(STAMP)
	$(PY) benchmarks/forward.py

presets: $(STAMP)
	$(VENV)/bin/palmlite presets

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
