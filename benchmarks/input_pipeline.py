"""Input pipeline and converter throughput on this machine.

    .venv/bin/python benchmarks/input_pipeline.py            # 8 cases, 240x240x155
    .venv/bin/python benchmarks/input_pipeline.py --num_cases 16 --epochs 4

Generates full-size synthetic BraTS cases in a temporary folder, converts them
(converter cases/s), then times the training input pipeline: random paper-size
crops (160x192x128) with augmentation from the full cases, batch 1 (cases/s
delivered, after one warm-up epoch), and the eval pipeline (whole volumes).
Target: >= 4 cases/s, so that input never limits 8 GPUs (paper §4: ~1.9 s per
step on one V100).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as train.py

import dataclasses
import platform
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf
from absl import app, flags, logging

from data_pipeline import convert, synthetic
from data_pipeline import input as input_lib
from data_pipeline.checks import int_flag_list
from data_pipeline.constants import BRATS_SHAPE, PAPER_CROP
from data_pipeline.io_utils import write_json_atomic

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_cases", 8, "Synthetic cases to generate.", lower_bound=1)
flags.DEFINE_list("shape", [str(s) for s in BRATS_SHAPE], "Case size D,H,W.")
flags.DEFINE_list("crop", [str(s) for s in PAPER_CROP], "Training crop D,H,W.")
flags.DEFINE_integer("epochs", 5, "Timed epochs of the training pipeline.", lower_bound=1)
flags.DEFINE_integer("cases_per_shard", 1, "Converter cases per shard.", lower_bound=1)
flags.DEFINE_string("json_out", None, "Also write the results as JSON here.")
flags.DEFINE_string(
    "work_dir", None, "Folder for the cases and shards (default: a temp dir, removed)."
)


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cores} cores (nproc) of {model}, {platform.machine()}, "
        f"Python {platform.python_version()}, TensorFlow {tf.__version__}"
    )


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_epochs(name, ds, epochs):
    """Prints and returns cases/s over `epochs` timed epochs after a warm-up one
    (which traces, compiles and fills caches): overall and the best epoch (the
    cores may be shared: the load average says how much), and this process's
    CPU time per case (what a free machine's throughput follows from)."""
    n = sum(int(tf.shape(b["image"])[0]) for b in ds)
    rates = []
    start, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(epochs):
        epoch_start = time.perf_counter()
        for b in ds:
            _ = b["image"].shape
        rates.append(n / (time.perf_counter() - epoch_start))
    rate = n * epochs / (time.perf_counter() - start)
    cpu_ms = (cpu_seconds() - cpu) / (n * epochs) * 1000
    print(
        f"{name}: {rate:.2f} cases/s (best epoch {max(rates):.2f}; {n} cases x {epochs} epochs; "
        f"{cpu_ms:.0f} ms CPU per case; load average {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    return rate


def main(argv):
    del argv
    try:
        shape = int_flag_list("shape", FLAGS.shape, count=3, minimum=1)
        crop = int_flag_list("crop", FLAGS.crop, count=3, minimum=1)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    work = FLAGS.work_dir or tempfile.mkdtemp(prefix="brats_bench_")
    nifti, records = os.path.join(work, "nifti"), os.path.join(work, "tfrecord")
    print(f"machine: {machine()}")
    try:
        start = time.perf_counter()
        synthetic.write_synthetic_dataset(nifti, FLAGS.num_cases, shape, seed=0)
        synth_rate = FLAGS.num_cases / (time.perf_counter() - start)

        start = time.perf_counter()
        manifest = convert.convert(
            nifti, records, cases_per_shard=FLAGS.cases_per_shard, folds=1, overwrite=True
        )
        convert_rate = FLAGS.num_cases / (time.perf_counter() - start)
        size = sum(os.path.getsize(os.path.join(records, s["file"])) for s in manifest["shards"])
        nifti_size = sum(
            os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(nifti) for f in fs
        )
        boxes = [c["box_shape"] for c in manifest["cases"]]

        print(
            f"cases: {FLAGS.num_cases} synthetic, {'x'.join(map(str, shape))}; stored brain "
            f"boxes e.g. {boxes[0]}; NIfTI {nifti_size / 2**20 / FLAGS.num_cases:.1f} MiB/case, "
            f"TFRecord {size / 2**20 / FLAGS.num_cases:.1f} MiB/case"
        )
        print(f"synthetic generation: {synth_rate:.2f} cases/s")
        print(f"converter (NIfTI -> TFRecord): {convert_rate:.2f} cases/s")
        pattern = os.path.join(records, "*.tfrecord")
        crop_name = "x".join(map(str, crop))
        config = input_lib.InputConfig(files=pattern, crop_shape=crop, batch_size=1)
        train_rate = time_epochs(
            f"train input, {crop_name} crops + augmentation, batch 1",
            input_lib.make_dataset(config),
            FLAGS.epochs,
        )
        cached_rate = time_epochs(
            "  same, cache=True (decompressed examples kept in memory)",
            input_lib.make_dataset(dataclasses.replace(config, cache=True)),
            FLAGS.epochs,
        )
        time_epochs(
            "  same, deterministic=True",
            input_lib.make_dataset(dataclasses.replace(config, deterministic=True)),
            1,
        )
        time_epochs(
            "  same, jit=False (no XLA)",
            input_lib.make_dataset(dataclasses.replace(config, jit=False)),
            1,
        )
        eval_rate = time_epochs(
            "eval input, whole volumes",
            input_lib.make_dataset(input_lib.InputConfig(files=pattern, mode="eval")),
            1,
        )
        print(
            f"target >= 4 cases/s (train input, default config): "
            f"{'met' if train_rate >= 4 else 'NOT met'}"
        )
        if FLAGS.json_out:
            result = {
                "machine": machine(),
                "case_shape": "x".join(map(str, shape)),
                "crop": crop_name,
                "num_cases": FLAGS.num_cases,
                "train_cases_per_s": round(train_rate, 2),
                "train_cached_cases_per_s": round(cached_rate, 2),
                "eval_cases_per_s": round(eval_rate, 2),
                "convert_cases_per_s": round(convert_rate, 2),
            }
            write_json_atomic(FLAGS.json_out, result)
            print(f"wrote {FLAGS.json_out}")
    finally:
        if FLAGS.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
