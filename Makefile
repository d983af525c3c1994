# One command sets up and tests; one sets up and runs the demo. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: env test test-fast demo clean

env: $(STAMP)

# torch first, pinned to the builds on this machine's disk (a CUDA build that runs on the CPU);
# torchvision must match it exactly or segment-anything fails to import.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[lab,batch,dev]'
	touch $(STAMP)

demo: env
	$(BIN)/python -m dedit_nb.demo

test: env
	$(BIN)/python -m pytest -q -ra

test-fast: env
	$(BIN)/python -m pytest -q -ra -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
