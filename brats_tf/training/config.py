"""How to train (§3.5, §3.6): ``TrainConfig``, train.py's resolved training flags."""

from __future__ import annotations

import dataclasses

from brats_tf.model import PRECISIONS

STRATEGIES = ("default", "mirrored", "multi_worker")
ON_NONFINITE = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train (§3.5, §3.6). Defaults are the paper's single-GPU recipe.

    Attributes:
      model_dir: checkpoints, TensorBoard logs, the resolved flags, the export.
      num_train_cases: cases in one epoch (the training split's size).
      epochs: N_e, total epochs of the poly schedule (300).
      initial_lr: Adam's initial learning rate (1e-4).
      lr_power: exponent of the poly decay (0.9).
      adam_epsilon: Adam's epsilon (Keras' default 1e-7; the paper names none).
      batch_per_replica: examples per replica and step (1).
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
      jit_compile: XLA for the train step (off: 7-9x slower on CPU).
      verbose: Keras progress bar per epoch.
    """

    model_dir: str
    num_train_cases: int
    epochs: int = 300
    initial_lr: float = 1e-4
    lr_power: float = 0.9
    adam_epsilon: float = 1e-7
    batch_per_replica: int = 1
    strategy: str = "default"
    devices: tuple[str, ...] = ()
    precision: str = "float32"
    on_nonfinite: str = "stop"
    seed: int = 0
    deterministic: bool = False
    steps_per_epoch: int | None = None
    keep_checkpoints: int = 3
    jit_compile: bool = False
    verbose: bool = True

    def __post_init__(self):
        object.__setattr__(self, "devices", tuple(self.devices))
        if not self.model_dir:
            raise ValueError("TrainConfig.model_dir must be set")
        for name in ("num_train_cases", "epochs", "batch_per_replica", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.steps_per_epoch is not None and (
            not isinstance(self.steps_per_epoch, int) or self.steps_per_epoch < 1
        ):
            raise ValueError(
                f"TrainConfig.steps_per_epoch must be a positive integer or None, "
                f"got {self.steps_per_epoch!r}"
            )
        if not self.initial_lr > 0:
            raise ValueError(f"TrainConfig.initial_lr must be > 0, got {self.initial_lr!r}")
        if not self.adam_epsilon > 0:
            raise ValueError(f"TrainConfig.adam_epsilon must be > 0, got {self.adam_epsilon!r}")
        if not self.lr_power > 0:
            raise ValueError(f"TrainConfig.lr_power must be > 0, got {self.lr_power!r}")
        for name, allowed in (("strategy", STRATEGIES), ("precision", PRECISIONS),
                              ("on_nonfinite", ON_NONFINITE)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
