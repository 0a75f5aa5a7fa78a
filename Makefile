# The two commands the README starts with: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: env demo test bench
env:
	@bash scripts/setup_env.sh

# One command: cbx run trains the demo's student on first use (its `train:` step) and reuses
# every finished run and checkpoint on a second call.
demo: env
	$(VENV)/bin/cbx run experiments/demo.yaml && $(VENV)/bin/cbx leaderboard

test: env
	$(PY) -m pytest -q tests

bench: env
	$(VENV)/bin/cbx bench engine
