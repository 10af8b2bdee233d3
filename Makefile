# The two commands of the README: `make run` (service + tick on ./var/ledger.db) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint-imports test-fast demo legacy-demo bench crash-test replay export clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)  ## the service with its tick, embedded SQLite in ./var/
	mkdir -p var
	$(BIN)/ledger serve

test: $(STAMP)  ## the layout's import contracts, then every test; PostgreSQL tests need 127.0.0.1:5432 (required when CI=true)
	$(BIN)/lint-imports
	$(BIN)/pytest -q

lint-imports: $(STAMP)  ## the layout's import contracts (pyproject.toml [tool.importlinter])
	$(BIN)/lint-imports

test-fast: $(STAMP)  ## domain tests only
	$(BIN)/pytest -q tests/test_rules.py tests/test_billing.py

demo: $(STAMP)  ## a simulated day against the running service, compared with ground truth
	$(BIN)/ledger simulate

BENCH_ARGS ?=
export BENCH_QUICK
BENCH_AUDIT ?= 0
bench: $(STAMP)  ## issue 10's targets beside raw PostgreSQL, then the older rows (docs/benchmarks.md); BENCH_QUICK=1: a smoke run; BENCH_AUDIT=1: also the audit part (docs/audit.md)
	$(BIN)/python -m bench.targets $(BENCH_ARGS)
	$(BIN)/python -m bench.run
ifeq ($(BENCH_AUDIT),1)
	$(BIN)/python -m bench.audit
endif

CRASH_KILLS ?= 20
CRASH_PG ?= postgresql://postgres@127.0.0.1:5432/test
crash-test: $(STAMP)  ## SIGKILL the 2-worker service CRASH_KILLS times under load, on SQLite and PostgreSQL; check nothing acknowledged was lost
	$(BIN)/ledger crash-test --kills $(CRASH_KILLS) --store sqlite
	$(BIN)/ledger crash-test --kills $(CRASH_KILLS) --store postgres --postgres-url '$(CRASH_PG)'

LEGACY_PG ?= postgresql://postgres@127.0.0.1:5432/test
legacy-demo: $(STAMP)  ## build the legacy fixture database in PostgreSQL, import it, reconcile, apply
	rm -rf var/legacy-demo && mkdir -p var/legacy-demo
	$(BIN)/python -m legacy.fixtures --dsn '$(LEGACY_PG)' --schema legacy_demo
	LEDGER_DATABASE_URL=sqlite:///var/legacy-demo/ledger.db $(BIN)/ledger import-legacy \
	  --dsn '$(LEGACY_PG)?schema=legacy_demo' --rejects var/legacy-demo/rejects.csv
	LEDGER_DATABASE_URL=sqlite:///var/legacy-demo/ledger.db $(BIN)/ledger reconcile \
	  --out var/legacy-demo/reconcile --apply

replay: $(STAMP)
	$(BIN)/ledger replay --verify

export: $(STAMP)
	$(BIN)/ledger export -o var/events.jsonl

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
