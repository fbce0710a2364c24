"""benchmarks/learning_curve.py at a CPU's size: 16^3, width 8, 6 steps,
float32 and mixed_float16 (XLA and mixed_float16 are slow on a CPU; the
full-size run is for a GPU, docs/gpu_checks.md)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import learning_curve as lc

pytestmark = pytest.mark.heavy  # tests/conftest.py: scheduled first

CROP, WIDTH, STEPS, K = (16, 16, 16), 8, 6, 4  # points at steps 4 and 6

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(out, variants):
    # Two levels of one ResNet block (the paper: four, 1,2,2,4): the same
    # path, a smaller graph to trace (most of a short CPU run).
    return [
        sys.executable,
        "benchmarks/learning_curve.py",
        f"--out_dir={out}",
        "--crop=16,16,16",
        f"--init_filters={WIDTH}",
        "--blocks_down=1,1",
        f"--steps={STEPS}",
        f"--log_every={K}",
        f"--variants={variants}",
        "--num_train_cases=3",
        "--num_heldout_cases=1",
        "--seed=3",
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The benchmark with float32 and mixed_float16, and beside it (two
    processes overlap well on two cores: much of a short run is tracing)
    float32 alone again with the same seed, into another folder."""
    out, again = tmp_path_factory.mktemp("curves"), tmp_path_factory.mktemp("again")
    second = subprocess.Popen(
        _command(again, "float32"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        proc = subprocess.run(
            _command(out, "float32,mixed_float16"),
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        _, second_err = second.communicate(timeout=300)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert second.returncode == 0, second_err[-3000:]
    with open(out / "learning_curves.json") as f, open(again / "learning_curves.json") as g:
        return out, json.load(f), again, json.load(g)


def test_the_json_holds_every_curve_of_every_variant(run):
    out, payload, _, _ = run
    assert set(payload["variants"]) == {"float32", "mixed_float16"}
    assert payload["flags"]["crop"] == list(CROP)
    for name, r in payload["variants"].items():
        assert r["config"]["precision"] == name and r["config"]["blocks_down"] == [1, 1]
        assert r["config"]["optimizer"] == ("Adam" if name == "float32" else "LossScaleOptimizer")
        assert r["device"] == "CPU" and r["tensorflow"]
        assert r["steps_done"] == STEPS and len(r["step_seconds"]) == STEPS
        assert r["curves"]["step"] == [4, 6]
        for key in lc.CURVES:
            assert len(r["curves"][key]) == 2, key
            assert all(math.isfinite(v) for v in r["curves"][key]), (name, key)
        for key in ("dice_WT", "dice_TC", "dice_ET"):
            assert all(0.0 <= v <= 1.0 for v in r["curves"][key])
        # the loss is the weighted sum of its terms (§3.4: 1, 0.1, 0.1)
        c = r["curves"]
        for i in range(2):
            assert c["loss"][i] == pytest.approx(
                c["dice"][i] + 0.1 * c["l2"][i] + 0.1 * c["kl"][i], rel=1e-5
            )
        assert set(r["heldout_dice"]) == {"WT", "TC", "ET"}
        assert all(0.0 <= v <= 1.0 for v in r["heldout_dice"].values())
        assert r["sec_per_step"] > 0
    assert set(payload["summary"]) == {"float32", "mixed_float16"}
    png = (out / "learning_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


def test_every_variant_starts_from_the_same_weights_and_data_order(run):
    _, payload, _, _ = run
    a, b = payload["variants"]["float32"], payload["variants"]["mixed_float16"]
    assert a["initial_weights_checksum"] == b["initial_weights_checksum"]
    assert a["data_order"] == b["data_order"] == lc.case_order(STEPS, 3, seed=3)
    assert lc.case_order(STEPS, 3, seed=4) != a["data_order"]
    # one epoch is a permutation of the training cases
    assert sorted(a["data_order"][:3]) == [0, 1, 2]
    # float32 and float16 start from the same point: the first losses are close
    assert b["curves"]["loss"][0] == pytest.approx(a["curves"]["loss"][0], rel=0.05)


def test_equal_seeds_give_equal_float32_curves(run):
    """A second run with the same seed: the same cases, the same weights and
    the same float32 curves and held-out Dice, exactly."""
    out, payload, again, second = run
    for name in ("train", "heldout"):
        a, b = np.load(out / "data" / f"{name}.npz"), np.load(again / "data" / f"{name}.npz")
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    first, repeat = payload["variants"]["float32"], second["variants"]["float32"]
    assert repeat["initial_weights_checksum"] == first["initial_weights_checksum"]
    assert repeat["data_order"] == first["data_order"]
    assert repeat["curves"] == first["curves"]
    assert repeat["heldout_dice"] == first["heldout_dice"]


@pytest.mark.parametrize(
    "flag", ["--crop=24,32,32", "--variants=float32,bf16", "--init_filters=12", "--blocks_down=1"]
)
def test_bad_flags_fail_in_one_line(flag, tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/learning_curve.py", f"--out_dir={tmp_path}", flag],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("learning_curve.py: error:"), proc.stderr
