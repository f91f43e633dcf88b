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

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs/demo
