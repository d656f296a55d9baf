# Everything a fresh machine needs: `make run` and `make test` set up the
# virtualenv, install the project (compiling the C core) and its extras.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
SOURCES := setup.py pyproject.toml $(wildcard */_*_build.py */*/_*_build.py */csrc/* */*/csrc/*)

.PHONY: all install run test bench clean system-packages

all: test

$(STAMP): $(SOURCES) | system-packages
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

# Debian tools the tests use, tolerant of failure (a test needing a missing
# one skips and says why): fsck.fat (dosfstools) checks the FAT volume a
# guest writes on its disk.
system-packages:
	@test -x /usr/sbin/fsck.fat || test -x /sbin/fsck.fat || \
	  { apt-get install -y -q dosfstools || { apt-get update -q && apt-get install -y -q dosfstools; }; } >/dev/null 2>&1 || \
	  echo "note: dosfstools (fsck.fat) could not be installed; the test that needs it will skip"

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

# Style and types (settings in pyproject.toml: [tool.ruff], [tool.mypy]).
.PHONY: lint
lint: $(STAMP)
	$(VENV)/bin/ruff check ring vmbus host_drivers guest_kernel pvbus tests
	$(VENV)/bin/mypy
