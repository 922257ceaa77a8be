# MedicalFusion: every target sets up what it needs in .venv (Python 3.9+, torch 2.13 CPU build).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
DATA   ?= ../shared/data

.PHONY: setup demo test test-fast check-py39 bench evaluate train clean

# both cores; each real case's fusions stay in one worker (xdist_group marks, conftest.py)
PYTEST_PARALLEL ?= -n 2 --dist loadgroup

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

## the main job on the embedded sample: out/demo/{fused.nrrd,preview.png,metrics.csv}
demo: setup
	$(VENV)/bin/medicalfusion demo --output out/demo

## the test suite (tests that need ../shared/data skip with a reason when it is absent), after the 3.9 check
test: setup check-py39
	$(PY) -m pytest -q $(PYTEST_PARALLEL)

## the inner loop: every test not marked slow (under a minute on 2 cores)
test-fast: setup
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not slow"

## the Slicer module and the core must run on Python 3.9 (Slicer 5.4-5.8): syntax and standard library
check-py39: setup
	$(VENV)/bin/vermin --target=3.9- --violations --no-tips --eval-annotations MedicalFusion/MedicalFusion.py MedicalFusion/MedicalFusionLib

## speed and memory benchmarks and registration accuracy, written to docs/BENCHMARKS.md
bench: setup
	$(PY) scripts/bench.py --output docs/BENCHMARKS.md
	$(PY) scripts/bench_metrics.py --repeats 3 --output docs/BENCHMARKS.md
	$(PY) scripts/bench_metrics.py --repeats 3 --threads 1 --section metrics-threads1 --output docs/BENCHMARKS.md
	$(PY) scripts/bench_ui_gaps.py --threads 1 --output docs/BENCHMARKS.md
	$(PY) scripts/bench_ui_gaps.py --methods lp nsct dmfnet nsst_papcnn --cases spm12 --section ui-gaps-default-threads --output docs/BENCHMARKS.md
	$(PY) scripts/bench_registration.py --trials 5 --output docs/BENCHMARKS.md
	$(PY) scripts/bench_e2e.py --output docs/BENCHMARKS.md
	$(PY) scripts/bench_e2e.py --cases synthetic-256 mni-demo --methods mrdfn lp --metric-set quick --section e2e-quick --output docs/BENCHMARKS.md
	$(PY) scripts/bench_io.py --output docs/BENCHMARKS.md

## the evaluation tables on the aanlib test split, written to out/evaluation
evaluate: setup
	$(VENV)/bin/medicalfusion evaluate --dataset $(DATA)/aanlib --split test --output out/evaluation

## retrain a network, e.g. make train METHOD=mrdfn
train: setup
	$(VENV)/bin/medicalfusion train --method $(METHOD) --data $(DATA)/aanlib

clean:
	rm -rf out .pytest_cache
