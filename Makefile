# `make demo` and `make test` each create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install wheels install-current-torch test-current-torch

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[xla,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xla-trainer pretrain

# Test files run on TEST_WORKERS processes (pytest-xdist), one file per worker: most tests wait on
# subprocesses (XLA start-up and compilation), so two workers on two cores save about a sixth.
# Files go out in collection order (--no-loadscope-reorder), which tests/conftest.py sorts longest
# first: xdist's default order (most tests first) left the one-test 4-minute file for last.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The edit loop: everything but the tests marked slow (subprocess runs, XLA compiles, long trainings).
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

# The eager path (CPU, CUDA; DDP, FSDP2) on the current torch, in a second venv without torch_xla: the
# tests not marked xla. torch_xla's last release pins torch 2.9 (.venv above); these are the newest
# torch/torchvision pair the package registry resolves (2026-12-03: torchvision 0.29.2 and torch
# 2.15.0 do not resolve). Pinned here only; the stamp names them, so a new pin reinstalls.
CURRENT_TORCH := 2.14.1
CURRENT_TORCHVISION := 0.29.1
CT_VENV ?= .venv-current-torch
CT_PINS := torch==$(CURRENT_TORCH) torchvision==$(CURRENT_TORCHVISION)
CT_STAMP := $(CT_VENV)/.installed-torch$(CURRENT_TORCH)-torchvision$(CURRENT_TORCHVISION)

# The pins go in again with the package so that pip cannot move torch to satisfy a dependency; the
# last line fails the install if it did anyway.
$(CT_STAMP): pyproject.toml
	$(PYTHON) -m venv $(CT_VENV)
	$(CT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CT_VENV)/bin/python -m pip install --quiet $(CT_PINS)
	$(CT_VENV)/bin/python -m pip install --quiet -e '.[test]' $(CT_PINS)
	$(CT_VENV)/bin/python -c "import importlib.util as u, torch, torchvision; \
		assert (torch.__version__.split('+')[0], torchvision.__version__.split('+')[0]) == \
		('$(CURRENT_TORCH)', '$(CURRENT_TORCHVISION)'), (torch.__version__, torchvision.__version__); \
		assert u.find_spec('torch_xla') is None, 'torch_xla in $(CT_VENV)'"
	touch $(CT_STAMP)

install-current-torch: $(CT_STAMP)

test-current-torch: $(CT_STAMP)
	$(CT_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not xla"

# The packages the lent GPU machine lacks, as CPython 3.12 manylinux wheels in .whl/, for
# gpu_scripts/device_check.sh (that machine has no network): gpu_scripts/wheels.txt as published,
# wheels-sdist.txt (source only on PyPI) built here into pure-Python wheels. Emptied first, so that
# .whl/ holds exactly the listed versions.
WHEELS := .whl
WHEEL_PLATFORM := --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64

wheels:
	rm -rf $(WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: $(WHEEL_PLATFORM) -d $(WHEELS) \
		-r gpu_scripts/wheels.txt
	$(PYTHON) -m pip wheel --quiet --no-deps -w $(WHEELS) -r gpu_scripts/wheels-sdist.txt
	@echo "$$(ls $(WHEELS) | wc -l) wheels, $$(du -sh $(WHEELS) | cut -f1), in $(WHEELS)/"
