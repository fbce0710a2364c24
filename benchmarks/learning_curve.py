"""Learning curves of the paper network in several precisions, side by side.

    python benchmarks/learning_curve.py --out_dir=/tmp/curves                 # the paper's size
    python benchmarks/learning_curve.py --out_dir=/tmp/small --crop=32,32,32 --init_filters=8 \\
        --steps=6 --log_every=2 --variants=float32,mixed_float16 --num_train_cases=3

Trains the paper's network (crop 160x192x128, width 32, VAE; §3.4's loss,
Adam 1e-4 fixed, train.py's optimizer set-up: a LossScaleOptimizer under
mixed_float16; the step is ``brats_tf.training.make_train_step``) for
--steps steps on synthetic BraTS-like cases of the crop's size
(``data_pipeline.synthetic.make_case``, normalised as train.py's input),
once per variant:

  float32                   float32 (TF32 as TensorFlow's default on the GPU)
  mixed_float16             the Keras mixed_float16 policy
  mixed_float16_xla         the same, the step compiled with XLA (--jit_compile)
  mixed_float16_recompute   the same, brats_tf.recompute in every level (--recompute)

Every variant gets the same seed, the same initial weights (written once,
loaded by each), the same cases in the same order (a fresh permutation of
the training cases per epoch, from --seed) and the same VAE draws and
dropout masks (seeded). Each runs in its own subprocess (its own dtype
policy, memory and GPU memory peak) and stops after --time_limit_s
(recorded); a subprocess that fails is recorded with its error and the
others still run.

Every --log_every steps it records the means over those steps of the loss
terms (dice, l2, kl, total loss) and of the training Dice per region (WT,
TC, ET: ``brats_tf.metrics.RegionDice``, thresholded at 0.5); at the end the
held-out Dice per region on --num_heldout_cases other synthetic cases
(``build_inference_model``, threshold 0.5, ``brats_tf.metrics.dice``).
Writes <out_dir>/learning_curves.json (curves, each variant's config, the
device, TensorFlow's version, seconds per step) and
<out_dir>/learning_curves.png (the curves, ``brats_tf.figures.write_png``).
The data and initial weights stay in <out_dir>/data/.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as train.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from absl import app, flags

from benchmarks.machine import describe
from data_pipeline.checks import int_flag_list
from data_pipeline.io_utils import write_json_atomic

# name -> (Keras policy, XLA, recompute every level)
VARIANTS = {
    "float32": ("float32", False, False),
    "mixed_float16": ("mixed_float16", False, False),
    "mixed_float16_xla": ("mixed_float16", True, False),
    "mixed_float16_recompute": ("mixed_float16", False, True),
}
CURVES = ("loss", "dice", "l2", "kl", "dice_WT", "dice_TC", "dice_ET")
REGIONS = ("WT", "TC", "ET")

FLAGS = flags.FLAGS


def define_flags():
    """The command line's flags (defined here, not at import, so that tests
    and other programs can import this module)."""
    flags.DEFINE_list("crop", ["160", "192", "128"], "Crop D,H,W of the cases (divisible by 16).")
    flags.DEFINE_integer("init_filters", 32, "Network width (the paper: 32).", lower_bound=8)
    flags.DEFINE_list(
        "blocks_down",
        ["1", "2", "2", "4"],
        "ResNet blocks per encoder level, one entry a level, at least 2 "
        "(the paper: 1,2,2,4; 1,1 traces a quarter of the graph, for smoke runs).",
    )
    flags.DEFINE_integer("steps", 300, "Training steps per variant.", lower_bound=1)
    flags.DEFINE_integer("log_every", 10, "Steps per curve point (K).", lower_bound=1)
    flags.DEFINE_list("variants", list(VARIANTS), f"Variants to run, of {', '.join(VARIANTS)}.")
    flags.DEFINE_string("out_dir", None, "Folder for the JSON, the PNG and the data.")
    flags.DEFINE_integer("seed", 0, "Seed of the cases, the weights, the data order, the draws.")
    flags.DEFINE_integer("num_train_cases", 8, "Synthetic training cases.", lower_bound=1)
    flags.DEFINE_integer("num_heldout_cases", 2, "Synthetic held-out cases.", lower_bound=1)
    flags.DEFINE_float("lr", 1e-4, "Adam's learning rate (fixed).", lower_bound=0.0)
    flags.DEFINE_float(
        "time_limit_s",
        3600.0,
        "Per variant: no new step after this many seconds "
        "(the held-out Dice is still taken); the subprocess is killed 600 s later.",
        lower_bound=1.0,
    )
    flags.DEFINE_string("_variant", None, "Internal: run this one variant in this process.")
    flags.DEFINE_boolean("_prepare", False, "Internal: write the data and initial weights.")


# ------------------------------------------------------------------ data
def data_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "data")


def make_cases(crop, first: int, count: int, seed: int):
    """``count`` synthetic cases of size ``crop`` (cases first, first + 1,
    ...), normalised per channel over the brain (§3.7) and as WT/TC/ET
    masks: (images float32 [N, D, H, W, 4], labels uint8 [N, D, H, W, 3])."""
    from data_pipeline.constants import MODALITIES
    from data_pipeline.synthetic import make_case
    from data_pipeline.volume import labels_to_regions, normalize_nonzero

    images, labels = [], []
    for n in range(first, first + count):
        lgg = np.random.default_rng((seed, n, 1)).uniform() < 0.25
        case, label = make_case(crop, seed=(seed, n), lgg=lgg)
        images.append(normalize_nonzero(np.stack([case[m] for m in MODALITIES], axis=-1)))
        labels.append(labels_to_regions(label).astype(np.uint8))
    return np.stack(images), np.stack(labels)


def case_order(steps: int, num_cases: int, seed: int) -> list[int]:
    """The training case of each step: one random permutation per epoch."""
    rng = np.random.default_rng((seed, 12345))
    order: list[int] = []
    while len(order) < steps:
        order.extend(int(i) for i in rng.permutation(num_cases))
    return order[:steps]


def model_config(
    crop, init_filters: int, seed: int, recompute: bool = False, blocks_down=(1, 2, 2, 4)
):
    from brats_tf.config import ModelConfig

    config = ModelConfig(
        input_shape=tuple(crop),
        init_filters=init_filters,
        seed=seed,
        blocks_down=tuple(blocks_down),
        blocks_up=(1,) * (len(blocks_down) - 1),  # the paper's one block a decoder level
    )
    if recompute:
        import dataclasses

        config = dataclasses.replace(config, recompute_levels=config.levels)
    return config


def prepare(
    crop,
    init_filters: int,
    seed: int,
    num_train: int,
    num_heldout: int,
    folder: str,
    blocks_down=(1, 2, 2, 4),
) -> dict:
    """Writes the cases (train.npz, heldout.npz) and the initial float32
    weights (initial.weights.h5) to ``folder``; returns a description."""
    import keras

    from brats_tf.model import build_model

    os.makedirs(folder, exist_ok=True)
    for name, first, count in (("train", 0, num_train), ("heldout", num_train, num_heldout)):
        images, labels = make_cases(crop, first, count, seed)
        np.savez(os.path.join(folder, f"{name}.npz"), images=images, labels=labels)
    keras.utils.set_random_seed(seed)
    model = build_model(model_config(crop, init_filters, seed, blocks_down=blocks_down))
    model.save_weights(os.path.join(folder, "initial.weights.h5"))
    return {"params": model.count_params()}


def weights_checksum(model) -> float:
    """Sum of squares of all weights: equal initial weights give equal sums."""
    return float(sum(np.sum(np.square(w.astype(np.float64))) for w in model.get_weights()))


# ---------------------------------------------------------- one variant
def run_variant(
    name: str,
    crop,
    init_filters: int,
    steps: int,
    log_every: int,
    seed: int,
    lr: float,
    folder: str,
    time_limit_s: float,
    blocks_down=(1, 2, 2, 4),
) -> dict:
    """Trains one variant in this process; returns its curves and figures."""
    import keras
    import tensorflow as tf

    from benchmarks.machine import device_name
    from brats_tf import metrics
    from brats_tf.config import LossConfig
    from brats_tf.inference import model_probabilities
    from brats_tf.model import build_inference_model, build_model
    from brats_tf.training import make_optimizer, make_train_step
    from data_pipeline import constants

    precision, jit_compile, recompute = VARIANTS[name]
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(seed)
    config = model_config(crop, init_filters, seed, recompute, blocks_down)
    model = build_model(config)
    model.load_weights(os.path.join(folder, "initial.weights.h5"))
    initial_checksum = weights_checksum(model)
    optimizer = make_optimizer(lr, precision)
    region_dice = [metrics.RegionDice(region) for region in constants.REGIONS]
    step = make_train_step(
        model, optimizer, LossConfig(), region_dice=region_dice, jit_compile=jit_compile
    )
    train = np.load(os.path.join(folder, "train.npz"))
    images, labels = train["images"], train["labels"]
    order = case_order(steps, len(images), seed)

    curves = {key: [] for key in ("step",) + CURVES}
    window = {key: 0.0 for key in ("loss", "dice", "l2", "kl", "count")}
    step_seconds, nonfinite = [], 0
    start = time.perf_counter()
    stopped_at = None
    for i, case in enumerate(order):
        if time.perf_counter() - start > time_limit_s:
            stopped_at = i
            break
        batch = {
            "image": tf.constant(images[case : case + 1]),
            "label": tf.constant(labels[case : case + 1].astype(np.float32)),
        }
        t = time.perf_counter()
        stats = {k: float(v.numpy()) for k, v in step(batch).items()}
        step_seconds.append(time.perf_counter() - t)
        if math.isfinite(stats["loss"]):
            for key in window:
                window[key] += stats[key]
        else:  # a float16 overflow: the LossScaleOptimizer skipped the update
            nonfinite += 1
        if (i + 1) % log_every == 0 or i + 1 == len(order):
            count = max(window["count"], 1.0)
            curves["step"].append(i + 1)
            for key in ("loss", "dice", "l2", "kl"):
                curves[key].append(window[key] / count if window["count"] else float("nan"))
            for metric in region_dice:
                curves[metric.name].append(float(metric.result()))
                metric.reset_state()
            window = {key: 0.0 for key in window}
    train_seconds = time.perf_counter() - start

    heldout = np.load(os.path.join(folder, "heldout.npz"))
    segmenter = build_inference_model(model)
    per_region = {region: [] for region in REGIONS}
    for image, label in zip(heldout["images"], heldout["labels"]):
        probs = model_probabilities(segmenter, tf.constant(image[None])).numpy()[0]
        for c, region in enumerate(REGIONS):
            per_region[region].append(metrics.dice(probs[..., c] > 0.5, label[..., c] > 0))
    gpus = tf.config.list_physical_devices("GPU")
    timed = step_seconds[1:] or step_seconds
    return {
        "variant": name,
        "config": {
            "precision": precision,
            "jit_compile": jit_compile,
            "recompute_levels": config.recompute_levels,
            "crop": list(crop),
            "init_filters": init_filters,
            "blocks_down": list(config.blocks_down),
            "vae": config.vae,
            "lr": lr,
            "seed": seed,
            "optimizer": type(optimizer).__name__,
            "params": model.count_params(),
        },
        "device": device_name(),
        "tensorflow": tf.__version__,
        "initial_weights_checksum": initial_checksum,
        "data_order": order[: len(step_seconds)],
        "steps_done": len(step_seconds),
        "stopped_by_time_limit_at": stopped_at,
        "nonfinite_steps": nonfinite,
        # updates applied: fewer than the steps where a LossScaleOptimizer
        # skipped a step whose float16 gradients overflowed
        "applied_updates": int(optimizer.iterations.numpy()),
        "curves": curves,
        "heldout_dice": {region: float(np.mean(v)) for region, v in per_region.items()},
        "heldout_dice_per_case": per_region,
        "first_step_s": round(step_seconds[0], 3),
        "sec_per_step": round(float(np.median(timed)), 4),
        "step_seconds": [round(s, 4) for s in step_seconds],
        "train_seconds": round(train_seconds, 1),
        "gpu_peak_gib": (
            round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**30, 2)
            if gpus
            else None
        ),
    }


# ------------------------------------------------------------ the figure
def curves_figure(results: dict) -> np.ndarray:
    """An RGB image: one panel per curve (x: step), a line per variant; the
    legend gives each variant's held-out Dice (brats_tf.figures.line_panels)."""
    from brats_tf.figures import line_panels

    names = [n for n, r in results.items() if "curves" in r]
    panels = [
        (
            key,
            [
                (name, results[name]["curves"]["step"], results[name]["curves"][key])
                for name in names
            ],
        )
        for key in CURVES
    ]
    legend = []
    for name in names:
        text = name
        if "heldout_dice" in results[name]:
            text += "  HELD-OUT DICE WT {WT:.3f} TC {TC:.3f} ET {ET:.3f}".format(
                **results[name]["heldout_dice"]
            )
        legend.append(text)
    return line_panels(panels, x_label="STEP", legend=legend)


