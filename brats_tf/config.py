"""Frozen configurations. Defaults are the paper's (§3, §3.4, §3.5).

Library code takes these (or plain arguments) and never reads absl FLAGS;
entry points turn their flags into these dataclasses. Every field is checked
in ``__post_init__`` and a bad value is quoted in the error. A field that
train.py sets from a flag is declared with ``flagged``: its default, and the
flag's name, help and bounds (``flag_fields`` reads them).
"""

from __future__ import annotations

import dataclasses

from data_pipeline import constants
from data_pipeline.checks import positive_int
from data_pipeline.flag_fields import flagged

# Keras dtype policies a network trains or infers in (mixed_float16: GPUs;
# mixed_bfloat16: CPUs with AMX or AVX512-BF16, and GPUs).
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def check_precision(precision) -> str | None:
    """``precision`` if it is None or one of ``PRECISIONS``, else ValueError."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (or None), got {precision!r}")
    return precision


# tf.distribute strategies of training: one device, all local GPUs, several machines.
STRATEGIES = ("default", "mirrored", "multi_worker")
# What training does at a NaN/inf loss: stop the run, or skip that update.
ON_NONFINITE = ("stop", "skip")
# The segmentation head's kernel initialisers (ModelConfig.head_kernel_init).
HEAD_KERNEL_INITS = ("glorot_uniform", "normal")
# ModelConfig fields renamed since earlier runs wrote their config.json: old name -> new.
RENAMED_MODEL_FIELDS = {"l2_weight": "weight_decay"}


def _non_negative(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{owner}.{name} must be a number >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network of Table 1.

    Attributes:
      input_shape: training crop (D, H, W); the paper's 160 x 192 x 128. Must be
        divisible by 2 ** len(blocks_down) (16 for the paper) because the VAE
        branch halves the encoder endpoint once more and upsamples it back.
      in_channels: input modalities (4: T1, T1c, T2, FLAIR).
      num_classes: sigmoid output channels (3: WT, TC, ET).
      init_filters: InitConv filters (32); doubled at every EncoderDown.
      groups: GroupNormalization groups (8).
      blocks_down: ResNet blocks per encoder level (1, 2, 2, 4).
      blocks_up: ResNet blocks per decoder level, from the finest level
        (DecoderBlock0) to the coarsest (DecoderBlock2): (1, 1, 1).
      vae_filters: filters of the VD convolution (16).
      latent_dim: size of the VAE's latent vector (128); VD's Dense has
        2 * latent_dim units (mean and log-variance halves).
      dropout: spatial dropout rate after InitConv (0.2).
      weight_decay: L2 weight on every convolution kernel (1e-5, §3.5).
      vae: build the VAE branch (training model only; off = ablation).
      seed: seed of VDraw's sampling and of the dropout (None: random).
      recompute_levels: gradient checkpointing: the ResNet blocks
        of the finest ``recompute_levels`` levels (encoder, decoder and VAE)
        recompute their activations in the backward pass instead of keeping
        them; 0 = off (the paper), 1 = the full-resolution blocks. Same
        results, less memory, a little more time.
      head_kernel_init: the segmentation head's (DecoderEnd_Conv1) kernel
        initialiser, one of HEAD_KERNEL_INITS; the paper names none.
        'glorot_uniform' (Keras' default, as every other convolution);
        'normal': normal with std head_kernel_std (0.01 as Lin et al. 2017,
        "Focal loss": every voxel starts at the probability of
        head_bias_init).
      head_kernel_std: the std of the 'normal' head kernel.
      head_bias_init: the head's initial bias, the same for the 3 channels
        (0: Keras' default; e.g. -4.6 = logit(0.01), a rare-foreground prior).
      head_lr_multiplier: the head's kernel and bias learn this many times
        faster than every other weight (1: as the paper). They are stored
        divided by it and multiplied back after the convolution (the layer
        DecoderEnd_Scale): Adam moves a stored weight by about the learning
        rate a step, so the head's effective weights move this many times
        more. The initialisation above is of the effective weights; the L2
        weight decay acts on the stored kernel (weaker by its square).
      l2_weight: weight_decay's earlier name, which config.json files of
        earlier runs hold (``ModelConfig(**saved)`` reads them): given, it is
        the weight_decay; never stored.
    """

    input_shape: tuple[int, int, int] = flagged(
        constants.PAPER_CROP, "Training crop D,H,W; divisible by 16.", name="crop"
    )
    in_channels: int = constants.NUM_MODALITIES
    num_classes: int = constants.NUM_REGIONS
    init_filters: int = flagged(32, "InitConv filters; doubled per level.", lower_bound=1)
    groups: int = flagged(8, "GroupNorm groups.", lower_bound=1)
    blocks_down: tuple[int, ...] = flagged((1, 2, 2, 4), "ResNet blocks per encoder level.")
    blocks_up: tuple[int, ...] = flagged(
        (1, 1, 1), "ResNet blocks per decoder level (finest first)."
    )
    vae_filters: int = 16
    latent_dim: int = flagged(128, "VAE latent size.", lower_bound=1)
    dropout: float = flagged(
        0.2, "Spatial dropout after InitConv.", lower_bound=0.0, upper_bound=0.99
    )
    weight_decay: float = flagged(1e-5, "L2 weight on convolution kernels.", lower_bound=0.0)
    vae: bool = flagged(True, "Train with the VAE branch (off: the ablation).")
    seed: int | None = None
    recompute_levels: int = 0
    head_kernel_init: str = flagged(
        "glorot_uniform",
        "Kernel initialiser of the segmentation head DecoderEnd_Conv1 (the "
        "paper names none): Keras' glorot_uniform, or normal with std --head_kernel_std.",
        choices=HEAD_KERNEL_INITS,
    )
    head_kernel_std: float = flagged(
        0.01,
        "Std of --head_kernel_init=normal (0.01: every voxel starts near the probability "
        "of --head_bias_init).",
        lower_bound=0.0,
    )
    head_bias_init: float = flagged(
        0.0,
        "Initial bias of the segmentation head's 3 channels (e.g. -4.6 = logit(0.01), a "
        "rare-foreground prior).",
    )
    head_lr_multiplier: float = flagged(
        1.0,
        "The segmentation head's kernel and bias learn this many times faster than the "
        "other weights (stored divided by it, multiplied back after the convolution); "
        "1: as the paper.",
    )
    l2_weight: dataclasses.InitVar[float | None] = None

    def __post_init__(self, l2_weight):
        owner = "ModelConfig"
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "blocks_down", tuple(self.blocks_down))
        object.__setattr__(self, "blocks_up", tuple(self.blocks_up))
        if l2_weight is not None:
            if self.weight_decay != ModelConfig.weight_decay:
                raise ValueError(
                    f"{owner}: weight_decay={self.weight_decay!r} and its earlier "
                    f"name l2_weight={l2_weight!r}; give one"
                )
            object.__setattr__(self, "weight_decay", l2_weight)
        if len(self.input_shape) != 3:
            raise ValueError(f"{owner}.input_shape must be (D, H, W), got {self.input_shape!r}")
        for name in (
            "in_channels",
            "num_classes",
            "init_filters",
            "groups",
            "vae_filters",
            "latent_dim",
        ):
            positive_int(f"{owner}.{name}", getattr(self, name))
        for n in self.input_shape:
            positive_int(f"{owner}.input_shape", n)
        self._check_levels(owner)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{owner}.dropout must be in [0, 1), got {self.dropout!r}")
        _non_negative(owner, "weight_decay", self.weight_decay)
        if (
            isinstance(self.recompute_levels, bool)
            or not isinstance(self.recompute_levels, int)
            or not 0 <= self.recompute_levels <= self.levels
        ):
            raise ValueError(
                f"{owner}.recompute_levels must be an integer in [0, {self.levels}], "
                f"got {self.recompute_levels!r}"
            )
        self._check_head(owner)
        divisor = self.train_divisor if self.vae else self.spatial_divisor
        bad = [n for n in self.input_shape if n % divisor]
        if bad:
            why = (
                "the VAE branch halves the encoder endpoint once more"
                if self.vae
                else "the encoder downsamples"
            )
            raise ValueError(
                f"{owner}.input_shape {self.input_shape} must be divisible by {divisor} "
                f"({why}); sizes {bad} are not"
            )

    def _check_levels(self, owner: str) -> None:
        if len(self.blocks_down) < 2:
            raise ValueError(
                f"{owner}.blocks_down needs at least 2 levels, got {self.blocks_down!r}"
            )
        for n in self.blocks_down + self.blocks_up:
            positive_int(f"{owner}.blocks_down/blocks_up", n)
        if len(self.blocks_up) != len(self.blocks_down) - 1:
            raise ValueError(
                f"{owner}.blocks_up needs one entry per decoder level "
                f"({len(self.blocks_down) - 1} for blocks_down={self.blocks_down}), "
                f"got {self.blocks_up!r}"
            )
        if self.init_filters % self.groups:
            raise ValueError(
                f"{owner}.init_filters={self.init_filters} is not divisible by groups={self.groups}"
            )

    def _check_head(self, owner: str) -> None:
        if self.head_kernel_init not in HEAD_KERNEL_INITS:
            raise ValueError(
                f"{owner}.head_kernel_init must be one of {HEAD_KERNEL_INITS}, "
                f"got {self.head_kernel_init!r}"
            )
        if (
            isinstance(self.head_kernel_std, bool)
            or not isinstance(self.head_kernel_std, (int, float))
            or not 0 < self.head_kernel_std < 10
        ):
            raise ValueError(
                f"{owner}.head_kernel_std must be a number in (0, 10), got {self.head_kernel_std!r}"
            )
        if (
            isinstance(self.head_bias_init, bool)
            or not isinstance(self.head_bias_init, (int, float))
            or not abs(self.head_bias_init) < 50
        ):
            raise ValueError(
                f"{owner}.head_bias_init must be a number in (-50, 50), got {self.head_bias_init!r}"
            )
        if (
            isinstance(self.head_lr_multiplier, bool)
            or not isinstance(self.head_lr_multiplier, (int, float))
            or not 0 < self.head_lr_multiplier <= 1000
        ):
            raise ValueError(
                f"{owner}.head_lr_multiplier must be a number in (0, 1000], "
                f"got {self.head_lr_multiplier!r}"
            )

    @property
    def levels(self) -> int:
        return len(self.blocks_down)

    @property
    def spatial_divisor(self) -> int:
        """Inference inputs must be divisible by this (8 for the paper)."""
        return 2 ** (self.levels - 1)

    @property
    def train_divisor(self) -> int:
        """Training crops must be divisible by this when the VAE is on (16)."""
        return 2**self.levels

    def filters(self, level: int) -> int:
        """Channels at encoder/decoder level ``level`` (32, 64, 128, 256)."""
        return self.init_filters * 2**level

    @property
    def vae_grid(self) -> tuple[int, int, int]:
        """Spatial size of VD's output and VU's reshape (10 x 12 x 8)."""
        return tuple(n // self.train_divisor for n in self.input_shape)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """L = dice_weight * L_dice + l2_weight * L_L2 + kl_weight * L_KL (§3.4).

    Attributes:
      dice_weight, l2_weight, kl_weight: the paper's 1, 0.1, 0.1; l2_weight
        weighs L_L2, the VAE's reconstruction loss (not the kernels' weight
        decay, ModelConfig.weight_decay).
      dice_epsilon: the epsilon in the soft Dice denominator.
    """

    dice_weight: float = flagged(1.0, "Weight of the soft Dice loss.", lower_bound=0.0)
    l2_weight: float = flagged(
        0.1, "Weight of the VAE reconstruction loss.", name="l2_loss_weight", lower_bound=0.0
    )
    kl_weight: float = flagged(0.1, "Weight of the VAE KL loss.", lower_bound=0.0)
    dice_epsilon: float = 1e-5

    def __post_init__(self):
        for name in ("dice_weight", "l2_weight", "kl_weight"):
            _non_negative("LossConfig", name, getattr(self, name))
        if not self.dice_epsilon > 0:
            raise ValueError(f"LossConfig.dice_epsilon must be > 0, got {self.dice_epsilon!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train (§3.5, §3.6): train.py's resolved training flags. Defaults
    are the paper's single-GPU recipe; each flagged field is train.py's flag of
    the same name (``initial_lr``: --lr).

    Attributes:
      model_dir: checkpoints, TensorBoard logs, the resolved flags, the export.
      num_train_cases: cases in one epoch (the training split's size).
      epochs: N_e, total epochs of the poly schedule.
      initial_lr, lr_power: the poly schedule lr = initial_lr (1 - e/N_e)^lr_power.
      adam_epsilon: Adam's epsilon (Keras' default; the paper names none).
      batch_per_replica: examples per replica and step.
      strategy: 'default' (one device), 'mirrored' (local GPUs), 'multi_worker'.
      devices: for 'mirrored', the devices to use (empty: all local GPUs).
      precision: Keras dtype policy: float32, mixed_float16, mixed_bfloat16.
      on_nonfinite: 'stop' the run with an error naming the step, or 'skip'
        the update of a step whose loss or gradients are not finite.
      seed: seeds the weights, dropout, VAE sampling and the data order.
      deterministic: also make TF ops deterministic (slower; for tests).
      steps_per_epoch: cap on steps per epoch (None: num_train_cases //
        global batch); for smoke runs.
      keep_checkpoints: how many epoch checkpoints to keep.
      jit_compile: XLA for the train step (7-9x slower on a CPU).
      verbose: Keras progress bar per epoch.
    """

    model_dir: str
    num_train_cases: int
    epochs: int = flagged(300, "Epochs N_e of the poly schedule.", lower_bound=1)
    initial_lr: float = flagged(1e-4, "Adam's initial learning rate.", name="lr", lower_bound=0.0)
    lr_power: float = flagged(0.9, "Exponent of the poly decay.", lower_bound=0.0)
    adam_epsilon: float = flagged(
        1e-7, "Adam's epsilon (Keras' default; the paper names none).", lower_bound=0.0
    )
    batch_per_replica: int = flagged(1, "Examples per replica and step.", lower_bound=1)
    strategy: str = flagged("default", "tf.distribute strategy.", choices=STRATEGIES)
    devices: tuple[str, ...] = flagged(
        (), "Devices for --strategy=mirrored (default: all local GPUs)."
    )
    precision: str = flagged(
        "float32", "Keras dtype policy (mixed_float16 on GPUs).", choices=PRECISIONS
    )
    on_nonfinite: str = flagged(
        "stop", "A NaN/inf loss stops the run, or its update is skipped.", choices=ON_NONFINITE
    )
    seed: int = flagged(0, "Seed of weights, dropout, VAE sampling, data order.")
    deterministic: bool = flagged(False, "Deterministic ops and data (slower).")
    steps_per_epoch: int | None = flagged(
        None, "Cap on steps per epoch (default: one pass).", lower_bound=1
    )
    keep_checkpoints: int = flagged(3, "Epoch checkpoints kept.", lower_bound=1)
    jit_compile: bool = flagged(False, "XLA-compile the train step (slow on CPU).")
    verbose: bool = flagged(True, "Progress bar per epoch.")

    def __post_init__(self):
        object.__setattr__(self, "devices", tuple(self.devices))
        if not self.model_dir:
            raise ValueError("TrainConfig.model_dir must be set")
        for name in ("num_train_cases", "epochs", "batch_per_replica", "keep_checkpoints"):
            positive_int(f"TrainConfig.{name}", getattr(self, name))
        if self.steps_per_epoch is not None:
            positive_int("TrainConfig.steps_per_epoch", self.steps_per_epoch)
        for name in ("initial_lr", "adam_epsilon", "lr_power"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name, allowed in (
            ("strategy", STRATEGIES),
            ("precision", PRECISIONS),
            ("on_nonfinite", ON_NONFINITE),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )


def check_precision_for_model(model_config: ModelConfig, precision: str) -> None:
    """ValueError for a precision this network cannot be trained in.

    mixed_bfloat16 with the coarsest level 2 voxels deep (a crop depth of
    16 for the paper's 4 levels): oneDNN's bfloat16 kernel gradient of a
    3x3x3 convolution whose output is 2 deep (v3.7.3,
    ``jit_bf16:avx512_core_bf16`` backward_weights, on CPUs with AVX512-BF16
    and no AMX) reads memory it should not, and gives wrong, at times
    infinite or NaN, values for two of the kernel's three depth taps
    (docs/deviations.md). Refused everywhere, whatever the device."""
    depth = model_config.input_shape[0] // model_config.spatial_divisor
    if precision == "mixed_bfloat16" and depth == 2:
        raise ValueError(
            f"mixed_bfloat16 with a crop depth of {model_config.input_shape[0]} (the coarsest "
            f"level is 2 deep, where oneDNN's bfloat16 kernel gradient is wrong on some CPUs): "
            f"use a depth of at least {3 * model_config.spatial_divisor}, or float32"
        )
