"""Full-size check of the serving path: the paper network on a 240x240x155 case.

Builds the paper's network (random weights, Table 1 sizes), exports it with
brats_tf.export, loads the SavedModel and runs ``serving_default`` on a
synthetic raw 240x240x155x4 volume; compares with ``inference.predict_volume``
(Keras model, NumPy normalisation and padding 155 -> 160) and prints the
seconds of each and the peak resident memory.

  python benchmarks/full_volume_inference.py [--tta]

The paper reports 0.4 s per volume on one V100 (§4); this measures the CPU.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from brats_tf import constants, export, inference  # noqa: E402
from brats_tf.config import ModelConfig  # noqa: E402
from brats_tf.model import build_inference_model, build_model  # noqa: E402


def main() -> None:
    tta = "--tta" in sys.argv[1:]
    signature = "serving_tta" if tta else "serving_default"
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig())
    rng = np.random.default_rng(0)
    shape = constants.BRATS_SHAPE
    image = rng.uniform(50, 1000, shape + (constants.NUM_MODALITIES,)).astype(np.float32)
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    brain = np.linalg.norm((grid - np.array(shape) / 2) / (np.array(shape) / 2.4), axis=-1) < 1
    image[~brain] = 0.0

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        version_dir = export.export_saved_model(model, tmp)
        print(f"export: {time.perf_counter() - t:.1f} s -> {version_dir}")
        loaded = tf.saved_model.load(str(version_dir))
        fn = loaded.signatures[signature]
        t = time.perf_counter()
        out = fn(image=tf.constant(image[None]))
        served = out["probabilities"].numpy()[0]
        print(f"{signature} on {'x'.join(map(str, shape))}: {time.perf_counter() - t:.1f} s, "
              f"outputs {out['probabilities'].shape} {out['labels'].shape} {out['labels'].dtype}")

    infer = build_inference_model(model)
    t = time.perf_counter()
    probs = inference.predict_volume(infer, image, tta=tta)
    print(f"predict_volume (Keras): {time.perf_counter() - t:.1f} s")
    diff = float(np.abs(served - probs).max())
    labels_equal = float(np.mean(inference.probabilities_to_labels(probs)
                                 == out["labels"].numpy()[0]))
    print(f"max |SavedModel - Keras| = {diff:.2e}; labels equal on {100 * labels_equal:.4f}% "
          f"of voxels")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    if diff > 1e-4:
        sys.exit(f"SavedModel and Keras disagree: max difference {diff}")


if __name__ == "__main__":
    main()
