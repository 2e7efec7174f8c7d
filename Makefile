# Two commands a new user needs: `make demo` (the pipeline on synthetic data) and `make test`.
# Each creates the virtual environment from the complete lock when it is missing.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo paper test clean-output

# TFX 1.16 declares Requires-Python <3.11 but works on 3.11, hence PIP_IGNORE_REQUIRES_PYTHON;
# the lock pins every package, so nothing is resolved.
$(STAMP): requirements.lock setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || { \
	  echo "error: Python 3.11 is required (found '$(PYTHON)': $$($(PYTHON) --version 2>&1))." >&2; \
	  echo "Install Python 3.11 and run again, or point PYTHON at it: make PYTHON=/path/to/python3.11" >&2; \
	  exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PIP_IGNORE_REQUIRES_PYTHON=1 $(BIN)/pip install --quiet --no-deps -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipeline.demo

# The paper end to end (the `paper` profile through the TFX CLI; about 24 minutes on 2 cores),
# then the README's results section and docs/results/ regenerated from that run's own files.
paper: $(STAMP)
	STEM_PROFILE=paper $(BIN)/python -m pipeline.demo
	$(BIN)/python -m pipeline.results --profile paper

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean-output:
	rm -rf output
