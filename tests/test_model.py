"""The assembled network: shapes, Table 1 parameter counts, weight sharing, saving, training."""

import dataclasses
import functools
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from benchmarks.reduced_precision import slack
from brats_tf import losses
from brats_tf.config import LossConfig, ModelConfig
from brats_tf.layers import GroupNorm, ResNetBlock
from brats_tf.model import build_inference_model, build_model, config_from_model, model_precision
from brats_tf.recompute import RecomputedResNetBlock
from brats_tf.training import make_train_step

pytestmark = pytest.mark.heavy  # tests/conftest.py: scheduled first

TINY = ModelConfig(input_shape=(32, 32, 32), init_filters=8, latent_dim=16, seed=0)


@pytest.fixture(scope="module")
def paper_model():
    return build_model(ModelConfig())


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(0)
    return build_model(TINY)


# ------------------------------------------------ Table 1, counted by hand
def conv(k, cin, cout):  # kernel + bias
    return k**3 * cin * cout + cout


def gn(c):  # gamma + beta
    return 2 * c


def block(c):  # GN, ReLU, Conv3, GN, ReLU, Conv3 (+ identity, no weights)
    return 2 * gn(c) + 2 * conv(3, c, c)


def dense(n_in, n_out):
    return n_in * n_out + n_out


# The paper's Table 1 with the paper's sizes: input 4 x 160x192x128, 32 filters.
VD_GRID = 16 * 10 * 12 * 8  # VD output: 16 channels x 10x12x8
PAPER_STAGES = {
    "InitConv": conv(3, 4, 32),
    "EncoderBlock0_0": block(32),
    "EncoderDown1": conv(3, 32, 64),
    "EncoderBlock1_0": block(64),
    "EncoderBlock1_1": block(64),
    "EncoderDown2": conv(3, 64, 128),
    "EncoderBlock2_0": block(128),
    "EncoderBlock2_1": block(128),
    "EncoderDown3": conv(3, 128, 256),
    **{f"EncoderBlock3_{i}": block(256) for i in range(4)},
    "DecoderUp2_Conv1": conv(1, 256, 128),
    "DecoderBlock2_0": block(128),
    "DecoderUp1_Conv1": conv(1, 128, 64),
    "DecoderBlock1_0": block(64),
    "DecoderUp0_Conv1": conv(1, 64, 32),
    "DecoderBlock0_0": block(32),
    "DecoderEnd_Conv1": conv(1, 32, 3),
    "VD_GN": gn(256),
    "VD_Conv": conv(3, 256, 16),
    "VD_Dense": dense(VD_GRID, 256),
    "VU_Dense": dense(128, VD_GRID),
    "VU_Conv1": conv(1, 16, 256),
    "VUp2_Conv1": conv(1, 256, 128),
    "VBlock2_0": block(128),
    "VUp1_Conv1": conv(1, 128, 64),
    "VBlock1_0": block(64),
    "VUp0_Conv1": conv(1, 64, 32),
    "VBlock0_0": block(32),
    "Vend": conv(1, 32, 4),
}


def test_paper_parameter_counts_per_stage(paper_model):
    counted = {layer.name: layer.count_params() for layer in paper_model.layers if layer.weights}
    assert counted == PAPER_STAGES
    assert paper_model.count_params() == sum(PAPER_STAGES.values())


# The paper's Table 1 "output" column, channels last.
PAPER_SHAPES = {
    "InitConv": (160, 192, 128, 32),
    "EncoderBlock0_0": (160, 192, 128, 32),
    "EncoderBlock1_1": (80, 96, 64, 64),
    "EncoderBlock2_1": (40, 48, 32, 128),
    "EncoderBlock3_3": (20, 24, 16, 256),
    "DecoderUp2_Add": (40, 48, 32, 128),
    "DecoderBlock2_0": (40, 48, 32, 128),
    "DecoderUp1_Add": (80, 96, 64, 64),
    "DecoderBlock0_0": (160, 192, 128, 32),
    "DecoderEnd_Sigmoid": (160, 192, 128, 3),
    "VD_Conv": (10, 12, 8, 16),
    "VD_Dense": (256,),
    "VU_Reshape": (10, 12, 8, 16),
    "VU_Upsample": (20, 24, 16, 256),
    "VUp2_Upsample": (40, 48, 32, 128),
    "VBlock2_0": (40, 48, 32, 128),
    "VBlock1_0": (80, 96, 64, 64),
    "VBlock0_0": (160, 192, 128, 32),
    "Vend": (160, 192, 128, 4),
}


