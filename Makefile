# `make demo` and `make test` each set up (or refresh) .venv, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is pinned: an unpinned torch pulls a multi-GB CUDA build where a CPU build is on disk.
PINS := torch==2.13.0 triton==3.6.0

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PINS)
	$(PY) -m pip install -q -e '.[dali,dev,latent]' $(PINS)
	touch $@

demo: venv
	$(PY) -m pdiff.demo

# The suite on every core (pytest-xdist; worksteal evens out the long trainer tests).
test: venv
	$(PY) -m pytest -q -n auto --dist worksteal

clean:
	rm -rf $(VENV) runs/demo
