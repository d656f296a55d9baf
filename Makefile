# Everything a fresh machine needs: `make run` and `make test` set up the
# virtualenv, install the project (compiling the C core) and its extras.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
SOURCES := setup.py pyproject.toml $(wildcard */_*_build.py */*/_*_build.py */csrc/* */*/csrc/*)

.PHONY: all install run test bench clean

all: test

$(STAMP): $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pvbus run

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(VENV)/bin/pvbus bench ring --json bench-results/ring.json
	$(VENV)/bin/pvbus bench block --json bench-results/block.json
	$(VENV)/bin/pvbus bench --json bench-results/kinds.json

clean:
	rm -rf $(VENV) build *.egg-info ring/_ring_c.* .pytest_cache .hypothesis bench-results
