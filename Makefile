# MedicalFusion: every target sets up what it needs in .venv (Python 3.9+, torch 2.13 CPU build).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
DATA   ?= ../shared/data

.PHONY: setup demo test test-fast check-py39 pacs-deps bench bench-deps evaluate train clean

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

## the test suite (tests that need ../shared/data skip with a reason when it is absent), after the 3.9 check;
## as root (CI) the DICOM/PACS tests run (never skip) with the Debian packages of pacs-deps; a user who
## cannot install them sees which packages to install and those tests skip with that reason
test: setup check-py39 pacs-deps
	MEDICALFUSION_REQUIRE_PACS=$$([ "$$(id -u)" = 0 ] && echo 1) $(PY) -m pytest -q $(PYTEST_PARALLEL)

## Debian packages of the DICOM/PACS tests: dciodvfy (dicom3tools), Orthanc + its DICOMweb plugin (started by
## the tests on 127.0.0.1 from scripts/orthanc.py), openssl (a test certificate); apt-get installs the missing
## ones when run as root (CI), else says what to install (and the tests that need them skip)
PACS_DEBS := dicom3tools orthanc orthanc-dicomweb openssl
pacs-deps:
	@missing=""; \
	command -v dciodvfy >/dev/null 2>&1 || missing="$$missing dicom3tools"; \
	command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing="$$missing orthanc"; \
	ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/lib/orthanc/libOrthancDicomWeb.so* >/dev/null 2>&1 \
		|| missing="$$missing orthanc-dicomweb"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else \
			echo "make: the DICOM/PACS tests need these Debian packages and skip without them:$$missing (sudo apt-get install$$missing)"; \
		fi; \
	fi

## the inner loop: every test not marked slow (under a minute on 2 cores, docs/TESTING.md)
test-fast: setup
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not slow"

## the Slicer module and the core must run on Python 3.9 (Slicer 5.4-5.8): syntax and standard library
check-py39: setup
	$(VENV)/bin/vermin --target=3.9- --violations --no-tips --eval-annotations MedicalFusion/MedicalFusion.py MedicalFusion/MedicalFusionLib \
		MedicalFusion/MedicalFusionSlicer

BENCH_VENV ?= .venv-bench
BENCH_PEERS := itk-elastix==0.25.4 antspyx==0.6.3 SimpleITK   # pyproject.toml's `bench` extra

$(BENCH_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet $(BENCH_PEERS)
	touch $@

## the registration benchmark's peers (itk-elastix, antspyx: the `bench` extra) in their own venv
## (antspyx pins numpy<2.4 and scipy<1.16, older than the project's)
bench-deps: $(BENCH_VENV)/.installed

## speed and memory benchmarks and registration accuracy, written to docs/BENCHMARKS.md
bench: setup pacs-deps bench-deps
	$(PY) scripts/bench.py --output docs/BENCHMARKS.md
	$(PY) scripts/bench_metrics.py --repeats 3 --output docs/BENCHMARKS.md
	$(PY) scripts/bench_metrics.py --repeats 3 --threads 1 --section metrics-threads1 --output docs/BENCHMARKS.md
	$(PY) scripts/bench_ui_gaps.py --threads 1 --output docs/BENCHMARKS.md
	$(PY) scripts/bench_ui_gaps.py --methods lp nsct dmfnet nsst_papcnn --cases spm12 --section ui-gaps-default-threads --output docs/BENCHMARKS.md
	$(PY) scripts/bench_ui_gaps.py --methods lp --register rigid --threads 1 --section ui-gaps-register --output docs/BENCHMARKS.md
	$(PY) scripts/bench_registration.py --trials 5 --output docs/BENCHMARKS.md
	$(PY) scripts/bench_registration.py --cases hybrid synthetic-mr spm12-t2 --peers elastix ants --peers-python $(BENCH_VENV)/bin/python --trials 5 --threads 1 --output docs/BENCHMARKS.md
	$(PY) scripts/bench_e2e.py --output docs/BENCHMARKS.md
	$(PY) scripts/bench_e2e.py --cases synthetic-256 mni-demo spm12 --methods mrdfn lp --metric-set quick --section e2e-quick --output docs/BENCHMARKS.md
	$(PY) scripts/bench_e2e.py --cases synthetic-256 mni-demo spm12 --methods mrdfn --metric-set none --section e2e-none --output docs/BENCHMARKS.md
	$(PY) scripts/bench_io.py --output docs/BENCHMARKS.md
	$(PY) scripts/bench_memory.py --sizes 256x256x180 400x400x400 700x700x700 512x512x1000 --output docs/BENCHMARKS.md
	$(PY) scripts/bench_cohort.py --studies 24 --method mrdfn --output docs/BENCHMARKS.md
	$(PY) scripts/bench_pacs.py --repeats 3 --threads 1 --output docs/BENCHMARKS.md

## the evaluation tables on the aanlib test split, written to out/evaluation
evaluate: setup
	$(VENV)/bin/medicalfusion evaluate --dataset $(DATA)/aanlib --split test --output out/evaluation

## retrain a network, e.g. make train METHOD=mrdfn
train: setup
	$(VENV)/bin/medicalfusion train --method $(METHOD) --data $(DATA)/aanlib

clean:
	rm -rf out .pytest_cache
