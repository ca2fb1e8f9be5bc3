# Quick start (fresh machine, Python 3.11):  make demo   |   make test
PYTHON ?= python3.11
VENV := .venv
WORKDIR ?= runs/demo

.PHONY: setup demo demo-fast test clean-demo

$(VENV)/.installed: requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements.txt
	touch $@

setup: $(VENV)/.installed

# The whole SFD pipeline on scikit-learn's digits (about 10 minutes on 2 CPU cores);
# writes $(WORKDIR)/samples.png, fid_vs_steps.png and metrics.json. Reruns skip done stages.
demo: setup
	$(VENV)/bin/python main.py --config=configs/demo.py --mode=demo --workdir=$(WORKDIR)

demo-fast: setup
	$(VENV)/bin/python main.py --config=configs/demo.py:fast=1 --mode=demo --workdir=$(WORKDIR)_fast

test: setup
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests

clean-demo:
	rm -rf $(WORKDIR) $(WORKDIR)_fast
