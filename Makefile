# Entry points for newcomers and CI; scripts/ does the work, so the README's
# two commands (scripts/run, scripts/test) and these targets stay the same.
# Extra arguments: make test ARGS="-x tests/test_compose.py".

VENV ?= .venv
PACKAGES := schemas controller bridge_http agent_sim kbbus tests
ARGS ?=

.PHONY: setup run test check format soak bench schemas ci

setup:
	@scripts/setup >/dev/null

run:
	scripts/run $(ARGS)

test:
	scripts/test $(ARGS)

# What CI holds every change to: formatting, lint, strict types.
check: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy $(PACKAGES)

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The long soak (KBBUS_SOAK_S seconds of load, default 180), outside the usual
# time limit; the default run has only its short version.
soak:
	scripts/test -m soak -o timeout=0 tests/test_soak.py $(ARGS)

bench: setup
	$(VENV)/bin/kbbus bench --json bench-results.json $(ARGS)

# Writes the JSON Schema files and the AsyncAPI document from the models.
schemas: setup
	$(VENV)/bin/python -m schemas.generate

ci:
	.ci/run $(ARGS)
