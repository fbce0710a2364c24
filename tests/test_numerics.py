"""This device's numerics against float64 references, at a tiny size
(benchmarks/numerics_check.py; docs/gpu_checks.md runs it big on a GPU).

GroupNorm against the textbook formulas in float64 NumPy; one ResNet block
and a whole training step (``training.make_train_step``'s gradients) against
a float64 TensorFlow re-implementation of the network with the same weights.
The bounds are numerics_check.BOUNDS (derived there); float16's are loosened
by ``benchmarks.reduced_precision.slack`` on CPUs whose float16 convolutions accumulate
in float16.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import numerics_check as nc
from benchmarks.reduced_precision import slack

GN_SHAPE = (2, 8, 8, 8, 32)
BLOCK_SHAPE = (1, 8, 8, 8, 16)
CROP, WIDTH = (16, 16, 16), 8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_passed(results: dict):
    for what, r in results.items():
        assert r["passed"], f"{what}: {r}"


@pytest.fixture(scope="module")
def case():
    return nc.make_step_case(CROP, WIDTH, seed=0)


@pytest.fixture(scope="module")
def cache():
    return {}


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_groupnorm_forward_and_backward_match_float64(precision):
    results = nc.check_groupnorm(GN_SHAPE, 8, precision, seed=0, slack=slack("float16"))
    _assert_passed(results)
    if precision == "float32":  # far inside the bound: float32 rounding, not float16's
        assert max(r["rel_l2"] for r in results.values()) < 1e-6


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_resnet_block_matches_float64(precision):
    results = nc.check_resnet_block(
        BLOCK_SHAPE,
        8,
        precision,
        tf32=False,
        seed=0,
        reference_device="CPU:0",
        slack=slack("float16"),
    )
    _assert_passed(results)
    assert results["forward"]["bound"] == f"block_{precision}"


def test_float32_training_step_gradients_match_float64(case, cache):
    result = nc.check_training_step(case, "float32", reference_device="CPU:0", cache=cache)
    _assert_passed({k: v for k, v in result.items() if isinstance(v, dict)})
    # The float64 network is the model: same loss to float32 precision.
    assert result["loss_value"] == pytest.approx(result["reference_loss"], rel=1e-5)


def test_mixed_float16_training_step_gradients_point_the_same_way(case, cache):
    result = nc.check_training_step(
        case, "mixed_float16", reference_device="CPU:0", slack=slack("float16"), cache=cache
    )
    _assert_passed({k: v for k, v in result.items() if isinstance(v, dict)})
    grads = result["gradients"]
    assert grads["cosine"] >= 1 - 0.01 * slack("float16")
    # float16 is visibly less exact than float32 (the check measures something)
    assert grads["rel_l2"] > BOUNDS_FLOAT32_STEP
    # and against float32's gradients (the target as stated): the same bound
    against_float32 = nc.compare(cache["mixed_float16_step"][0], cache["float32_step"][0])
    assert nc.judge(against_float32, "step_mixed_float16", slack("float16"))["passed"]


BOUNDS_FLOAT32_STEP = nc.BOUNDS["step_float32"][0]


def test_a_different_vae_draw_fails_the_check(case, cache):
    """The reference must use the step's draw: with another one the float32
    gradients are far outside the bound (the check can fail)."""
    if "float32_step" not in cache:
        nc.check_training_step(case, "float32", reference_device="CPU:0", cache=cache)
    grads, _ = cache["float32_step"]
    from brats_tf.model import build_model

    model = build_model(case.config)  # the same layers and variable order
    model.set_weights(case.weights)
    other, _ = nc.reference_gradients(case, model, seed=1, device="CPU:0")
    assert not nc.judge(nc.compare(grads, other), "step_float32")["passed"]


def test_recompute_gives_the_plain_step_gradients(case, cache):
    result = nc.check_recompute(case, plain=cache.get("float32_step"))
    _assert_passed(result)


def test_compare_measures_errors():
    ref = np.array([3.0, 4.0])
    got = np.array([3.0, 4.0 + 5e-3])
    m = nc.compare(got, ref)
    assert m["rel_l2"] == pytest.approx(1e-3)
    assert m["max_rel"] == pytest.approx(5e-3 / 4)
    assert m["cosine"] == pytest.approx(float(got @ ref / np.linalg.norm(got) / 5.0))
    assert nc.compare([np.array([np.nan]), ref], [ref[:1], ref])["rel_l2"] == float("inf")
    assert nc.judge(m, "step_tf32")["passed"] and not nc.judge(m, "step_float32")["passed"]


def test_tf32_is_recorded_as_not_applicable_on_a_cpu():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is present")
    assert not nc.tf32_applies()


@pytest.mark.parametrize("flag", ["--crop=20,32,32", "--gn_shape=2,8,8,8", "--init_filters=12"])
def test_bad_flags_fail_in_one_line(flag):
    proc = subprocess.run(
        [sys.executable, "benchmarks/numerics_check.py", flag],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("numerics_check.py: error:"), proc.stderr
