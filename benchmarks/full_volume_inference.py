"""Full-volume inference of the paper network on one 4 x 240 x 240 x 155 case.

The target on the 2-core CPU: one model, no TTA, raw volume -> label
map in <= 15 s and <= 4 GB. Each configuration runs in a fresh subprocess, so
its peak resident memory is its own:

* ``keras``: ``inference.predict_volume`` (what evaluate.py does with a
  .keras model or a model_dir) + ``probabilities_to_labels``;
* ``saved_model``: the exported SavedModel's ``serving_default`` /
  ``serving_tta`` (what TF Serving runs), which returns the label map;

each with the crop to the brain's bounding box (the default) or the whole
volume padded to 240 x 240 x 160 (``--crop_to_brain=false``, the paper), with
or without TTA (8 flips), and in ``--precision`` or the one after an ``@``
(``keras:crop@mixed_bfloat16``). The network is built in float32 and then
converted as users do: ``build_inference_model(model, precision=...)``
(evaluate.py --precision) or ``export_saved_model(..., precision=...)``
(brats_tf.export --precision). The case is a synthetic BraTS-like head at the
real size (data_pipeline.synthetic: brain ~140 x 173 x 133 voxels, like
BraTS), or with --case_dir a real case's folder (its four modalities as
evaluate.py reads them: data_pipeline.layouts, data_pipeline.cases); the
network has random weights (timing does not depend on them).
The first call (tracing) is reported apart from the timed calls.

  python benchmarks/full_volume_inference.py                   # the default set
  python benchmarks/full_volume_inference.py --configs=keras:crop,saved_model:crop:tta
  python benchmarks/full_volume_inference.py --configs=keras:crop@mixed_bfloat16   # AMX CPUs
  python benchmarks/full_volume_inference.py --configs=saved_model:crop --breakdown
  python benchmarks/full_volume_inference.py --json_out=benchmarks/full_volume_inference.json
  python benchmarks/full_volume_inference.py --init_filters=8 \
      --case_dir=$BRATS_REAL_DIR/HGG/Brats18_2013_11_1 --configs=keras:crop,keras:full

The paper reports 0.4 s per volume on one V100 (§4).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as train.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from benchmarks.machine import describe, device_name, run_measurement
from brats_tf.config import PRECISIONS
from data_pipeline.io_utils import write_json_atomic

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "configs",
    ["keras:crop", "keras:full", "saved_model:crop", "keras:crop:tta"],
    "Configurations, each path:crop|full[:tta][@precision], path keras or "
    "saved_model, precision as --precision.",
)
flags.DEFINE_integer("repeats", 2, "Timed calls after the first (tracing) call.", lower_bound=1)
flags.DEFINE_integer("init_filters", 32, "Network width (the paper: 32).", lower_bound=8)
flags.DEFINE_enum(
    "precision",
    "float32",
    list(PRECISIONS),
    "Keras dtype policy the network computes in, unless a configuration names "
    "one (mixed_float16: GPU; mixed_bfloat16: CPUs with AVX512-BF16/AMX or GPUs).",
)
flags.DEFINE_boolean(
    "breakdown",
    False,
    "Also time the parts of a call apart (no TTA): "
    "the NumPy case to a host tensor (tf.constant), the copy to the device, "
    "normalisation + box + padding, the network, crop back + paste + labels "
    "+ copy back (the 'parts').",
)
flags.DEFINE_string("json_out", None, "Also write the results as JSON here.")
flags.DEFINE_string(
    "case_dir", None, "A real case's folder (BraTS layout) instead of the synthetic case."
)
flags.DEFINE_string("_single", None, "Internal: run this one configuration in this process.")


def _parse(text: str, precision: str) -> dict:
    config, _, named = text.partition("@")
    parts = config.split(":")
    if (
        len(parts) not in (2, 3)
        or parts[0] not in ("keras", "saved_model")
        or parts[1] not in ("crop", "full")
        or (len(parts) == 3 and parts[2] != "tta")
        or (named and named not in PRECISIONS)
    ):
        raise app.UsageError(
            f"--configs: bad entry {text!r}; use path:crop|full[:tta]"
            f"[@precision] with path keras or saved_model, precision one of "
            f"{', '.join(PRECISIONS)}"
        )
    return {
        "path": parts[0],
        "crop_to_brain": parts[1] == "crop",
        "tta": len(parts) == 3,
        "precision": named or precision,
    }


def _case():
    """(image float32 [D, H, W, 4], label) of --case_dir, else of the synthetic case."""
    import numpy as np

    from data_pipeline import constants

    if FLAGS.case_dir:
        from data_pipeline.cases import load_case
        from data_pipeline.layouts import find_cases

        (case,) = find_cases(FLAGS.case_dir)
        loaded = load_case(case, require_label=False)  # the brain's box, placed back below
        image = np.zeros(tuple(loaded.original_shape) + (loaded.image.shape[-1],), np.float32)
        box = tuple(slice(a, a + n) for a, n in zip(loaded.box_start, loaded.image.shape))
        image[box] = loaded.image
        return image, None
    from data_pipeline.synthetic import make_case

    images, label = make_case(constants.BRATS_SHAPE, seed=0)
    image = np.stack([images[m] for m in constants.MODALITIES], axis=-1).astype(np.float32)
    return image, label


def _sync(t):
    """Waits for ``t`` (on whichever device) by copying one element back."""
    import tensorflow as tf

    return tf.reshape(t, [-1])[:1].numpy()


def _parts(segmenter, image, crop_to_brain: bool) -> dict:
    """Median seconds of each part of one inference call, run apart, each
    after a warm-up call, on the device (the GPU when there is one)."""
    import numpy as np
    import tensorflow as tf

    from brats_tf import inference

    spec = tf.TensorSpec([None] * 4 + [image.shape[-1]], tf.float32)

    @tf.function(input_signature=[spec])
    def pre(x):
        return inference.prepare_volume_tf(x, crop_to_brain=crop_to_brain)

    @tf.function(input_signature=[spec])
    def network(x):
        return inference.model_probabilities(segmenter, x)

    @tf.function
    def post(probs, placement):
        return inference.probabilities_to_labels_tf(inference.place_back_tf(probs, placement))

    device = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
    steps = {}
    batch = image[None]

    def host_tensor():
        with tf.device("CPU:0"):  # not on the device the steps below run on
            return tf.constant(batch)

    steps["host_tensor"] = host_tensor

    def to_device():
        # A fresh host tensor each time: an eager tensor keeps its first copy on
        # a device and hands it out again (the copy would then cost nothing).
        fresh = host_tensor()
        t = time.perf_counter()
        _sync(tf.identity(fresh))
        return time.perf_counter() - t

    host = host_tensor()
    with tf.device(device):
        steps["to_device"] = to_device
        x = tf.identity(host)
        steps["preprocess"] = lambda: _sync(pre(x)[0])
        padded, placement = pre(x)
        steps["network"] = lambda: _sync(network(padded))
        probs = network(padded)
        steps["postprocess"] = lambda: post(probs, placement).numpy()
        out = {}
        for name, step in steps.items():
            step()
            times = []
            for _ in range(FLAGS.repeats):
                t = time.perf_counter()
                inner = step()
                times.append(inner if name == "to_device" else time.perf_counter() - t)
            out[name + "_s"] = round(float(np.median(times)), 4)
    out["sum_s"] = round(sum(out.values()), 4)
    return out


def _run_one(config: dict) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from brats_tf import inference
    from brats_tf.config import ModelConfig
    from brats_tf.model import build_inference_model, build_model
    from data_pipeline import volume

    image, _ = _case()
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(init_filters=FLAGS.init_filters))  # float32
    precision = config["precision"]
    tmp = tempfile.TemporaryDirectory()
    segmenter = None
    if config["path"] == "keras" or FLAGS.breakdown:
        segmenter = build_inference_model(model, precision=precision)
    if config["path"] == "keras":

        def predict():
            probs = inference.predict_volume(
                segmenter, image, tta=config["tta"], crop_to_brain=config["crop_to_brain"]
            )
            return inference.probabilities_to_labels(probs)
    else:
        version = inference.export_saved_model(
            model, tmp.name, crop_to_brain=config["crop_to_brain"], precision=precision
        )
        del model
        fn = tf.saved_model.load(str(version)).signatures[
            "serving_tta" if config["tta"] else "serving_default"
        ]

        def predict():
            return fn(image=tf.constant(image[None]))["labels"].numpy()[0]

    start, size = volume.brain_box(image)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    labels = predict()
    first = time.perf_counter() - t
    times = []
    for _ in range(FLAGS.repeats):
        t = time.perf_counter()
        labels = predict()
        times.append(time.perf_counter() - t)
    gpus = tf.config.list_physical_devices("GPU")
    gpu_peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**30 if gpus else None
    assert labels.shape == image.shape[:3], labels.shape
    result = {
        "path": config["path"],
        "crop_to_brain": config["crop_to_brain"],
        "tta": config["tta"],
        "input": "x".join(map(str, image.shape)),
        "network_input": "x".join(
            str(-(-n // 8) * 8) for n in (size if config["crop_to_brain"] else image.shape[:3])
        ),
        "init_filters": FLAGS.init_filters,
        "precision": precision,
        "device": device_name(),
        "first_call_s": round(first, 2),
        "seconds": round(float(np.median(times)), 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "rss_before_gib": round(rss0 / 2**20, 2),
        "gpu_peak_gib": None if gpu_peak is None else round(gpu_peak, 2),
    }
    if FLAGS.breakdown and not config["tta"]:  # after the peaks above: its own allocations
        result["parts"] = _parts(segmenter, image, config["crop_to_brain"])
    tmp.cleanup()
    return result


def main(argv):
    del argv
    if FLAGS._single:
        print(json.dumps(_run_one(_parse(FLAGS._single, FLAGS.precision))))
        return
    configs = [(c, _parse(c, FLAGS.precision)) for c in FLAGS.configs]
    machine = describe()
    print(f"machine: {machine}; case: {FLAGS.case_dir or 'synthetic'}; width {FLAGS.init_filters}")
    results = []
    for text, _ in configs:
        args = [
            sys.executable,
            os.path.abspath(__file__),
            f"--_single={text}",
            f"--repeats={FLAGS.repeats}",
            f"--init_filters={FLAGS.init_filters}",
            f"--precision={FLAGS.precision}",
            f"--breakdown={FLAGS.breakdown}",
        ]
        if FLAGS.case_dir:
            args.append(f"--case_dir={FLAGS.case_dir}")
        print(f"running {text} ...", flush=True)
        r = run_measurement(args, text)
        results.append(r)
        print(
            f"  {r['path']:<11} {'crop' if r['crop_to_brain'] else 'full':<4} "
            f"{'tta' if r['tta'] else 'one':<3} {r['precision']}: {r['seconds']:.3g} s per case "
            f"(first call {r['first_call_s']:.1f} s), network input {r['network_input']}, "
            f"peak RSS {r['peak_rss_gib']} GiB",
            flush=True,
        )
        if "parts" in r:
            print(
                "    parts: " + ", ".join(f"{k[:-2]} {v:.3f} s" for k, v in r["parts"].items()),
                flush=True,
            )
    if FLAGS.json_out:
        write_json_atomic(
            FLAGS.json_out,
            {
                "machine": machine,
                "case": FLAGS.case_dir or "synthetic",
                "init_filters": FLAGS.init_filters,
                "results": results,
            },
        )
        print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
    app.run(main)
