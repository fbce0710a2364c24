"""The custom training loop: distribution scaling, loss scaling, resume, non-finite losses.

Strategies with several replicas run in subprocesses: the CPU is split into
two logical devices before TensorFlow initialises.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from benchmarks.reduced_precision import slack
from brats_tf import losses, training
from brats_tf.config import LossConfig, ModelConfig
from brats_tf.schedules import poly_lr

pytestmark = pytest.mark.heavy  # tests/conftest.py: scheduled first

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 16, 16)
# Two levels of one ResNet block each, not the paper's four (1, 2, 2, 4): the
# loop does not depend on the depth, and the graph to trace, most of a short
# run's time, is half as large (test_model.py tests the paper's network).
BLOCKS = dict(blocks_down=(1, 1), blocks_up=(1,))
TINY = ModelConfig(input_shape=SHAPE, init_filters=8, latent_dim=8, dropout=0.0, **BLOCKS)


def make_cases(n, seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n,) + shape + (4,)).astype(np.float32)
    labels = np.zeros((n,) + shape + (3,), np.float32)
    for i in range(n):
        c = rng.integers(4, 12, size=3)
        labels[i, c[0] - 3 : c[0] + 3, c[1] - 3 : c[1] + 3, c[2] - 3 : c[2] + 3, 0] = 1
        labels[i, c[0] - 1 : c[0] + 1, c[1] - 1 : c[1] + 1, c[2] - 1 : c[2] + 1, 1:] = 1
        images[i, ..., 3] += 2 * labels[i, ..., 0]
    return images, labels


def dataset_fn_for(images, labels, batch, shuffle=True, seed=0):
    def fn(ctx, epoch):
        ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        if shuffle:  # a different, reproducible order every epoch
            ds = ds.shuffle(len(images), seed=seed * 1000 + epoch)
        return ds.batch(batch)

    return fn


def sgd(lr):
    return keras.optimizers.SGD(learning_rate=lr)


def test_train_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="epochs must be a positive integer, got -1"):
        training.TrainConfig(model_dir=str(tmp_path), num_train_cases=2, epochs=-1)
    with pytest.raises(ValueError, match="strategy must be one of"):
        training.TrainConfig(model_dir=str(tmp_path), num_train_cases=2, strategy="tpu")
    with pytest.raises(ValueError, match="precision"):
        training.TrainConfig(model_dir=str(tmp_path), num_train_cases=2, precision="float16")
    with pytest.raises(ValueError, match="adam_epsilon must be > 0, got 0"):
        training.TrainConfig(model_dir=str(tmp_path), num_train_cases=2, adam_epsilon=0.0)


def test_adam_epsilon_reaches_the_optimizer():
    assert training.make_optimizer(1e-4, "float32").epsilon == 1e-7  # Keras' default
    assert training.make_optimizer(1e-4, "float32", epsilon=1e-4).epsilon == 1e-4
    wrapped = training.make_optimizer(1e-4, "mixed_float16", epsilon=1e-3)
    assert wrapped.inner_optimizer.epsilon == 1e-3


def test_one_sgd_step_matches_the_hand_written_gradient(tmp_path):
    """The loop's update is exactly -lr * grad(total loss + L2 reg) of the batch mean."""
    images, labels = make_cases(2)
    cfg = training.TrainConfig(
        model_dir=str(tmp_path),
        num_train_cases=2,
        epochs=1,
        initial_lr=0.1,
        batch_per_replica=2,
        verbose=False,
    )
    trainer = training.Trainer(
        TINY,
        LossConfig(l2_weight=0.0),
        cfg,
        dataset_fn_for(images, labels, 2, shuffle=False),
        optimizer_fn=sgd,
    )
    model = trainer.model
    w0 = [w.numpy() for w in model.trainable_variables]
    with tf.GradientTape() as tape:
        out = model(images, training=True)
        terms = losses.total_loss(labels, images, out, LossConfig(l2_weight=0.0))
        loss = tf.reduce_mean(terms["loss"]) + tf.add_n(model.losses)
    grads = tape.gradient(loss, model.trainable_variables)
    history = trainer.train()
    for w, g, var in zip(w0, grads, model.trainable_variables):
        np.testing.assert_allclose(var.numpy(), w - 0.1 * g.numpy(), rtol=1e-4, atol=1e-6)
    assert history[0]["lr"] == pytest.approx(0.1)
    assert history[0]["loss"] == pytest.approx(float(tf.reduce_mean(terms["loss"])), rel=1e-5)
    # Per-region training Dice of the step's (pre-update) predictions, by hand.
    seg = out["seg"].numpy() > 0.5
    truth = labels > 0.5
    for c, region in enumerate(("WT", "TC", "ET")):
        per_case = [
            2
            * np.sum(seg[i, ..., c] & truth[i, ..., c])
            / max(np.sum(seg[i, ..., c]) + np.sum(truth[i, ..., c]), 1)
            for i in range(2)
        ]
        assert history[0][f"dice_{region}"] == pytest.approx(np.mean(per_case), abs=1e-6)


