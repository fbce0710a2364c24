"""This device's numerics against float64 references: GroupNorm, one ResNet
block and a whole training step's gradients.

    python benchmarks/numerics_check.py --json_out=/tmp/numerics.json          # small, any device
    python benchmarks/numerics_check.py --crop=160,192,128 --init_filters=32 \\
        --block_shape=1,80,96,64,64 --gn_shape=1,160,192,128,32 --json_out=numerics_gpu.json

Every check computes the same function twice: on the device in the precision
under test, and in float64 (an independent implementation: NumPy for
GroupNorm, float64 TensorFlow ops for the block and the network, by default on
the GPU when there is one, else on the CPU). It reports the relative L2 error
||got - ref|| / ||ref||, the maximum error relative to the largest reference
value max|got - ref| / max|ref|, the cosine of the two, and pass/fail against
the bounds in BOUNDS (derived in the comments there).

Precisions: float32 with TF32 off and on (TF32, ``tf.config.experimental.
enable_tensor_float_32_execution``, applies only to NVIDIA GPUs of compute
capability >= 8.0; on a CPU the TF32-on run is skipped and recorded as not
applicable), mixed_float16 (the Keras policy; float16 activations, float32
variables and GroupNorm statistics), optionally the XLA-compiled step
(--jit_compile), and --recompute (brats_tf.recompute in every level) against
the plain step, same weights.

The whole step is ``brats_tf.training.make_train_step`` itself, with an
optimizer that stores the gradients it is given instead of applying them
(under mixed_float16 wrapped in a LossScaleOptimizer, so the gradients are the
unscaled ones the step would apply). The network is the paper's, with the
spatial dropout at 0 (random) and VDraw's draw fixed (its generator's state
is set before each call, and the float64 reference uses the same draw).

On a CPU whose float16 convolution accumulates in float16
(benchmarks/reduced_precision.py), the float16 bounds are loosened by that measured slack
(--float16_slack=-1, the default, measures it; 1 on a GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as train.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

# Bounds per check, by what is compared: (relative L2, max relative, min cosine).
# u32 = 2**-24 = 6e-8 (float32 unit roundoff), u16 = 2**-11 = 4.9e-4 (float16,
# and the TF32 inputs of a matrix product: 10 explicit mantissa bits).
BOUNDS = {
    # float32 GroupNorm: a handful of roundings per element, and float32 sums
    # over a group (a reduction over H, W then D: error ~u32 * log2(n), 1e-6
    # at the paper's 4 M voxels). 1e-5 leaves 10x; the maximum (one element,
    # dx's cancellation of its three terms) 1e-4.
    "gn_float32": (1e-5, 1e-4, 1 - 1e-8),
    # float32 ResNet block: two convolutions of 27 * C-term dot products
    # (relative error ~u32 * sqrt(27 C) ~1e-6), the kernel gradient a sum over
    # all voxels (blocked float32 accumulation, ~1e-6 to 1e-5 at full size).
    "block_float32": (1e-4, 1e-3, 1 - 1e-8),
    # float32 whole step: ~40 layers forward and back, each adding ~1e-6 of
    # rounding, amplified by the network's conditioning: 1e-4 relative L2.
    "step_float32": (1e-4, 1e-3, 1 - 1e-7),
    # TF32: each product's inputs rounded to 10 bits (u16 per factor, float32
    # accumulation): a convolution errs by ~u16 (5e-4) relative; a block (two
    # of them) by ~1e-3, the step's gradients by a few 1e-3. GroupNorm has no
    # matrix product and keeps the float32 bounds.
    "block_tf32": (5e-3, 5e-2, 1 - 1e-4),
    "step_tf32": (1e-2, 1e-1, 1 - 1e-4),
    # mixed_float16 GroupNorm: statistics in float32, the output (and in the
    # backward pass the incoming and outgoing gradients) rounded to float16:
    # rms error u16 / sqrt(3) ~3e-4 per element; 1e-3, max 2 u16 ~ 1e-3 of an
    # element, of the largest element at most 2e-3.
    "gn_mixed_float16": (1e-3, 2e-3, 1 - 1e-6),
    # mixed_float16 ResNet block: the input, the weights and four
    # intermediate activations rounded to float16 (rms ~u16 each, ~1e-3 in
    # all), gradients through the same path twice; 1e-2, cosine >= 0.9999.
    "block_mixed_float16": (1e-2, 1e-1, 1 - 1e-4),
    # ... and its gradients: from y back to x four stages (conv2's and conv1's
    # input gradients, the two GroupNorms' backward passes), each reading a
    # float16 cotangent and writing a float16 result, and the kernel
    # gradients sums over every voxel: sqrt(8) * u16 ~ 1.4e-3, times the
    # ReLU/GroupNorm Jacobians' amplification (a few), ~5e-3 where the
    # float16 kernels accumulate in float32 (GPUs). 2e-2, cosine >= 0.999.
    # Kernels that accumulate in float16 (Eigen's on some CPUs, slack 2.5)
    # add ~u16 * sqrt(27 C) per convolution: 3e-2 measured at C = 16 on the
    # AMD EPYC of docs/gpu_checks.md, inside 2.5 x 2e-2.
    "block_grad_mixed_float16": (2e-2, 2e-1, 1 - 1e-3),
    # mixed_float16 whole step: ~40 layers of float16 activations and
    # gradients (sqrt(40) * u16 ~ 3e-3 per layer pass, compounding through the
    # forward and backward passes), loss scaling: a few 1e-2; the cosine bound
    # is the target, >= 0.99 (the direction Adam follows), relative L2 <= 0.1.
    "step_mixed_float16": (1e-1, 1.0, 0.99),
    # recompute vs the plain step, float32 with TF32 off: the same arithmetic,
    # only re-run (on a GPU cuDNN may choose another algorithm for the
    # recomputed convolution): differences of float32 rounding, 1e-5.
    "recompute_float32": (1e-5, 1e-4, 1 - 1e-8),
}


def compare(got, ref) -> dict:
    """Relative L2 error, max error relative to max|ref|, and cosine of two
    arrays (or lists of arrays, compared as one concatenated vector)."""
    if isinstance(got, (list, tuple)):
        got = np.concatenate([np.ravel(g) for g in got])
        ref = np.concatenate([np.ravel(r) for r in ref])
    got = np.asarray(got, np.float64).ravel()
    ref = np.asarray(ref, np.float64).ravel()
    if got.shape != ref.shape:
        raise ValueError(f"shapes differ: {got.shape} vs {ref.shape}")
    ref_norm = np.linalg.norm(ref)
    diff = got - ref
    finite = bool(np.all(np.isfinite(got)))
    return {
        "rel_l2": float(np.linalg.norm(diff) / ref_norm) if finite else float("inf"),
        "max_rel": float(np.abs(diff).max() / np.abs(ref).max()) if finite else float("inf"),
        "cosine": float(got @ ref / (np.linalg.norm(got) * ref_norm)) if finite else -1.0,
    }


def judge(metrics: dict, bound: str, slack: float = 1.0) -> dict:
    """``metrics`` with the bounds and ``passed``; ``slack`` multiplies the
    relative-error bounds and 1 - cosine."""
    rel_l2, max_rel, cosine = BOUNDS[bound]
    bounds = {
        "rel_l2": rel_l2 * slack,
        "max_rel": max_rel * slack,
        "cosine": 1 - (1 - cosine) * slack,
    }
    passed = (
        metrics["rel_l2"] <= bounds["rel_l2"]
        and metrics["max_rel"] <= bounds["max_rel"]
        and metrics["cosine"] >= bounds["cosine"]
    )
    return {**metrics, "bound": bound, "bounds": bounds, "passed": bool(passed)}


# ------------------------------------------------------------------ set-up
@contextlib.contextmanager
def policy(precision: str, tf32: bool = False):
    """Keras global dtype policy ``precision`` and TF32 on/off inside; both
    restored afterwards."""
    import keras
    import tensorflow as tf

    old_policy = keras.mixed_precision.global_policy()
    old_tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
    keras.mixed_precision.set_global_policy(precision)
    tf.config.experimental.enable_tensor_float_32_execution(tf32)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(old_policy)
        tf.config.experimental.enable_tensor_float_32_execution(old_tf32)


def tf32_applies() -> bool:
    """True when TF32 changes float32 matrix products here: an NVIDIA GPU of
    compute capability 8.0 or later."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        cc = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if cc and cc[0] >= 8:
            return True
    return False


