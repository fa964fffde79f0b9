# Set-up and entry points. `make demo` runs the main job, `make test` runs the tests; both create
# the virtual environment in .venv and install the pinned packages first.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo eval test lint tools clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The managed Kafka broker needs Java 17 and Maven (to fetch the Kafka jars from Maven Central).
# The dashboard test runs Debian's headless Chromium from /usr/bin/chromium.
tools:
	@command -v java >/dev/null && command -v mvn >/dev/null || \
		{ apt-get update && apt-get install -y --no-install-recommends openjdk-17-jre-headless maven; }
	@test -x /usr/bin/chromium || \
		{ apt-get update && apt-get install -y --no-install-recommends chromium; }

demo: $(STAMP) tools
	$(BIN)/sec-online demo

eval: $(STAMP) tools
	$(BIN)/sec-online evaluate

# Fault scenarios (worker killed, stopped, table deleted, duplicate and invalid records) on a
# slice of the log; writes reports/reliability/summary.json.
.PHONY: reliability
reliability: $(STAMP) tools
	$(BIN)/sec-online reliability

# Throughput, freshness, serving latency and state size on the managed broker; writes
# reports/bench/bench.json and bench.md. PY_SPY=/path/to/py-spy adds a profile of the worker.
.PHONY: bench
bench: $(STAMP) tools
	$(BIN)/python -m benchmarks.run $(if $(PY_SPY),--py-spy $(PY_SPY))

lint: $(STAMP)
	$(BIN)/ruff check sec_online streams state tests benchmarks
	$(BIN)/ruff format --check sec_online streams state tests benchmarks

test: $(STAMP) tools lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .cache .sec-online reports
