"""Times one training step of the paper network: forward, backward, Adam update.

Batch 1, float32 (or --precision), at each requested crop, each in a fresh
subprocess so that its peak memory is its own. Prints, per crop: seconds per
step, model GFLOP per step (brats_tf.flops: convolutions and dense layers,
training step = 3x forward), achieved GFLOP/s, and the process's peak
resident memory; plus the GFLOP/s of a large float32 matrix product measured
in the same process, and the ratio of the two (the target: >= 65%).

The reference product (best of 3 calls) is timed right before every timed
step and once after the last: each step is compared with the faster of the
two products around it, and the median of those per-step ratios is the
figure printed. On a shared host the cores' speed drifts by 10-30% within
minutes (other tenants load the memory bus and caches); a reference measured
once at the start, as before 2026-11-27, compared steps and product from
different moments. Taking the faster neighbour keeps the ratio conservative.
The start-only figure is still written (fraction_of_start_matmul).

  python benchmarks/model_step.py                          # 64^3 and 160x192x128
  python benchmarks/model_step.py --crops=64,64,64 --steps=5 --json_out=/tmp/step.json

XLA (--jit_compile) is off by default: on this 2-core CPU it makes the 3-D
convolutions 7-9x slower.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as train.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from benchmarks.machine import (
    describe,
    device_name,
    paired_fraction,
    paper_training_step,
    run_measurement,
)
from brats_tf.config import PRECISIONS
from data_pipeline.checks import int_flag_list
from data_pipeline.io_utils import write_json_atomic

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "crops",
    ["64,64,64", "160,192,128"],
    "Crops to time, each 'D,H,W' (separate several with ';' on the command line "
    "or repeat the list with commas in groups of three).",
)
flags.DEFINE_integer("init_filters", 32, "Network width (the paper: 32).", lower_bound=8)
flags.DEFINE_integer("steps", 3, "Timed steps per crop.", lower_bound=1)
flags.DEFINE_integer(
    "warmup", 1, "Untimed steps first (tracing, allocator warm-up).", lower_bound=1
)
flags.DEFINE_enum("precision", "float32", list(PRECISIONS), "Keras dtype policy.")
flags.DEFINE_boolean("jit_compile", False, "Compile the step with XLA (slow on CPU).")
flags.DEFINE_integer(
    "recompute_levels",
    0,
    "Gradient checkpointing of the ResNet blocks of "
    "the finest levels (train.py --recompute); 0: off.",
    lower_bound=0,
)
flags.DEFINE_integer(
    "matmul_n", 4096, "Size of the reference float32 matrix product.", lower_bound=256
)
flags.DEFINE_integer(
    "gpu_memory_limit_mb",
    None,
    "GPU only: cap the first GPU's memory (e.g. 16000 to check that a step fits a 16 GB card).",
    lower_bound=256,
)
flags.DEFINE_string("json_out", None, "Also write the results as JSON here.")
flags.DEFINE_string("_single", None, "Internal: time this one crop in this process.")


class _MatmulProbe:
    """GFLOP/s of TensorFlow's n x n float32 matrix product (best of
    ``repeats`` calls), re-measurable between training steps."""

    def __init__(self, n: int):
        import tensorflow as tf

        self._n = n
        self._a = tf.random.normal((n, n))
        self._b = tf.random.normal((n, n))
        self._matmul = tf.linalg.matmul
        self._matmul(self._a, self._b).numpy()  # warm-up

    def gflops(self, repeats: int = 1) -> float:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            self._matmul(self._a, self._b).numpy()
            best = min(best, time.perf_counter() - t)
        return 2 * self._n**3 / best / 1e9


def _numpy_matmul_gflops(n: int) -> float:
    """The same product in NumPy's BLAS (OpenBLAS in the PyPI wheel): a second
    reference, since TensorFlow's own matrix product is not the fastest one on
    every CPU (oneDNN's sgemm on an AVX2-only AMD EPYC reaches ~70% of
    OpenBLAS's)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _time_one(crop: tuple[int, int, int]) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from brats_tf import flops
    from brats_tf.training import set_inter_op_threads

    # as train.py: one op at a time under --recompute on one device
    set_inter_op_threads(FLAGS.recompute_levels, "default")
    gpus = tf.config.list_physical_devices("GPU")
    if gpus and FLAGS.gpu_memory_limit_mb:
        tf.config.set_logical_device_configuration(
            gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=FLAGS.gpu_memory_limit_mb)]
        )
    keras.mixed_precision.set_global_policy(FLAGS.precision)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    probe = _MatmulProbe(FLAGS.matmul_n)
    matmul = probe.gflops(repeats=3)
    numpy_matmul = None if gpus else _numpy_matmul_gflops(FLAGS.matmul_n)
    model, make_step = paper_training_step(crop, FLAGS.init_filters, FLAGS.recompute_levels)
    step = make_step(jit_compile=FLAGS.jit_compile)

    t = time.perf_counter()
    for _ in range(FLAGS.warmup):
        step().numpy()
    first = time.perf_counter() - t
    times, probes = [], []
    for _ in range(FLAGS.steps):
        probes.append(probe.gflops(repeats=3))
        t = time.perf_counter()
        step().numpy()
        times.append(time.perf_counter() - t)
    probes.append(probe.gflops(repeats=3))
    sec = float(np.median(times))
    tensor_peak = None
    try:  # oneDNN's pooled CPU allocator (tensors), without the libraries' memory
        tensor_peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**30
    except ValueError:  # no allocator statistics (e.g. TF_ENABLE_ONEDNN_OPTS=0)
        pass
    gpu_peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**30 if gpus else None
    gflop = flops.train_step_flops(model) / 1e9
    paired = paired_fraction(times, probes, gflop * 1e9)
    return {
        "crop": "x".join(map(str, crop)),
        "init_filters": FLAGS.init_filters,
        "precision": FLAGS.precision,
        "jit_compile": FLAGS.jit_compile,
        "recompute_levels": FLAGS.recompute_levels,
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "default",
        "params": model.count_params(),
        "warmup_s": round(first, 2),
        "sec_per_step": round(sec, 3),
        "gflop_per_step": round(gflop, 1),
        "step_seconds": [round(t, 3) for t in times],
        "gflops": round(gflop / sec, 1),
        # the median per-step ratio to the faster neighbouring product (above)
        "matmul_gflops": round(paired[1], 1),
        "fraction_of_matmul": round(paired[0], 3),
        "matmul_probes_gflops": [round(p, 1) for p in probes],
        "start_matmul_gflops": round(matmul, 1),
        "fraction_of_start_matmul": round(gflop / sec / matmul, 3),
        "numpy_matmul_gflops": None if numpy_matmul is None else round(numpy_matmul, 1),
        # ru_maxrss is in KiB on Linux; the baseline is the interpreter + TF.
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "baseline_rss_gib": round(rss0 / 2**20, 2),
        "cpu_tensor_peak_gib": None if tensor_peak is None else round(tensor_peak, 2),
        "device": device_name(),
        "gpu_peak_gib": None if gpu_peak is None else round(gpu_peak, 2),
        "gpu_memory_limit_mb": FLAGS.gpu_memory_limit_mb if gpus else None,
    }


