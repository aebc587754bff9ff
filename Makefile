# `make demo` and `make test` each create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install

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
