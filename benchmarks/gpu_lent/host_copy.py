"""GPU only: the SavedModel's inference call split at the host tensor, with a
fresh host tensor each call (an eager tensor caches its copy on the GPU)."""
import os, sys, tempfile, time
sys.path.insert(0, os.getcwd())
import numpy as np, tensorflow as tf, keras
from brats_tf import export
from brats_tf.config import ModelConfig
from brats_tf.model import build_model
sys.argv = sys.argv[:1]
from benchmarks.full_volume_inference import _case
image, _ = _case()
keras.utils.set_random_seed(0)
model = build_model(ModelConfig(init_filters=32))
d = tempfile.mkdtemp()
v = export.export_saved_model(model, d, crop_to_brain=True, precision="mixed_float16")
fn = tf.saved_model.load(str(v)).signatures["serving_default"]
def host():
    with tf.device("CPU:0"):
        return tf.constant(image[None])
fn(image=host())["labels"].numpy()
res = {"host_tensor": [], "h2d_fresh": [], "call_from_host_tensor": [], "whole": []}
for _ in range(20):
    t = time.perf_counter(); h = host(); res["host_tensor"].append(time.perf_counter() - t)
    t = time.perf_counter()
    with tf.device("GPU:0"):
        g = tf.identity(h)
    tf.reshape(g, [-1])[:1].numpy(); res["h2d_fresh"].append(time.perf_counter() - t)
    h = host()
    t = time.perf_counter(); fn(image=h)["labels"].numpy(); res["call_from_host_tensor"].append(time.perf_counter() - t)
    t = time.perf_counter(); fn(image=tf.constant(image[None]))["labels"].numpy(); res["whole"].append(time.perf_counter() - t)
for k, x in res.items():
    print(f"{k}: median {np.median(x)*1000:.1f} ms, min {np.min(x)*1000:.1f} ms")
