# wsss-flow: the two commands of the README.
#   make demo   set up .venv and run the toy pipeline end to end (report in results/toy/reports/cam/; ~10 min on 2 cores)
#   make test   set up .venv and run the test suite
#   make toy-fsae  the toy FSAE table (PPC, SIPE, MCTformer-V2, each with and without FSAE; about an hour on 2 cores)
#   make bench  run the benchmarks of bench/ (about 10 min on 2 cores), print the table, update bench/README.md
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= 2
SNAKEMAKE := $(VENV)/bin/snakemake

.PHONY: demo toy-fsae test setup lint bench clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11); set PYTHON=..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch torchvision
	$(PY) -m pip install -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(SNAKEMAKE) --cores $(CORES) all
	@echo "report: results/toy/reports/cam/report.md"

toy-fsae: setup
	$(SNAKEMAKE) --cores $(CORES) toy_fsae_report
	@echo "report: results/toy/reports/fsae/report.md"

test: setup
	$(PY) -m pytest -q -rs --durations=15 tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: setup
	$(SNAKEMAKE) --lint

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf results logs .snakemake .wsss
