"""brats_tf.optimizers.Adam (fused update kernel) against a NumPy Adam and Keras's Adam."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from brats_tf import optimizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_adam(weights, grads_per_step, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Kingma & Ba's Adam in float64, bias correction folded into the step size."""
    w = [x.astype(np.float64) for x in weights]
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            g = g.astype(np.float64)
            m[i] = beta_1 * m[i] + (1 - beta_1) * g
            v[i] = beta_2 * v[i] + (1 - beta_2) * g * g
            step = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
            w[i] = w[i] - step * m[i] / (np.sqrt(v[i]) + epsilon)
    return w


def _problem(seed=0, steps=4):
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=s).astype(np.float32) for s in [(3, 3, 3, 4, 8), (8,), (5,)]]
    grads = [[rng.normal(scale=10.0 ** rng.integers(-4, 2), size=w.shape).astype(np.float32)
              for w in weights] for _ in range(steps)]
    return weights, grads


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])  # xla: train.py --jit_compile
def test_fused_adam_equals_numpy_and_keras_adam(mode):
    weights, grads = _problem()
    results = {}
    for name, cls in [("fused", optimizers.Adam), ("keras", keras.optimizers.Adam)]:
        variables = [keras.Variable(w) for w in weights]
        opt = cls(learning_rate=3e-3)
        opt.build(variables)

        def apply(gs):
            opt.apply_gradients(zip(gs, variables))
        if mode != "eager":
            apply = tf.function(apply, autograph=False, jit_compile=mode == "xla")
        for gs in grads:
            apply([tf.constant(g) for g in gs])
        assert int(opt.iterations.numpy()) == len(grads)
        results[name] = [v.numpy() for v in variables]
    expected = numpy_adam(weights, grads, 3e-3)
    for fused, keras_w, ref, w0 in zip(results["fused"], results["keras"], expected, weights):
        np.testing.assert_allclose(fused, ref, rtol=1e-5, atol=1e-7)
        # Keras's formula, term by term: float32 rounding apart (weights ~1: ulp 1.2e-7).
        np.testing.assert_allclose(fused, keras_w, rtol=1e-6, atol=1e-6)
        # Four steps of size ~lr moved every weight well beyond the tolerance.
        assert np.min(np.abs(ref - w0)) > 1e-4


def test_fused_adam_graph_has_one_update_op_per_variable():
    weights, grads = _problem(steps=1)
    variables = [keras.Variable(w) for w in weights]
    opt = optimizers.Adam(learning_rate=1e-4)
    opt.build(variables)
    fn = tf.function(lambda gs: opt.apply_gradients(zip(gs, variables)), autograph=False)
    graph = fn.get_concrete_function([tf.constant(g) for g in grads[0]]).graph
    types = [op.type for op in graph.get_operations()]
    assert types.count("ResourceApplyAdam") == len(variables)
    assert types.count("Pow") == 2  # the bias corrections, once a step
    assert "AssignSubVariableOp" not in types


def test_amsgrad_takes_keras_update():
    weights, grads = _problem(steps=2)
    out = []
    for cls in (optimizers.Adam, keras.optimizers.Adam):
        variables = [keras.Variable(w) for w in weights]
        opt = cls(learning_rate=1e-2, amsgrad=True)
        for gs in grads:
            opt.apply_gradients(zip([tf.constant(g) for g in gs], variables))
        out.append([v.numpy() for v in variables])
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


def test_checkpoints_are_interchangeable_with_keras_adam(tmp_path):
    weights, grads = _problem(steps=2)
    variables = [keras.Variable(w) for w in weights]
    keras_adam = keras.optimizers.Adam(learning_rate=1e-3)
    for gs in grads:
        keras_adam.apply_gradients(zip([tf.constant(g) for g in gs], variables))
    path = tf.train.Checkpoint(optimizer=keras_adam).write(str(tmp_path / "ckpt"))
    fused = optimizers.Adam(learning_rate=1e-3)
    fused.build([keras.Variable(np.zeros_like(w)) for w in weights])
    tf.train.Checkpoint(optimizer=fused).read(path).assert_consumed()
    assert len(fused.variables) == len(keras_adam.variables)
    for a, b in zip(fused.variables, keras_adam.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    config = fused.get_config()
    again = keras.optimizers.deserialize(keras.optimizers.serialize(fused))
    assert type(again) is optimizers.Adam and again.get_config() == config


def test_inside_loss_scale_optimizer_skips_nonfinite_steps():
    weights, grads = _problem(steps=1)
    variables = [keras.Variable(w) for w in weights]
    opt = keras.optimizers.LossScaleOptimizer(optimizers.Adam(learning_rate=1e-3),
                                              initial_scale=1.0)
    fn = tf.function(lambda gs: opt.apply_gradients(zip(gs, variables)), autograph=False)
    bad = [tf.constant(g) for g in grads[0]]
    bad[0] = tf.tensor_scatter_nd_update(bad[0], [[0, 0, 0, 0, 0]], [np.inf])
    fn(bad)
    for v, w in zip(variables, weights):
        np.testing.assert_array_equal(v.numpy(), w)
    # The skipped step halved the loss scale: the next gradients count as
    # scaled by 0.5, i.e. twice these.
    assert float(opt.dynamic_scale) == 0.5
    fn([tf.constant(g) for g in grads[0]])
    expected = numpy_adam(weights, [[2 * g for g in grads[0]]], 1e-3)
    for v, ref in zip(variables, expected):
        np.testing.assert_allclose(v.numpy(), ref, rtol=1e-5, atol=1e-7)


_MIRRORED = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    import keras
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from brats_tf import optimizers
    from test_optimizers import _problem
    weights, grads = _problem(steps=3)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        variables = [keras.Variable(w) for w in weights]
        opt = optimizers.Adam(learning_rate=3e-3)
        opt.build(variables)

    @tf.function(autograph=False)
    def step(gs):
        def replica_fn(gs):
            # each replica holds half the gradient: the all-reduced sum is gs
            opt.apply_gradients(zip([g / 2 for g in gs], variables))
        strategy.run(replica_fn, args=(gs,))

    for gs in grads:
        step([tf.constant(g) for g in gs])
    copies = [[c.numpy().tolist() for c in strategy.experimental_local_results(v.value)]
              for v in variables]
    print(json.dumps({{"copies": copies, "iterations": int(opt.iterations.numpy())}}))
    """
)


def test_fused_adam_under_mirrored_strategy_updates_every_copy():
    script = _MIRRORED.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["iterations"] == 3
    weights, grads = _problem(steps=3)
    expected = numpy_adam(weights, grads, 3e-3)
    for copies, ref in zip(result["copies"], expected):
        assert len(copies) == 2
        for copy in copies:
            np.testing.assert_allclose(np.array(copy), ref, rtol=1e-5, atol=1e-7)