def default_reference_device() -> str:
    import tensorflow as tf

    return "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"


# ------------------------------------------------------------- GroupNorm
def groupnorm_reference(x, gamma, beta, groups, epsilon, dy):
    """GroupNorm's output and its gradients (dx, dgamma, dbeta) for the
    cotangent ``dy``, in float64 NumPy from the textbook formulas:
    y = xhat * gamma + beta, xhat = (x - mu) / sigma per example and group;
    dx = (g - mean(g) - xhat * mean(g * xhat)) / sigma with g = dy * gamma."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    gamma, beta = np.asarray(gamma, np.float64), np.asarray(beta, np.float64)
    b, c = x.shape[0], x.shape[-1]
    shape = (b, -1, groups, c // groups)  # voxels x groups x channels of a group
    xg = x.reshape(shape)
    mu = xg.mean(axis=(1, 3), keepdims=True)
    sigma = np.sqrt(((xg - mu) ** 2).mean(axis=(1, 3), keepdims=True) + epsilon)
    xhat = (xg - mu) / sigma
    y = xhat.reshape(x.shape) * gamma + beta
    g = (dy * gamma).reshape(shape)
    dx = (
        g - g.mean(axis=(1, 3), keepdims=True) - xhat * (g * xhat).mean(axis=(1, 3), keepdims=True)
    ) / sigma
    dgamma = (dy * xhat.reshape(x.shape)).reshape(-1, c).sum(axis=0)
    dbeta = dy.reshape(-1, c).sum(axis=0)
    return y, dx.reshape(x.shape), dgamma, dbeta


def check_groupnorm(
    shape=(2, 8, 8, 8, 32), groups=8, precision="float32", seed=0, slack=1.0
) -> dict:
    """brats_tf.layers.GroupNorm (on the default device, under ``precision``)
    against groupnorm_reference: the output and the gradients of
    sum(y * dy) for input, gamma and beta. Inputs far from zero (mean 3) and
    random gamma and beta, so the centring and the scale both matter."""
    import tensorflow as tf

    from brats_tf.layers import GroupNorm

    rng = np.random.default_rng(seed)
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma = (1.0 + 0.5 * rng.standard_normal(shape[-1])).astype(np.float32)
    beta = rng.standard_normal(shape[-1]).astype(np.float32)
    with policy(precision):
        layer = GroupNorm(groups)
        layer.build(shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        xt = tf.cast(tf.constant(x), layer.compute_dtype)
        dyt = tf.cast(tf.constant(dy), layer.compute_dtype)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt)
            objective = tf.reduce_sum(tf.cast(y * dyt, tf.float32))
        dx, dgamma, dbeta = tape.gradient(objective, [xt, layer.gamma, layer.beta])
    # The reference takes the inputs as the layer saw them (float16-rounded
    # under mixed_float16): the layer's own error, not the input's rounding.
    seen_x = tf.cast(xt, tf.float64).numpy()
    seen_dy = tf.cast(dyt, tf.float64).numpy()
    ref = groupnorm_reference(seen_x, gamma, beta, groups, layer.epsilon, seen_dy)
    bound = "gn_float32" if precision == "float32" else f"gn_{precision}"
    slack = slack if precision == "mixed_float16" else 1.0
    got = [y, dx, dgamma, dbeta]
    return {
        name: judge(compare(tf.cast(g, tf.float64).numpy(), r), bound, slack)
        for name, g, r in zip(("forward", "grad_input", "grad_gamma", "grad_beta"), got, ref)
    }


# ---------------------------------------------- float64 reference network
class Float64Reference:
    """A float64 re-implementation of the paper's layers (TensorFlow float64
    ops: tf.nn.conv3d, GroupNorm from its formula, trilinear upsampling by 2
    as 0.75/0.25 weights of the two nearest voxels, half-pixel centres, edge
    clamped), reading a Keras model's (or layer's) weights: ``params`` maps
    each Keras variable's id to a float64 tensor that a GradientTape
    watches."""

    def __init__(self, variables):
        import tensorflow as tf

        self.tf = tf
        self.variables = list(variables)
        self.params = {
            id(v): tf.constant(np.asarray(v.numpy(), np.float64)) for v in self.variables
        }
        self.regularization = []

    def p(self, variable):
        return self.params[id(variable)]

    def conv(self, layer, x, stride=1):
        tf = self.tf
        kernel = self.p(layer.kernel)
        if layer.kernel_regularizer is not None:
            self.regularization.append(layer.kernel_regularizer.l2 * tf.reduce_sum(kernel**2))
        y = tf.nn.conv3d(x, kernel, [1, stride, stride, stride, 1], "SAME")
        return y + self.p(layer.bias)

    def groupnorm(self, layer, x):
        tf = self.tf
        b, d, h, w, c = x.shape
        xg = tf.reshape(x, [-1, d * h * w, layer.groups, c // layer.groups])
        mu = tf.reduce_mean(xg, axis=[1, 3], keepdims=True)
        var = tf.reduce_mean((xg - mu) ** 2, axis=[1, 3], keepdims=True)
        xhat = tf.reshape((xg - mu) / tf.sqrt(var + layer.epsilon), tf.shape(x))
        return xhat * self.p(layer.gamma) + self.p(layer.beta)

    def block(self, layer, x):
        relu = self.tf.nn.relu
        y = self.conv(layer.conv1, relu(self.groupnorm(layer.norm1, x)))
        return x + self.conv(layer.conv2, relu(self.groupnorm(layer.norm2, y)))

    def dense(self, layer, x):
        return x @ self.p(layer.kernel) + self.p(layer.bias)

    def upsample2(self, x):
        tf = self.tf
        for axis in (1, 2, 3):
            n = x.shape[axis]
            first = tf.gather(x, [0], axis=axis)
            last = tf.gather(x, [n - 1], axis=axis)
            prev = tf.concat([first, tf.gather(x, tf.range(n - 1), axis=axis)], axis=axis)
            nxt = tf.concat([tf.gather(x, tf.range(1, n), axis=axis), last], axis=axis)
            pair = tf.stack([0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt], axis=axis + 1)
            shape = list(x.shape)
            shape[axis] *= 2
            x = tf.reshape(pair, shape)
        return x

    def network(self, model, cfg, image, eps):
        """The training model's outputs (seg, recon, z_mean, z_log_var) in float64."""
        tf = self.tf
        get = model.get_layer
        x = self.conv(get("InitConv"), image)  # the dropout rate is 0 here
        features = []
        for level, n_blocks in enumerate(cfg.blocks_down):
            if level:
                x = self.conv(get(f"EncoderDown{level}"), x, stride=2)
            for i in range(n_blocks):
                x = self.block(get(f"EncoderBlock{level}_{i}"), x)
            features.append(x)
        x = features[-1]
        for level in reversed(range(cfg.levels - 1)):
            x = self.upsample2(self.conv(get(f"DecoderUp{level}_Conv1"), x)) + features[level]
            for i in range(cfg.blocks_up[level]):
                x = self.block(get(f"DecoderBlock{level}_{i}"), x)
        seg = tf.sigmoid(cfg.head_lr_multiplier * self.conv(get("DecoderEnd_Conv1"), x))
        v = tf.nn.relu(self.groupnorm(get("VD_GN"), features[-1]))
        v = self.conv(get("VD_Conv"), v, stride=2)
        v = self.dense(get("VD_Dense"), tf.reshape(v, [v.shape[0], -1]))
        z_mean, z_log_var = tf.split(v, 2, axis=-1)
        z = z_mean + tf.exp(0.5 * z_log_var) * eps
        v = tf.nn.relu(self.dense(get("VU_Dense"), z))
        v = tf.reshape(v, [v.shape[0], *cfg.vae_grid, cfg.vae_filters])
        v = self.upsample2(self.conv(get("VU_Conv1"), v))
        for level in reversed(range(cfg.levels - 1)):
            v = self.upsample2(self.conv(get(f"VUp{level}_Conv1"), v))
            v = self.block(get(f"VBlock{level}_0"), v)
        recon = self.conv(get("Vend"), v)
        return seg, recon, z_mean, z_log_var

    def loss(self, labels, image, outputs, loss_config):
        """§3.4's loss (batch mean) plus the kernels' L2 weight decay, float64."""
        tf = self.tf
        seg, recon, z_mean, z_log_var = outputs
        axes = [1, 2, 3]
        dice = tf.reduce_sum(
            1.0
            - 2.0
            * tf.reduce_sum(labels * seg, axes)
            / (
                tf.reduce_sum(labels**2, axes)
                + tf.reduce_sum(seg**2, axes)
                + loss_config.dice_epsilon
            ),
            axis=-1,
        )
        l2 = tf.reduce_mean((image - recon) ** 2, axis=[1, 2, 3, 4])
        voxels = float(np.prod(image.shape[1:4]))
        kl = tf.reduce_sum(z_mean**2 + tf.exp(z_log_var) - z_log_var - 1.0, axis=-1) / voxels
        total = (
            loss_config.dice_weight * dice + loss_config.l2_weight * l2 + loss_config.kl_weight * kl
        )
        return tf.reduce_mean(total), tf.add_n(self.regularization)


