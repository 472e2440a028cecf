# One-command set-up on a fresh machine with Python 3.11: `make run` serves, `make test` tests.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 8000
HOST ?= 127.0.0.1
# daphne caps frames both ways at CHAT_MAX_FRAME_BYTES (scripts/serve.py passes it on): inbound
# frames over 1 MiB get an error frame from the consumer and the transport cuts at the cap (close
# 1009), and the service, which reads the same variable (same default as chatproject/settings.py),
# never hands daphne a larger frame.
CHAT_MAX_FRAME_BYTES ?= 2097152
export CHAT_MAX_FRAME_BYTES
# Daphne processes on PORT: empty = the usable cores when REDIS_URL is set, else 1 (scripts/serve.py;
# several without REDIS_URL are refused: the in-process channel layer cannot cross processes).
WORKERS ?=
# The project's Python packages (compiled before serving).
PACKAGES := accounts chat chatproject core notifications webclient
# More daphne options for every worker, after scripts/serve.py's DAPHNE_ARGS (the frame and message
# size limits), which bench/run.py uses too; a later option wins.
DAPHNE_ARGS ?=

.PHONY: run test test-postgres test-cluster chaos install migrate cassandra-schema services services-stop services-status bench bench-smoke clean

$(VENV)/.installed: requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

install: $(VENV)/.installed

migrate: install
	$(PY) manage.py migrate --noinput

run: migrate
	@if [ "$$CHAT_MESSAGE_STORE" = cassandra ]; then $(PY) manage.py cassandra_schema; fi
	$(PY) manage.py collectstatic --noinput --verbosity 0
	@# Compiled here once: with PYTHONDONTWRITEBYTECODE set, every worker's start would compile the
	@# project's modules again (0.25 s of it). Only the project's packages (not media/, uploads' home).
	@# A tree it cannot write to (read-only) only costs that time: the service starts anyway.
	-$(PY) -m compileall -q $(PACKAGES)
	$(PY) scripts/serve.py --host $(HOST) --port $(PORT) $(if $(strip $(WORKERS)),--workers $(WORKERS)) -- $(DAPHNE_ARGS)

cassandra-schema: install
	$(PY) manage.py cassandra_schema

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The same suite on PostgreSQL, production's relational database: scripts/services.sh starts it
# on 127.0.0.1:$(POSTGRES_PORT) (role and database `chat`) if it is not answering yet.
POSTGRES_PORT ?= 5433
test-postgres: install
	POSTGRES_PORT=$(POSTGRES_PORT) scripts/services.sh start postgres
	DATABASE_URL=postgres://chat@127.0.0.1:$(POSTGRES_PORT)/chat $(PY) -m pytest $(PYTEST_ARGS)

# A three-node Cassandra losing nodes under a running daphne (docs/reliability.md); starts the
# cluster (127.0.0.2-4) if needed and leaves it running: `scripts/services.sh stop cluster`.
test-cluster: install
	scripts/services.sh cluster
	$(PY) -m pytest -m cassandra_cluster tests/test_cassandra_cluster.py $(PYTEST_ARGS)

# The benchmark (docs/performance.md): needs `make services`; about 8 minutes.
bench: install
	$(PY) -m bench.run --out bench/results $(BENCH_ARGS)

# A short run of every scenario; fails on a gap, a duplicate or a broken harness (CI runs it).
bench-smoke: install
	$(PY) -m bench.run --smoke --out $${TMPDIR:-/tmp}/bench-smoke $(BENCH_ARGS)

# Faults at random moments under load, then a checker (docs/reliability.md): starts and stops its
# own PostgreSQL, three-node Cassandra, Redis, daphnes and worker. CHAOS_SEED replays a schedule.
CHAOS_SECONDS ?= 300
CHAOS_SEED ?=
chaos: install
	$(PY) -m chaos.run --seconds $(CHAOS_SECONDS) $(if $(strip $(CHAOS_SEED)),--seed $(CHAOS_SEED))

services:
	scripts/services.sh start

services-stop:
	scripts/services.sh stop

services-status:
	scripts/services.sh status

clean:
	rm -rf $(VENV) staticfiles .pytest_cache
