# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
# JAX_PLATFORMS=cpu: the venv holds libtpu (ahead-of-time TPU compiles, `make aot`); CPU jobs
# must not try to start a TPU backend.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.cfg | cksum | cut -d' ' -f1)
WORKDIR ?= workdir/demo
CONFIG ?= experiments/demo.py

.PHONY: venv test demo describe aot bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,aot]'
	rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

# Two pytest workers, whole files each (module fixtures are built once): one worker leaves a
# core idle while XLA compiles, which is most of the suite's time. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q \
	  $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) tests

demo: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m kimi_vl_jax.main --config=$(CONFIG) --workdir=$(WORKDIR) --mode=train

describe: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m kimi_vl_jax.main --config=experiments/kimi_vl_a3b.py --mode=describe --workdir=workdir/describe

# The A3B recipe's joint pretraining step compiled for a v5p-64 slice (32 chips) on this host.
aot: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m kimi_vl_jax.main --config=experiments/kimi_vl_a3b.py:v5p-64 --mode=aot --topology=v5p:4x4x2 --stages=joint_pretrain --workdir=workdir/aot

clean:
	rm -rf $(VENV) workdir .pytest_cache
