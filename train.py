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
history.json, curves.png, and at the end model.keras (the training model),
segmenter.keras (the inference model) and export/1/ (a SavedModel for TF
Serving): each when it is missing, older than the last checkpoint, or the
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

from absl import app, flags

# The configs (without TensorFlow): their flagged fields are train.py's flags.
from brats_tf.config import (
    RENAMED_MODEL_FIELDS,
    LossConfig,
    ModelConfig,
    TrainConfig,
    check_precision_for_model,
)
from data_pipeline.checks import int_flag_list
from data_pipeline.flag_fields import flag_fields
from data_pipeline.input_config import InputConfig

FLAGS = flags.FLAGS

# The flags that are not one config field each.
flags.DEFINE_string(
    "data_dir",
    None,
    "Converter output: TFRecord shards and manifest.json "
    "(python -m data_pipeline.convert --input_dir <NIfTI folder> --output_dir "
    "<NIfTI folder>_tfrecord writes one).",
)
flags.DEFINE_integer(
    "fold", 0, "Validation fold (others train); -1: train on all cases.", lower_bound=-1
)
flags.DEFINE_string("model_dir", None, "Checkpoints, logs, flags and the export go here.")
flags.DEFINE_boolean(
    "recompute",
    False,
    "Gradient checkpointing of the ResNet blocks of the finest "
    "--recompute_levels levels (brats_tf/recompute.py): each keeps only what it "
    "is made from and computes its activations again in the backward pass; on "
    "one device one TensorFlow op runs at a time. Same results, less memory "
    "(paper crop, float32, 4 levels: 6.6 instead of 18.3 GiB on a 2-core CPU), "
    "some more time per step (docs/performance.md).",
)
flags.DEFINE_integer(
    "recompute_levels",
    None,
    "Levels recomputed with --recompute (1: the full-resolution blocks only). Default: all.",
    lower_bound=1,
)
flags.DEFINE_integer(
    "member",
    None,
    "Train member K of an ensemble trained from scratch (the "
    "paper's 10 models, §4): seed --seed + K, written into "
    "--model_dir/member_K. evaluate.py --model='<model_dir>/member_*' averages "
    "the members.",
    lower_bound=0,
)
flags.DEFINE_integer(
    "validate_every",
    0,
    "Validate on the held-out fold every K epochs "
    "(0: only after the last epoch; needs --fold >= 0).",
    lower_bound=0,
)
flags.DEFINE_boolean(
    "export",
    True,
    "At the end, write model.keras, segmenter.keras and "
    "export/1 (a run that trained nothing writes only those missing or older "
    "than the last checkpoint).",
)

_DEFINE = {
    bool: flags.DEFINE_boolean,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    str: flags.DEFINE_string,
}


def define_config_flags(config_class) -> None:
    """A flag for each ``flagged`` field of ``config_class``: its name, help,
    choices and bounds from the field's declaration, its default the field's
    (a list flag's: the items as text). Defined in train.py, so that absl
    files the flags under train.py (``--help`` lists them)."""
    for field in flag_fields(config_class):
        if field.choices:
            flags.DEFINE_enum(field.name, field.default, list(field.choices), field.help)
        elif field.type is tuple:
            flags.DEFINE_list(field.name, [str(v) for v in field.default], field.help)
        else:
            _DEFINE[field.type](field.name, field.default, field.help, **field.bounds)


def config_values(config_class) -> dict:
    """{field: value} of ``config_class``'s flagged fields, from their flags
    (a list flag of integers as a tuple of ints: ValueError naming the flag)."""
    values = {}
    for field in flag_fields(config_class):
        value = FLAGS[field.name].value
        if field.type is tuple:
            value = int_flag_list(field.name, value) if field.item is int else tuple(value)
        values[field.field] = value
    return values


# Data (§3.7), the model (Table 1), the loss (§3.4), the optimisation (§3.5, §3.6).
for _config_class in (InputConfig, ModelConfig, LossConfig, TrainConfig):
    define_config_flags(_config_class)

log = logging.getLogger("train")


