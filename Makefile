# brats_tf: the two commands a new user runs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
# oneDNN CPU kernels on every x86 CPU, not only those with AVX512-VNNI/AMX (as train.py).
export TF_ENABLE_ONEDNN_OPTS ?= 1

.PHONY: venv test demo bench learn clean

# The venv is (re)built when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -q pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# Two test processes (pytest-xdist), a test file to each at a time: most of a
# test's time is single-threaded Python (imports, tracing), so two overlap well
# on two cores. TEST_WORKERS=1 runs them one after the other.
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

# The CPU demo: synthetic BraTS-like cases -> TFRecords -> train -> evaluate -> export.
# Everything goes to $(DEMO_DIR), made anew each time.
DEMO_DIR ?= demo_output
demo: venv
	rm -rf $(DEMO_DIR)
	$(PY) -m data_pipeline.synthetic --output_dir $(DEMO_DIR)/nifti --num_cases 40 --seed 0
	$(PY) -m data_pipeline.convert --input_dir $(DEMO_DIR)/nifti --output_dir $(DEMO_DIR)/tfrecord --folds 5 --seed 0
	$(PY) train.py --flagfile=configs/demo.flags --data_dir=$(DEMO_DIR)/tfrecord --model_dir=$(DEMO_DIR)/run
	# The held-out fold, single model (the paper's 'single model' row), then with
	# test-time augmentation (mean of the 8 mirror flips, its 'single model + TTA' row).
	$(PY) evaluate.py --model=$(DEMO_DIR)/run --data=$(DEMO_DIR)/tfrecord --fold=0 --output_dir=$(DEMO_DIR)/eval
	$(PY) evaluate.py --model=$(DEMO_DIR)/run --data=$(DEMO_DIR)/tfrecord --fold=0 --tta --output_dir=$(DEMO_DIR)/eval_tta
	@echo "demo done: data in $(DEMO_DIR)/nifti and $(DEMO_DIR)/tfrecord, run (checkpoints, logs, history.json, model.keras, export/1) in $(DEMO_DIR)/run, held-out evaluation in $(DEMO_DIR)/eval (single model) and $(DEMO_DIR)/eval_tta (with TTA)"

# Every benchmark (about an hour on 2 cores; run it on an idle machine): writes
# benchmarks/results.json and benchmarks/RESULTS.md (README quotes it).
bench: venv
	$(PY) benchmarks/run_all.py

# Learning curves of the paper network in float32, mixed_float16, mixed_float16
# with XLA and with recompute, same seed, weights and data order (a GPU's job:
# docs/gpu_checks.md). LEARN_FLAGS adds flags, e.g. LEARN_FLAGS=--steps=600.
LEARN_DIR ?= learning_curves
LEARN_FLAGS ?=
learn: venv
	$(PY) benchmarks/learning_curve.py --out_dir=$(LEARN_DIR) $(LEARN_FLAGS)

clean:
	rm -rf $(VENV) .pytest_cache
