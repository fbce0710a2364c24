"""Bounds of reduced-precision (float16 / bfloat16) comparisons with float32
that hold on every CPU TensorFlow runs on here: a measurement of this CPU,
used by benchmarks/numerics_check.py and by the tests' bounds."""

_SLACK = {}


def slack(dtype: str) -> float:
    """How much looser the bounds of a float16 / bfloat16 comparison with
    float32 must be on this CPU: 1 where TensorFlow's 3-D convolution in
    ``dtype`` accumulates in float32 (its error is that of rounding the
    output; the bounds of the tests were set on AVX-512 Xeons), 2.5 where it
    accumulates in ``dtype`` itself (Eigen's kernels on an AVX2-only AMD EPYC:
    the 864-term conv3d below errs by 19x (bfloat16) and 15x (float16) the
    output's rounding, and a tiny network's probabilities differ from
    float32's about twice as much as on the Xeons, mean and maximum).
    Measured here, once per dtype, on a conv3d of inputs already in
    ``dtype`` against float64 on the same inputs."""
    if dtype not in _SLACK:
        import numpy as np
        import tensorflow as tf

        rng = np.random.default_rng(0)
        x = tf.cast(rng.normal(size=(1, 8, 8, 8, 32)).astype(np.float32), dtype)
        k = tf.cast((rng.normal(size=(3, 3, 3, 32, 32)) / np.sqrt(864)).astype(np.float32), dtype)
        with tf.device("CPU:0"):
            got = tf.cast(tf.nn.conv3d(x, k, [1] * 5, "SAME"), tf.float64).numpy()
            want = tf.nn.conv3d(
                tf.cast(x, tf.float64), tf.cast(k, tf.float64), [1] * 5, "SAME"
            ).numpy()
            rounding = np.abs(tf.cast(tf.cast(want, dtype), tf.float64).numpy() - want).max()
        _SLACK[dtype] = 1.0 if np.abs(got - want).max() <= 3 * rounding else 2.5
    return _SLACK[dtype]
