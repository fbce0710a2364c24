"""Profiles one training step op by op (TF profiler trace, aggregated by op type).

  python benchmarks/profile_step.py --crop=64,64,64 [--top=25] [--by_name]
  python benchmarks/profile_step.py --crop=80,96,64 --memory --recompute_levels=2

Prints the share of the step's CPU time spent in each TensorFlow op type
(Conv3D, Conv3DBackpropFilterV2, Sum, Mul, ...), from the host XPlane of a
profiler trace of two steps after a warm-up step: the first thing to read
before optimising anything. --by_name splits it per op, i.e. per
layer (which convolution's kernel gradient is slow, and at what level).
Shares are of op time summed over the inter-op threads (ops overlap, so
the total exceeds the wall time) and leave out the tf.function call that
encloses them.

--memory instead lists the tensors alive at the step's memory peak (the op
that made each, its shape and size, largest first), from TensorFlow's memory
profile of one step. It needs the profiler's converter, `pip install xprof`
(not in requirements.txt). Memory scales with the crop, so a crop 1/8 of the
paper's shows the same picture in a fraction of the time.
"""

from __future__ import annotations

import collections
import glob
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as train.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("crop", ["64", "64", "64"], "Crop D,H,W (divisible by 16).")
flags.DEFINE_integer("init_filters", 32, "Network width.", lower_bound=8)
flags.DEFINE_integer("top", 25, "Op types (or, with --memory, tensors) to print.", lower_bound=1)
flags.DEFINE_boolean(
    "memory",
    False,
    "List the tensors alive at the memory peak instead (needs `pip install xprof`).",
)
flags.DEFINE_boolean(
    "by_name",
    False,
    "Count time per op (one layer's op, e.g. "
    "'.../EncoderBlock3_0_1/conv1_1/BiasAdd (_MklNativeFusedConv3D)') instead "
    "of per op type: which layers the time goes to.",
)
flags.DEFINE_integer(
    "recompute_levels",
    0,
    "Gradient checkpointing of the finest levels' "
    "blocks, as train.py --recompute; with it one op runs at a time.",
    lower_bound=0,
)


def _memory_report(logdir: str) -> None:
    """Prints the allocations alive at the peak of TensorFlow's CPU allocator."""
    import json

    from xprof.convert import raw_to_tool_data

    path = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0]
    data, _ = raw_to_tool_data.xspace_to_tool_data([path], "memory_profile", {})
    profile = json.loads(data)
    for allocator, per in profile["memoryProfilePerAllocator"].items():
        summary = per["profileSummary"]
        snapshots, special = per["memoryProfileSnapshots"], per["specialAllocations"]
        rows = []
        for active in per["activeAllocations"]:
            index = int(active["snapshotIndex"])
            meta = (
                snapshots[index]["activityMetadata"]
                if index >= 0
                else special[int(active["specialIndex"])]
            )
            rows.append(
                (int(meta["allocationBytes"]), meta["tfOpName"], meta.get("tensorShape", "?"))
            )
        rows.sort(reverse=True)
        peak = int(summary["peakStats"]["peakBytesInUse"]) / 2**30
        print(
            f"allocator {allocator}: peak {peak:.2f} GiB in use; alive at the peak "
            f"({len(rows)} allocations, {sum(r[0] for r in rows) / 2**30:.2f} GiB):"
        )
        for size, op, shape in rows[: FLAGS.top]:
            if op == "unused preallocated device memory":  # the profile's name for it
                op = "(in use before the traced step: variables, optimizer slots, inputs)"
            print(f"  {size / 2**20:9.1f} MiB  {shape:24s} {op}")


def main(argv):
    del argv
    if FLAGS.memory:
        try:
            import xprof  # noqa: F401  only checks that it is installed
        except ImportError:
            sys.exit("profile_step.py: --memory needs the profiler's converter: pip install xprof")
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from benchmarks.machine import op_event_key, paper_training_step
    from brats_tf.training import set_inter_op_threads
    from data_pipeline.checks import int_flag_list

    try:
        crop = int_flag_list("crop", FLAGS.crop, count=3)
        # as train.py: one op at a time under --recompute on one device
        set_inter_op_threads(FLAGS.recompute_levels, "default")
        _, make_step = paper_training_step(crop, FLAGS.init_filters, FLAGS.recompute_levels)
    except ValueError as e:  # one line, no traceback
        sys.exit(f"profile_step.py: --crop={','.join(FLAGS.crop)}: {e}")
    step = make_step()

    import time

    step().numpy()
    t = time.perf_counter()
    step().numpy()
    print(f"one step: {time.perf_counter() - t:.2f} s wall")
    logdir = tempfile.mkdtemp(prefix="brats_profile_")
    if FLAGS.memory:
        tf.profiler.experimental.start(
            logdir, options=tf.profiler.experimental.ProfilerOptions(host_tracer_level=3)
        )
        step().numpy()
        tf.profiler.experimental.stop()
        _memory_report(logdir)
        return
    tf.profiler.experimental.start(logdir)
    for _ in range(2):
        step().numpy()
    tf.profiler.experimental.stop()
    path = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    totals: collections.Counter = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                key = op_event_key(names.get(event.metadata_id, "?"), FLAGS.by_name)
                if key is not None:
                    totals[key] += event.duration_ps
    total = sum(totals.values())
    print(
        f"op time over 2 steps, crop {crop}, width {FLAGS.init_filters}: {total / 1e12:.2f} s "
        f"(summed over threads)"
    )
    for op, ps in totals.most_common(FLAGS.top):
        print(f"  {op:{72 if FLAGS.by_name else 40}s} {ps / 1e12:8.3f} s  {100 * ps / total:5.1f}%")


if __name__ == "__main__":
    app.run(main)
