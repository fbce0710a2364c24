"""The paper's training recipe (§3.4-3.6) as one custom, distribution-aware loop.

One code path for one device, ``MirroredStrategy`` (all local GPUs) and
``MultiWorkerMirroredStrategy`` (several machines, from TF_CONFIG). A custom
loop rather than ``model.fit``: ``fit`` with MultiWorkerMirroredStrategy hits
an open Keras bug (keras-team/keras#20585), and the loop makes the two things
that matter explicit and tested:

* distribution scaling: per-example losses are summed over the replica's
  examples and divided by the GLOBAL batch size, the regularisation loss by
  the number of replicas, because the replicas' gradients are SUMMED;
* mixed precision: ``optimizer.scale_loss`` before the gradient (a
  ``LossScaleOptimizer`` unscales, and skips steps whose gradients overflow).

An epoch is one pass over the training cases in random order (§3.6), the
learning rate is set per epoch by ``schedules.poly_lr`` (§3.5), a checkpoint
(model, optimizer, epoch, random-generator states) is written after every
epoch, and a run restarted with the same ``model_dir`` resumes from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import threading
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from data_pipeline import constants
from brats_tf import losses, metrics
from brats_tf.config import LossConfig, ModelConfig
from data_pipeline.io_utils import write_json_atomic
from brats_tf.model import PRECISIONS, build_inference_model, build_model
from brats_tf.schedules import poly_lr

log = logging.getLogger("brats_tf.training")

STRATEGIES = ("default", "mirrored", "multi_worker")
ON_NONFINITE = ("stop", "skip")

# dataset_fn(input_context, epoch) -> tf.data.Dataset of {"image", "label"}
# batches of the PER-REPLICA batch size: one pass over that pipeline's shard.
DatasetFn = Callable[[tf.distribute.InputContext, int], tf.data.Dataset]


def _release_in_background(holder: list) -> threading.Thread:
    """Empties ``holder`` (which holds the only references to its items) on a
    helper thread, so the items are destroyed there; returns the thread.

    Destroying an epoch's distributed tf.data iterator after the train step
    has used it blocks for up to ~9 s (measured with py-spy on the CPU demo:
    every other epoch stalled at the return of ``_run_epoch``: 24 s of 5
    epochs). It waits, it does not compute, so the loop goes on meanwhile.
    The thread is not a daemon (a daemon killed inside TensorFlow's C++ at
    interpreter exit aborts the process); ``Trainer.train`` joins them.
    """
    thread = threading.Thread(target=holder.clear, name="release-iterator")
    thread.start()
    return thread


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (and on_nonfinite='stop')."""


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


def set_inter_op_threads(recompute_levels: int, strategy: str) -> int | None:
    """TensorFlow's inter-op thread pool for training; call before TensorFlow
    runs an op. Gradient checkpointing on one device runs one op at a time:
    the recomputed blocks' backward passes already run one after the other
    (brats_tf.recompute), and with TensorFlow's default pool the executor
    still ran other full-resolution work beside them (paper crop, float32,
    4 levels, 2-core AMD EPYC Zen 4, 2026-12-04: 7.8 against 6.6 GiB peak
    RSS). Otherwise TensorFlow chooses. Returns the pool's size, or None."""
    if recompute_levels and strategy == "default":
        tf.config.threading.set_inter_op_parallelism_threads(1)
        return 1
    return None


# A region whose training Dice (``metrics.RegionDice``, the mean over the last
# epoch's crops) ends below this has not been learned: its sigmoid channel
# saturated early in training and gets no gradient since (all-on in the brain,
# or nothing), as the demo's seeds 1 and 2 did (docs/demo_runs.md). A
# trained demo model ends at 0.6-0.95 per region, such runs at 0.00-0.01.
UNLEARNED_DICE = 0.1


def unlearned_regions(summary: dict, threshold: float = UNLEARNED_DICE) -> dict:
    """{region: training Dice} of the regions an epoch's ``summary`` (a
    history.json entry, ``dice_<region>``) shows unlearned; {} when none is."""
    return {region: float(summary[f"dice_{region}"]) for region in constants.REGIONS
            if isinstance(summary.get(f"dice_{region}"), (int, float))
            and summary[f"dice_{region}"] < threshold}


