# Everything a fresh machine needs: `make run` and `make test` set up the
# virtualenv, install the project (compiling the C core) and its extras.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# apt-get never asks (a package's configuration questions take their defaults).
export DEBIAN_FRONTEND := noninteractive
SOURCES := setup.py pyproject.toml $(wildcard */_*_build.py */*/_*_build.py */csrc/* */*/csrc/*)

.PHONY: all install run test bench clean system-packages

all: test

$(STAMP): $(SOURCES) | system-packages
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) -m pip install --quiet -e '.[programs]' || \
	  echo "note: pyfuse3 (the programs extra, built against libfuse3-dev) could not be installed; --exec shows no disk files and its tests skip"
	$(MAKE) -s -C guestcode || echo "note: the guest code could not be built; pvbus bench builds it or falls back"
	touch $@

# Debian tools the tests use, tolerant of failure (a test needing a missing
# one skips and says why): fsck.fat (dosfstools) checks the FAT volume a
# guest writes on its disk.
system-packages:
	@test -x /usr/sbin/fsck.fat || test -x /sbin/fsck.fat || \
	  { apt-get install -y -q dosfstools || { apt-get update -q && apt-get install -y -q dosfstools; }; } >/dev/null 2>&1 || \
	  echo "note: dosfstools (fsck.fat) could not be installed; the test that needs it will skip"
	@# The network tests and bench: ping (iputils-ping), iperf3 (pvbus bench net; a socket pump without it).
	@{ test -x /usr/bin/ping && test -x /usr/bin/iperf3; } 2>/dev/null || \
	  { apt-get install -y -q iputils-ping iperf3 || { apt-get update -q && apt-get install -y -q iputils-ping iperf3; }; } \
	  >/dev/null 2>&1 || echo "note: iputils-ping or iperf3 could not be installed; the tests needing ping skip"
	@# Real programs in a guest (--exec): FUSE (fuse3, libfuse3-dev and pkg-config to build pyfuse3), fio,
	@# mtools (FAT without the kernel's vfat driver).
	@{ test -x /usr/bin/fusermount3 && test -x /usr/bin/fio && test -x /usr/bin/mcopy && pkg-config --exists fuse3; } \
	  2>/dev/null || \
	  { apt-get install -y -q fuse3 libfuse3-dev fio pkg-config mtools || \
	    { apt-get update -q && apt-get install -y -q fuse3 libfuse3-dev fio pkg-config mtools; }; } >/dev/null 2>&1 || \
	  echo "note: fuse3, libfuse3-dev, fio, pkg-config or mtools could not be installed; tests needing them skip"
	@# The guest code's aarch64 build (pvbus bench: a guest for hardware this host does not have).
	@command -v aarch64-linux-gnu-gcc >/dev/null || \
	  { apt-get install -y -q gcc-aarch64-linux-gnu || { apt-get update -q && apt-get install -y -q gcc-aarch64-linux-gnu; }; } \
	  >/dev/null 2>&1 || echo "note: gcc-aarch64-linux-gnu could not be installed; the foreign-architecture run skips"

# The guest machine code of the fullvirt and emulated kinds (guestcode/README.md).
.PHONY: guestcode
guestcode: | system-packages
	$(MAKE) -C guestcode

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/pvbus run

# The suite, after style and types: a change that breaks either fails the run.
test: lint
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
	$(VENV)/bin/ruff check ring vmbus host_drivers guest_kernel pvbus tests fuzz
	$(VENV)/bin/mypy

# Coverage-guided fuzzing of every parser of guest input (fuzz/): each target
# for FUZZ_SECONDS, then a summary; corpora and crashes in fuzz/work/.
FUZZ_SECONDS ?= 600
.PHONY: fuzz
fuzz: $(STAMP)
	$(PY) -m fuzz all --seconds $(FUZZ_SECONDS)

# The C modules built with AddressSanitizer and UBSan in a copy of the tree
# (build-sanitize/: the normal build and venv are untouched), and the hostile
# and fast-path tests run against them with libasan preloaded.
SANITIZE_DIR   := build-sanitize
SANITIZE_TESTS ?= tests/ring/test_ring_hostile.py tests/storage/test_fastpath.py tests/bus/test_hostile.py \
                  $(wildcard tests/hostile)
.PHONY: sanitize
sanitize: $(STAMP)
	rm -rf $(SANITIZE_DIR) && mkdir -p $(SANITIZE_DIR)
	git ls-files -co --exclude-standard | while read -r f; do [ -f "$$f" ] && echo "$$f"; done \
	  | tar -cf - -T - | tar -xf - -C $(SANITIZE_DIR)
	cd $(SANITIZE_DIR) && PVBUS_SANITIZE=1 $(abspath $(PY)) setup.py -q build_ext --inplace
	cd $(SANITIZE_DIR) && LD_PRELOAD=$$(gcc -print-file-name=libasan.so) \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  PYTHONPATH=$$PWD $(abspath $(PY)) -m pytest -p no:cacheprovider -q $(SANITIZE_TESTS)

# The queue layer across two processes for a million requests: no lost
# wake-up (the short run is part of make test).
stress: $(STAMP)
	$(PY) -m tests.queue.stress --requests 1000000

# Hostile guests at full size: 500 churning guests beside four good ones, and
# 32 storage guests at once (their small versions are part of make test).
.PHONY: soak
soak: $(STAMP)
	$(PY) -m pytest -m soak -q tests/hostile tests/sockets