@pytest.mark.parametrize("name", sorted(PAPER_SHAPES))
def test_paper_stage_output_shapes(paper_model, name):
    assert tuple(paper_model.get_layer(name).output.shape[1:]) == PAPER_SHAPES[name]


def test_paper_outputs(paper_model):
    out = paper_model.output
    assert set(out) == {"seg", "recon", "z_mean", "z_log_var"}
    assert tuple(out["seg"].shape) == (None, 160, 192, 128, 3)
    assert tuple(out["recon"].shape) == (None, 160, 192, 128, 4)
    assert tuple(out["z_mean"].shape) == tuple(out["z_log_var"].shape) == (None, 128)
    assert paper_model.get_layer("VDraw").output[0].shape[-1] == 128
    assert paper_model.get_layer("InitDropout").rate == pytest.approx(0.2)
    norms = [layer for layer in paper_model._flatten_layers() if isinstance(layer, GroupNorm)]
    assert len(norms) == 2 * 15 + 1  # two per ResNet block, one in VD
    assert all(layer.groups == 8 for layer in norms)


def test_paper_l2_on_every_conv_kernel_and_nothing_else(paper_model):
    convs = [
        layer for layer in paper_model._flatten_layers() if isinstance(layer, keras.layers.Conv3D)
    ]
    # InitConv, EncoderDown x3, DecoderUp x3, DecoderEnd, VD, VU, VUp x3, Vend,
    # and two in each of the 15 ResNet blocks (9 encoder, 3 decoder, 3 VAE).
    assert len(convs) == 14 + 2 * 15
    for layer in convs:
        assert layer.kernel_regularizer is not None
        assert layer.kernel_regularizer.l2 == pytest.approx(1e-5)
        assert layer.bias_regularizer is None
    dense = [layer for layer in paper_model.layers if isinstance(layer, keras.layers.Dense)]
    assert all(layer.kernel_regularizer is None for layer in dense)
    assert len(paper_model.losses) == len(convs)


def test_no_skip_connection_into_the_vae(paper_model):
    """Walk back from Vend: the only encoder layer reached is the endpoint."""
    seen, stack = set(), [paper_model.get_layer("Vend")]
    while stack:
        layer = stack.pop()
        if layer.name in seen:
            continue
        seen.add(layer.name)
        for node in layer._inbound_nodes:
            for t in node.input_tensors:
                stack.append(t._keras_history.operation)
    assert not any(n.startswith("Decoder") for n in seen)
    assert "EncoderBlock3_3" in seen
    # The VAE reaches the finer encoder levels only through the endpoint:
    # no VAE layer takes an encoder level's output directly.
    for name in seen:
        if name.startswith("V"):
            layer = paper_model.get_layer(name)
            for node in layer._inbound_nodes:
                for t in node.input_tensors:
                    src = t._keras_history.operation.name
                    assert not src.startswith(("EncoderBlock0", "EncoderBlock1", "EncoderBlock2"))


# ------------------------------------------------------------- tiny model
def test_tiny_forward_shapes_and_dtypes(tiny_model):
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 32, 4)).astype(np.float32)
    out = tiny_model(x)
    assert out["seg"].shape == (2, 32, 32, 32, 3) and out["seg"].dtype == tf.float32
    assert out["recon"].shape == (2, 32, 32, 32, 4)
    assert out["z_mean"].shape == (2, 16)
    seg = out["seg"].numpy()
    assert np.all((seg > 0) & (seg < 1))