def make_optimizer(learning_rate: float, precision: str, skip_nonfinite: bool = False,
                   optimizer_fn: Callable[[float], keras.optimizers.Optimizer] | None = None,
                   epsilon: float = 1e-7) -> keras.optimizers.Optimizer:
    """train.py's optimizer: Adam (§3.5), or ``optimizer_fn(learning_rate)``,
    wrapped in a LossScaleOptimizer under mixed_float16 (dynamic loss
    scaling) or with ``skip_nonfinite``: in float32 the scale stays a power
    of two (exact) and the wrapper's only effect is to skip updates whose
    gradients are not finite."""
    optimizer = (optimizer_fn or (lambda lr: keras.optimizers.Adam(learning_rate=lr,
                                                                   epsilon=epsilon)))(
        learning_rate)
    if precision == "mixed_float16" or skip_nonfinite:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


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
            f"use a depth of at least {3 * model_config.spatial_divisor}, or float32")


def make_train_step(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                    loss_config: LossConfig, strategy: tf.distribute.Strategy | None = None,
                    region_dice=(), jit_compile: bool = False):
    """The training step (§3.4, §3.5), for train.py and the benchmarks alike:
    ``step(batch)`` with ``batch = {"image", "label"}`` (per-replica batches
    of a distributed dataset under ``strategy``) runs forward, the total loss,
    backward and one optimizer update on every replica, updates the
    ``region_dice`` metrics, and returns the per-term loss sums and the
    example count, summed over replicas.

    Per-example losses are summed over the replica's examples and divided by
    the GLOBAL batch, the weight decay (``model.losses``) by the number of
    replicas, because the replicas' gradients are summed; under
    mixed_float16 the loss is scaled before the gradient
    (``optimizer.scale_loss``; a LossScaleOptimizer unscales and skips steps
    whose gradients overflow).
    """
    strategy = strategy or tf.distribute.get_strategy()

    def replica_step(batch):
        image, labels = batch["image"], batch["label"]
        ctx = tf.distribute.get_replica_context()
        local = tf.cast(tf.shape(image)[0], tf.float32)
        global_batch = ctx.all_reduce(tf.distribute.ReduceOp.SUM, local)
        with tf.GradientTape() as tape:
            outputs = model(image, training=True)
            terms = losses.total_loss(labels, image, outputs, loss_config)
            loss = losses.reduce_per_example(terms["loss"], global_batch)
            if model.losses:
                loss += tf.add_n(model.losses) / ctx.num_replicas_in_sync
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        for metric in region_dice:
            metric.update_state(labels, outputs["seg"])
        stats = {name: tf.reduce_sum(value) for name, value in terms.items()}
        stats["count"] = local
        return stats

    def step(batch):
        per_replica = strategy.run(replica_step, args=(batch,))
        return tf.nest.map_structure(
            lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None), per_replica)

    return tf.function(step, jit_compile=jit_compile)


