"""The feature spec's helpers: byte planes, serialisation checks, spec versions."""

import numpy as np
import oracles
import pytest
import tensorflow as tf

from data_pipeline import features


@pytest.mark.parametrize(
    "dtype,extremes",
    [
        (np.int16, [-32768, 32767, -1, 0, 1, 255, 256, -256]),
        (np.float32, [-0.0, np.inf, -np.inf, 1e-38, -3.4e38, 0.1, 1.5, 65536.0]),
    ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_byte_planes_round_trip_exact(dtype, extremes, jit):
    x = np.random.default_rng(0).normal(0, 3000, (3, 4, 5, 4)).astype(dtype)
    x.flat[: len(extremes)] = extremes
    planes = features.to_byte_planes(x)
    assert planes.dtype == np.uint8 and planes.shape == (x.itemsize,) + x.shape
    np.testing.assert_array_equal(planes[0], x.view(np.uint8).reshape(x.shape + (-1,))[..., 0])
    decode = tf.function(
        lambda p: features.from_byte_planes(p, tf.as_dtype(dtype)), jit_compile=jit
    )
    np.testing.assert_array_equal(decode(tf.constant(planes)).numpy(), x.astype(np.float32))


def test_serialize_rejects_bad_arrays():
    image = np.ones((4, 4, 4, 4), np.int16)
    with pytest.raises(ValueError, match="float64"):
        features.serialize_example(
            "c", image.astype(np.float64), None, (4, 4, 4), np.eye(4), (0, 0, 0)
        )
    with pytest.raises(ValueError, match=r"\(4, 4, 4, 3\)"):
        features.serialize_example("c", image[..., :3], None, (4, 4, 4), np.eye(4), (0, 0, 0))
    with pytest.raises(ValueError, match="does not match"):
        features.serialize_example(
            "c", image, np.zeros((4, 4, 3), np.uint8), (4, 4, 4), np.eye(4), (0, 0, 0)
        )


def test_examples_of_another_spec_version_are_refused():
    image = np.ones((4, 4, 4, 4), np.int16)
    record = features.serialize_example("c", image, None, (4, 4, 4), np.eye(4), (0, 0, 0))
    ex = tf.train.Example.FromString(record)
    del ex.features.feature["spec_version"]  # as written by feature spec version 1
    with pytest.raises(tf.errors.InvalidArgumentError, match="reconvert"):
        oracles.parse_example(tf.constant(ex.SerializeToString()))
    np.testing.assert_array_equal(
        oracles.parse_example(tf.constant(record))["image"].numpy(), image
    )
