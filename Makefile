# brats_tf: the two commands a new user runs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv test demo bench clean

# The venv is (re)built when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -q pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

# Until train.py / evaluate.py exist (issues 4 and 5), the demo runs what exists.
demo: venv
	@echo "make demo: the data pipeline, train.py and evaluate.py are not built yet;"
	@echo "this demo builds the paper network (Table 1) and times training steps at a small size."
	$(PY) benchmarks/model_step.py --crops=32,32,32 --init_filters=8 --steps=2

bench: venv
	$(PY) benchmarks/model_step.py --json_out=benchmarks/model_step.json

clean:
	rm -rf $(VENV) .pytest_cache
