"""Trains the paper's network (Myronenko 2018, §3.4-3.7) on converted BraTS TFRecords.

    python train.py --flagfile=configs/brats2018.flags --data_dir=data/brats18 --model_dir=runs/b18
    python train.py --flagfile=configs/demo.flags         # CPU demo on synthetic data

Data: the output folder of `python -m data_pipeline.convert` (shards and
manifest.json; a folder of NIfTI cases is refused with the command that
converts it). `--fold=k` trains on every other fold and validates on fold k
every `--validate_every` epochs; `--fold=-1` trains on all cases.

Strategies: `--strategy=default` (one device), `mirrored` (all local GPUs or
`--devices`), `multi_worker` (several machines; the cluster from TF_CONFIG).
Ensembles (the paper's 10 models): `--member=K` trains member K with seed
--seed + K into --model_dir/member_K; evaluate.py --model='<model_dir>/member_*'.
Run again with the same --model_dir to resume from the last epoch checkpoint;
a run whose model, fold or seed differs from the config.json there stops
before writing anything; a run that finished before trains and rewrites
nothing. A shard that cannot be read stops the run in one line naming it (and
its case); when no epoch finished, --model_dir is left as it was found.

Writes into --model_dir: flags.txt (a flagfile that reproduces the run),
config.json (the resolved configs), checkpoints/, logs/ (TensorBoard),
history.json, and at the end model.keras (the training model),
segmenter.keras (the inference model) and export/<version>/ (a SavedModel for
TF Serving): each when it is missing, older than the last checkpoint, or the
run trained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# oneDNN's CPU kernels on every x86 CPU (TensorFlow's wheels turn them on by
# default only on some; elsewhere Eigen's 3-D convolutions are 2-8x slower):
# one set of kernels, whatever the CPU. Read once, when TensorFlow loads.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS

# Data.
flags.DEFINE_string("data_dir", None, "Converter output: TFRecord shards and manifest.json "
                    "(python -m data_pipeline.convert --input_dir <NIfTI folder> --output_dir "
                    "<NIfTI folder>_tfrecord writes one).")
flags.DEFINE_integer("fold", 0, "Validation fold (others train); -1: train on all cases.",
                     lower_bound=-1)
flags.DEFINE_string("model_dir", None, "Checkpoints, logs, flags and the export go here.")
flags.DEFINE_boolean("input_cache", False,
                     "Shuffle over all training cases each epoch (a uniform order) instead of "
                     "shard order plus an 8-case buffer; holds the epoch's decompressed cases in "
                     "memory (~30 MB per BraTS case). The data are read again every epoch.")
flags.DEFINE_enum("crop_from", "grid", ["grid", "brain_box"],
                  "Where the random training crop is drawn: uniformly in the original grid (the "
                  "paper), or in the brain's bounding box, so that crops smaller than the "
                  "paper's are still mostly brain (docs/deviations.md).")
flags.DEFINE_boolean("augment", True, "Random flips and intensity augmentation (§3.7).")
# Model (Table 1).
flags.DEFINE_list("crop", ["160", "192", "128"], "Training crop D,H,W; divisible by 16.")
flags.DEFINE_integer("init_filters", 32, "InitConv filters; doubled per level.", lower_bound=1)
flags.DEFINE_integer("groups", 8, "GroupNorm groups.", lower_bound=1)
flags.DEFINE_list("blocks_down", ["1", "2", "2", "4"], "ResNet blocks per encoder level.")
flags.DEFINE_list("blocks_up", ["1", "1", "1"], "ResNet blocks per decoder level (finest first).")
flags.DEFINE_integer("latent_dim", 128, "VAE latent size.", lower_bound=1)
flags.DEFINE_float("dropout", 0.2, "Spatial dropout after InitConv.", lower_bound=0.0,
                   upper_bound=0.99)
flags.DEFINE_float("weight_decay", 1e-5, "L2 weight on convolution kernels.", lower_bound=0.0)
flags.DEFINE_boolean("vae", True, "Train with the VAE branch (off: the ablation).")
flags.DEFINE_boolean("recompute", False,
                     "Gradient checkpointing of the ResNet blocks of the finest "
                     "--recompute_levels levels (brats_tf/recompute.py): each keeps only what it "
                     "is made from and computes its activations again in the backward pass; on "
                     "one device one TensorFlow op runs at a time. Same results, less memory "
                     "(paper crop, float32, 4 levels: 6.6 instead of 18.3 GiB on a 2-core CPU), "
                     "some more time per step (docs/performance.md).")
flags.DEFINE_integer("recompute_levels", None, "Levels recomputed with --recompute (1: the "
                     "full-resolution blocks only). Default: all.", lower_bound=1)
flags.DEFINE_enum("head_kernel_init", "glorot_uniform", ["glorot_uniform", "normal"],
                  "Kernel initialiser of the segmentation head DecoderEnd_Conv1 (the paper names "
                  "none): Keras' glorot_uniform, or normal with std --head_kernel_std.")
flags.DEFINE_float("head_kernel_std", 0.01, "Std of --head_kernel_init=normal (0.01: every voxel "
                   "starts near the probability of --head_bias_init).", lower_bound=0.0)
flags.DEFINE_float("head_bias_init", 0.0, "Initial bias of the segmentation head's 3 channels "
                   "(e.g. -4.6 = logit(0.01), a rare-foreground prior).")
# Loss (§3.4).
flags.DEFINE_float("dice_weight", 1.0, "Weight of the soft Dice loss.", lower_bound=0.0)
flags.DEFINE_float("l2_loss_weight", 0.1, "Weight of the VAE reconstruction loss.",
                   lower_bound=0.0)
flags.DEFINE_float("kl_weight", 0.1, "Weight of the VAE KL loss.", lower_bound=0.0)
# Optimisation (§3.5, §3.6).
flags.DEFINE_integer("epochs", 300, "Epochs N_e of the poly schedule.", lower_bound=1)
flags.DEFINE_float("lr", 1e-4, "Adam's initial learning rate.", lower_bound=0.0)
flags.DEFINE_float("lr_power", 0.9, "Exponent of the poly decay.", lower_bound=0.0)
flags.DEFINE_float("adam_epsilon", 1e-7, "Adam's epsilon (Keras' default; the paper names "
                   "none).", lower_bound=0.0)
flags.DEFINE_integer("batch_per_replica", 1, "Examples per replica and step.", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", None, "Cap on steps per epoch (default: one pass).",
                     lower_bound=1)
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                  "tf.distribute strategy.")
flags.DEFINE_list("devices", [], "Devices for --strategy=mirrored (default: all local GPUs).")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_float16", "mixed_bfloat16"],
                  "Keras dtype policy (mixed_float16 on GPUs).")
flags.DEFINE_enum("on_nonfinite", "stop", ["stop", "skip"],
                  "A NaN/inf loss stops the run, or its update is skipped.")
flags.DEFINE_integer("seed", 0, "Seed of weights, dropout, VAE sampling, data order.")
flags.DEFINE_integer("member", None, "Train member K of an ensemble trained from scratch (the "
                     "paper's 10 models, §4): seed --seed + K, written into "
                     "--model_dir/member_K. evaluate.py --model='<model_dir>/member_*' averages "
                     "the members.", lower_bound=0)
flags.DEFINE_boolean("deterministic", False, "Deterministic ops and data (slower).")
flags.DEFINE_boolean("jit_compile", False, "XLA-compile the train step (slow on CPU).")
flags.DEFINE_integer("keep_checkpoints", 3, "Epoch checkpoints kept.", lower_bound=1)
flags.DEFINE_integer("validate_every", 0, "Validate on the held-out fold every K epochs "
                     "(0: only after the last epoch; needs --fold >= 0).", lower_bound=0)
flags.DEFINE_boolean("export", True, "At the end, write model.keras, segmenter.keras and "
                     "export/1 (a run that trained nothing writes only those missing or older "
                     "than the last checkpoint).")
flags.DEFINE_boolean("verbose", True, "Progress bar per epoch.")

log = logging.getLogger("train")


def configs_from_flags():
    """(ModelConfig, LossConfig, TrainConfig, data dict) from FLAGS; ValueError if invalid."""
    from brats_tf.config import LossConfig, ModelConfig, int_flag_list
    from brats_tf.training import TrainConfig, check_precision_for_model
    from data_pipeline.manifest import fold_files, read_manifest

    for name in ("data_dir", "model_dir"):
        if not FLAGS[name].value:
            raise ValueError(f"--{name} is required")
    model_dir, seed = member_dir_and_seed(FLAGS.model_dir, FLAGS.seed, FLAGS.member)
    manifest_path = os.path.join(FLAGS.data_dir, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise ValueError(not_converted(FLAGS.data_dir))
    manifest = read_manifest(manifest_path)  # ManifestError (a ValueError): one line
    folds = manifest["options"]["folds"]
    if FLAGS.fold >= folds:
        raise ValueError(f"--fold={FLAGS.fold}: {manifest_path} has {folds} folds")
    if FLAGS.fold >= 0:
        train_files, val_files = fold_files(manifest_path, FLAGS.fold)
        num_train = sum(1 for c in manifest["cases"] if c["fold"] != FLAGS.fold)
        if not any(c["fold"] == FLAGS.fold for c in manifest["cases"]):
            raise ValueError(
                f"--fold={FLAGS.fold}: fold {FLAGS.fold} of {manifest_path} has no case (the "
                f"converter skipped them), nothing to validate on: choose another --fold, or "
                f"--fold=-1 to train on every case")
    else:
        train_files = [os.path.join(manifest["dir"], s["file"]) for s in manifest["shards"]]
        val_files, num_train = [], len(manifest["cases"])
    if not train_files or num_train == 0:
        raise ValueError(f"--fold={FLAGS.fold}: no training cases in {manifest_path}")
    if FLAGS.steps_per_epoch and FLAGS.steps_per_epoch * FLAGS.batch_per_replica > num_train:
        raise ValueError(
            f"--steps_per_epoch={FLAGS.steps_per_epoch} x --batch_per_replica="
            f"{FLAGS.batch_per_replica} needs {FLAGS.steps_per_epoch * FLAGS.batch_per_replica} "
            f"training cases per epoch; --fold={FLAGS.fold} of {manifest_path} has {num_train}")
    _check_tf_config()
    blocks_down = int_flag_list("blocks_down", FLAGS.blocks_down)
    model_config = ModelConfig(
        input_shape=int_flag_list("crop", FLAGS.crop), init_filters=FLAGS.init_filters,
        groups=FLAGS.groups, blocks_down=blocks_down,
        blocks_up=int_flag_list("blocks_up", FLAGS.blocks_up), latent_dim=FLAGS.latent_dim,
        dropout=FLAGS.dropout, l2_weight=FLAGS.weight_decay, vae=FLAGS.vae,
        recompute_levels=(FLAGS.recompute_levels or len(blocks_down)) if FLAGS.recompute else 0,
        head_kernel_init=FLAGS.head_kernel_init, head_kernel_std=FLAGS.head_kernel_std,
        head_bias_init=FLAGS.head_bias_init)
    loss_config = LossConfig(dice_weight=FLAGS.dice_weight,
                             l2_weight=FLAGS.l2_loss_weight, kl_weight=FLAGS.kl_weight)
    train_config = TrainConfig(
        model_dir=model_dir, num_train_cases=num_train, epochs=FLAGS.epochs,
        initial_lr=FLAGS.lr, lr_power=FLAGS.lr_power, adam_epsilon=FLAGS.adam_epsilon,
        batch_per_replica=FLAGS.batch_per_replica, strategy=FLAGS.strategy,
        devices=tuple(FLAGS.devices), precision=FLAGS.precision,
        on_nonfinite=FLAGS.on_nonfinite, seed=seed, deterministic=FLAGS.deterministic,
        steps_per_epoch=FLAGS.steps_per_epoch, keep_checkpoints=FLAGS.keep_checkpoints,
        jit_compile=FLAGS.jit_compile, verbose=FLAGS.verbose)
    check_precision_for_model(model_config, train_config.precision)
    if FLAGS.strategy == "multi_worker" and "TF_CONFIG" not in os.environ:
        raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable")
    data = {"train_files": train_files, "val_files": val_files, "num_train_cases": num_train,
            "manifest": manifest_path, "fold": FLAGS.fold, "member": FLAGS.member,
            "crop_from": FLAGS.crop_from}
    return model_config, loss_config, train_config, data


def not_converted(data_dir: str) -> str:
    """The error for a --data_dir without manifest.json, with a converter
    command that the converter accepts: into that folder when it does not
    exist yet; for a folder of BraTS NIfTI cases, from it into a folder
    beside it (the converter writes nothing inside its input)."""
    from data_pipeline import layouts

    if not os.path.exists(data_dir):
        return (f"--data_dir={data_dir}: no manifest.json there (no such folder); convert the "
                f"data into it first: python -m data_pipeline.convert --input_dir <BraTS NIfTI "
                f"folder> --output_dir {data_dir}")
    folder = os.path.normpath(data_dir)
    if os.path.basename(folder) in ("", ".", ".."):
        folder = os.path.abspath(folder)
    beside = f"{folder}_tfrecord"
    try:
        cases = layouts.find_cases(data_dir)
    except (ValueError, OSError):
        cases = []
    if not cases:
        return (f"--data_dir={data_dir}: no manifest.json there: not the converter's output "
                f"(nor BraTS NIfTI cases); train.py reads what python -m data_pipeline.convert "
                f"--input_dir <BraTS NIfTI folder> --output_dir <a folder outside it> writes")
    namings = " and ".join(sorted({c.naming for c in cases}))
    if os.path.isfile(os.path.join(beside, "manifest.json")):
        return (f"--data_dir={data_dir}: no manifest.json there: it holds {len(cases)} BraTS "
                f"NIfTI case(s) ({namings} naming), and {beside} their conversion, it seems: "
                f"train with --data_dir={beside}")
    return (f"--data_dir={data_dir}: no manifest.json there: it holds {len(cases)} BraTS NIfTI "
            f"case(s) ({namings} naming), not the converter's TFRecords; convert them first, "
            f"into a folder beside it: python -m data_pipeline.convert --input_dir {data_dir} "
            f"--output_dir {beside}, then train with --data_dir={beside}")


def member_dir_and_seed(model_dir: str, seed: int, member: int | None) -> tuple[str, int]:
    """(model_dir, seed) of one run: ensemble member K trains with seed + K in
    model_dir/member_K (its own initial weights, dropout, VAE sampling and data
    order); without a member, model_dir and seed as given."""
    if member is None:
        return model_dir, seed
    return os.path.join(model_dir, f"member_{member}"), seed + member


def _check_tf_config():
    """A TF_CONFIG that is set must be a JSON object (multi_worker: with cluster and task)."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return
    try:
        tf_config = json.loads(text)
    except ValueError as e:
        raise ValueError(f"the TF_CONFIG environment variable is not valid JSON ({e})") from None
    if not isinstance(tf_config, dict):
        raise ValueError("the TF_CONFIG environment variable is not a JSON object")
    missing = [k for k in ("cluster", "task") if k not in tf_config]
    if FLAGS.strategy == "multi_worker" and missing:
        raise ValueError(f"the TF_CONFIG environment variable lacks {' and '.join(missing)}")


