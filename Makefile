# Common tasks. `make run` and `make test` set everything up on a fresh machine first.
.PHONY: setup test-setup run test unit integration faults cluster-faults lint typecheck bench profile broker-up broker-down store-up store-down clean

VENV := .venv
BIN := $(VENV)/bin

setup:
	@scripts/bootstrap.sh

# Debian packages only the tests need: prometheus (a real Prometheus server, and promtool) and
# kcat (librdkafka's client: it produces records aiokafka cannot, e.g. non-UTF-8 header names).
TEST_PACKAGES := prometheus kcat

test-setup:
	@scripts/bootstrap.sh $(TEST_PACKAGES)

run: setup
	$(BIN)/python -m demo

test: test-setup
	$(BIN)/pytest

unit: test-setup
	$(BIN)/pytest tests/unit

integration: test-setup
	$(BIN)/pytest tests/integration

# The fault-injection suite; each test's counts line is in the "fault-injection counts" summary.
faults: setup
	$(BIN)/pytest tests/faults -rA --durations=0

# The cluster fault suite: a three-node KRaft cluster of its own, failures under an SDK stream;
# each scenario's counts line is in the "cluster fault counts" summary.
cluster-faults: setup
	$(BIN)/pytest tests/cluster -m cluster -rA --durations=0

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

typecheck: setup
	$(BIN)/mypy

# The benchmark also runs the Celery + Redis peer: redis-server from Debian, celery from PyPI.
# Pass flags with BENCH_ARGS, e.g. `make bench BENCH_ARGS=--quick`.
bench:
	@scripts/bootstrap.sh redis-server
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

# Where the consumer's own process spends its CPU in the pre-filled scenario: py-spy (from the
# bench extra) or, where it cannot attach, cProfile; a top-N table on stdout, the tables and flame
# graphs beside the JSON report. E.g. `make profile PROFILE_ARGS="--sizes 32,512"`.
PROFILE_ARGS ?= --sizes 32
profile: setup
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench --profile --skip quickfix,celery $(PROFILE_ARGS)

broker-up: setup
	$(BIN)/svd-broker up

broker-down:
	$(BIN)/svd-broker down

# The local S3-compatible object store (S3Proxy); `eval "$(.venv/bin/svd-store env)"` points this
# shell's service (SVD_STORE_*) and SDK (SVD_CLIENT_STORE_*) at it.
store-up: setup
	$(BIN)/svd-store up

store-down:
	$(BIN)/svd-store down

clean:
	-$(BIN)/svd-broker down
	-$(BIN)/svd-store down
	rm -rf .kafka/instance .s3proxy/instance .pytest_cache .mypy_cache .ruff_cache .hypothesis
