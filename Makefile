# The two commands of the README: `make demo` runs the main job, `make test` runs every test.
# Both create the virtual environment, install pvcore and every in-tree plugin
# editable, and install the Debian packages the tests need when missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PLUGINS := $(wildcard plugins/*/pyproject.toml)
PYTEST_ARGS ?=
FUZZ_SECONDS ?= 60

.PHONY: demo test fuzz soak setup debian-packages hooks-doc clean

demo: setup
	$(VENV)/bin/pvcore demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests $(wildcard plugins/*/tests)

# Every fuzz target (fuzz/run.py) for FUZZ_SECONDS each; CI runs each for a few seconds in `make test`.
fuzz: setup
	$(PY) -m fuzz.run --seconds $(FUZZ_SECONDS)

# The 10-minute soak (bench/soak.py): 16 devices on kvm and lpar doors, mixed load, misbehaving clients, a real guest.
soak: setup
	$(PY) bench/soak.py --seconds 600 --guest

setup: debian-packages $(VENV)/.installed

debian-packages:
	@scripts/ensure-debian-packages

$(VENV)/.installed: pyproject.toml $(PLUGINS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,libvirt]' $(foreach p,$(PLUGINS),-e $(dir $(p)))
	touch $@

hooks-doc: setup
	$(PY) -m pvcore.hookdoc > docs/hooks.md

clean:
	rm -rf $(VENV)
