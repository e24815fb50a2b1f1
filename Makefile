# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg | cksum | cut -d' ' -f1)
WORKDIR ?= workdir/demo
CONFIG ?= experiments/demo.py

.PHONY: venv test demo describe bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m kimi_vl_jax.main --config=$(CONFIG) --workdir=$(WORKDIR) --mode=train

describe: $(STAMP)
	$(BIN)/python -m kimi_vl_jax.main --config=experiments/kimi_vl_a3b.py --mode=describe --workdir=workdir/describe

clean:
	rm -rf $(VENV) workdir .pytest_cache