def _parse_crops(values: list[str]) -> list[tuple[int, int, int]]:
    try:
        numbers = int_flag_list(
            "crops", [v for item in values for v in item.replace(";", ",").split(",") if v]
        )
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if not numbers or len(numbers) % 3:
        raise app.UsageError(f"--crops needs groups of three sizes D,H,W, got {values}")
    crops = [tuple(numbers[i : i + 3]) for i in range(0, len(numbers), 3)]
    for crop in crops:
        if any(n % 16 for n in crop):
            raise app.UsageError(f"--crops: every size must be divisible by 16, got {crop}")
    return crops


def main(argv):
    del argv
    if FLAGS._single:
        print(json.dumps(_time_one(_parse_crops([FLAGS._single])[0])))
        return
    machine = describe()
    print(f"machine: {machine}")
    results = []
    for crop in _parse_crops(FLAGS.crops):
        args = [sys.executable, os.path.abspath(__file__), f"--_single={','.join(map(str, crop))}"]
        for name in (
            "init_filters",
            "steps",
            "warmup",
            "precision",
            "jit_compile",
            "matmul_n",
            "recompute_levels",
            "gpu_memory_limit_mb",
        ):
            if FLAGS[name].value is not None:
                args.append(f"--{name}={FLAGS[name].value}")
        print(f"timing crop {crop} ...", flush=True)
        result = run_measurement(args, f"for crop {crop}")
        results.append(result)
        print(
            f"  {result['crop']} width {result['init_filters']} {result['precision']} "
            f"recompute_levels {result['recompute_levels']}"
            ": "
            f"{result['sec_per_step']:.3f} s/step, {result['gflop_per_step']:.1f} GFLOP/step, "
            f"{result['gflops']:.1f} GFLOP/s = {100 * result['fraction_of_matmul']:.0f}% of "
            f"matmul {result['matmul_gflops']:.1f} GFLOP/s (each step against the product "
            f"timed next to it; against the one at the start: "
            f"{100 * result['fraction_of_start_matmul']:.0f}% of "
            f"{result['start_matmul_gflops']:.1f})"
            + (
                f" (NumPy's {result['numpy_matmul_gflops']:.1f})"
                if result.get("numpy_matmul_gflops")
                else ""
            )
            + f", peak RSS {result['peak_rss_gib']} GiB"
            + (
                f" (tensors {result['cpu_tensor_peak_gib']} GiB)"
                if result.get("cpu_tensor_peak_gib")
                else ""
            )
            + (f", GPU peak {result['gpu_peak_gib']} GiB" if result["gpu_peak_gib"] else ""),
            flush=True,
        )
    if FLAGS.json_out:
        write_json_atomic(FLAGS.json_out, {"machine": machine, "results": results})
        print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
    app.run(main)
