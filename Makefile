# The two commands of README.rst. Both create the virtualenv they need, so they work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= etc/relayd.ini

.PHONY: run test check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# A regular (non-editable) install: twistd does not find plugins through the import hooks of a flat-layout
# editable install. Regenerating dropin.cache here keeps the daemon from trying to write it later.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml $(shell find relayd twisted -name '*.py')
	$(BIN)/python -m pip install --quiet .
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet ".[test]"
	touch $@

run: $(VENV)/.installed
	cd $(CURDIR) && $(BIN)/twistd --nodaemon --pidfile= relayd --config $(CONFIG)

check: $(VENV)/.installed
	$(BIN)/twistd relayd --config $(CONFIG) --check

test: $(VENV)/.installed-test
	$(BIN)/python -m mypy relayd
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
