# brats_tf: the two commands a new user runs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2
# oneDNN CPU kernels on every x86 CPU, not only those with AVX512-VNNI/AMX (as train.py).
export TF_ENABLE_ONEDNN_OPTS ?= 1

.PHONY: venv lint format test demo demo_ensemble real real_dir bench learn clean

# The venv is (re)built when requirements.txt changes. pip byte-compiles what
# it installs one file after the other; compileall does the same on every core.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -q pip
	$(PY) -m pip install -q --no-compile -r requirements.txt
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" > /dev/null
	touch $@

venv: $(VENV)/.installed

# Two test processes (pytest-xdist), a test file to each at a time: most of a
# test's time is single-threaded Python (imports, tracing), so two overlap well
# on two cores. The files go out in the order tests/conftest.py gives them
# (the heavy ones first), not xdist's (most tests first). TEST_WORKERS=1 runs
# them one after the other.
TEST_WORKERS ?= 2
test: venv lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

# ruff (pyproject.toml): the lint rules, then the format check; `make format`
# rewrites the files the check would refuse.
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
format: venv
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

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

# The paper's ensemble at demo scale, on make demo's data (run make demo first):
# three members trained from scratch, each with its own seed (train.py
# --member=K: seed K, folder ensemble/member_K; 3x the demo's training time),
# then the held-out fold with TTA: member 0 alone and the three. With the
# flagfile's segmentation head every seed of 0-9 learned every region; with
# Keras' default head seeds 1 and 2 did not (docs/demo_runs.md, "The ensemble").
MEMBERS ?= 0 1 2
empty :=
comma := ,
# the members' folders, comma separated: evaluate.py --model
MEMBER_DIRS = $(subst $(empty) $(empty),$(comma),$(strip $(addprefix $(DEMO_DIR)/ensemble/member_,$(MEMBERS))))
demo_ensemble: venv
	@test -f $(DEMO_DIR)/tfrecord/manifest.json || { echo "no $(DEMO_DIR)/tfrecord: run make demo first"; exit 1; }
	for k in $(MEMBERS); do \
	  $(PY) train.py --flagfile=configs/demo.flags --data_dir=$(DEMO_DIR)/tfrecord --model_dir=$(DEMO_DIR)/ensemble --member=$$k --noverbose || exit 1; \
	done
	$(PY) evaluate.py --model=$(DEMO_DIR)/ensemble/member_$(firstword $(MEMBERS)) --data=$(DEMO_DIR)/tfrecord --fold=0 --tta --output_dir=$(DEMO_DIR)/eval_member0_tta --overwrite
	$(PY) evaluate.py --model=$(MEMBER_DIRS) --data=$(DEMO_DIR)/tfrecord --fold=0 --tta --output_dir=$(DEMO_DIR)/eval_ensemble_tta --overwrite
	@echo "ensemble done: members in $(DEMO_DIR)/ensemble, held-out evaluations in $(DEMO_DIR)/eval_member0_tta (member $(firstword $(MEMBERS))) and $(DEMO_DIR)/eval_ensemble_tta (the ensemble), both with TTA"

# Real BraTS cases (never in this repository): REAL_DIR (default: the
# BRATS_REAL_DIR environment variable) is a folder of cases in a BraTS layout.
# Converts them once into $(REAL_OUT)/tfrecord (5 folds), then for each fold
# of REAL_FOLDS trains configs/real_cpu.flags (about an hour per fold on 2
# cores; a stopped run resumes), chooses the ET post-processing's N on the
# fold's training cases and evaluates the held-out fold: single model, with
# TTA, with TTA and post-processing; per-fold records, training curves and the
# held-out Dice against training minutes in $(REAL_OUT)/records
# (benchmarks/real_cv.py; docs/real_runs.md). REAL_FOLDS="0 1 2 3 4" runs the
# cross-validation.
REAL_DIR ?= $(BRATS_REAL_DIR)
REAL_OUT ?= real_output
REAL_FOLDS ?= 0
real_dir:
	@test -n "$(REAL_DIR)" || { echo "make real needs REAL_DIR=<folder of BraTS cases> (or the BRATS_REAL_DIR environment variable)"; exit 1; }
real: real_dir venv
	test -f $(REAL_OUT)/tfrecord/manifest.json || $(PY) -m data_pipeline.convert --input_dir $(REAL_DIR) --output_dir $(REAL_OUT)/tfrecord --folds 5 --seed 0
	$(PY) benchmarks/real_cv.py --data_dir=$(REAL_OUT)/tfrecord --out_dir=$(REAL_OUT)/cv --record_dir=$(REAL_OUT)/records --folds=$(subst $(empty) $(empty),$(comma),$(strip $(REAL_FOLDS)))
	@echo "real done: models and evaluations in $(REAL_OUT)/cv/fold_<k>, records (cv.json, curves) in $(REAL_OUT)/records"

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