# Fields a run may change when it resumes: how the same network is computed.
_RESUMABLE_MODEL_FIELDS = ("recompute_levels",)


def check_model_dir(model_dir: str, resolved: dict) -> None:
    """Refuses a model_dir that holds another run: its config.json must agree with
    ``resolved`` (the model section but for _RESUMABLE_MODEL_FIELDS, the fold,
    the seed and the number of training cases). Reads only; ValueError, one line."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        if os.path.isfile(os.path.join(model_dir, "checkpoints", "checkpoint")):
            raise ValueError(f"--model_dir={model_dir} holds checkpoints but no config.json: "
                             f"not a train.py run; use a new --model_dir")
        return
    try:
        with open(path) as f:
            old = json.load(f)
        old_model = old["model"]
        if not isinstance(old_model, dict):
            raise TypeError("model is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--model_dir={model_dir}: cannot read {path} of the run there "
                         f"({type(e).__name__}: {e}); use a new --model_dir") from None
    new = json.loads(json.dumps(resolved))  # tuples as lists, as on disk
    pairs = [(key, old_model[key], value) for key, value in new["model"].items()
             if key in old_model and key not in _RESUMABLE_MODEL_FIELDS]
    pairs.append(("fold", old.get("data", {}).get("fold", new["data"]["fold"]),
                  new["data"]["fold"]))
    pairs.append(("seed", old.get("train", {}).get("seed", new["train"]["seed"]),
                  new["train"]["seed"]))
    pairs.append(("num_train_cases",
                  old.get("train", {}).get("num_train_cases", new["train"]["num_train_cases"]),
                  new["train"]["num_train_cases"]))
    differ = [f"{key} {a!r} there, {b!r} now" for key, a, b in pairs if a != b]
    if differ:
        raise ValueError(f"--model_dir={model_dir} holds a run of another configuration "
                         f"({'; '.join(differ)}): use a new --model_dir, or that run's flags "
                         f"(--flagfile={os.path.join(model_dir, 'flags.txt')}) to resume it")


def data_error(error: Exception, data: dict) -> str:
    """One line for an error met while training reads its data. A read error
    of the tf.data pipeline names neither shard nor case: each shard is then
    read once (``shards.find_unreadable_shard``) to name the one that fails
    and its case; otherwise the error's own words and the data folder."""
    import tensorflow as tf

    from data_pipeline.manifest import read_manifest
    from data_pipeline.shards import find_unreadable_shard, tf_error_text

    if isinstance(error, tf.errors.OpError):
        if isinstance(error, tf.errors.DataLossError) or "Iterator" in str(error):
            manifest = read_manifest(data["manifest"], check_shards=False)
            cases_of = {os.path.join(manifest["dir"], s["file"]): s["cases"]
                        for s in manifest["shards"]}
            bad = find_unreadable_shard(data["train_files"] + data["val_files"], cases_of)
            if bad is not None:
                return str(bad)
        text = tf_error_text(error)
    else:
        lines = str(error).strip().splitlines()
        text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text} (data {os.path.dirname(data['manifest'])})"