def summarize(results: dict) -> dict:
    """Per variant: did the loss fall (last point below the first), is the
    last training WT Dice above 0 (no collapse), held-out WT Dice minus
    float32's (target: within 0.05)."""
    out = {}
    base = results.get("float32", {}).get("heldout_dice", {}).get("WT")
    for name, r in results.items():
        if "curves" not in r:
            continue
        loss = [v for v in r["curves"]["loss"] if math.isfinite(v)]
        wt = r["heldout_dice"]["WT"]
        out[name] = {
            "loss_first": loss[0] if loss else None,
            "loss_last": loss[-1] if loss else None,
            "loss_fell": bool(len(loss) > 1 and loss[-1] < loss[0]),
            "train_WT_dice_last": r["curves"]["dice_WT"][-1],
            "heldout_WT_dice": wt,
            "heldout_WT_minus_float32": None if base is None else wt - base,
            "within_0.05_of_float32": None if base is None else abs(wt - base) <= 0.05,
        }
    return out


def _fail(message: str):
    """A bad flag: one line on stderr, exit status 1."""
    sys.exit(f"learning_curve.py: error: {message}")


def _int_list(name: str, **expected) -> tuple[int, ...]:
    """--name as integers (``int_flag_list``); a bad value exits in one line."""
    try:
        return int_flag_list(name, FLAGS[name].value, **expected)
    except ValueError as e:
        _fail(str(e))


