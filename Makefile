# The README's quick start: `make demo` and `make test` each set up from nothing, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is installed before lmdbkit so that pip never replaces it. Keep your own build (CUDA, ROCm):
# install it into $(VENV) first, or point TORCH at it, e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
RUNS   ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean

$(VENV)/.setup-done: pyproject.toml setup.py lmdbkit/_speedups.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(VENV)/.setup-done

demo: setup
	$(PY) -m lmdbkit.notebooks demo --runs $(RUNS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# skips the heavier multi-process and browser checks (CI runs everything)
test-fast: setup
	$(PY) -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
