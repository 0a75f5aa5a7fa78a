# The two commands the README starts with: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: env demo test bench
env:
	@bash scripts/setup_env.sh

# The demo's student is trained first (about a minute; a second call finds it done).
demo: env
	$(VENV)/bin/cbx distill experiments/distill-demo.yaml
	$(VENV)/bin/cbx run experiments/demo.yaml && $(VENV)/bin/cbx leaderboard

test: env
	$(PY) -m pytest -q tests

bench: env
	$(VENV)/bin/cbx bench engine
