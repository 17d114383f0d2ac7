# Two commands matter: `make demo` (set up, then run the tiny recipe end to end on CPU) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Two pytest workers, a unit of tests each at a time: a file, or the files that read one shared run
# (tests/shared_runs.py, scheduled by tests/conftest.py). Each worker owns its own Ray head, Prefect server and moto
# server. --no-loadscope-reorder keeps conftest's order: longest units first.
PYTEST_WORKERS ?= 2

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# img2dataset drags in the `dataclasses` backport, which shadows the standard library inside
	# Prefect's server process; img2dataset works without it.
	$(PY) -m pip uninstall -q -y dataclasses
	touch $@

demo: setup
	$(VENV)/bin/microdit demo

test: setup
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.model_throughput --preset MicroDiT_Debug

clean:
	rm -rf $(VENV) runs
