# README's quick start: `make demo` and `make test` do all set-up themselves.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test unit integration kernel e2e bench vm-test clean

setup:
	@VENV=$(VENV) scripts/setup.sh

demo: setup
	$(PY) -m nodeagent.demo

test: setup
	$(PY) -m pytest -q -ra tests

unit: setup
	$(PY) -m pytest -q tests/unit

integration: setup
	$(PY) -m pytest -q tests/integration

kernel: setup
	$(PY) -m pytest -q tests/kernel

e2e: setup
	$(PY) -m pytest -q tests/e2e

bench: setup
	$(PY) -m bench --rounds 3

# The kernel suite inside a QEMU VM on another Debian kernel (slow; not part of `make test`).
KERNEL ?= linux-image-6.1.0-*-cloud-amd64
vm-test:
	vm/run-kernel-suite.sh '$(KERNEL)'

clean:
	rm -rf $(VENV) build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