# ------------------------------------------------------------ ResNet block
def check_resnet_block(
    shape=(1, 8, 8, 8, 16),
    groups=8,
    precision="float32",
    tf32=False,
    seed=0,
    reference_device=None,
    slack=1.0,
) -> dict:
    """brats_tf.layers.ResNetBlock on the device (float32, TF32 on or off, or
    mixed_float16) against Float64Reference.block with the same weights:
    the output and the gradients of sum(y * dy) for the input and every
    weight (one vector)."""
    import tensorflow as tf

    from brats_tf.layers import ResNetBlock

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    with policy(precision, tf32):
        block = ResNetBlock(shape[-1], groups, l2_weight=0.0)
        block.build(shape)
        for norm in (block.norm1, block.norm2):  # not the trivial 1 and 0
            norm.gamma.assign((1 + 0.3 * rng.standard_normal(shape[-1])).astype(np.float32))
            norm.beta.assign((0.3 * rng.standard_normal(shape[-1])).astype(np.float32))
        xt = tf.cast(tf.constant(x), block.compute_dtype)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = block(xt)
            objective = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
        grads = tape.gradient(objective, [xt] + block.trainable_variables)
        got_y = tf.cast(y, tf.float64).numpy()
        got_grads = [tf.cast(g, tf.float64).numpy() for g in grads]
    with tf.device(reference_device or default_reference_device()):
        ref = Float64Reference(block.trainable_variables)
        x64 = tf.constant(x.astype(np.float64))
        watched = [x64] + [ref.p(v) for v in block.trainable_variables]
        with tf.GradientTape() as tape:
            tape.watch(watched)
            y64 = ref.block(block, x64)
            objective = tf.reduce_sum(y64 * dy.astype(np.float64))
        ref_grads = [g.numpy() for g in tape.gradient(objective, watched)]
    bound, slack = _bound("block", precision, tf32, slack)
    grad_bound = "block_grad_mixed_float16" if precision == "mixed_float16" else bound
    return {
        "forward": judge(compare(got_y, y64.numpy()), bound, slack),
        "gradients": judge(compare(got_grads, ref_grads), grad_bound, slack),
    }


