# Common tasks. `make run` and `make test` set everything up on a fresh machine first.
.PHONY: setup run test unit integration faults lint typecheck bench broker-up broker-down clean

VENV := .venv
BIN := $(VENV)/bin

setup:
	@scripts/bootstrap.sh

run: setup
	$(BIN)/python -m demo

test: setup
	$(BIN)/pytest

unit: setup
	$(BIN)/pytest tests/unit

integration: setup
	$(BIN)/pytest tests/integration

faults: setup
	$(BIN)/pytest tests/faults

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

typecheck: setup
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m bench

broker-up: setup
	$(BIN)/svd-broker up

broker-down:
	$(BIN)/svd-broker down

clean:
	-$(BIN)/svd-broker down
	rm -rf .kafka/instance .pytest_cache .mypy_cache .ruff_cache .hypothesis