_MIRRORED = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    import keras
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from test_training import TINY, dataset_fn_for, make_cases, sgd
    from brats_tf import training
    from brats_tf.config import LossConfig
    images, labels = make_cases(2)
    results = {{}}
    init = None
    for name, strategy, per_replica in [
        ("single", tf.distribute.OneDeviceStrategy("/cpu:0"), 2),
        ("mirrored", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), 1),
    ]:
        cfg = training.TrainConfig(model_dir=os.path.join({tmp!r}, name), num_train_cases=2,
                                   epochs=1, initial_lr=0.5, batch_per_replica=per_replica,
                                   verbose=False)
        # l2_weight 0: the VAE's random draw differs between the two layouts;
        # the Dice, KL and weight-regularisation gradients do not.
        trainer = training.Trainer(TINY, LossConfig(l2_weight=0.0), cfg,
                                   dataset_fn_for(images, labels, per_replica, shuffle=False),
                                   strategy=strategy, optimizer_fn=sgd)
        if init is None:
            init = trainer.model.get_weights()
        else:
            trainer.model.set_weights(init)
        assert trainer.strategy.num_replicas_in_sync == (1 if name == "single" else 2)
        summary = trainer.train()[0]
        np.savez(os.path.join({tmp!r}, name + ".npz"), *trainer.model.get_weights())
        results[name] = [summary[k] for k in ("loss", "dice_WT", "dice_TC", "dice_ET")]
    np.savez(os.path.join({tmp!r}, "init.npz"), *init)
    print(json.dumps(results))
    """
)


def test_mirrored_two_replicas_equal_one_device_with_the_global_batch(tmp_path):
    script = _MIRRORED.format(root=ROOT, tests=os.path.join(ROOT, "tests"), tmp=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    # Same loss and the same per-region training Dice (Keras metrics summed
    # over the replicas).
    assert results["single"] == pytest.approx(results["mirrored"], rel=1e-5)
    single = np.load(tmp_path / "single.npz")
    mirrored = np.load(tmp_path / "mirrored.npz")
    init = np.load(tmp_path / "init.npz")
    moved = 0.0
    for key in single.files:
        np.testing.assert_allclose(mirrored[key], single[key], rtol=1e-5, atol=1e-6)
        moved = max(moved, float(np.max(np.abs(single[key] - init[key]))))
    # The step moved the weights far more than the tolerance: a summed
    # (2x) gradient on the two replicas would fail the comparison above.
    assert moved > 1e-3


def _apply_one_update(trainer):
    """Repeats the one-step epoch until the inner optimizer has applied one
    update (a step whose scaled gradients overflow is skipped)."""
    while (
        int(getattr(trainer.optimizer, "inner_optimizer", trainer.optimizer).iterations.numpy()) < 1
    ):
        trainer.epoch.assign(0)
        trainer.train()
        trainer.history.clear()
        if trainer.optimizer.iterations.numpy() > 8:
            pytest.fail("mixed_float16: no finite step in 8 tries")


def test_mixed_float16_scales_the_loss(tmp_path):
    """Under mixed_float16 the SGD update matches float32's; unscaled float16
    gradients would underflow or be divided by the loss scale (32768). Under
    mixed_bfloat16 (float32's exponent range: no loss scaling) as well (the
    coarsest level is 16 x 8 x 8 here; 2 deep, oneDNN's bfloat16 kernel
    gradient is wrong on CPUs with AVX512-BF16 and no AMX:
    test_mixed_bfloat16_is_refused_where_onednn_is_wrong)."""
    shape = (32, 16, 16)
    model_config = ModelConfig(**{**TINY.__dict__, "input_shape": shape})
    images, labels = make_cases(1, shape=shape)
    deltas = {}
    init = None
    for precision in ("float32", "mixed_float16", "mixed_bfloat16"):
        cfg = training.TrainConfig(
            model_dir=str(tmp_path / precision),
            num_train_cases=1,
            epochs=1,
            initial_lr=0.5,
            precision=precision,
            verbose=False,
        )
        trainer = training.Trainer(
            model_config,
            LossConfig(l2_weight=0.0),
            cfg,
            dataset_fn_for(images, labels, 1),
            optimizer_fn=sgd,
        )
        if init is None:
            init = trainer.model.get_weights()
        else:
            trainer.model.set_weights(init)
        if precision == "mixed_float16":
            assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
            assert float(trainer.optimizer.dynamic_scale) == 2.0**15
        else:
            assert not isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
        _apply_one_update(trainer)
        deltas[precision] = [w - w0 for w, w0 in zip(trainer.model.get_weights(), init)]
    keras.mixed_precision.set_global_policy("float32")
    d32 = np.concatenate([d.ravel() for d in deltas["float32"]])
    for precision in ("mixed_float16", "mixed_bfloat16"):
        d16 = np.concatenate([d.ravel() for d in deltas[precision]])
        # Same update up to float16 (bfloat16) rounding: same direction and
        # size. Without scale_loss the float16 update would be ~32768x smaller
        # (or zero).
        cosine = float(d32 @ d16 / (np.linalg.norm(d32) * np.linalg.norm(d16)))
        # measured 0.9993 and 0.993 on a Xeon, 0.9767 (bfloat16) on an AVX2 EPYC;
        # this network's bfloat16 rounding alone (float32 with every activation,
        # gradient and weight rounded to bfloat16) gives 1 - cosine of 1-3e-3.
        assert 1 - cosine < 0.02 * slack(precision.split("_")[1]), (precision, cosine)
        assert 0.8 < np.linalg.norm(d16) / np.linalg.norm(d32) < 1.25, precision


def test_mixed_bfloat16_is_refused_where_onednn_is_wrong(tmp_path):
    """A coarsest level 2 voxels deep (crop depth 16 for 4 levels) in
    mixed_bfloat16 is refused before anything is built; float32 and
    mixed_float16 train there."""
    four = ModelConfig(**{**TINY.__dict__, "blocks_down": (1, 1, 1, 1), "blocks_up": (1, 1, 1)})
    cfg = training.TrainConfig(
        model_dir=str(tmp_path), num_train_cases=1, precision="mixed_bfloat16", verbose=False
    )
    images, labels = make_cases(1)
    with pytest.raises(ValueError, match="crop depth of 16 .* at least 24"):
        training.Trainer(four, LossConfig(), cfg, dataset_fn_for(images, labels, 1))
    training.check_precision_for_model(four, "mixed_float16")
    deeper = ModelConfig(**{**four.__dict__, "input_shape": (32, 16, 16)})
    training.check_precision_for_model(deeper, "mixed_bfloat16")
    training.check_precision_for_model(TINY, "mixed_bfloat16")  # 2 levels: 8 deep


def test_nonfinite_loss_stops_with_the_step_or_is_skipped(tmp_path):
    images, labels = make_cases(2)
    images[1, 0, 0, 0, 0] = np.nan
    cfg = training.TrainConfig(
        model_dir=str(tmp_path / "stop"), num_train_cases=2, epochs=1, verbose=False
    )
    trainer = training.Trainer(
        TINY, LossConfig(), cfg, dataset_fn_for(images, labels, 1, shuffle=False)
    )
    with pytest.raises(training.NonFiniteLossError, match=r"epoch 1, step 2"):
        trainer.train()
    assert not os.path.exists(tmp_path / "stop" / "checkpoints" / "checkpoint")
    cfg = training.TrainConfig(
        model_dir=str(tmp_path / "skip"),
        num_train_cases=2,
        epochs=1,
        on_nonfinite="skip",
        verbose=False,
    )
    trainer = training.Trainer(
        TINY, LossConfig(), cfg, dataset_fn_for(images, labels, 1, shuffle=False)
    )
    summary = trainer.train()[0]
    assert summary["skipped_steps"] == 1
    assert all(np.all(np.isfinite(w)) for w in trainer.model.get_weights())


class _Crash(Exception):
    pass


def test_resume_after_a_crash_reaches_the_uninterrupted_weights(tmp_path):
    images, labels = make_cases(3, seed=1)
    model_cfg = ModelConfig(input_shape=SHAPE, init_filters=8, latent_dim=8, **BLOCKS)  # dropout on

    def run(model_dir, crash_after=None):
        def epoch_end(trainer, epoch, summary):
            if crash_after is not None and epoch + 1 == crash_after:
                raise _Crash()
            return {}

        cfg = training.TrainConfig(
            model_dir=str(model_dir),
            num_train_cases=3,
            epochs=3,
            initial_lr=1e-3,
            seed=7,
            deterministic=True,
            verbose=False,
        )
        return training.Trainer(
            model_cfg,
            LossConfig(),
            cfg,
            dataset_fn_for(images, labels, 1, seed=7),
            epoch_end_fn=epoch_end,
        )

    straight = run(tmp_path / "a")
    history = straight.train()
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["lr"] for h in history] == pytest.approx([poly_lr(e, 1e-3, 3, 0.9) for e in range(3)])
    with pytest.raises(_Crash):  # during epoch 2, before its checkpoint
        run(tmp_path / "b", crash_after=2).train()
    resumed = run(tmp_path / "b")
    assert resumed.restore() == 1
    rest = resumed.train()
    assert [h["epoch"] for h in rest] == [2, 3]
    assert rest[1]["loss"] == pytest.approx(history[2]["loss"], rel=1e-6)
    saved = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [h["epoch"] for h in saved] == [1, 2, 3]
    for a, b in zip(straight.model.get_weights(), resumed.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(resumed.optimizer.iterations.numpy()) == 9


_WORKER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from brats_tf import training
    strategy = training.make_strategy("multi_worker")  # before any other TF op
    import numpy as np
    from test_training import TINY, dataset_fn_for, make_cases
    from brats_tf.config import LossConfig
    images, labels = make_cases(4, seed=3)
    cfg = training.TrainConfig(model_dir={model_dir!r}, num_train_cases=4, epochs=2,
                               initial_lr=1e-3, seed=5, verbose=False)
    trainer = training.Trainer(TINY, LossConfig(), cfg, dataset_fn_for(images, labels, 1, seed=5),
                               strategy=strategy)
    assert trainer.strategy.num_replicas_in_sync == 2
    history = trainer.train()
    assert [h["epoch"] for h in history] == [1, 2], history
    np.savez({out!r}, *trainer.model.get_weights())
    print("worker done", trainer.is_chief, trainer.optimizer.iterations.numpy())
    """
)


