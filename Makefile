# The two commands a newcomer runs (as root, on Debian/Ubuntu): `make demo`, `make test`.
# Each sets up what is missing first; re-running is quick when nothing changed.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all demo test lint typecheck unit setup system-deps clean interop package

all: test

system-deps:
	@tools/install-system-deps

$(PY):
	@$(MAKE) --no-print-directory system-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

setup: system-deps $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

# The trixie (strongSwan 6, raw ESP) tests need a chroot: `make interop` runs them.
unit: setup
	$(PY) -m pytest -m "not trixie"

test: lint typecheck unit

# The raw-ESP (protocol 50) subset against strongSwan 6 from a Debian trixie chroot,
# created first when missing (tools/interop/make-trixie-chroot).
interop: setup
	root=$$(tools/interop/make-trixie-chroot) && \
	IPSECMGR_TRIXIE_ROOT=$$root $(PY) -m pytest -p no:cacheprovider -m trixie tests/interop

# sdist + wheel in dist/, with the man page and bash completion generated from the
# argparse definitions (tools/package/make-extras). `make test` checks the same in a
# scratch copy (tests/ipsecmgr/test_packaging.py): wheel -> fresh venv -> commands work.
package: setup
	tools/package/make-extras $(PY)
	$(PY) -m build -o dist .

demo: setup
	$(VENV)/bin/ipsecmgr lab demo

clean:
	rm -rf $(VENV) generated build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis
