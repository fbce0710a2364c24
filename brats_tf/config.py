"""Frozen configurations. Defaults are the paper's (§3, §3.4, §3.5).

Library code takes these (or plain arguments) and never reads absl FLAGS;
entry points turn their flags into these dataclasses. Every field is checked
in ``__post_init__`` and a bad value is quoted in the error.
"""

from __future__ import annotations

import dataclasses

from data_pipeline import constants


def int_flag_list(name: str, values) -> tuple[int, ...]:
    """An entry point's list flag (``--name=1,2,3``, as absl gives it) as integers;
    ValueError naming the flag and quoting the values."""
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--{name} must be integers, got {','.join(values)}") from None


def _positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


def _non_negative(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{owner}.{name} must be a number >= 0, got {value!r}")


# The segmentation head's kernel initialisers (ModelConfig.head_kernel_init).
HEAD_KERNEL_INITS = ("glorot_uniform", "normal")


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
      l2_weight: L2 weight on every convolution kernel (1e-5).
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
    """

    input_shape: tuple[int, int, int] = constants.PAPER_CROP
    in_channels: int = constants.NUM_MODALITIES
    num_classes: int = constants.NUM_REGIONS
    init_filters: int = 32
    groups: int = 8
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    blocks_up: tuple[int, ...] = (1, 1, 1)
    vae_filters: int = 16
    latent_dim: int = 128
    dropout: float = 0.2
    l2_weight: float = 1e-5
    vae: bool = True
    seed: int | None = None
    recompute_levels: int = 0
    head_kernel_init: str = "glorot_uniform"
    head_kernel_std: float = 0.01
    head_bias_init: float = 0.0

    def __post_init__(self):
        owner = "ModelConfig"
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "blocks_down", tuple(self.blocks_down))
        object.__setattr__(self, "blocks_up", tuple(self.blocks_up))
        if len(self.input_shape) != 3:
            raise ValueError(f"{owner}.input_shape must be (D, H, W), got {self.input_shape!r}")
        for name in ("in_channels", "num_classes", "init_filters", "groups", "vae_filters",
                     "latent_dim"):
            _positive_int(owner, name, getattr(self, name))
        for n in self.input_shape:
            _positive_int(owner, "input_shape", n)
        if len(self.blocks_down) < 2:
            raise ValueError(
                f"{owner}.blocks_down needs at least 2 levels, got {self.blocks_down!r}"
            )
        for n in self.blocks_down + self.blocks_up:
            _positive_int(owner, "blocks_down/blocks_up", n)
        if len(self.blocks_up) != len(self.blocks_down) - 1:
            raise ValueError(
                f"{owner}.blocks_up needs one entry per decoder level "
                f"({len(self.blocks_down) - 1} for blocks_down={self.blocks_down}), "
                f"got {self.blocks_up!r}"
            )
        if self.init_filters % self.groups:
            raise ValueError(
                f"{owner}.init_filters={self.init_filters} is not divisible by "
                f"groups={self.groups}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{owner}.dropout must be in [0, 1), got {self.dropout!r}")
        _non_negative(owner, "l2_weight", self.l2_weight)
        if (isinstance(self.recompute_levels, bool) or not isinstance(self.recompute_levels, int)
                or not 0 <= self.recompute_levels <= self.levels):
            raise ValueError(f"{owner}.recompute_levels must be an integer in [0, {self.levels}], "
                             f"got {self.recompute_levels!r}")
        if self.head_kernel_init not in HEAD_KERNEL_INITS:
            raise ValueError(f"{owner}.head_kernel_init must be one of {HEAD_KERNEL_INITS}, "
                             f"got {self.head_kernel_init!r}")
        if (isinstance(self.head_kernel_std, bool)
                or not isinstance(self.head_kernel_std, (int, float))
                or not 0 < self.head_kernel_std < 10):
            raise ValueError(f"{owner}.head_kernel_std must be a number in (0, 10), "
                             f"got {self.head_kernel_std!r}")
        if (isinstance(self.head_bias_init, bool)
                or not isinstance(self.head_bias_init, (int, float))
                or not abs(self.head_bias_init) < 50):
            raise ValueError(f"{owner}.head_bias_init must be a number in (-50, 50), "
                             f"got {self.head_bias_init!r}")
        divisor = self.train_divisor if self.vae else self.spatial_divisor
        bad = [n for n in self.input_shape if n % divisor]
        if bad:
            why = ("the VAE branch halves the encoder endpoint once more"
                   if self.vae else "the encoder downsamples")
            raise ValueError(
                f"{owner}.input_shape {self.input_shape} must be divisible by {divisor} "
                f"({why}); sizes {bad} are not"
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
        return 2 ** self.levels

    def filters(self, level: int) -> int:
        """Channels at encoder/decoder level ``level`` (32, 64, 128, 256)."""
        return self.init_filters * 2 ** level

    @property
    def vae_grid(self) -> tuple[int, int, int]:
        """Spatial size of VD's output and VU's reshape (10 x 12 x 8)."""
        return tuple(n // self.train_divisor for n in self.input_shape)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """L = dice_weight * L_dice + l2_weight * L_L2 + kl_weight * L_KL (§3.4).

    Attributes:
      dice_weight, l2_weight, kl_weight: the paper's 1, 0.1, 0.1.
      dice_epsilon: the epsilon in the soft Dice denominator.
    """

    dice_weight: float = 1.0
    l2_weight: float = 0.1
    kl_weight: float = 0.1
    dice_epsilon: float = 1e-5

    def __post_init__(self):
        for name in ("dice_weight", "l2_weight", "kl_weight"):
            _non_negative("LossConfig", name, getattr(self, name))
        if not self.dice_epsilon > 0:
            raise ValueError(f"LossConfig.dice_epsilon must be > 0, got {self.dice_epsilon!r}")