def _bound(kind: str, precision: str, tf32: bool, slack: float) -> tuple[str, float]:
    if precision == "mixed_float16":
        return f"{kind}_mixed_float16", slack
    return (f"{kind}_tf32" if tf32 and tf32_applies() else f"{kind}_float32"), 1.0


# ------------------------------------------------------- the training step
def gradient_capture_optimizer():
    """A Keras optimizer that stores the gradients it is asked to apply (in
    ``.captured``, one float32 variable per trainable variable, NaN until a
    step gives it finite gradients) and leaves the weights alone."""
    import keras

    class GradientCapture(keras.optimizers.Optimizer):
        def __init__(self):
            super().__init__(learning_rate=0.0, name="gradient_capture")

        def build(self, variables):
            if self.built:
                return
            super().build(variables)
            self.captured = [
                self.add_variable_from_reference(v, "gradient", initializer="zeros")
                for v in variables
            ]

        def update_step(self, gradient, variable, learning_rate):
            self.captured[self._get_variable_index(variable)].assign(
                keras.ops.cast(gradient, "float32")
            )

    return GradientCapture()


@dataclasses.dataclass
class StepCase:
    """A tiny network, its float32 weights and one batch."""

    config: object
    weights: list
    image: np.ndarray
    label: np.ndarray