def make_strategy(name: str, devices: tuple[str, ...] = ()) -> tf.distribute.Strategy:
    """The tf.distribute strategy for ``name`` (see TrainConfig.strategy).

    'multi_worker' reads the cluster from the TF_CONFIG environment variable
    and must be created before any other TensorFlow op of the process.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=list(devices) or None)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy 'multi_worker' needs the TF_CONFIG environment variable")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )


class Trainer:
    """Builds model and optimizer under the strategy, trains, checkpoints, resumes."""

    def __init__(
        self,
        model_config: ModelConfig,
        loss_config: LossConfig,
        config: TrainConfig,
        dataset_fn: DatasetFn,
        strategy: tf.distribute.Strategy | None = None,
        epoch_end_fn: Callable[["Trainer", int, dict], dict] | None = None,
        optimizer_fn: Callable[[float], keras.optimizers.Optimizer] | None = None,
    ):
        """Args:
          dataset_fn: see DatasetFn; called once per epoch and input pipeline.
          strategy: overrides config.strategy (tests).
          epoch_end_fn: called after each epoch's training, before its
            checkpoint, with (trainer, epoch, summary); returns extra summary
            values (e.g. validation Dice), or raises to stop the run.
          optimizer_fn: builds the optimizer from the learning rate; default
            Adam (§3.5). Tests use SGD, whose update, unlike Adam's, is not
            invariant to the gradient's scale.
        """
        self.model_config = model_config
        self.loss_config = loss_config
        self.config = config
        self.dataset_fn = dataset_fn
        self._releasing: list[threading.Thread] = []
        self.epoch_end_fn = epoch_end_fn
        self.strategy = strategy or make_strategy(config.strategy, config.devices)
        self.is_chief = _is_chief(self.strategy)
        if config.deterministic:
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(config.seed)
        check_precision_for_model(model_config, config.precision)
        keras.mixed_precision.set_global_policy(config.precision)
        replicas = self.strategy.num_replicas_in_sync
        self.global_batch = config.batch_per_replica * replicas
        self.steps_per_epoch = config.steps_per_epoch or config.num_train_cases // self.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{config.num_train_cases} training cases are fewer than one global batch "
                f"({config.batch_per_replica} x {replicas} replicas)"
            )
        seeded = dataclasses.replace(model_config, seed=config.seed)
        with self.strategy.scope():
            self.model = build_model(seeded)
            self.optimizer = make_optimizer(config.initial_lr, config.precision,
                                            config.on_nonfinite == "skip", optimizer_fn,
                                            epsilon=config.adam_epsilon)
            self.optimizer.build(self.model.trainable_variables)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            # Per-region training Dice (thresholded at 0.5), per epoch.
            self.region_dice = [metrics.RegionDice(region) for region in constants.REGIONS]
        # Checkpoint: weights, optimizer slots and step, epoch, and the random
        # generator states of dropout and VDraw: Keras' SeedGenerator states are
        # model variables that tf.train.Checkpoint does not find through the
        # layers, so they are named here by their layer.
        rng_states = {
            layer.name: layer.seed_generator.state
            for layer in self.model.layers
            if getattr(layer, "seed_generator", None) is not None
        }
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, epoch=self.epoch, rng=rng_states
        )
        self.checkpoint_dir = os.path.join(config.model_dir, "checkpoints")
        if not self.is_chief:  # non-chief workers must save too, elsewhere
            resolver = self.strategy.cluster_resolver
            self.checkpoint_dir = os.path.join(
                config.model_dir, f".worker_{resolver.task_type}_{resolver.task_id}"
            )
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self.checkpoint_dir, max_to_keep=config.keep_checkpoints
        )
        self._train_step = make_train_step(self.model, self.optimizer, loss_config,
                                           self.strategy, self.region_dice, config.jit_compile)
        self._segmenter = None
        self.history: list[dict] = []

    # ------------------------------------------------------------------ loop
    def restore(self) -> int:
        """Restores the latest checkpoint of model_dir, if any; returns the epoch to run next."""
        latest = tf.train.latest_checkpoint(os.path.join(self.config.model_dir, "checkpoints"))
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            log.info("resumed from %s at epoch %d", latest, int(self.epoch.numpy()))
        return int(self.epoch.numpy())

    def _dataset(self, epoch: int):
        return iter(self.strategy.distribute_datasets_from_function(
            lambda ctx: self.dataset_fn(ctx, epoch)
        ))

    def train(self) -> list[dict]:
        """Runs the remaining epochs; returns one summary dict per epoch run."""
        cfg = self.config
        start = self.restore()
        if start >= cfg.epochs:
            log.info("nothing to do: %s already finished %d epochs", cfg.model_dir, start)
            return self.history
        writer = (tf.summary.create_file_writer(os.path.join(cfg.model_dir, "logs", "train"))
                  if self.is_chief else tf.summary.create_noop_writer())
        try:
            self._train_epochs(start, writer)
        finally:
            for thread in self._releasing:  # the epochs' iterators, destroyed in background
                thread.join()
            self._releasing = []
        return self.history

    def _train_epochs(self, start: int, writer) -> None:
        cfg = self.config
        for epoch in range(start, cfg.epochs):
            lr = poly_lr(epoch, cfg.initial_lr, cfg.epochs, cfg.lr_power)
            self.optimizer.learning_rate.assign(lr)
            summary, last_batch = self._run_epoch(epoch, lr)
            if self.epoch_end_fn is not None:
                summary.update(self.epoch_end_fn(self, epoch, summary) or {})
            self.history.append(summary)
            if self.is_chief:
                self._append_history(summary)
            # The checkpoint comes last: a run killed before it redoes this
            # epoch, and _append_history drops the stale entry then.
            self.epoch.assign(epoch + 1)
            path = self.manager.save(checkpoint_number=epoch + 1)
            if not self.is_chief:
                shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            with writer.as_default(step=epoch + 1):
                for name, value in summary.items():
                    if isinstance(value, (int, float)) and name != "epoch":
                        tf.summary.scalar(name, value)
                if self.is_chief and last_batch is not None:
                    self._image_summaries(last_batch)
            writer.flush()
            log.info(
                "epoch %d/%d  %s  checkpoint %s", epoch + 1, cfg.epochs,
                "  ".join(f"{k} {v:.4g}" for k, v in summary.items()
                          if isinstance(v, float)), path,
            )

    def _append_history(self, summary: dict) -> None:
        """model_dir/history.json, one entry per finished epoch (survives a crash)."""
        path = os.path.join(self.config.model_dir, "history.json")
        previous = []
        if os.path.exists(path):
            with open(path) as f:
                previous = [h for h in json.load(f) if h["epoch"] < summary["epoch"]]
        write_json_atomic(path, previous + [summary])

    def _run_epoch(self, epoch: int, lr: float) -> tuple[dict, object]:
        cfg = self.config
        iterator = self._dataset(epoch)
        progbar = (keras.utils.Progbar(self.steps_per_epoch, unit_name="step")
                   if cfg.verbose and self.is_chief else None)
        totals: dict[str, np.ndarray] = {}
        for metric in self.region_dice:
            metric.reset_state()
        skipped = 0
        batch = None
        start = time.perf_counter()
        for step in range(self.steps_per_epoch):
            try:
                batch = next(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                raise ValueError(
                    f"epoch {epoch + 1}: the training data ran out after {step} of "
                    f"{self.steps_per_epoch} steps; num_train_cases={cfg.num_train_cases} "
                    f"is larger than the data"
                ) from None
            stats = {k: v.numpy() for k, v in self._train_step(batch).items()}
            loss = float(stats["loss"])
            if not math.isfinite(loss):
                where = f"epoch {epoch + 1}, step {step + 1} (optimizer step " \
                        f"{int(self.optimizer.iterations.numpy())})"
                if cfg.on_nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss {loss} at {where}; stopped without saving, the last "
                        f"good checkpoint is {self.manager.latest_checkpoint}"
                    )
                skipped += 1
                log.warning("non-finite loss at %s: update skipped", where)
                continue
            for name, value in stats.items():
                totals[name] = totals.get(name, 0.0) + value
            if progbar is not None:
                n = max(float(stats["count"]), 1.0)
                progbar.update(step + 1, values=[("loss", loss / n)])
        count = max(float(totals.get("count", 0.0)), 1.0)
        summary = {"epoch": epoch + 1, "lr": lr, "seconds": time.perf_counter() - start}
        for name in ("loss", "dice", "l2", "kl"):
            summary[name] = float(totals.get(name, 0.0)) / count
        for metric in self.region_dice:
            summary[metric.name] = float(metric.result())
        summary["skipped_steps"] = skipped
        holder = [iterator]
        del iterator  # the holder's is now the only reference
        self._releasing = [t for t in self._releasing if t.is_alive()]
        self._releasing.append(_release_in_background(holder))
        return summary, batch

    def _image_summaries(self, batch) -> None:
        """TensorBoard images of the first example of a batch: the middle slice
        along the third spatial axis (axial for BraTS) of FLAIR, the label and
        the prediction (WT, TC, ET as red, green, blue)."""
        local = self.strategy.experimental_local_results
        image = local(batch["image"])[0][:1]
        label = local(batch["label"])[0][:1]
        # The inference model (shared weights, no VAE): drawing from VDraw's
        # generator here would change the training run's random stream.
        if self._segmenter is None:
            self._segmenter = build_inference_model(self.model)
        seg = self._segmenter(image)["seg"]
        k = image.shape[3] // 2
        flair = image[:, :, :, k, constants.MODALITIES.index("flair"), None]
        low, high = tf.reduce_min(flair), tf.reduce_max(flair)
        tf.summary.image("input_flair", (flair - low) / tf.maximum(high - low, 1e-6))
        tf.summary.image("label_WT_TC_ET", label[:, :, :, k, :])
        tf.summary.image("prediction_WT_TC_ET", tf.cast(seg[:, :, :, k, :], tf.float32))
