# Every target works on a fresh machine with only Python 3.11+: `venv` builds .venv on demand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp

.PHONY: venv test test-python test-clients test-java test-ts test-polyglot test-kafka test-browser lint fmt demo clean

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

# pytest and the other languages' client tests run side by side (output kept per target).
test: lint
	$(MAKE) --no-print-directory -j3 -Otarget test-python test-java test-ts

# Each xdist worker runs its own embedded broker and PostgreSQL.
test-python: venv
	$(BIN)/pytest -q -p no:cacheprovider -n auto --maxprocesses 4

test-clients: test-java test-ts

# The Java and TypeScript clients' own tests (the shared vectors, encoding, placement, signing,
# tensors), wherever their toolchain is installed; CI (CI set) has them and must run them.
test-java:
	@if command -v mvn >/dev/null && command -v java >/dev/null; then \
		cd clients/java && mvn -B -q test; \
	elif [ -n "$$CI" ]; then echo "test-java: CI needs java and mvn" >&2; exit 1; \
	else echo "test-java: skipped, java and mvn are not on PATH"; fi

test-ts:
	@if command -v npm >/dev/null && command -v node >/dev/null; then \
		cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error && npm test; \
	elif [ -n "$$CI" ]; then echo "test-ts: CI needs node and npm" >&2; exit 1; \
	else echo "test-ts: skipped, node and npm are not on PATH"; fi

# One session served by Python, Java and TypeScript clients at once (builds both clients).
test-polyglot: venv
	$(BIN)/pytest -q -p no:cacheprovider tests/polyglot

# The same integration tests on a 3-node Apache Kafka cluster (`roundlog up --broker kafka`,
# which needs java and mvn), then the broker-fault tests, each on a cluster of its own.
test-kafka: venv
	ROUNDLOG_TEST_BROKER=kafka $(BIN)/pytest -q -p no:cacheprovider tests/integration
	$(BIN)/pytest -q -p no:cacheprovider -rP --show-capture=stdout tests/faults

# The dashboard (`roundlog ui`) over a real demo, in a headless Chromium: Debian's chromium and
# chromium-driver, installed where missing; screenshots of each page land in build/screenshots/.
test-browser: venv
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if command -v apt-get >/dev/null; then \
			sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
			$$sudo apt-get update -qq && \
			$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
		else echo "test-browser: install chromium and its chromedriver" >&2; fi; \
	fi
	$(BIN)/pytest -q -p no:cacheprovider tests/browser

fmt: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: venv
	$(BIN)/roundlog demo

clean:
	rm -rf $(VENV) build dist services/*.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	rm -rf clients/java/target clients/typescript/node_modules clients/typescript/dist clients/typescript/build-test
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
