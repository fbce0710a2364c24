"""Where training runs: the tf.distribute strategy (one device, the local GPUs,
several machines), which worker is the chief, and the inter-op thread pool."""

from __future__ import annotations

import os

import tensorflow as tf

from brats_tf.config import STRATEGIES


def set_inter_op_threads(recompute_levels: int, strategy: str) -> int | None:
    """TensorFlow's inter-op thread pool for training; call before TensorFlow
    runs an op. Gradient checkpointing on one device runs one op at a time:
    the recomputed blocks' backward passes already run one after the other
    (brats_tf.recompute), and with TensorFlow's default pool the executor
    still ran other full-resolution work beside them, which raised the peak
    memory (docs/performance.md, "The plain core"). Otherwise TensorFlow
    chooses. Returns the pool's size, or None."""
    if recompute_levels and strategy == "default":
        tf.config.threading.set_inter_op_parallelism_threads(1)
        return 1
    return None


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


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process is the one that writes: the chief, or worker 0 of
    a cluster without a chief; True without a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict()
    )
