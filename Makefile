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
tools:
	@command -v java >/dev/null && command -v mvn >/dev/null || \
		{ apt-get update && apt-get install -y --no-install-recommends openjdk-17-jre-headless maven; }

demo: $(STAMP) tools
	$(BIN)/sec-online demo

eval: $(STAMP) tools
	$(BIN)/sec-online evaluate

# Fault scenarios (worker killed, stopped, table deleted, duplicate and invalid records) on a
# slice of the log; writes reports/reliability/summary.json.
.PHONY: reliability
reliability: $(STAMP) tools
	$(BIN)/sec-online reliability

lint: $(STAMP)
	$(BIN)/ruff check sec_online streams state tests
	$(BIN)/ruff format --check sec_online streams state tests

test: $(STAMP) tools lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .cache .sec-online reports
