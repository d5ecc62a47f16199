# Every target works on a fresh machine with only Python 3.11+: `venv` builds .venv on demand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp

.PHONY: venv test test-kafka lint fmt demo clean

venv: $(STAMP)

# Re-install only when the dependencies may have changed.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q -p no:cacheprovider

# The same integration tests on a 3-node Apache Kafka cluster (`roundlog up --broker kafka`,
# which needs java and mvn), then the broker-fault tests, each on a cluster of its own.
test-kafka: venv
	ROUNDLOG_TEST_BROKER=kafka $(BIN)/pytest -q -p no:cacheprovider tests/integration
	$(BIN)/pytest -q -p no:cacheprovider -rP --show-capture=stdout tests/faults

fmt: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: venv
	$(BIN)/roundlog demo

clean:
	rm -rf $(VENV) build dist services/*.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
