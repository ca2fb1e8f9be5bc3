# Quick start (fresh machine, Python 3.11, 3.12 or 3.13):  make demo   |   make test
#
# The interpreter: PYTHON=/path/to/python if given, else the first supported (3.11-3.13)
# of python3.11, python3.12, python3.13, python3 on PATH, then ~/.pyenv/versions; the
# choice and the reason are printed (`make python` prints only that). Setup installs that
# Python's test set, requirements/pyXY-test.txt (the runtime set plus the test tools and the
# demo's packages), into .venv, then `pip install -e . --no-deps` (the logic lives in
# .ci/run, which CI runs).
PYTHON ?=
VENV := .venv
WORKDIR ?= runs/demo
export PYTHON VENV

.PHONY: python setup demo demo-fast demo-clocks demo-fewstep lint test clean-demo

python:
	@bash .ci/run python >/dev/null

setup:
	@bash .ci/run setup

# The whole SFD pipeline on scikit-learn's digits (about 10 minutes on 2 CPU cores);
# writes $(WORKDIR)/samples.png, fid_vs_steps.png and metrics.json. Reruns skip done stages.
demo: setup
	$(VENV)/bin/python main.py --config=configs/demo.py --mode=demo --workdir=$(WORKDIR)

demo-fast: setup
	$(VENV)/bin/python main.py --config=configs/demo.py:fast=1 --mode=demo --workdir=$(WORKDIR)_fast

# The clock-schedule sweep (synchronous, SFD Δt 0.3, a rate clock, a learned clock; 3 seeds
# each; 12 training runs, so about 12× the demo's training time): writes
# $(WORKDIR)_clocks/clock_sweep.png and metrics.json (mean ± std per schedule).
demo-clocks: setup
	$(VENV)/bin/python main.py --config=configs/demo.py:clocks=1 --mode=demo --workdir=$(WORKDIR)_clocks

# Few-step sampling (docs/fewstep.md): flow-matching SFD at Euler NFE 1, 2, 4, 8, 20 against
# average-velocity (MeanFlow) SFD and synchronous models at 1, 2, 4 jumps; 3 seeds each
# (9 trainings): writes $(WORKDIR)_fewstep/fewstep.png and metrics.json (mean ± std).
demo-fewstep: setup
	$(VENV)/bin/python main.py --config=configs/demo.py:fewstep=1 --mode=demo --workdir=$(WORKDIR)_fewstep

lint: setup
	$(VENV)/bin/ruff check

# What CI runs: lint, the TPU compiler, then the test suite.
test: lint
	@bash .ci/run tpu-compiler
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests

clean-demo:
	rm -rf $(WORKDIR) $(WORKDIR)_fast $(WORKDIR)_clocks $(WORKDIR)_fewstep