def make_step_case(crop=(16, 16, 16), init_filters=8, seed=0) -> StepCase:
    """The paper's network at ``crop`` and width ``init_filters`` (dropout 0,
    VDraw seeded), its initial weights (seed) with non-trivial GroupNorm
    scales, a normalised-like image and a 10% label."""
    import keras

    from brats_tf.config import ModelConfig
    from brats_tf.model import build_model

    config = ModelConfig(input_shape=tuple(crop), init_filters=init_filters, dropout=0.0, seed=seed)
    with policy("float32"):
        keras.utils.set_random_seed(seed)
        model = build_model(config)
    rng = np.random.default_rng(seed)
    weights = []
    for v in model.weights:
        value = v.numpy()
        if v.path.endswith("gamma"):
            value = (1 + 0.2 * rng.standard_normal(value.shape)).astype(value.dtype)
        elif v.path.endswith("beta"):
            value = (0.2 * rng.standard_normal(value.shape)).astype(value.dtype)
        weights.append(value)
    image = rng.standard_normal((1,) + tuple(crop) + (4,)).astype(np.float32)
    label = (rng.random((1,) + tuple(crop) + (3,)) > 0.9).astype(np.float32)
    return StepCase(config, weights, image, label)


def _fixed_draw_state(seed: int) -> np.ndarray:
    return np.array([seed, 7], dtype=np.int64)