def test_inference_model_shares_weights_and_takes_any_divisible_size(tiny_model):
    inf = build_inference_model(tiny_model)
    assert {id(v) for v in inf.weights} <= {id(v) for v in tiny_model.weights}
    assert "Vend" not in [layer.name for layer in inf.layers]
    x = np.random.default_rng(1).normal(size=(1, 32, 32, 32, 4)).astype(np.float32)
    np.testing.assert_allclose(
        inf(x)["seg"].numpy(), tiny_model(x, training=False)["seg"].numpy(), atol=1e-6
    )
    # A change to a weight of one model is a change to the other.
    kernel = tiny_model.get_layer("DecoderEnd_Conv1").kernel
    old = kernel.numpy()
    kernel.assign(old + 0.5)
    changed = inf(x)["seg"].numpy()
    kernel.assign(old)
    np.testing.assert_allclose(changed, tiny_model(x, training=False)["seg"].numpy() * 0 + changed)
    assert not np.allclose(changed, inf(x)["seg"].numpy())
    odd = np.random.default_rng(2).normal(size=(1, 24, 40, 16, 4)).astype(np.float32)
    assert inf(odd)["seg"].shape == (1, 24, 40, 16, 3)


@pytest.mark.parametrize(
    "precision,dtype", [("mixed_bfloat16", "bfloat16"), ("mixed_float16", "float16")]
)
def test_inference_model_in_another_precision_has_a_copy_of_the_weights(
    tiny_model, precision, dtype
):
    x = np.random.default_rng(5).normal(size=(1, 16, 24, 32, 4)).astype(np.float32)
    same = build_inference_model(tiny_model)
    want = same(x)["seg"].numpy()
    other = build_inference_model(tiny_model, precision=precision)
    # The source model and the global policy are untouched.
    assert keras.mixed_precision.global_policy().name == "float32"
    assert model_precision(tiny_model) == "float32" and model_precision(other) == precision
    for name in ("InitConv", "EncoderBlock0_0", "DecoderUp0_Upsample", "DecoderEnd_Conv1"):
        assert other.get_layer(name).compute_dtype == dtype, name
        assert tiny_model.get_layer(name).compute_dtype == "float32", name
    assert other.get_layer("DecoderEnd_Sigmoid").compute_dtype == "float32"
    # A copy: the same values (float32 variables), no shared variable.
    assert not {id(v) for v in other.weights} & {id(v) for v in tiny_model.weights}
    assert len(other.weights) == len(same.weights)
    for layer in other.layers:
        for a, b in zip(layer.weights, tiny_model.get_layer(layer.name).weights):
            assert a.dtype == "float32"
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=layer.name)
    got = other(x)["seg"]
    assert got.dtype == tf.float32
    diff = np.abs(got.numpy() - want)
    # Computed in 8 (bfloat16) or 11 (float16) significant bits: close to
    # float32's probabilities, not equal to them (looser on CPUs whose
    # convolutions accumulate in the low precision: benchmarks/reduced_precision.py).
    loose = slack(dtype)
    assert 0 < diff.max() < (0.06 if dtype == "bfloat16" else 0.01) * loose, diff.max()
    assert diff.mean() < (0.01 if dtype == "bfloat16" else 1e-3) * loose, diff.mean()
    # Back to float32: float32's output again.
    back = build_inference_model(other, precision="float32")
    np.testing.assert_allclose(back(x)["seg"].numpy(), want, atol=1e-6)
    with pytest.raises(ValueError, match="precision must be one of"):
        build_inference_model(tiny_model, precision="float16")