def _free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_multi_worker_two_local_workers_end_with_identical_weights(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        script = _WORKER.format(
            root=ROOT,
            tests=os.path.join(ROOT, "tests"),
            model_dir=str(tmp_path / "run"),
            out=str(tmp_path / f"w{index}.npz"),
        )
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            ),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300))
    finally:
        for proc in procs:
            proc.kill()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
        assert "worker done" in out
    w0, w1 = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    for key in w0.files:
        np.testing.assert_array_equal(w0[key], w1[key])
    # Only the chief (worker 0) keeps checkpoints, in model_dir/checkpoints.
    assert (tmp_path / "run" / "checkpoints" / "checkpoint").exists()
    assert not list((tmp_path / "run").glob(".worker_*"))


def test_epoch_iterators_are_destroyed_off_the_main_thread():
    """Destroying a used epoch iterator can block for seconds; the Trainer
    leaves it to a background thread (trainer._release_in_background)."""
    import threading

    from brats_tf.training.trainer import _release_in_background

    destroyed = []
    done = threading.Event()

    class Probe:
        def __del__(self):
            destroyed.append(threading.current_thread())
            done.set()

    holder = [Probe()]
    thread = _release_in_background(holder)
    thread.join(10)
    assert done.is_set() and not thread.daemon
    assert destroyed and destroyed[0] is not threading.main_thread()
    assert holder == []


def test_unlearned_regions_by_hand():
    from brats_tf.training import UNLEARNED_DICE, unlearned_regions

    assert UNLEARNED_DICE == 0.1
    assert unlearned_regions({"epoch": 60, "dice_WT": 0.95, "dice_TC": 0.002, "dice_ET": 0.1}) == {
        "TC": 0.002
    }  # 0.1 itself is learned
    assert unlearned_regions({"dice_WT": 0.05, "dice_TC": 0.5, "dice_ET": 0.0099}) == {
        "WT": 0.05,
        "ET": 0.0099,
    }
    assert unlearned_regions({"epoch": 3, "loss": 1.0}) == {}  # no Dice recorded: nothing
    assert unlearned_regions({"dice_WT": 0.5, "dice_TC": 0.5, "dice_ET": 0.2}, 0.3) == {"ET": 0.2}