def step_gradients(
    case: StepCase, precision="float32", tf32=False, recompute=False, jit_compile=False, seed=0
) -> tuple[list, dict, object]:
    """Gradients of one ``make_train_step`` step (unscaled under
    mixed_float16), its loss terms, and the model. VDraw's generator state is
    set to the same fixed value before the step, as for the reference."""
    import dataclasses as dc

    import tensorflow as tf

    from brats_tf.config import LossConfig
    from brats_tf.model import build_model
    from brats_tf.training import make_optimizer, make_train_step

    config = dc.replace(case.config, recompute_levels=case.config.levels if recompute else 0)
    with policy(precision, tf32):
        model = build_model(config)
        model.set_weights(case.weights)
        optimizer = make_optimizer(
            None, precision, optimizer_fn=lambda _: gradient_capture_optimizer()
        )
        optimizer.build(model.trainable_variables)
        capture = getattr(optimizer, "inner_optimizer", optimizer)
        step = make_train_step(model, optimizer, LossConfig(), jit_compile=jit_compile)
        batch = {"image": tf.constant(case.image), "label": tf.constant(case.label)}
        for _ in range(20):  # a float16 overflow halves the loss scale and skips the step
            for g in capture.captured:
                g.assign(tf.fill(g.shape, float("nan")))
            model.get_layer("VDraw").seed_generator.state.assign(_fixed_draw_state(seed))
            stats = {k: float(v.numpy()) for k, v in step(batch).items()}
            grads = [g.numpy().astype(np.float64) for g in capture.captured]
            if all(np.all(np.isfinite(g)) for g in grads):
                break
        else:
            raise RuntimeError(f"{precision}: 20 steps in a row had non-finite gradients")
    return grads, stats, model


def reference_gradients(case: StepCase, model, seed=0, device=None) -> tuple[list, float]:
    """The float64 gradients of the step's objective (the batch-mean loss
    plus weight decay) for ``model``'s trainable variables, and the loss
    without weight decay, with the draw of step_gradients."""
    import keras
    import tensorflow as tf

    from brats_tf.config import LossConfig

    generator = keras.random.SeedGenerator(0)
    generator.state.assign(_fixed_draw_state(seed))
    eps = keras.random.normal((1, case.config.latent_dim), seed=generator)
    with tf.device(device or default_reference_device()):
        ref = Float64Reference(model.trainable_variables)
        watched = [ref.p(v) for v in model.trainable_variables]
        image = tf.constant(case.image.astype(np.float64))
        label = tf.constant(case.label.astype(np.float64))
        with tf.GradientTape() as tape:
            tape.watch(watched)
            outputs = ref.network(model, case.config, image, tf.cast(eps, tf.float64))
            loss, decay = ref.loss(label, image, outputs, LossConfig())
            objective = loss + decay
        grads = tape.gradient(objective, watched)
    missing = [v.path for v, g in zip(model.trainable_variables, grads) if g is None]
    if missing:
        raise RuntimeError(f"the float64 reference does not use {missing}")
    return [g.numpy() for g in grads], float(loss.numpy())


def check_training_step(
    case: StepCase,
    precision="float32",
    tf32=False,
    jit_compile=False,
    seed=0,
    reference_device=None,
    slack=1.0,
    cache=None,
) -> dict:
    """One step's gradients (all variables as one vector) and its loss
    against the float64 reference. ``cache``: a dict that keeps the
    reference (it depends only on ``case``) between calls."""
    grads, stats, model = step_gradients(case, precision, tf32, jit_compile=jit_compile, seed=seed)
    cache = {} if cache is None else cache
    if not tf32 and not jit_compile:  # check_recompute's plain step; float16 vs float32
        cache[f"{precision}_step"] = (grads, stats)
    if "reference" not in cache:
        cache["reference"] = reference_gradients(case, model, seed, reference_device)
    ref_grads, ref_loss = cache["reference"]
    bound, slack = _bound("step", precision, tf32, slack)
    return {
        "gradients": judge(compare(grads, ref_grads), bound, slack),
        "loss": judge(compare([stats["loss"]], [ref_loss]), bound, slack),
        "loss_value": stats["loss"],
        "reference_loss": ref_loss,
    }


