# The two commands of the README: `make run` (service + tick on ./var/ledger.db) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test test-fast demo bench replay export clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)  ## the service with its tick, embedded SQLite in ./var/
	mkdir -p var
	$(BIN)/ledger serve

test: $(STAMP)  ## every test; PostgreSQL tests need 127.0.0.1:5432 (required when CI=true)
	$(BIN)/pytest -q

test-fast: $(STAMP)  ## domain tests only
	$(BIN)/pytest -q tests/test_rules.py tests/test_billing.py

demo: $(STAMP)  ## a simulated day against the running service, compared with ground truth
	$(BIN)/ledger simulate

bench: $(STAMP)  ## throughput benchmarks (timing lives here, never in pass/fail tests)
	$(BIN)/python -m bench.run

replay: $(STAMP)
	$(BIN)/ledger replay --verify

export: $(STAMP)
	$(BIN)/ledger export -o var/events.jsonl

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