def test_inference_model_rejects_sizes_not_divisible_by_8(tiny_model):
    with pytest.raises(ValueError, match=r"240x240x155 is not divisible by 8"):
        build_inference_model(tiny_model, (240, 240, 155))
    inf = build_inference_model(tiny_model)
    with pytest.raises(tf.errors.InvalidArgumentError, match="divisible by 8"):
        inf(np.zeros((1, 16, 16, 12, 4), np.float32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_shape=(160, 192, 120)), r"divisible by 16.*\[120\]"),
        (dict(input_shape=(160, 192)), "input_shape"),
        (dict(init_filters=12), "not divisible by groups=8"),
        (dict(blocks_up=(1, 1)), "blocks_up"),
        (dict(dropout=1.0), "dropout"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(l2_weight=-1.0), "weight_decay"),  # its earlier name (config.json of earlier runs)
        (dict(weight_decay=2e-5, l2_weight=3e-5), "earlier name l2_weight"),
        (dict(latent_dim=0), "latent_dim"),
        (dict(head_kernel_init="he_normal"), "head_kernel_init.*'he_normal'"),
        (dict(head_bias_init=float("nan")), "head_bias_init.*nan"),
        (dict(head_bias_init=True), "head_bias_init"),
        (dict(head_kernel_std=0.0), "head_kernel_std.*0.0"),
        (dict(head_lr_multiplier=0.0), "head_lr_multiplier.*0.0"),
        (dict(head_lr_multiplier=float("nan")), "head_lr_multiplier.*nan"),
        (dict(head_lr_multiplier=2000.0), "head_lr_multiplier"),
        (dict(head_lr_multiplier=True), "head_lr_multiplier"),
    ],
)
def test_model_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_a_config_json_of_an_earlier_run_still_loads(tmp_path):
    """Runs before ModelConfig.weight_decay had its name wrote it as
    "l2_weight" into config.json: evaluation builds their checkpoints' network
    from it with that L2 weight on the kernels, and the config reads back
    with today's name only."""
    from brats_tf import evaluation

    config = ModelConfig(**{**TINY.__dict__, "weight_decay": 3e-5})
    saved = {k: list(v) if isinstance(v, tuple) else v for k, v in config.__dict__.items()}
    saved["l2_weight"] = saved.pop("weight_decay")
    assert ModelConfig(**saved) == config and "l2_weight" not in dataclasses.asdict(config)
    keras.utils.set_random_seed(0)
    model = build_model(config)
    tf.train.Checkpoint(model=model).save(str(tmp_path / "checkpoints" / "ckpt"))
    (tmp_path / "config.json").write_text(json.dumps({"model": saved}, indent=2))
    loaded = evaluation.load_model(str(tmp_path))
    assert loaded.kind == "checkpoint"
    blocks = [layer for layer in loaded.model.layers if isinstance(layer, ResNetBlock)]
    assert blocks and {block.l2_weight for block in blocks} == {3e-5}
    image = np.random.default_rng(0).normal(size=(1, 16, 16, 16, 4)).astype(np.float32)
    want = build_inference_model(model)(image)["seg"]
    np.testing.assert_allclose(loaded.model(image)["seg"], want, atol=1e-6)


def test_config_without_vae_needs_only_divisibility_by_8():
    model = build_model(ModelConfig(input_shape=(24, 40, 8), init_filters=8, vae=False))
    assert set(model.output) == {"seg"}


def test_segmentation_head_initialisation_options():
    """Default: Glorot-uniform kernel (|w| <= sqrt(6 / (fan_in + fan_out))),
    zero bias, logits spread over the volume. normal (std 0.01) with a bias b:
    kernel std 0.01, every voxel's probability within 0.01 of sigmoid(b)."""
    shape = (16, 16, 16)
    image = np.random.default_rng(0).normal(size=(1,) + shape + (4,)).astype(np.float32)
    keras.utils.set_random_seed(1)
    default = build_model(ModelConfig(input_shape=shape, init_filters=8, latent_dim=8))
    kernel, bias = default.get_layer("DecoderEnd_Conv1").get_weights()
    assert np.abs(kernel).max() <= np.sqrt(6 / (8 + 3)) and np.abs(kernel).std() > 0.1
    assert np.all(bias == 0)
    assert np.std(default(image)["seg"].numpy()) > 0.05
    keras.utils.set_random_seed(1)
    prior = build_model(
        ModelConfig(
            input_shape=shape,
            init_filters=8,
            latent_dim=8,
            head_kernel_init="normal",
            head_bias_init=-4.6,
        )
    )
    kernel, bias = prior.get_layer("DecoderEnd_Conv1").get_weights()
    assert 0.004 < kernel.std() < 0.02
    np.testing.assert_array_equal(bias, np.float32(-4.6))
    seg = prior(image)["seg"].numpy()
    np.testing.assert_allclose(seg, 1 / (1 + np.exp(4.6)), atol=0.01)
    wider = build_model(
        ModelConfig(
            input_shape=shape,
            init_filters=8,
            latent_dim=8,
            head_kernel_init="normal",
            head_kernel_std=0.3,
        )
    )
    assert 0.15 < wider.get_layer("DecoderEnd_Conv1").get_weights()[0].std() < 0.5