def configs_from_flags():
    """(ModelConfig, LossConfig, TrainConfig, data dict) from FLAGS; ValueError if invalid."""
    for name in ("data_dir", "model_dir"):
        if not FLAGS[name].value:
            raise ValueError(f"--{name} is required")
    model_dir, seed = member_dir_and_seed(FLAGS.model_dir, FLAGS.seed, FLAGS.member)
    data = training_split(FLAGS.data_dir, FLAGS.fold)
    num_train, per_epoch = data["num_train_cases"], FLAGS.steps_per_epoch
    if per_epoch and per_epoch * FLAGS.batch_per_replica > num_train:
        raise ValueError(
            f"--steps_per_epoch={per_epoch} x --batch_per_replica={FLAGS.batch_per_replica} "
            f"needs {per_epoch * FLAGS.batch_per_replica} training cases per epoch; "
            f"--fold={FLAGS.fold} of {data['manifest']} has {num_train}"
        )
    _check_tf_config()
    model_values = config_values(ModelConfig)
    levels = (FLAGS.recompute_levels or len(model_values["blocks_down"])) if FLAGS.recompute else 0
    model_config = ModelConfig(recompute_levels=levels, **model_values)
    loss_config = LossConfig(**config_values(LossConfig))
    train_config = TrainConfig(
        model_dir=model_dir,
        num_train_cases=num_train,
        **{**config_values(TrainConfig), "seed": seed},
    )
    check_precision_for_model(model_config, train_config.precision)
    if FLAGS.strategy == "multi_worker" and "TF_CONFIG" not in os.environ:
        raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable")
    data.update(member=FLAGS.member, **config_values(InputConfig))  # every input flag
    return model_config, loss_config, train_config, data