def model_dir_contents(model_dir: str) -> dict:
    """What a run finds in model_dir before it writes there: "created", the
    topmost folder of model_dir's path that does not exist yet (None when
    model_dir exists); else "paths", every file and folder under it
    (relative), and "bytes", the contents of the two files every run
    rewrites, flags.txt and config.json."""
    if not os.path.isdir(model_dir):
        top = os.path.abspath(model_dir)
        while not os.path.exists(os.path.dirname(top)):
            top = os.path.dirname(top)
        return {"created": top}
    paths, contents = set(), {}
    for folder, dirs, files in os.walk(model_dir):
        rel = os.path.relpath(folder, model_dir)
        paths.update(os.path.normpath(os.path.join(rel, name)) for name in dirs + files)
    for name in ("flags.txt", "config.json"):
        if os.path.isfile(os.path.join(model_dir, name)):
            with open(os.path.join(model_dir, name), "rb") as f:
                contents[name] = f.read()
    return {"created": None, "paths": paths, "bytes": contents}


def restore_model_dir(model_dir: str, found: dict) -> None:
    """Undoes a run's writes into model_dir (one that trained nothing):
    folders it created are removed; in a model_dir that existed, what it
    added (TensorBoard events, a flags.txt or config.json) is removed and
    flags.txt and config.json get their earlier bytes back. Nothing that was
    there before is removed."""
    from data_pipeline.io_utils import atomic_path, remove_path

    if found["created"] is not None:
        remove_path(found["created"])
        return
    for folder, dirs, files in os.walk(model_dir, topdown=False):
        rel = os.path.relpath(folder, model_dir)
        for name in files + dirs:
            if os.path.normpath(os.path.join(rel, name)) not in found["paths"]:
                remove_path(os.path.join(folder, name))
    for name, contents in found["bytes"].items():
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                if f.read() == contents:
                    continue
        with atomic_path(path) as tmp:
            tmp.write_bytes(contents)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"train.py: error: unexpected arguments: {' '.join(argv[1:])}")
    try:
        model_config, loss_config, train_config, data = configs_from_flags()
        resolved = {"model": dataclasses.asdict(model_config),
                    "loss": dataclasses.asdict(loss_config),
                    "train": dataclasses.asdict(train_config), "data": data}
        check_model_dir(train_config.model_dir, resolved)
    except ValueError as e:  # one line, before anything is written
        sys.exit(f"train.py: error: {e}")
    # Only now import TensorFlow: the strategy must be created before any op.
    import tensorflow as tf

    from brats_tf import training
    inter_op_threads = training.set_inter_op_threads(model_config.recompute_levels,
                                                     train_config.strategy)
    resolved["runtime"] = {"inter_op_threads": inter_op_threads or "tensorflow default"}
    strategy = training.make_strategy(train_config.strategy, train_config.devices)

    from brats_tf import figures
    from data_pipeline.io_utils import update_text
    from data_pipeline.input import InputConfig, make_dataset

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    log.info("configuration: %s", json.dumps(resolved, sort_keys=True))
    log.info("strategy %s with %d replica(s)", type(strategy).__name__,
             strategy.num_replicas_in_sync)

    global_batch = train_config.batch_per_replica * strategy.num_replicas_in_sync

    def dataset_fn(ctx: tf.distribute.InputContext, epoch: int):
        # A new seed per epoch: a fresh, reproducible order and augmentation
        # each epoch, the same again after a resume.
        config = InputConfig(
            files=tuple(data["train_files"]), mode="train",
            crop_shape=model_config.input_shape, batch_size=global_batch,
            augment=FLAGS.augment, seed=train_config.seed * 100003 + epoch,
            deterministic=train_config.deterministic, cache=FLAGS.input_cache,
            crop_from=data["crop_from"],
            drop_remainder=True)
        return make_dataset(config, ctx)

    epoch_end_fn = None
    if data["val_files"]:
        def epoch_end_fn(trainer, epoch, summary):
            last = epoch + 1 == train_config.epochs
            every = FLAGS.validate_every
            if not trainer.is_chief or not (last or (every and (epoch + 1) % every == 0)):
                return {}
            return training.validation_dice(trainer.model, data["val_files"])

    try:
        trainer = training.Trainer(model_config, loss_config, train_config, dataset_fn,
                                   strategy=strategy, epoch_end_fn=epoch_end_fn)
    except ValueError as e:  # e.g. fewer cases than a global batch: still nothing written
        sys.exit(f"train.py: error: {e}")
    # Every check passed: only now is model_dir written (its earlier config.json,
    # if any, agrees with this run: check_model_dir); files that would get the
    # same text are left as they are.
    model_dir = train_config.model_dir
    found = model_dir_contents(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    update_text(os.path.join(model_dir, "flags.txt"), FLAGS.flags_into_string())
    update_text(os.path.join(model_dir, "config.json"),
                json.dumps(resolved, indent=2, sort_keys=True))
    try:
        trainer.train()
    except training.NonFiniteLossError as e:
        sys.exit(f"train.py: {e}")
    except (ValueError, tf.errors.OpError) as e:  # e.g. a shard that cannot be read
        message = data_error(e, data)
        if not trainer.history:  # no epoch finished in this run: leave model_dir as found
            restore_model_dir(model_dir, found)
        sys.exit(f"train.py: error: {message}")
    if trainer.is_chief and trainer.history:  # epochs ran: the whole history drawn again
        path = figures.write_training_curves(model_dir)
        log.info("wrote %s", path)
    unlearned = training.unlearned_regions(trainer.history[-1]) if trainer.history else {}
    if unlearned:
        log.warning(
            "this run has not learned %s: training Dice %s in its last epoch (a sigmoid channel "
            "saturated early and got no gradient since); train it again with another --seed "
            "or --member, and leave it out of an ensemble",
            " and ".join(unlearned), ", ".join(f"{r} {d:.3f}" for r, d in unlearned.items()))
    if trainer.is_chief and FLAGS.export:
        # A run that trained nothing now (finished before) keeps the final files
        # written since its last checkpoint; missing or older ones are written.
        latest = trainer.manager.latest_checkpoint
        keep = os.path.getmtime(f"{latest}.index") if latest and not trainer.history else None
        for path in training.save_final(trainer.model, model_dir, keep_newer_than=keep):
            log.info("wrote %s", path)
    log.info("done: %s", model_dir)


if __name__ == "__main__":
    app.run(main)