def _child(args: list[str], timeout: float, env: dict | None = None) -> dict:
    """Runs this script with ``args`` in a subprocess; its last stdout line
    as JSON, or {"error": ...} when it fails or runs past ``timeout``."""
    command = [sys.executable, os.path.abspath(__file__)] + args
    try:
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"killed after {timeout:.0f} s"}
    if proc.returncode:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {argv[1:]}")
    crop = _int_list("crop", count=3, minimum=16, multiple=16)
    if FLAGS.init_filters % 8:
        _fail(
            f"--init_filters must be divisible by 8 (the GroupNorm groups), "
            f"got {FLAGS.init_filters}"
        )
    unknown = [v for v in FLAGS.variants if v not in VARIANTS]
    if unknown or not FLAGS.variants:
        _fail(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if not FLAGS.out_dir:
        _fail("--out_dir is required")
    blocks_down = _int_list("blocks_down", minimum=1)
    try:  # the network's own checks (levels, divisibility), before any child starts
        model_config(crop, FLAGS.init_filters, FLAGS.seed, blocks_down=blocks_down)
    except ValueError as e:
        _fail(str(e))
    folder = data_dir(FLAGS.out_dir)
    common = dict(
        crop=crop, init_filters=FLAGS.init_filters, seed=FLAGS.seed, blocks_down=blocks_down
    )
    if FLAGS._prepare:
        print(
            json.dumps(
                prepare(
                    folder=folder,
                    num_train=FLAGS.num_train_cases,
                    num_heldout=FLAGS.num_heldout_cases,
                    **common,
                )
            )
        )
        return
    if FLAGS._variant:
        print(
            json.dumps(
                run_variant(
                    FLAGS._variant,
                    steps=FLAGS.steps,
                    lr=FLAGS.lr,
                    log_every=FLAGS.log_every,
                    folder=folder,
                    time_limit_s=FLAGS.time_limit_s,
                    **common,
                )
            )
        )
        return

    flag_args = [
        f"--{name}={FLAGS[name].value}"
        for name in (
            "init_filters",
            "steps",
            "log_every",
            "out_dir",
            "seed",
            "num_train_cases",
            "num_heldout_cases",
            "lr",
            "time_limit_s",
        )
    ] + [f"--crop={','.join(map(str, crop))}", f"--blocks_down={','.join(map(str, blocks_down))}"]
    machine = describe()
    print(f"machine: {machine}; writing to {FLAGS.out_dir}", flush=True)
    # The data and initial weights on the CPU: no GPU memory held meanwhile.
    prepared = _child(flag_args + ["--_prepare"], timeout=3600, env={"CUDA_VISIBLE_DEVICES": ""})
    if "error" in prepared:
        sys.exit(f"preparing the data failed: {prepared['error']}")
    results = {}
    for name in FLAGS.variants:
        print(f"{name} ...", flush=True)
        start = time.perf_counter()
        results[name] = _child(flag_args + [f"--_variant={name}"], timeout=FLAGS.time_limit_s + 600)
        r = results[name]
        if "error" in r:
            print(
                f"  {name} failed: {r['error'].splitlines()[-1] if r['error'] else ''}", flush=True
            )
            continue
        print(
            f"  {r['steps_done']} steps, {r['sec_per_step']} s/step (first "
            f"{r['first_step_s']} s), loss {r['curves']['loss'][0]:.4f} -> "
            f"{r['curves']['loss'][-1]:.4f}, held-out Dice "
            + " ".join(f"{k} {v:.3f}" for k, v in r["heldout_dice"].items())
            + f", {time.perf_counter() - start:.0f} s in all",
            flush=True,
        )
    payload = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "flags": {
            "crop": list(crop),
            "init_filters": FLAGS.init_filters,
            "blocks_down": list(blocks_down),
            "steps": FLAGS.steps,
            "log_every": FLAGS.log_every,
            "seed": FLAGS.seed,
            "lr": FLAGS.lr,
            "num_train_cases": FLAGS.num_train_cases,
            "num_heldout_cases": FLAGS.num_heldout_cases,
            "time_limit_s": FLAGS.time_limit_s,
            "variants": list(FLAGS.variants),
        },
        "data": prepared,
        "variants": results,
        "summary": summarize(results),
    }
    from brats_tf.figures import write_png

    json_path = os.path.join(FLAGS.out_dir, "learning_curves.json")
    write_json_atomic(json_path, payload)
    png_path = os.path.join(FLAGS.out_dir, "learning_curves.png")
    write_png(curves_figure(results), png_path)
    print(f"wrote {json_path} and {png_path}")
    failed = [n for n, r in results.items() if "error" in r]
    if failed:
        sys.exit(f"variants failed: {', '.join(failed)}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
