"""train.py end to end, timed: seconds per step, the input pipeline's wait
per step, the GPU's peak memory, and (mirrored) whether the replicas end equal.

    python benchmarks/train_timing.py --timing_json=/tmp/timing.json \\
        --flagfile=configs/brats2018.flags --data_dir=data/syn --model_dir=/tmp/run \\
        --epochs=2 --steps_per_epoch=60 --noexport
    # two logical GPUs on one device, train.py's --strategy=mirrored:
    python benchmarks/train_timing.py --timing_json=/tmp/mirrored.json --logical_devices=2 \\
        --flagfile=configs/brats2018.flags --data_dir=data/syn --model_dir=/tmp/run2 \\
        --strategy=mirrored --epochs=2 --steps_per_epoch=20 --noexport

Every flag but the three below is train.py's, and train.py's ``main`` runs
unchanged in this process, with two measurements added around
``brats_tf.training.Trainer``: each epoch's iterator is wrapped so that
every ``next()`` (the wait for the input pipeline's batch; the previous step
has finished then, as train.py reads its loss) is timed apart, and each
epoch's wall time and step count are recorded. Per epoch it reports seconds
per step, the mean input wait per step and its share of the step. The first
epoch includes tracing (and XLA's compile): its figures are reported but the
summary is of the later epochs.

--logical_devices=N splits the first GPU (or, without one, the CPU) into N
logical devices (``tf.config.set_logical_device_configuration``) before
train.py creates its strategy; with --strategy=mirrored train.py then trains
one replica on each (on a CPU pass --devices=/cpu:0,/cpu:1,...). At the end
every trainable variable's replicas are compared: they must be identical.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as train.py
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
    """train.py's flags (importing it defines them) and three more; not at
    import, so that tests can import this module."""
    import train  # noqa: F401  defines train.py's flags, which this script parses

    flags.DEFINE_string("timing_json", None, "Write the timings here (required).")
    flags.DEFINE_integer(
        "logical_devices",
        0,
        "Split the first GPU (else the CPU) into this "
        "many logical devices; 0: leave the devices alone.",
        lower_bound=0,
    )
    flags.DEFINE_integer(
        "logical_gpu_memory_mb",
        30000,
        "Memory of each logical GPU (--logical_devices with a GPU).",
        lower_bound=256,
    )


class TimedIterator:
    """Wraps an iterator; records the seconds each ``next()`` takes."""

    def __init__(self, iterator, waits: list):
        self._iterator = iterator
        self.waits = waits

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self._iterator)
        finally:
            self.waits.append(time.perf_counter() - start)


def instrument(trainer_class, record: dict) -> None:
    """Wraps ``trainer_class``'s per-epoch iterator and epoch loop so that
    ``record["epochs"]`` gets one entry per epoch (steps, seconds, input
    waits) and ``record["trainer"]`` the trainer."""
    dataset, run_epoch, init = (
        trainer_class._dataset,
        trainer_class._run_epoch,
        trainer_class.__init__,
    )

    def timed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        record["trainer"] = self

    def timed_dataset(self, epoch):
        waits: list = []
        record["epochs"].append({"epoch": epoch + 1, "waits": waits})
        return TimedIterator(dataset(self, epoch), waits)

    def timed_run_epoch(self, epoch, lr):
        start = time.perf_counter()
        out = run_epoch(self, epoch, lr)
        entry = record["epochs"][-1]
        entry["seconds"] = time.perf_counter() - start
        entry["steps"] = len(entry["waits"])
        return out

    trainer_class.__init__ = timed_init
    trainer_class._dataset = timed_dataset
    trainer_class._run_epoch = timed_run_epoch


def epoch_row(entry: dict) -> dict:
    steps = max(entry["steps"], 1)
    sec_per_step = entry["seconds"] / steps
    wait = sum(entry["waits"]) / steps
    return {
        "epoch": entry["epoch"],
        "steps": entry["steps"],
        "seconds": round(entry["seconds"], 3),
        "sec_per_step": round(sec_per_step, 4),
        "input_wait_per_step_s": round(wait, 5),
        "input_wait_max_s": round(max(entry["waits"], default=0.0), 5),
        "input_wait_fraction": round(wait / sec_per_step, 4) if sec_per_step else None,
    }


def replicas_identical(trainer) -> bool | None:
    """None with one replica; else whether every trainable variable has the
    same value on every replica."""
    import numpy as np

    strategy = trainer.strategy
    if strategy.num_replicas_in_sync < 2:
        return None
    for variable in trainer.model.trainable_variables:
        values = [np.asarray(v) for v in strategy.experimental_local_results(variable.value)]
        if any(not np.array_equal(values[0], v) for v in values[1:]):
            return False
    return True


def split_devices(n: int, gpu_memory_mb: int) -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    device = gpus[0] if gpus else tf.config.list_physical_devices("CPU")[0]
    config = (
        tf.config.LogicalDeviceConfiguration(memory_limit=gpu_memory_mb)
        if gpus
        else tf.config.LogicalDeviceConfiguration()
    )
    tf.config.set_logical_device_configuration(device, [config] * n)
    return device.device_type


def main(argv):
    if not FLAGS.timing_json:
        sys.exit("train_timing.py: error: --timing_json is required")
    record: dict = {"epochs": []}
    import tensorflow as tf

    import train
    from benchmarks.machine import describe, device_name
    from brats_tf import training
    from data_pipeline.io_utils import write_json_atomic

    split = (
        split_devices(FLAGS.logical_devices, FLAGS.logical_gpu_memory_mb)
        if FLAGS.logical_devices
        else None
    )
    instrument(training.Trainer, record)
    start = time.perf_counter()
    train.main(argv)
    wall = time.perf_counter() - start
    rows = [epoch_row(e) for e in record["epochs"] if "seconds" in e]
    later = rows[1:] or rows
    steps = sum(r["steps"] for r in later)
    seconds = sum(r["seconds"] for r in later)
    wait = sum(
        sum(e["waits"]) for e in record["epochs"][len(rows) - len(later) :] if "seconds" in e
    )
    trainer = record.get("trainer")
    gpus = tf.config.list_physical_devices("GPU")
    payload = {
        "machine": describe(),
        "device": device_name(),
        "tensorflow": tf.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "argv": sys.argv[1:],
        "logical_devices": FLAGS.logical_devices,
        "split": split,
        "replicas": trainer.strategy.num_replicas_in_sync if trainer else None,
        "epochs": rows,
        # the epochs after the first (all of them if there is one)
        "sec_per_step": round(seconds / steps, 4) if steps else None,
        "input_wait_per_step_s": round(wait / steps, 5) if steps else None,
        "input_wait_fraction": round(wait / seconds, 4) if seconds else None,
        "gpu_peak_gib": (
            round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**30, 2)
            if gpus
            else None
        ),
        "replicas_identical": replicas_identical(trainer) if trainer else None,
        "wall_seconds": round(wall, 1),
    }
    write_json_atomic(FLAGS.timing_json, payload)
    print(
        f"{payload['sec_per_step']} s/step, input wait {payload['input_wait_per_step_s']} "
        f"s/step ({payload['input_wait_fraction']} of a step), GPU peak "
        f"{payload['gpu_peak_gib']} GiB, replicas identical: {payload['replicas_identical']}; "
        f"wrote {FLAGS.timing_json}"
    )
    if payload["replicas_identical"] is False:
        sys.exit("train_timing.py: the replicas differ")


if __name__ == "__main__":
    define_flags()
    app.run(main)
