"""Shared by the benchmarks: the machine's description and running one
measurement in a fresh subprocess (its own peak memory). Files are written
with data_pipeline.io_utils (atomic)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset:
    """The CPU's feature flags from the first ``flags`` line of a Linux
    cpuinfo file; empty where there is none (other systems). For the
    machine's description only: nothing chooses numerics from them."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def describe() -> str:
    """'<CPU model name>, <n> logical cores, <widest vector ISA>' (from
    /proc/cpuinfo where it exists), with ', oneDNN off' when
    TF_ENABLE_ONEDNN_OPTS=0 (the entry points turn it on by default)."""
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None
            )
    except OSError:
        pass
    flags = cpu_flags()
    isa = next(
        (
            name
            for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
            if flag in flags
        ),
        "",
    )
    cpu = cpu or platform.processor() or "unknown CPU"
    text = f"{cpu}, {os.cpu_count()} logical cores" + (f", {isa}" if isa else "")
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":
        text += ", oneDNN off"
    return text


def cpu_has_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16,
    /proc/cpuinfo flags), where oneDNN runs bfloat16 convolutions fast;
    elsewhere they are emulated and slower than float32."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def device_name() -> str:
    """The first GPU's name as TensorFlow reports it, else "CPU"."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")


def run_measurement(args: list[str], what: str, env: dict | None = None) -> dict:
    """Runs ``args`` (a benchmark re-invoking itself for one measurement), with
    ``env`` added to the environment; returns the JSON object on its last
    stdout line. Exits with the tail of its stderr if it fails."""
    proc = subprocess.run(
        args, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})}
    )
    if proc.returncode:
        sys.exit(f"benchmark {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def paired_fraction(step_seconds: list[float], probes: list[float], flop: float) -> tuple:
    """(median over steps of step GFLOP/s / reference GFLOP/s, median
    reference): step i is compared with max(probes[i], probes[i + 1]), the
    faster of the products timed just before and just after it."""
    if len(probes) != len(step_seconds) + 1:
        raise ValueError(
            f"{len(step_seconds)} steps need {len(step_seconds) + 1} probes, got {len(probes)}"
        )
    refs = [max(probes[i], probes[i + 1]) for i in range(len(step_seconds))]
    fractions = [flop / 1e9 / s / r for s, r in zip(step_seconds, refs)]
    return statistics.median(fractions), statistics.median(refs)


def paper_training_step(crop: tuple, init_filters: int = 32, recompute_levels: int = 0):
    """The paper network's training step on one random case, as the
    benchmarks time it: ``(model, make_step)``. The model is built under
    the current Keras dtype policy with seed 0, with train.py's optimizer
    (Adam 1e-4, wrapped in a LossScaleOptimizer under mixed_float16) and
    train.py's step (``brats_tf.training.make_train_step``); the case is a
    float32 image 1 x crop x 4 (normal noise) and 3 label channels (10%
    ones), fixed. ``make_step(jit_compile=False)`` returns a function of no
    arguments that runs one step and returns its loss tensor. Raises
    ValueError for a crop ModelConfig rejects."""
    import keras
    import numpy as np
    import tensorflow as tf

    from brats_tf.config import LossConfig, ModelConfig
    from brats_tf.model import build_model
    from brats_tf.training import make_optimizer, make_train_step

    config = ModelConfig(
        input_shape=tuple(crop), init_filters=init_filters, recompute_levels=recompute_levels
    )
    keras.utils.set_random_seed(0)
    model = build_model(config)
    optimizer = make_optimizer(1e-4, keras.mixed_precision.global_policy().name)
    rng = np.random.default_rng(0)
    batch = {
        "image": tf.constant(rng.normal(size=(1,) + tuple(crop) + (4,)).astype(np.float32)),
        "label": tf.constant((rng.random((1,) + tuple(crop) + (3,)) > 0.9).astype(np.float32)),
    }

    def make_step(jit_compile: bool = False):
        step = make_train_step(model, optimizer, LossConfig(), jit_compile=jit_compile)
        return lambda: step(batch)["loss"]

    return model, make_step


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` (a tf.function
    returning a tensor; ``.numpy()`` waits for it), after one untimed call
    that traces and warms it up."""
    fn().numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn().numpy()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def op_event_key(event_name: str, by_name: bool = False) -> str | None:
    """What a host event of a TensorFlow profiler trace is counted under in
    profile_step.py: TF op events are named "<op name>:<op type>"; the key
    is the op type, or with ``by_name`` "<op name> (<op type>)". None for
    events that are not one op: executor and thread markers, and the call
    of the whole tf.function ("... : __inference_step_123"), which would
    count the ops inside it twice."""
    if ":" not in event_name or event_name.startswith(("$", "Executor", "Thread")):
        return None
    op_name, op_type = (part.strip() for part in event_name.rsplit(":", 1))
    if not op_type or op_type.startswith("__inference") or op_type == "Run":
        return None
    return f"{op_name} ({op_type})" if by_name else op_type
