# `make demo` and `make test` each create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install

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
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile
