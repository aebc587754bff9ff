# `make demo` and `make test` each create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install wheels

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