def check_recompute(case: StepCase, seed=0, plain=None) -> dict:
    """The step with brats_tf.recompute in every level against the plain
    step, same weights and draw, float32 with TF32 off. ``plain``: the
    plain step's (gradients, loss terms), if already computed."""
    if plain is None:
        plain = step_gradients(case, "float32", False, recompute=False, seed=seed)[:2]
    plain, plain_stats = plain
    again, again_stats, _ = step_gradients(case, "float32", False, recompute=True, seed=seed)
    return {
        "gradients": judge(compare(again, plain), "recompute_float32"),
        "loss": judge(compare([again_stats["loss"]], [plain_stats["loss"]]), "recompute_float32"),
    }


# ----------------------------------------------------------------- driver
def run_checks(
    gn_shape=(2, 8, 8, 8, 32),
    block_shape=(1, 8, 8, 8, 16),
    crop=(16, 16, 16),
    init_filters=8,
    seed=0,
    reference_device=None,
    float16_slack=1.0,
    mixed_float16=True,
    jit_compile=False,
    log=print,
) -> list[dict]:
    """Every check; one dict per check (name, precision, tf32, results)."""
    import tensorflow as tf

    reference_device = reference_device or default_reference_device()
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    tf32_modes = (False, True) if tf32_applies() else (False,)
    precisions = [("float32", t) for t in tf32_modes]
    if mixed_float16:
        precisions.append(("mixed_float16", False))
    checks = []

    def add(name, precision, tf32, fn, **extra):
        start = time.perf_counter()
        result = fn()
        entry = {
            "check": name,
            "precision": precision,
            "tf32": tf32,
            "seconds": round(time.perf_counter() - start, 2),
            **extra,
            "results": result,
        }
        checks.append(entry)
        log(summary_line(entry))

    for precision, tf32 in precisions:
        if not tf32:  # GroupNorm has no matrix product: TF32 does not touch it
            add(
                "groupnorm",
                precision,
                tf32,
                lambda: check_groupnorm(gn_shape, 8, precision, seed, float16_slack),
            )
        add(
            "resnet_block",
            precision,
            tf32,
            lambda: check_resnet_block(
                block_shape, 8, precision, tf32, seed, reference_device, float16_slack
            ),
        )
    case = make_step_case(crop, init_filters, seed)
    cache: dict = {}
    for precision, tf32 in precisions:
        for jit in (False, True) if jit_compile else (False,):
            add(
                "training_step",
                precision,
                tf32,
                lambda: check_training_step(
                    case, precision, tf32, jit, seed, reference_device, float16_slack, cache
                ),
                jit_compile=jit,
            )
    add(
        "recompute_vs_plain",
        "float32",
        False,
        lambda: check_recompute(case, seed, cache.get("float32_step")),
    )
    if "mixed_float16_step" in cache and "float32_step" in cache:
        # the target as stated against float32 (TF32 off), whose own error
        # (<= 1e-4) is negligible at float16's bound
        add(
            "mixed_float16_vs_float32",
            "mixed_float16",
            False,
            lambda: {
                "gradients": judge(
                    compare(cache["mixed_float16_step"][0], cache["float32_step"][0]),
                    "step_mixed_float16",
                    float16_slack,
                )
            },
        )
    if not tf32_applies():
        checks.append(
            {
                "check": "tf32",
                "precision": "float32",
                "tf32": True,
                "results": {},
                "note": "TF32 does not apply on this device "
                f"({'GPU before compute capability 8.0' if on_gpu else 'CPU'}): "
                "the TF32-on run is the TF32-off run",
            }
        )
    return checks


def all_passed(checks: list[dict]) -> bool:
    return all(r["passed"] for c in checks for r in c["results"].values() if isinstance(r, dict))


def summary_line(entry: dict) -> str:
    name = entry["check"] + (" +XLA" if entry.get("jit_compile") else "")
    parts = [f"{name} {entry['precision']}{' TF32' if entry['tf32'] else ''}:"]
    for what, r in entry["results"].items():
        if isinstance(r, dict):
            parts.append(
                f"{what} rel_l2 {r['rel_l2']:.2e} (<= {r['bounds']['rel_l2']:.2g}) "
                f"max_rel {r['max_rel']:.2e} cos {r['cosine']:.8f} "
                f"{'ok' if r['passed'] else 'FAIL'};"
            )
    return " ".join(parts)


