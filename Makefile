# The two commands of the README: `make demo` runs the main job, `make test` runs every test.
# Both create the virtual environment, install pvcore and every in-tree plugin
# editable, and install the Debian packages the tests need when missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PLUGINS := $(wildcard plugins/*/pyproject.toml)
PYTEST_ARGS ?=
FUZZ_SECONDS ?= 60

.PHONY: demo test fuzz soak setup compiled debian-packages hooks-doc clean

demo: setup
	$(VENV)/bin/pvcore demo

# The ring, device and front-door tests run a second time on the pure-Python fallback
# (PVCORE_PURE_PYTHON=1, docs/performance.md); tests/test_build.py checks each pass loaded what it asked for.
PURE_TESTS := tests/test_build.py tests/test_virtqueue.py tests/test_session.py tests/test_memory.py \
	tests/test_fdmemory.py tests/test_inflight.py tests/test_loopback.py tests/test_block.py tests/test_rng.py \
	tests/test_net.py tests/test_nbd.py tests/test_nbd_splice.py tests/test_vhost_user.py tests/test_guest_lengths.py \
	tests/test_shrunk_memory.py tests/test_fuzz_findings.py tests/test_throttle.py tests/test_nbd_polling.py \
	tests/test_spread_queues.py

test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests $(wildcard plugins/*/tests)
	PVCORE_PURE_PYTHON=1 $(PY) -m pytest $(PYTEST_ARGS) $(PURE_TESTS)

# Every fuzz target (fuzz/run.py) for FUZZ_SECONDS each; CI runs each for a few seconds in `make test`.
fuzz: setup
	$(PY) -m fuzz.run --seconds $(FUZZ_SECONDS)

# The 10-minute soak (bench/soak.py): 16 devices on kvm and lpar doors, mixed load, misbehaving clients, a real guest.
soak: setup
	$(PY) bench/soak.py --seconds 600 --guest

setup: debian-packages $(VENV)/.installed compiled

# Recompile the hot modules (pvcore.build) in place if any changed since the install; a failure only warns.
compiled: $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace

debian-packages:
	@scripts/ensure-debian-packages

$(VENV)/.installed: pyproject.toml setup.py $(PLUGINS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,libvirt]' $(foreach p,$(PLUGINS),-e $(dir $(p)))
	touch $@

hooks-doc: setup
	$(PY) -m pvcore.hookdoc > docs/hooks.md

clean:
	rm -rf $(VENV)
