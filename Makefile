# The two set-up commands are `make demo` and `make test`; both install what is missing first.
PY := .venv/bin/python
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: deps demo test unit lint bench

deps:
	@scripts/install-deps.sh

demo: deps
	@scripts/demo.sh

test: deps
	$(PY) -m pytest -q tests

unit: deps
	$(PY) -m pytest -q tests/unit

lint: deps
	@scripts/lint.sh

bench: deps
	$(PY) bench/boot.py
	$(PY) bench/freeze.py
	$(PY) bench/hotswap.py
	$(PY) bench/pipeline.py
	$(PY) bench/bridge.py