def _main():
    from absl import app, flags

    from data_pipeline.checks import int_flag_list

    FLAGS = flags.FLAGS
    flags.DEFINE_list("gn_shape", ["2", "16", "16", "16", "32"], "GroupNorm input B,D,H,W,C.")
    flags.DEFINE_list(
        "block_shape",
        ["1", "16", "16", "16", "32"],
        "ResNet block input B,D,H,W,C (C = the block's filters).",
    )
    flags.DEFINE_list(
        "crop", ["32", "32", "32"], "Crop D,H,W of the whole-step check (divisible by 16)."
    )
    flags.DEFINE_integer("init_filters", 8, "Network width of the whole-step check.", lower_bound=8)
    flags.DEFINE_integer("seed", 0, "Seed of the inputs and weights.")
    flags.DEFINE_string(
        "reference_device",
        None,
        "Device of the float64 reference (default: GPU:0 when there is a GPU, else CPU:0).",
    )
    flags.DEFINE_float(
        "float16_slack",
        -1.0,
        "Factor on the float16 bounds; -1: measure it "
        "on a CPU (benchmarks/reduced_precision.py), 1 on a GPU.",
    )
    flags.DEFINE_boolean("mixed_float16", True, "Also check mixed_float16 (slow on a CPU).")
    flags.DEFINE_boolean("jit_compile", False, "Also check the XLA-compiled step.")
    flags.DEFINE_string("json_out", None, "Write the results as JSON here.")

    def fail(message):
        sys.exit(f"numerics_check.py: error: {message}")

    def sizes(name, n, multiple=1):
        try:
            return int_flag_list(name, FLAGS[name].value, count=n, minimum=1, multiple=multiple)
        except ValueError as e:
            fail(str(e))

    def main(argv):
        if len(argv) > 1:
            fail(f"unexpected arguments: {argv[1:]}")
        gn_shape, block_shape = sizes("gn_shape", 5), sizes("block_shape", 5)
        crop = sizes("crop", 3, 16)
        if gn_shape[-1] % 8 or block_shape[-1] % 8 or FLAGS.init_filters % 8:
            fail(
                "channels (--gn_shape, --block_shape, --init_filters) must be "
                "divisible by 8 (the GroupNorm groups)"
            )
        import tensorflow as tf

        from benchmarks.machine import describe, device_name
        from data_pipeline.io_utils import write_json_atomic

        gpu = bool(tf.config.list_physical_devices("GPU"))
        slack = FLAGS.float16_slack
        if slack < 0:
            slack = 1.0
            if not gpu and FLAGS.mixed_float16:
                from benchmarks.reduced_precision import slack as measure_slack

                slack = measure_slack("float16")
        print(
            f"machine: {describe()}; device: {device_name()}; TF {tf.__version__}; "
            f"float16 slack {slack}",
            flush=True,
        )
        start = time.perf_counter()
        checks = run_checks(
            gn_shape,
            block_shape,
            crop,
            FLAGS.init_filters,
            FLAGS.seed,
            FLAGS.reference_device,
            slack,
            FLAGS.mixed_float16,
            FLAGS.jit_compile,
            log=lambda line: print(line, flush=True),
        )
        passed = all_passed(checks)
        payload = {
            "machine": describe(),
            "device": device_name(),
            "tensorflow": tf.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "tf32_applies": tf32_applies(),
            "float16_slack": slack,
            "reference_device": FLAGS.reference_device or default_reference_device(),
            "flags": {
                name: FLAGS[name].value
                for name in (
                    "gn_shape",
                    "block_shape",
                    "crop",
                    "init_filters",
                    "seed",
                    "mixed_float16",
                    "jit_compile",
                )
            },
            "seconds": round(time.perf_counter() - start, 1),
            "all_passed": passed,
            "checks": checks,
        }
        if FLAGS.json_out:
            write_json_atomic(FLAGS.json_out, payload)
            print(f"wrote {FLAGS.json_out}")
        if not passed:
            sys.exit("numerics_check.py: some checks failed (above)")
        print("all checks passed")

    app.run(main)


if __name__ == "__main__":
    _main()