def test_head_lr_multiplier_is_the_same_function_whose_head_learns_faster(tmp_path):
    """head_lr_multiplier m: the head's stored kernel and bias are the
    effective ones divided by m (the model computes the same function), and
    Adam's first step, lr * g / (|g| + eps / sqrt(1 - beta_2)) in Keras, about
    lr * sign(g) where |g| >> 3e-6, moves the effective head weights m times
    as far while every other weight moves as with m = 1."""
    m, lr, shape = 10.0, 1e-3, (16, 16, 16)
    base = dict(
        input_shape=shape, init_filters=8, latent_dim=8, vae=False, dropout=0.0, weight_decay=0.0
    )
    keras.utils.set_random_seed(2)
    plain = build_model(ModelConfig(**base))
    keras.utils.set_random_seed(2)
    fast = build_model(ModelConfig(**base, head_lr_multiplier=m))
    stored = fast.get_layer("DecoderEnd_Conv1").get_weights()[0]
    # the effective kernel starts as Glorot-uniform's (bound sqrt(6 / (8 + 3)))
    assert np.abs(stored).max() * m <= np.sqrt(6 / 11) and np.abs(stored).std() * m > 0.1
    for layer in plain.layers:
        if layer.weights:
            fast.get_layer(layer.name).set_weights(layer.get_weights())
    kernel, bias = plain.get_layer("DecoderEnd_Conv1").get_weights()
    fast.get_layer("DecoderEnd_Conv1").set_weights([kernel / m, bias / m])
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1,) + shape + (4,)).astype(np.float32)
    target = (rng.random((1,) + shape + (3,)) < 0.3).astype(np.float32)
    np.testing.assert_allclose(fast(image)["seg"], plain(image)["seg"], atol=1e-6)

    def one_adam_step(model):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((model(image, training=True)["seg"] - target) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        before = {v.path: v.numpy() for v in model.trainable_variables}
        keras.optimizers.Adam(lr).apply_gradients(zip(grads, model.trainable_variables))
        grads = {v.path: g.numpy() for v, g in zip(model.trainable_variables, grads)}
        return {v.path: v.numpy() - before[v.path] for v in model.trainable_variables}, grads

    moved_plain, grads = one_adam_step(plain)
    moved_fast, _ = one_adam_step(fast)
    for path, delta in moved_plain.items():
        big = np.abs(grads[path]) > 1e-3  # where eps is negligible: a step of lr
        if path.startswith("DecoderEnd_Conv1/"):  # stored * m: the effective weights
            assert big.mean() > 0.5, path
            effective = moved_fast[path][big] * m
            np.testing.assert_allclose(effective, m * delta[big], rtol=1e-2)
            np.testing.assert_allclose(np.abs(effective), m * lr, rtol=1e-2)
        else:
            np.testing.assert_allclose(moved_fast[path][big], delta[big], rtol=1e-2, atol=1e-7)
    # recorded and rebuilt: config_from_model, the inference model, a .keras file
    assert config_from_model(fast).head_lr_multiplier == m
    assert config_from_model(plain).head_lr_multiplier == 1.0
    want = fast(image)["seg"].numpy()
    np.testing.assert_allclose(build_inference_model(fast)(image)["seg"], want, atol=1e-6)
    fast.save(tmp_path / "fast.keras")
    loaded = keras.saving.load_model(tmp_path / "fast.keras")
    np.testing.assert_array_equal(loaded(image)["seg"].numpy(), want)
    normal = build_model(
        ModelConfig(**base, head_kernel_init="normal", head_kernel_std=0.03, head_lr_multiplier=m)
    )
    stored = normal.get_layer("DecoderEnd_Conv1").get_weights()[0]
    assert 0.015 < stored.std() * m < 0.05


def test_config_from_model_recovers_the_segmentation_network(paper_model):
    cfg = config_from_model(paper_model)
    assert cfg == ModelConfig(seed=None)


# --------------------------------------------------------------- saving
def test_keras_save_load_round_trip(tiny_model, tmp_path):
    path = tmp_path / "model.keras"
    tiny_model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(3).normal(size=(1, 32, 32, 32, 4)).astype(np.float32)
    want, got = tiny_model(x, training=False), loaded(x, training=False)
    for key in ("seg", "z_mean", "z_log_var"):  # recon depends on VDraw's random draw
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy())
    for a, b in zip(tiny_model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    inf = build_inference_model(loaded)
    np.testing.assert_array_equal(inf(x)["seg"].numpy(), want["seg"].numpy())


# ------------------------------------------------------------ mixed precision
def test_mixed_precision_outputs_and_losses_are_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = build_model(ModelConfig(input_shape=(16, 16, 16), init_filters=8, latent_dim=4))
    assert model.get_layer("InitConv").compute_dtype == "float16"
    assert model.get_layer("DecoderEnd_Sigmoid").compute_dtype == "float32"
    assert model.get_layer("VDraw").compute_dtype == "float32"
    assert model.get_layer("Vend").compute_dtype == "float32"
    x = np.random.default_rng(4).normal(size=(1, 16, 16, 16, 4)).astype(np.float32)
    out = model(x)
    for key in ("seg", "recon", "z_mean", "z_log_var"):
        assert out[key].dtype == tf.float32, key
        assert np.all(np.isfinite(out[key].numpy()))
    labels = np.zeros((1, 16, 16, 16, 3), np.float32)
    terms = losses.total_loss(labels, x, out)
    assert all(v.dtype == tf.float32 for v in terms.values())


# ----------------------------------------------------------------- training
def test_a_few_adam_steps_reduce_the_total_loss():
    keras.utils.set_random_seed(1)
    cfg = ModelConfig(input_shape=(32, 32, 32), init_filters=8, latent_dim=16, seed=1)
    model = build_model(cfg)
    rng = np.random.default_rng(5)
    image = rng.normal(size=(1, 32, 32, 32, 4)).astype(np.float32)
    labels = np.zeros((1, 32, 32, 32, 3), np.float32)
    labels[0, 8:24, 8:24, 8:24, 0] = 1  # WT
    labels[0, 12:20, 12:20, 12:20, 1] = 1  # TC
    labels[0, 14:18, 14:18, 14:18, 2] = 1  # ET
    image[0, 8:24, 8:24, 8:24, 3] += 2.0  # visible on "FLAIR"
    image[0, 12:20, 12:20, 12:20, 2] -= 2.0  # visible on "T2"
    image[0, 14:18, 14:18, 14:18, 1] += 2.0  # visible on "T1ce"
    optimizer = keras.optimizers.Adam(1e-4)  # the paper's initial rate, as train.py
    train_step = make_train_step(model, optimizer, LossConfig())
    batch = {"image": tf.constant(image), "label": tf.constant(labels)}

    def step():
        return {name: value.numpy() for name, value in train_step(batch).items()}

    first = step()
    for _ in range(11):
        last = step()
    assert last["loss"] < 0.85 * first["loss"]
    assert last["dice"] < first["dice"]
    assert last["l2"] < first["l2"]


# ------------------------------------------------- gradient checkpointing
def _loss_and_grads(cfg, weights, image, labels, graph):
    keras.utils.set_random_seed(7)
    model = build_model(cfg)
    model.set_weights(weights)

    def run():
        with tf.GradientTape() as tape:
            out = model(image, training=True)
            loss = losses.reduce_per_example(losses.total_loss(labels, image, out)["loss"], 1)
            loss += tf.add_n(model.losses)
        return loss, tape.gradient(loss, model.trainable_variables)

    loss, grads = tf.function(run)() if graph else run()
    return model, loss.numpy(), [g.numpy() for g in grads]


@functools.cache
def _without_recompute(graph):
    """The model without recompute, its weights, a case, and its loss and
    gradients (eagerly or traced): the reference of the test below, computed
    once for both of its traced cases."""
    cfg = ModelConfig(input_shape=(32, 32, 32), init_filters=8, latent_dim=16, seed=3)
    keras.utils.set_random_seed(7)
    weights = build_model(cfg).get_weights()
    rng = np.random.default_rng(8)
    image = rng.normal(size=(1, 32, 32, 32, 4)).astype(np.float32)
    labels = (rng.random((1, 32, 32, 32, 3)) > 0.7).astype(np.float32)
    _, want_loss, want = _loss_and_grads(cfg, weights, image, labels, graph)
    return cfg, weights, image, labels, want_loss, want


@pytest.mark.parametrize("levels,graph", [(1, False), (1, True), (4, True)])
def test_recompute_gives_the_same_loss_and_gradients(levels, graph):
    """--recompute: same loss and gradients as keeping the activations (VDraw and
    dropout draw the same numbers: same seed, fresh model, one call)."""
    cfg, weights, image, labels, want_loss, want = _without_recompute(graph)
    rcfg = ModelConfig(**{**cfg.__dict__, "recompute_levels": levels})
    model, loss, got = _loss_and_grads(rcfg, weights, image, labels, graph)
    blocks = [layer for layer in model.layers if isinstance(layer, ResNetBlock)]
    assert sum(b.recompute for b in blocks) == {1: 3, 4: 15}[levels]  # enc + dec + VAE blocks
    assert config_from_model(model).recompute_levels == levels
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    # Float noise only: the summation order inside the ops may differ. Some
    # gradients are ~0 by construction (a conv bias right before a GroupNorm
    # with one channel per group), so the absolute tolerance is relative to
    # the largest gradient of the model.
    scale = max(np.abs(w).max() for w in want)
    for g, w, v in zip(got, want, model.trainable_variables):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=v.path)


