"""benchmarks/train_timing.py: train.py timed, input wait apart, and
--strategy=mirrored on two logical devices ending with identical replicas
(here two logical CPUs; on a GPU two logical GPUs, docs/gpu_checks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from tiny_data import synthetic_tfrecords

from benchmarks import train_timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_timed_iterator_times_each_wait():
    def slow():
        for i in range(3):
            time.sleep(0.05 * i)
            yield i

    waits = []
    assert list(train_timing.TimedIterator(slow(), waits)) == [0, 1, 2]
    assert len(waits) == 4  # three items and the StopIteration
    assert waits[0] < 0.04 and 0.04 <= waits[1] < 0.5 and 0.09 <= waits[2] < 0.6


def test_epoch_row_is_the_epoch_per_step():
    row = train_timing.epoch_row(
        {"epoch": 2, "steps": 4, "seconds": 2.0, "waits": [0.1, 0.0, 0.0, 0.1]}
    )
    assert row["sec_per_step"] == 0.5 and row["input_wait_per_step_s"] == 0.05
    assert row["input_wait_fraction"] == 0.1 and row["input_wait_max_s"] == 0.1


def test_replicas_identical_compares_every_replica():
    class Strategy:
        num_replicas_in_sync = 2

        @staticmethod
        def experimental_local_results(value):
            return value

    def trainer(*replica_values):
        variables = [types.SimpleNamespace(value=v) for v in replica_values]
        return types.SimpleNamespace(
            strategy=Strategy(), model=types.SimpleNamespace(trainable_variables=variables)
        )

    same = (np.ones(3), np.ones(3))
    assert train_timing.replicas_identical(trainer(same, same)) is True
    assert (
        train_timing.replicas_identical(trainer(same, (np.ones(3), np.array([1, 1, 1.5])))) is False
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("timing_data")
    return str(synthetic_tfrecords(root, 4, (40, 40, 40), folds=2))


def test_mirrored_train_py_on_two_logical_cpus_is_timed_and_ends_equal(data_dir, tmp_path):
    out = tmp_path / "timing.json"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/train_timing.py",
            f"--timing_json={out}",
            "--logical_devices=2",
            f"--flagfile={os.path.join(ROOT, 'configs', 'smoke.flags')}",
            f"--data_dir={data_dir}",
            f"--model_dir={tmp_path / 'run'}",
            "--fold=-1",
            "--strategy=mirrored",
            "--devices=/cpu:0,/cpu:1",
            "--noexport",
            "--nodeterministic",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["replicas"] == 2 and payload["replicas_identical"] is True
    assert [e["epoch"] for e in payload["epochs"]] == [1, 2]
    assert all(e["steps"] == 2 for e in payload["epochs"])
    later = payload["epochs"][1]
    assert payload["sec_per_step"] == pytest.approx(later["seconds"] / 2, rel=1e-3)
    assert 0 <= payload["input_wait_per_step_s"] <= payload["sec_per_step"]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 2  # train.py ran its own loop: two epochs
    assert payload["gpu_peak_gib"] is None and payload["device"] == "CPU"
