"""The paper's training recipe (§3.4-3.6) as one custom, distribution-aware loop.

One code path for one device, ``MirroredStrategy`` (all local GPUs) and
``MultiWorkerMirroredStrategy`` (several machines, from TF_CONFIG). A custom
loop rather than ``model.fit``: ``fit`` with MultiWorkerMirroredStrategy hits
an open Keras bug (keras-team/keras#20585), and the loop makes the
distribution scaling and the loss scaling of ``make_train_step`` explicit and
tested.

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
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from brats_tf import metrics
from brats_tf.config import LossConfig, ModelConfig, TrainConfig, check_precision_for_model
from brats_tf.model import build_inference_model, build_model
from brats_tf.schedules import poly_lr
from brats_tf.training.step import (
    NonFiniteLossError,
    make_optimizer,
    make_train_step,
)
from brats_tf.training.strategies import is_chief, make_strategy
from data_pipeline import constants
from data_pipeline.io_utils import write_json_atomic

log = logging.getLogger("brats_tf.training")

# dataset_fn(input_context, epoch) -> tf.data.Dataset of {"image", "label"}
# batches of the PER-REPLICA batch size: one pass over that pipeline's shard.
DatasetFn = Callable[[tf.distribute.InputContext, int], tf.data.Dataset]


def _release_in_background(holder: list) -> threading.Thread:
    """Empties ``holder`` (which holds the only references to its items) on a
    background thread, so the items are destroyed there; returns the thread.

    Destroying an epoch's distributed tf.data iterator after the train step
    has used it can block for seconds (docs/history/performance.md, "Destroying an
    epoch's iterator in the background"). It waits, it does not compute, so
    the loop goes on meanwhile. The thread is not a daemon (a daemon killed
    inside TensorFlow's C++ at interpreter exit aborts the process);
    ``Trainer.train`` joins them.
    """
    thread = threading.Thread(target=holder.clear, name="release-iterator")
    thread.start()
    return thread


class Trainer:
    """Builds model and optimizer under the strategy, trains, checkpoints, resumes."""

    def __init__(
        self,
        model_config: ModelConfig,
        loss_config: LossConfig,
        config: TrainConfig,
        dataset_fn: DatasetFn,
        strategy: tf.distribute.Strategy | None = None,
        epoch_end_fn: Callable[[Trainer, int, dict], dict] | None = None,
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
        self.is_chief = is_chief(self.strategy)
        self._seed_and_precision()
        self.global_batch, self.steps_per_epoch = self._count_steps()
        self._build_model_and_optimizer(optimizer_fn)
        self._set_up_checkpoints()
        self._train_step = make_train_step(
            self.model,
            self.optimizer,
            loss_config,
            self.strategy,
            self.region_dice,
            config.jit_compile,
        )
        self._segmenter = None
        self.history: list[dict] = []

    # ----------------------------------------------------------------- set-up
    def _seed_and_precision(self) -> None:
        """Op determinism (if asked), the seed, and the Keras dtype policy."""
        config = self.config
        if config.deterministic:
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(config.seed)
        check_precision_for_model(self.model_config, config.precision)
        keras.mixed_precision.set_global_policy(config.precision)

    def _count_steps(self) -> tuple[int, int]:
        """(global batch, steps per epoch); ValueError when the training cases
        are fewer than one global batch."""
        config = self.config
        replicas = self.strategy.num_replicas_in_sync
        global_batch = config.batch_per_replica * replicas
        steps = config.steps_per_epoch or config.num_train_cases // global_batch
        if steps < 1:
            raise ValueError(
                f"{config.num_train_cases} training cases are fewer than one global batch "
                f"({config.batch_per_replica} x {replicas} replicas)"
            )
        return global_batch, steps

    def _build_model_and_optimizer(self, optimizer_fn) -> None:
        """The model (seeded), optimizer, epoch counter and per-region training
        Dice, made under the strategy's scope."""
        config = self.config
        seeded = dataclasses.replace(self.model_config, seed=config.seed)
        with self.strategy.scope():
            self.model = build_model(seeded)
            self.optimizer = make_optimizer(
                config.initial_lr,
                config.precision,
                config.on_nonfinite == "skip",
                optimizer_fn,
                epsilon=config.adam_epsilon,
            )
            self.optimizer.build(self.model.trainable_variables)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            # Per-region training Dice (thresholded at 0.5), per epoch.
            self.region_dice = [metrics.RegionDice(region) for region in constants.REGIONS]

    def _set_up_checkpoints(self) -> None:
        """The checkpoint and its manager: weights, optimizer slots and step,
        epoch, and the random generator states of dropout and VDraw: Keras'
        SeedGenerator states are model variables that tf.train.Checkpoint
        does not find through the layers, so they are named here by their
        layer. A non-chief worker saves too, into a folder of its own."""
        config = self.config
        rng_states = {
            layer.name: layer.seed_generator.state
            for layer in self.model.layers
            if getattr(layer, "seed_generator", None) is not None
        }
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, epoch=self.epoch, rng=rng_states
        )
        self.checkpoint_dir = os.path.join(config.model_dir, "checkpoints")
        if not self.is_chief:
            resolver = self.strategy.cluster_resolver
            self.checkpoint_dir = os.path.join(
                config.model_dir, f".worker_{resolver.task_type}_{resolver.task_id}"
            )
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self.checkpoint_dir, max_to_keep=config.keep_checkpoints
        )

    # ------------------------------------------------------------------ loop
    def restore(self) -> int:
        """Restores the latest checkpoint of model_dir, if any; returns the epoch to run next."""
        latest = tf.train.latest_checkpoint(os.path.join(self.config.model_dir, "checkpoints"))
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            log.info("resumed from %s at epoch %d", latest, int(self.epoch.numpy()))
        return int(self.epoch.numpy())

    def _dataset(self, epoch: int):
        return iter(
            self.strategy.distribute_datasets_from_function(lambda ctx: self.dataset_fn(ctx, epoch))
        )

    def train(self) -> list[dict]:
        """Runs the remaining epochs; returns one summary dict per epoch run."""
        cfg = self.config
        start = self.restore()
        if start >= cfg.epochs:
            log.info("nothing to do: %s already finished %d epochs", cfg.model_dir, start)
            return self.history
        writer = (
            tf.summary.create_file_writer(os.path.join(cfg.model_dir, "logs", "train"))
            if self.is_chief
            else tf.summary.create_noop_writer()
        )
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
                "epoch %d/%d  %s  checkpoint %s",
                epoch + 1,
                cfg.epochs,
                "  ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, float)),
                path,
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
        progbar = (
            keras.utils.Progbar(self.steps_per_epoch, unit_name="step")
            if cfg.verbose and self.is_chief
            else None
        )
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
                where = (
                    f"epoch {epoch + 1}, step {step + 1} (optimizer step "
                    f"{int(self.optimizer.iterations.numpy())})"
                )
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