def test_recompute_runs_the_block_again_in_the_backward_pass():
    """The checkpointed block's first convolution runs twice per training step
    (forward, then recomputed for the gradient; the second one's output is not
    needed by any gradient); without recompute, each runs once. In inference
    the block is never recomputed. Counted in the traced graph."""
    x = tf.constant(np.random.default_rng(9).normal(size=(1, 8, 8, 8, 8)).astype(np.float32))

    def conv3d_ops(fn):
        graph = tf.function(fn).get_concrete_function().graph
        return sum(op.type == "Conv3D" for op in graph.get_operations())

    for recompute, expected in ((False, 2), (True, 3)):
        cls = RecomputedResNetBlock if recompute else ResNetBlock
        block = cls(8, groups=2, name=f"b{int(recompute)}")
        block.build(x.shape)

        def step():
            with tf.GradientTape() as tape:
                y = tf.reduce_sum(block(x, training=True) ** 2)
            return tape.gradient(y, block.trainable_variables)

        assert conv3d_ops(step) == expected, recompute
        assert conv3d_ops(lambda: block(x, training=False)) == 2


def test_recompute_makes_the_stem_output_again():
    """In the model's traced training step under --recompute, the first block
    makes the stem's output (InitConv + InitDropout) again from the image: the
    4-channel InitConv runs twice, once without recompute; inference once."""
    cfg = ModelConfig(
        input_shape=(16, 16, 16),
        init_filters=8,
        latent_dim=4,
        blocks_down=(1, 1),
        blocks_up=(1,),
        seed=1,
    )
    image = tf.zeros((1, 16, 16, 16, 4))

    def stem_convs(model, training):
        def run():
            with tf.GradientTape() as tape:
                out = model(image, training=training)
                loss = tf.add_n([tf.reduce_sum(v) for v in out.values()])
            return tape.gradient(loss, model.trainable_variables)

        graph = tf.function(run).get_concrete_function().graph
        return sum(
            op.type == "Conv3D" and op.inputs[1].shape[3] == 4 for op in graph.get_operations()
        )

    for levels, expected in ((0, 1), (1, 2), (2, 2)):
        model = build_model(ModelConfig(**{**cfg.__dict__, "recompute_levels": levels}))
        assert stem_convs(model, True) == expected, levels
        assert stem_convs(model, False) == 1, levels


def test_recompute_levels_is_checked():
    with pytest.raises(ValueError, match=r"recompute_levels must be an integer in \[0, 4\]"):
        ModelConfig(recompute_levels=5)