def training_split(data_dir: str, fold: int) -> dict:
    """The shards of converted data in ``data_dir`` that train and validate
    with ``fold`` held out (-1: none): {"train_files", "val_files",
    "num_train_cases", "manifest" (its path), "fold"}; ValueError, one line,
    for a folder that is not converted or a fold with nothing to train or
    validate on."""
    from data_pipeline.manifest import fold_files, read_manifest

    manifest_path = os.path.join(data_dir, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise ValueError(not_converted(data_dir))
    manifest = read_manifest(manifest_path)  # ManifestError (a ValueError): one line
    folds = manifest["options"]["folds"]
    if fold >= folds:
        raise ValueError(f"--fold={fold}: {manifest_path} has {folds} folds")
    if fold >= 0:
        train_files, val_files = fold_files(manifest_path, fold)
        num_train = sum(1 for c in manifest["cases"] if c["fold"] != fold)
        if not any(c["fold"] == fold for c in manifest["cases"]):
            raise ValueError(
                f"--fold={fold}: fold {fold} of {manifest_path} has no case (the converter "
                f"skipped them), nothing to validate on: choose another --fold, or --fold=-1 to "
                f"train on every case"
            )
    else:
        train_files = [os.path.join(manifest["dir"], s["file"]) for s in manifest["shards"]]
        val_files, num_train = [], len(manifest["cases"])
    if not train_files or num_train == 0:
        raise ValueError(f"--fold={fold}: no training cases in {manifest_path}")
    return {
        "train_files": train_files,
        "val_files": val_files,
        "num_train_cases": num_train,
        "manifest": manifest_path,
        "fold": fold,
    }


def not_converted(data_dir: str) -> str:
    """The error for a --data_dir without manifest.json, with a converter
    command that the converter accepts: into that folder when it does not
    exist yet; for a folder of BraTS NIfTI cases, from it into a folder
    beside it (the converter writes nothing inside its input)."""
    from data_pipeline import layouts

    if not os.path.exists(data_dir):
        return (
            f"--data_dir={data_dir}: no manifest.json there (no such folder); convert the "
            f"data into it first: python -m data_pipeline.convert --input_dir <BraTS NIfTI "
            f"folder> --output_dir {data_dir}"
        )
    folder = os.path.normpath(data_dir)
    if os.path.basename(folder) in ("", ".", ".."):
        folder = os.path.abspath(folder)
    beside = f"{folder}_tfrecord"
    try:
        cases = layouts.find_cases(data_dir)
    except (ValueError, OSError):
        cases = []
    if not cases:
        return (
            f"--data_dir={data_dir}: no manifest.json there: not the converter's output "
            f"(nor BraTS NIfTI cases); train.py reads what python -m data_pipeline.convert "
            f"--input_dir <BraTS NIfTI folder> --output_dir <a folder outside it> writes"
        )
    namings = " and ".join(sorted({c.naming for c in cases}))
    if os.path.isfile(os.path.join(beside, "manifest.json")):
        return (
            f"--data_dir={data_dir}: no manifest.json there: it holds {len(cases)} BraTS "
            f"NIfTI case(s) ({namings} naming), and {beside} their conversion, it seems: "
            f"train with --data_dir={beside}"
        )
    return (
        f"--data_dir={data_dir}: no manifest.json there: it holds {len(cases)} BraTS NIfTI "
        f"case(s) ({namings} naming), not the converter's TFRecords; convert them first, "
        f"into a folder beside it: python -m data_pipeline.convert --input_dir {data_dir} "
        f"--output_dir {beside}, then train with --data_dir={beside}"
    )


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
            raise ValueError(
                f"--model_dir={model_dir} holds checkpoints but no config.json: "
                f"not a train.py run; use a new --model_dir"
            )
        return
    try:
        with open(path) as f:
            old = json.load(f)
        old_model = old["model"]
        if not isinstance(old_model, dict):
            raise TypeError("model is not an object")
        old_model = {RENAMED_MODEL_FIELDS.get(key, key): v for key, v in old_model.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"--model_dir={model_dir}: cannot read {path} of the run there "
            f"({type(e).__name__}: {e}); use a new --model_dir"
        ) from None
    new = json.loads(json.dumps(resolved))  # tuples as lists, as on disk
    pairs = [
        (key, old_model[key], value)
        for key, value in new["model"].items()
        if key in old_model and key not in _RESUMABLE_MODEL_FIELDS
    ]
    pairs.append(
        ("fold", old.get("data", {}).get("fold", new["data"]["fold"]), new["data"]["fold"])
    )
    pairs.append(
        ("seed", old.get("train", {}).get("seed", new["train"]["seed"]), new["train"]["seed"])
    )
    pairs.append(
        (
            "num_train_cases",
            old.get("train", {}).get("num_train_cases", new["train"]["num_train_cases"]),
            new["train"]["num_train_cases"],
        )
    )
    differ = [f"{key} {a!r} there, {b!r} now" for key, a, b in pairs if a != b]
    if differ:
        raise ValueError(
            f"--model_dir={model_dir} holds a run of another configuration "
            f"({'; '.join(differ)}): use a new --model_dir, or that run's flags "
            f"(--flagfile={os.path.join(model_dir, 'flags.txt')}) to resume it"
        )


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
            cases_of = {
                os.path.join(manifest["dir"], s["file"]): s["cases"] for s in manifest["shards"]
            }
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
    model_config, loss_config, train_config, data, resolved = resolve_run()
    # Only now import TensorFlow: the strategy must be created before any op.
    import tensorflow as tf

    from brats_tf import training

    strategy = start_runtime(model_config, train_config, resolved)
    try:
        trainer = training.Trainer(
            model_config,
            loss_config,
            train_config,
            make_dataset_fn(model_config, train_config, data, strategy),
            strategy=strategy,
            epoch_end_fn=make_epoch_end_fn(train_config, data),
        )
    except ValueError as e:  # e.g. fewer cases than a global batch: still nothing written
        sys.exit(f"train.py: error: {e}")
    model_dir = train_config.model_dir
    found = write_run_files(model_dir, resolved)
    try:
        trainer.train()
    except training.NonFiniteLossError as e:
        sys.exit(f"train.py: {e}")
    except (ValueError, tf.errors.OpError) as e:  # e.g. a shard that cannot be read
        message = data_error(e, data)
        if not trainer.history:  # no epoch finished in this run: leave model_dir as found
            restore_model_dir(model_dir, found)
        sys.exit(f"train.py: error: {message}")
    finish_run(trainer, model_dir)


def resolve_run():
    """The configs, the data and ``resolved`` (config.json's contents) of this
    run, checked against the run already in its model_dir; a bad flag exits
    with one line before anything is written."""
    try:
        model_config, loss_config, train_config, data = configs_from_flags()
        resolved = {
            "model": dataclasses.asdict(model_config),
            "loss": dataclasses.asdict(loss_config),
            "train": dataclasses.asdict(train_config),
            "data": data,
        }
        check_model_dir(train_config.model_dir, resolved)
    except ValueError as e:  # one line, before anything is written
        sys.exit(f"train.py: error: {e}")
    return model_config, loss_config, train_config, data, resolved


def start_runtime(model_config, train_config, resolved):
    """TensorFlow's threads, logging and the tf.distribute strategy (before
    any op); records the threads in ``resolved["runtime"]``."""
    from brats_tf import training

    inter_op_threads = training.set_inter_op_threads(
        model_config.recompute_levels, train_config.strategy
    )
    resolved["runtime"] = {"inter_op_threads": inter_op_threads or "tensorflow default"}
    strategy = training.make_strategy(train_config.strategy, train_config.devices)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    log.info("configuration: %s", json.dumps(resolved, sort_keys=True))
    log.info(
        "strategy %s with %d replica(s)", type(strategy).__name__, strategy.num_replicas_in_sync
    )
    return strategy


def make_dataset_fn(model_config, train_config, data, strategy):
    """The Trainer's dataset_fn: the training shards, cropped, augmented and
    batched (the global batch split over the replicas)."""
    from data_pipeline.input import make_dataset

    global_batch = train_config.batch_per_replica * strategy.num_replicas_in_sync
    input_values = config_values(InputConfig)

    def dataset_fn(ctx, epoch: int):
        # A new seed per epoch: with --deterministic a fresh, reproducible
        # order and augmentation each epoch, the same again after a resume
        # (without it make_dataset draws from TensorFlow's global seed).
        config = InputConfig(
            files=tuple(data["train_files"]),
            mode="train",
            crop_shape=model_config.input_shape,
            batch_size=global_batch,
            seed=train_config.seed * 100003 + epoch,
            deterministic=train_config.deterministic,
            drop_remainder=True,
            **input_values,
        )
        return make_dataset(config, ctx)

    return dataset_fn


def make_epoch_end_fn(train_config, data):
    """Validation Dice on the held-out fold every --validate_every epochs and
    after the last (by the chief); None without a held-out fold."""
    if not data["val_files"]:
        return None
    from brats_tf import training

    def epoch_end_fn(trainer, epoch, summary):
        last = epoch + 1 == train_config.epochs
        every = FLAGS.validate_every
        if not trainer.is_chief or not (last or (every and (epoch + 1) % every == 0)):
            return {}
        return training.validation_dice(trainer.model, data["val_files"])

    return epoch_end_fn


def write_run_files(model_dir: str, resolved: dict) -> dict:
    """Writes flags.txt and config.json into model_dir (files that would get
    the same text are left as they are); returns what model_dir held before
    (``model_dir_contents``). Called once every check passed: model_dir's
    earlier config.json, if any, agrees with this run (``check_model_dir``)."""
    from data_pipeline.io_utils import update_text

    found = model_dir_contents(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    update_text(os.path.join(model_dir, "flags.txt"), FLAGS.flags_into_string())
    update_text(
        os.path.join(model_dir, "config.json"), json.dumps(resolved, indent=2, sort_keys=True)
    )
    return found


def finish_run(trainer, model_dir: str) -> None:
    """After training: the training curves (epochs ran), a warning for
    regions the run has not learned, and with --export the final model files."""
    from brats_tf import figures, training

    if trainer.is_chief and trainer.history:  # epochs ran: the whole history drawn again
        path = figures.write_training_curves(model_dir)
        log.info("wrote %s", path)
    unlearned = training.unlearned_regions(trainer.history[-1]) if trainer.history else {}
    if unlearned:
        log.warning(
            "this run has not learned %s: training Dice %s in its last epoch (a sigmoid channel "
            "saturated early and got no gradient since); train it again with another --seed "
            "or --member, and leave it out of an ensemble",
            " and ".join(unlearned),
            ", ".join(f"{r} {d:.3f}" for r, d in unlearned.items()),
        )
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
