"""The paper's network (§3.1, Fig. 1, Table 1), assembled functionally.

Two models share one set of layers:

* ``build_model(config)``: the training model. Input [B, D, H, W, 4] at the
  training crop (160 x 192 x 128 in the paper). Outputs a dict:
    - ``seg``:       [B, D, H, W, 3] sigmoid probabilities, channels WT, TC, ET
                     (data_pipeline.constants.REGIONS), float32;
    - ``recon``:     [B, D, H, W, 4] the VAE's reconstruction of the input
                     (linear output, compared with the normalised input), float32;
    - ``z_mean``, ``z_log_var``: [B, latent_dim] the VAE's posterior, float32.
  Without the VAE (``config.vae=False``) only ``seg``.
* ``build_inference_model(model)``: encoder + segmentation decoder with the
  same layer objects (so the same weights), no VAE, any spatial size
  divisible by 8 (``None`` spatial dims). Output: ``{"seg": probabilities}``.
  With ``precision`` (e.g. ``mixed_bfloat16`` for CPUs with AMX or
  AVX512-BF16, ``mixed_float16`` for GPUs) it computes in that precision
  instead, with a copy of the weights.

Every layer carries the paper's stage name (InitConv, EncoderBlock1_0,
EncoderDown2, DecoderUp1_Conv1, DecoderBlock0_0, DecoderEnd_Conv1, VD_Conv,
VDraw, VU_Dense, VUp2_Conv1, VBlock1_0, Vend, ...), so the model summary reads
like Table 1 and tests can count parameters stage by stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable

import keras

from brats_tf import layers as L
from brats_tf import recompute as R
from brats_tf.config import PRECISIONS, ModelConfig, check_precision  # noqa: F401 (PRECISIONS: this module's users)


def model_precision(model: keras.Model) -> str:
    """The Keras dtype policy a brats_tf model computes in (its InitConv's)."""
    return model.get_layer("InitConv").dtype_policy.name


@contextlib.contextmanager
def _global_policy(precision: str):
    """Layers made inside take the dtype policy ``precision``; the global
    policy is put back afterwards."""
    old = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(old)


class _Stages:
    """Makes each paper stage's layer, or fetches it from an existing model.

    The forward pass is written once (``_encode``, ``_decode``, ``_vae``); the
    training model creates the layers, the inference model re-uses them by
    name, which is what makes their weights shared.
    """

    def __init__(self, source: keras.Model | None = None):
        self.source = source

    def __call__(self, name: str, make: Callable[[], keras.layers.Layer]) -> keras.layers.Layer:
        if self.source is None:
            return make()
        return self.source.get_layer(name)


def _block(cfg: ModelConfig, level: int, name: str) -> L.ResNetBlock:
    """A ResNet block of ``level``; gradient checkpointed in the finest
    ``cfg.recompute_levels`` levels (brats_tf.recompute)."""
    cls = R.RecomputedResNetBlock if level < cfg.recompute_levels else L.ResNetBlock
    return cls(cfg.filters(level), cfg.groups, cfg.weight_decay, name=name)


def _upsample(cfg: ModelConfig, level: int, name: str) -> L.TrilinearUpSampling3D:
    """The trilinear x2 upsampling into ``level``; under --recompute of that
    level, one whose output the block after it can make again."""
    recomputed = level < cfg.recompute_levels
    return (R.RecomputedUpSampling3D if recomputed else L.TrilinearUpSampling3D)(2, name=name)


def _encode(x, cfg: ModelConfig, stage: _Stages) -> list:
    """Encoder: returns the output of every level, finest first (§3.1)."""
    # Under --recompute the first block makes the stem's output again
    # instead of keeping it (brats_tf.recompute).
    stem = cfg.recompute_levels > 0
    x = stage(
        "InitConv",
        lambda: L.conv3d(
            cfg.init_filters,
            3,
            l2_weight=cfg.weight_decay,
            name="InitConv",
            layer_class=R.StemConv3D if stem else keras.layers.Conv3D,
        ),
    )(x)
    dropout = R.StemDropout3D if stem else keras.layers.SpatialDropout3D
    x = stage("InitDropout", lambda: dropout(cfg.dropout, seed=cfg.seed, name="InitDropout"))(x)
    features = []
    for level, n_blocks in enumerate(cfg.blocks_down):
        filters = cfg.filters(level)
        if level > 0:
            name = f"EncoderDown{level}"
            x = stage(
                name, lambda: L.conv3d(filters, 3, strides=2, l2_weight=cfg.weight_decay, name=name)
            )(x)
        for i in range(n_blocks):
            name = f"EncoderBlock{level}_{i}"
            x = stage(name, lambda: _block(cfg, level, name))(x)
        features.append(x)
    return features


def _head_kernel_initializer(cfg: ModelConfig):
    """The segmentation head's stored kernel initialiser (ModelConfig.head_kernel_init),
    divided by head_lr_multiplier: the effective kernel starts as the option says."""
    m = cfg.head_lr_multiplier
    if cfg.head_kernel_init == "normal":
        return keras.initializers.RandomNormal(stddev=cfg.head_kernel_std / m)
    if m == 1:
        return "glorot_uniform"
    # glorot_uniform is VarianceScaling(1, fan_avg, uniform); its std scales with sqrt(scale)
    return keras.initializers.VarianceScaling(1.0 / m**2, mode="fan_avg", distribution="uniform")


def _decode(features: list, cfg: ModelConfig, stage: _Stages):
    """Segmentation decoder with additive skips (§3.1); returns probabilities."""
    x = features[-1]
    for level in reversed(range(cfg.levels - 1)):
        filters = cfg.filters(level)
        up = f"DecoderUp{level}"
        x = stage(
            f"{up}_Conv1",
            lambda: L.conv3d(filters, 1, l2_weight=cfg.weight_decay, name=f"{up}_Conv1"),
        )(x)
        x = stage(f"{up}_Upsample", lambda: _upsample(cfg, level, f"{up}_Upsample"))(x)
        add = R.SkipAdd if level < cfg.recompute_levels else keras.layers.Add
        x = stage(f"{up}_Add", lambda: add(name=f"{up}_Add"))([x, features[level]])
        for i in range(cfg.blocks_up[level]):
            name = f"DecoderBlock{level}_{i}"
            x = stage(name, lambda: _block(cfg, level, name))(x)
    head = R.HeadConv3D if cfg.recompute_levels > 0 else keras.layers.Conv3D
    x = stage(
        "DecoderEnd_Conv1",
        lambda: L.conv3d(
            cfg.num_classes,
            1,
            l2_weight=cfg.weight_decay,
            name="DecoderEnd_Conv1",
            layer_class=head,
            kernel_initializer=_head_kernel_initializer(cfg),
            bias_initializer=keras.initializers.Constant(
                cfg.head_bias_init / cfg.head_lr_multiplier
            ),
        ),
    )(x)
    if cfg.head_lr_multiplier != 1:
        scale = cfg.head_lr_multiplier
        x = stage(
            "DecoderEnd_Scale",
            lambda: keras.layers.Rescaling(scale, name="DecoderEnd_Scale"),
        )(x)
    # float32 outputs under a mixed precision policy.
    return stage(
        "DecoderEnd_Sigmoid",
        lambda: keras.layers.Activation("sigmoid", dtype="float32", name="DecoderEnd_Sigmoid"),
    )(x)


def _vae(endpoint, cfg: ModelConfig, stage: _Stages):
    """VAE branch (§3.2, Table 1), from the encoder endpoint, no skips.

    Returns (recon, z_mean, z_log_var).
    """
    # VD: GN, ReLU, Conv(16) stride 2, flatten, Dense(2 * latent).
    x = stage("VD_GN", lambda: L.GroupNorm(cfg.groups, epsilon=1e-5, name="VD_GN"))(endpoint)
    x = stage("VD_ReLU", lambda: keras.layers.ReLU(name="VD_ReLU"))(x)
    x = stage(
        "VD_Conv",
        lambda: L.conv3d(cfg.vae_filters, 3, strides=2, l2_weight=cfg.weight_decay, name="VD_Conv"),
    )(x)
    x = stage("VD_Flatten", lambda: keras.layers.Flatten(name="VD_Flatten"))(x)
    x = stage("VD_Dense", lambda: keras.layers.Dense(2 * cfg.latent_dim, name="VD_Dense"))(x)
    # VDraw: split into mean / log-variance, sample by reparameterisation.
    z, z_mean, z_log_var = stage("VDraw", lambda: L.GaussianSampling(seed=cfg.seed, name="VDraw"))(
        x
    )
    # VU: Dense to vae_filters x grid, ReLU, Conv1 to the endpoint width, upsample.
    grid = cfg.vae_grid
    x = stage(
        "VU_Dense",
        lambda: keras.layers.Dense(cfg.vae_filters * grid[0] * grid[1] * grid[2], name="VU_Dense"),
    )(z)
    x = stage("VU_ReLU", lambda: keras.layers.ReLU(name="VU_ReLU"))(x)
    x = stage(
        "VU_Reshape", lambda: keras.layers.Reshape(grid + (cfg.vae_filters,), name="VU_Reshape")
    )(x)
    top = cfg.levels - 1
    x = stage(
        "VU_Conv1",
        lambda: L.conv3d(cfg.filters(top), 1, l2_weight=cfg.weight_decay, name="VU_Conv1"),
    )(x)
    x = stage("VU_Upsample", lambda: L.TrilinearUpSampling3D(2, name="VU_Upsample"))(x)
    # VUp{level}: Conv1 (halve channels), upsample; VBlock{level}: ResNet block.
    for level in reversed(range(top)):
        filters = cfg.filters(level)
        x = stage(
            f"VUp{level}_Conv1",
            lambda: L.conv3d(filters, 1, l2_weight=cfg.weight_decay, name=f"VUp{level}_Conv1"),
        )(x)
        x = stage(f"VUp{level}_Upsample", lambda: _upsample(cfg, level, f"VUp{level}_Upsample"))(x)
        x = stage(f"VBlock{level}_0", lambda: _block(cfg, level, f"VBlock{level}_0"))(x)
    # Vend: Conv1 to the input channels, float32 (compared with the input).
    head = R.HeadConv3D if cfg.recompute_levels > 0 else keras.layers.Conv3D
    recon = stage(
        "Vend",
        lambda: L.conv3d(
            cfg.in_channels,
            1,
            l2_weight=cfg.weight_decay,
            name="Vend",
            dtype="float32",
            layer_class=head,
        ),
    )(x)
    return recon, z_mean, z_log_var


def build_model(
    config: ModelConfig | None = None, name: str = "brats_vae_segmenter"
) -> keras.Model:
    """The training model of Table 1 (encoder, segmentation decoder, VAE)."""
    cfg = config or ModelConfig()
    stage = _Stages()
    image = keras.Input(cfg.input_shape + (cfg.in_channels,), name="image")
    x = L.SpatialDivisibilityCheck(cfg.spatial_divisor, name="InputCheck")(image)
    features = _encode(x, cfg, stage)
    outputs = {"seg": _decode(features, cfg, stage)}
    if cfg.vae:
        recon, z_mean, z_log_var = _vae(features[-1], cfg, stage)
        outputs.update(recon=recon, z_mean=z_mean, z_log_var=z_log_var)
    return keras.Model(image, outputs, name=name)


def config_from_model(model: keras.Model) -> ModelConfig:
    """Recovers the segmentation network's ModelConfig from a built model.

    Works on a model from ``build_model`` or one loaded from a ``.keras`` file:
    levels and blocks per level are counted from the paper's stage names.
    """
    names = [layer.name for layer in model.layers]

    def count(prefix: str) -> dict[int, int]:
        found: dict[int, int] = {}
        for n in names:
            m = re.fullmatch(rf"{prefix}(\d+)_(\d+)", n)
            if m:
                found[int(m[1])] = found.get(int(m[1]), 0) + 1
        return found

    down, up = count("EncoderBlock"), count("DecoderBlock")
    if not down or "InitConv" not in names:
        raise ValueError(
            f"model {model.name!r} is not a brats_tf model: no InitConv / EncoderBlock layers"
        )
    init = model.get_layer("InitConv")
    block = model.get_layer("EncoderBlock0_0")
    image_shape = model.inputs[0].shape
    vae = "Vend" in names
    recompute_levels = sum(
        1 for level in down if model.get_layer(f"EncoderBlock{level}_0").recompute
    )
    input_shape = tuple(image_shape[1:4])
    if None in input_shape:  # an inference model: any size; keep a valid placeholder
        input_shape = (2 ** len(down),) * 3
    return ModelConfig(
        input_shape=input_shape,
        in_channels=image_shape[-1],
        num_classes=model.get_layer("DecoderEnd_Conv1").filters,
        init_filters=init.filters,
        groups=block.groups,
        blocks_down=tuple(down[i] for i in range(len(down))),
        blocks_up=tuple(up[i] for i in range(len(up))),
        dropout=model.get_layer("InitDropout").rate,
        weight_decay=block.l2_weight,
        vae=vae,
        recompute_levels=recompute_levels,
        head_lr_multiplier=(
            float(model.get_layer("DecoderEnd_Scale").scale) if "DecoderEnd_Scale" in names else 1.0
        ),
    )


def build_inference_model(
    model: keras.Model,
    spatial_shape: tuple = (None, None, None),
    name: str = "brats_segmenter",
    precision: str | None = None,
) -> keras.Model:
    """Encoder + segmentation decoder of ``model``, sharing its weights, no VAE.

    Args:
      model: a training model from ``build_model`` (or loaded from .keras), or
        an inference model.
      spatial_shape: (D, H, W) of the input; ``None`` for any size. Known sizes
        must be divisible by 8 (2 ** (levels - 1)), else ValueError.
      precision: the Keras dtype policy to compute in (``PRECISIONS``); None
        or ``model``'s own: share ``model``'s layers. Another: new layers
        under that policy with a copy of the weights (variables stay
        float32; ``model`` is untouched). ``mixed_bfloat16`` halves the
        inference time on CPUs with AMX (docs/performance.md), ``mixed_float16`` is for
        GPUs (on a CPU it is ~150x slower). GroupNorm statistics and the
        sigmoid stay float32 under either.

    Returns a model [B, D, H, W, 4] -> {"seg": [B, D, H, W, 3] probabilities}.
    """
    cfg = config_from_model(model)
    spatial_shape = tuple(spatial_shape)
    if len(spatial_shape) != 3:
        raise ValueError(f"spatial_shape must be (D, H, W), got {spatial_shape!r}")
    L.check_spatial_shape(spatial_shape, cfg.spatial_divisor)
    if check_precision(precision) is not None and precision != model_precision(model):
        # The segmentation layers only (no VAE), plain blocks: inference
        # never recomputes.
        copy_cfg = dataclasses.replace(cfg, vae=False, recompute_levels=0)
        with _global_policy(precision):
            copy = build_model(copy_cfg, name=f"{model.name}_{precision}")
        for layer in copy.layers:
            if layer.weights:
                layer.set_weights(model.get_layer(layer.name).get_weights())
        model, cfg = copy, copy_cfg
    stage = _Stages(model)
    image = keras.Input(spatial_shape + (cfg.in_channels,), name="image")
    x = L.SpatialDivisibilityCheck(cfg.spatial_divisor, name="InputCheck")(image)
    seg = _decode(_encode(x, cfg, stage), cfg, stage)
    return keras.Model(image, {"seg": seg}, name=name)
