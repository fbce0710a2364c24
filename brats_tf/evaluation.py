"""Held-out evaluation shared by train.py (validation) and evaluate.py.

Whole volumes from the input pipeline's eval mode (the stored brain box,
normalised), full-volume inference (padding to a multiple of 8 and back, §3),
probabilities -> BraTS label map -> nested regions, and per-region Dice.

``evaluate`` (evaluate.py, paper §4): models (``load_models``: model_dirs,
.keras files, SavedModels, checkpoints; ensembles, TTA) on cases in their
original grid (``open_cases``: TFRecords or NIfTI folders), BraTS metrics,
per-case CSV, summaries, NIfTI predictions and figures; see EVALUATION.md.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import io
import json
import logging
import os
import pathlib
import time
import weakref
import zipfile
from typing import Iterable, Iterator

import keras
import nibabel as nib
import numpy as np
import tensorflow as tf
import tqdm

from data_pipeline import constants, volume
from brats_tf import figures, inference, metrics, training
from brats_tf.config import ModelConfig
from brats_tf.inference import METADATA_FILE, export_saved_model
from data_pipeline.io_utils import (atomic_path, expand_pattern, remove_path, replace_folder,
                               stale_temporaries, write_text_atomic)
# (brats_tf.model imports brats_tf.layers and brats_tf.recompute: their layers are
# registered for loading .keras files)
from brats_tf.model import build_inference_model, build_model, check_precision, model_precision
from data_pipeline import convert, features, layouts
from data_pipeline import manifest as manifest_lib
from data_pipeline.input import InputConfig, make_dataset, shard_error

log = logging.getLogger("brats_tf.evaluation")


# training model -> its inference model, made once: predict_volume caches its
# traced graph per inference model, so a new one at every validation would
# trace the network again each time (weak keys: the cache keeps nothing alive).
_SEGMENTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def validation_dice(model, files, tta: bool = False) -> dict:
    """Mean per-region Dice ({"val_dice_WT", "val_dice_TC", "val_dice_ET"}) over ``files``.

    Args:
      model: a training model (its encoder and segmentation decoder are used).
      files: TFRecord shards written by data_pipeline.convert, with labels.
      tta: average the 8 mirror flips (§4).
    """
    segmenter = _SEGMENTERS.get(model)
    if segmenter is None:
        segmenter = _SEGMENTERS[model] = build_inference_model(model)
    scores = {region: [] for region in constants.REGIONS}
    for example in make_dataset(InputConfig(files=tuple(files), mode="eval")):
        probs = inference.predict_volume(segmenter, example["image"][0].numpy(), tta=tta,
                                         normalize=False)
        predicted = volume.labels_to_regions(inference.probabilities_to_labels(probs))
        truth = example["label"][0].numpy() > 0.5
        for index, region in enumerate(constants.REGIONS):
            scores[region].append(metrics.dice(predicted[..., index], truth[..., index]))
    if not scores[constants.REGIONS[0]]:
        raise ValueError(f"no validation case in {list(files)}")
    result = {f"val_dice_{r}": float(np.mean(v)) for r, v in scores.items()}
    log.info("validation on %d cases: %s", len(scores[constants.REGIONS[0]]),
             "  ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


def _save_keras_atomic(model, path: str) -> None:
    with atomic_path(path, suffix=".keras") as tmp:
        model.save(str(tmp))


def save_final(model, model_dir: str, version: int = 1,
               keep_newer_than: float | None = None) -> list[str]:
    """Writes model.keras (the training model), segmenter.keras (the inference
    model) and export/<version>/ (SavedModel) into model_dir; returns the
    paths written.

    First removes what an earlier save into model_dir, killed before its
    rename, left there: the temporaries of exactly those three
    (``io_utils.stale_temporaries``), nothing else.

    Args:
      keep_newer_than: a time (seconds since the epoch; train.py: the latest
        checkpoint's): each of the three that exists and was written since
        is kept as it is, so that a rerun of a finished run rewrites nothing.
        None: all three are written.
    """
    model_path = os.path.join(model_dir, "model.keras")
    segmenter_path = os.path.join(model_dir, "segmenter.keras")
    export_dir = os.path.join(model_dir, "export")
    version_dir = os.path.join(export_dir, str(version))
    for stale in (stale_temporaries(model_path, ".keras")
                  + stale_temporaries(segmenter_path, ".keras")
                  + stale_temporaries(version_dir, directory=True)):
        remove_path(stale)
        log.info("removed %s, left by an interrupted save", stale)

    def current(path: str) -> bool:
        return (keep_newer_than is not None and os.path.isfile(path)
                and os.path.getmtime(path) >= keep_newer_than)

    written = []
    if not current(model_path):
        _save_keras_atomic(model, model_path)
        written.append(model_path)
    if not current(segmenter_path):
        _save_keras_atomic(build_inference_model(model), segmenter_path)
        written.append(segmenter_path)
    if not current(os.path.join(version_dir, "saved_model.pb")):
        written.append(str(export_saved_model(model, export_dir, version=version,
                                              overwrite=True)))
    return written


# =====================================================================
# Offline evaluation of trained models (evaluate.py)
# =====================================================================
#
# Paper §4: single model, TTA (mean of the 8 mirror flips) and ensembles (mean
# of the models' probabilities); §1: labels and the nested regions. Metrics
# and empty-mask rules: brats_tf/metrics.py; figures: brats_tf/figures.py;
# user doc: brats_tf/EVALUATION.md.

PER_CASE_CSV = "per_case.csv"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
RUN_JSON = "evaluation.json"  # written by every run: marks a directory evaluate may overwrite
PREDICTIONS = "predictions"
PROBABILITIES = "probabilities"
FIGURES = "figures"


class EvaluationError(ValueError):
    """A bad input; str() is one line naming the model, case or file."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What ``evaluate`` does (evaluate.py's flags).

    Attributes:
      models: model paths (each a model_dir, a .keras file, a SavedModel dir or
        a checkpoint); several = an ensemble (§4).
      data: a TFRecord folder with manifest.json, or a folder of BraTS NIfTI cases.
      output_dir: everything is written here (nothing elsewhere).
      fold: with TFRecords, only this fold's (validation) shards; None = all.
      tta: mean over the 8 mirror flips (§4).
      crop_to_brain: run Keras models on the brain's bounding box
        (``volume.brain_box``); False: the whole padded volume (the paper).
      et_label: the ET value written in the predictions: 4 (BraTS 2017-2021)
        or 3 (BraTS 2023+); None (the default): the data's naming decides
        (``et_label_for_data``: 3 for BraTS 2023 names, else 4).
      threshold: a voxel is in a region when p > threshold.
      et_min_voxels: post-processing (not the paper's; 0: off): a case whose
        predicted ET has fewer voxels becomes necrosis there
        (``volume.et_to_necrosis``); choose it with ``brats_tf.postprocess``.
      precision: compute Keras models and checkpoints in this Keras dtype
        policy (``model.PRECISIONS``; ``mixed_bfloat16``: 2x faster on CPUs
        with AMX) instead of the one they were saved with (None). A
        SavedModel computes as it was exported; with a precision it is an error.
      hd95_mode: "pooled" (MedPy) or "max_directed" (metrics.HD95_MODES).
      save_probabilities: also write <case_id>_probabilities.nii.gz (float32 [D, H, W, 3]).
      figures: write a PNG per case.
      overwrite: replace an output_dir written by an earlier run.
      progress: show a tqdm progress bar.
    """

    models: tuple
    data: str
    output_dir: str
    fold: int | None = None
    tta: bool = False
    et_label: int | None = None
    threshold: float = 0.5
    et_min_voxels: int = 0
    crop_to_brain: bool = True
    precision: str | None = None
    hd95_mode: str = "pooled"
    save_probabilities: bool = False
    figures: bool = True
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        models = (self.models,) if isinstance(self.models, (str, os.PathLike)) else self.models
        models = tuple(str(m) for m in models)
        if not models or any(not m.strip() for m in models):
            raise ValueError(f"models must be one or more paths, got {self.models!r}")
        object.__setattr__(self, "models", models)
        for name in ("data", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise ValueError(f"{name} must be a path, got {value!r}")
            object.__setattr__(self, name, str(value))
        if self.fold is not None and (isinstance(self.fold, bool) or not isinstance(self.fold, int)
                                      or self.fold < 0):
            raise ValueError(f"fold must be None or an integer >= 0, got {self.fold!r}")
        if self.et_label is not None:
            volume.check_et_label(self.et_label)
        volume.check_threshold(self.threshold)
        volume.check_et_min_voxels(self.et_min_voxels)
        check_precision(self.precision)
        if self.hd95_mode not in metrics.HD95_MODES:
            raise ValueError(
                f"hd95_mode must be one of {metrics.HD95_MODES}, got {self.hd95_mode!r}")


# ------------------------------------------------------------------ models
@dataclasses.dataclass
class LoadedModel:
    """One model of the ensemble and how it is called.

    ``raw_input``: the model normalises its input itself (a SavedModel's
    serving signature); otherwise ``predict`` normalises (§3.7) before calling
    it. Either way the image is normalised exactly once.
    """

    path: str
    kind: str  # "keras" | "saved_model" | "checkpoint"
    model: object
    raw_input: bool

    def precision(self) -> str | None:
        """The Keras dtype policy the network computes in (None: a SavedModel)."""
        return None if self.raw_input else model_precision(self.model)

    def saved_metadata(self) -> dict:
        """A SavedModel's assets.extra/brats_tf.json ({} if absent or unreadable)."""
        if not self.raw_input:
            return {}
        try:
            meta = json.loads((pathlib.Path(self.path) / METADATA_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def region(self, crop_to_brain: bool) -> str:
        """'brain_box' or 'whole_volume': what this model runs on (a SavedModel:
        as exported; 'unknown' when its metadata does not say)."""
        if self.raw_input:
            exported = self.saved_metadata().get("crop_to_brain")
            if exported is None:
                return "unknown"
            crop_to_brain = exported
        return inference.region_name(crop_to_brain)

    def networks(self) -> int:
        """How many networks it averages (a SavedModel exported from an ensemble: several)."""
        size = self.saved_metadata().get("protocol", {}).get("ensemble_size", 1)
        return size if isinstance(size, int) and size >= 1 else 1

    def predict(self, image: np.ndarray, tta: bool, crop_to_brain: bool = True) -> np.ndarray:
        """[D, H, W, 4] RAW intensities -> [D, H, W, 3] probabilities (WT, TC, ET).

        ``crop_to_brain`` applies to Keras models; a SavedModel does what it
        was exported with (its assets.extra/brats_tf.json says)."""
        if self.raw_input:
            fn = self.model.signatures["serving_tta" if tta else "serving_default"]
            out = fn(image=tf.convert_to_tensor(np.asarray(image, np.float32)[None]))
            return np.asarray(out["probabilities"][0], np.float32)
        return inference.predict_volume(self.model, image, tta=tta, normalize=True,
                                        crop_to_brain=crop_to_brain)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _load_keras(path: pathlib.Path, precision: str | None = None):
    if not zipfile.is_zipfile(path):  # Keras would say "File not found" of a file that is there
        raise EvaluationError(f"model {path}: not a valid .keras file (not a zip archive: "
                              f"truncated or corrupt?)")
    try:
        model = keras.saving.load_model(str(path), compile=False)
    except Exception as e:  # noqa: BLE001  Keras raises many types for a bad file
        raise EvaluationError(f"model {path}: cannot load: {_one_line(e)}") from None
    model = inference.as_inference_model(model)
    if precision is not None and isinstance(model, keras.Model):
        model = build_inference_model(model, precision=precision)
    return model


def _load_checkpoint(prefix: str, config_json: pathlib.Path, precision: str | None = None):
    """The inference model from a tf.train.Checkpoint (keys model/optimizer/epoch/rng)
    and the ``model`` part of train.py's config.json."""
    if not config_json.is_file():
        raise EvaluationError(f"model {prefix}: no config.json beside the checkpoints "
                              f"(expected {config_json})")
    try:
        fields = json.loads(config_json.read_text())["model"]
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        model = build_model(ModelConfig(**fields))
        status = tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
        status.assert_existing_objects_matched()
    except Exception as e:  # noqa: BLE001
        raise EvaluationError(f"model {prefix}: cannot restore the checkpoint with "
                              f"{config_json}: {_one_line(e)}") from None
    return build_inference_model(model, precision=precision)


def load_model(path, precision: str | None = None) -> LoadedModel:
    """Resolves and loads one model path (see ``EvalConfig.models``).

    * ``*.keras`` file: loaded; a training model becomes its inference model.
    * folder with ``saved_model.pb`` (``export/<version>/``): loaded with
      ``tf.saved_model.load``, called through ``serving_default`` /
      ``serving_tta`` with RAW volumes.
    * model_dir (train.py): ``segmenter.keras``, else ``model.keras``, else the
      latest checkpoint of ``checkpoints/`` with ``config.json``.
    * checkpoint prefix (``.../checkpoints/ckpt-3``) or the checkpoints/ folder:
      with the model_dir's ``config.json``.
    ``precision``: see ``EvalConfig``; an error for a SavedModel.
    Raises EvaluationError (one line naming the path).
    """
    p = pathlib.Path(path)
    text = str(path)
    if p.is_file() and p.suffix == ".keras":
        return LoadedModel(text, "keras", _load_keras(p, precision), False)
    if p.is_dir() and (p / "saved_model.pb").is_file():
        try:
            loaded = tf.saved_model.load(text)
        except Exception as e:  # noqa: BLE001
            raise EvaluationError(f"model {p}: cannot load SavedModel: {_one_line(e)}") from None
        if precision is not None:
            raise EvaluationError(
                f"model {p}: a SavedModel computes in the precision it was exported with "
                f"(brats_tf.export --precision); --precision={precision} applies to .keras "
                f"files, model_dirs and checkpoints")
        missing = [s for s in ("serving_default", "serving_tta") if s not in loaded.signatures]
        if missing:
            raise EvaluationError(f"model {p}: SavedModel lacks the signature(s) {missing} "
                                  f"(export it with brats_tf.export)")
        return LoadedModel(text, "saved_model", loaded, True)
    if p.is_dir():
        for name in ("segmenter.keras", "model.keras"):
            if (p / name).is_file():
                return LoadedModel(str(p / name), "keras", _load_keras(p / name, precision),
                                   False)
        ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        latest = tf.train.latest_checkpoint(str(ckpt_dir))
        if latest:
            return LoadedModel(latest, "checkpoint", _load_checkpoint(
                latest, ckpt_dir.parent / "config.json", precision), False)
        raise EvaluationError(f"model {p}: not a model: no saved_model.pb, segmenter.keras, "
                              f"model.keras or checkpoints/ inside")
    if pathlib.Path(text + ".index").is_file():
        return LoadedModel(text, "checkpoint", _load_checkpoint(
            text, p.parent.parent / "config.json", precision), False)
    if not p.exists():
        raise EvaluationError(f"model {p}: no such file or directory")
    raise EvaluationError(f"model {p}: not a .keras file, SavedModel, model_dir or checkpoint")


def ensemble_probabilities(models: list[LoadedModel], image: np.ndarray,
                           tta: bool = False, crop_to_brain: bool = True) -> np.ndarray:
    """Mean of the models' probabilities (§4) on one RAW case [D, H, W, 4] -> [D, H, W, 3].

    The Keras models share one normalisation and padding (``predict_volume`` with
    the list); each SavedModel normalises inside its signature.
    """
    keras_models = [m.model for m in models if not m.raw_input]
    total = None
    if keras_models:
        total = inference.predict_volume(keras_models, image, tta=tta,
                                         crop_to_brain=crop_to_brain) * len(keras_models)
    for model in models:
        if model.raw_input:
            p = model.predict(image, tta)
            total = p if total is None else total + p
    return (total / len(models)).astype(np.float32)


def input_channels(model: LoadedModel) -> int | None:
    """The number of input channels the model takes (None when it cannot be told)."""
    if model.raw_input:
        spec = model.model.signatures["serving_default"].structured_input_signature[1]
        shape = next(iter(spec.values())).shape
    else:
        inputs = getattr(model.model, "inputs", None)
        if not inputs:
            return None
        shape = inputs[0].shape
    return None if shape[-1] is None else int(shape[-1])


def load_models(paths, precision: str | None = None) -> list[LoadedModel]:
    """``load_model`` for each path; checks each takes the 4 modalities."""
    models = []
    for path in paths:
        model = load_model(path, precision)
        channels = input_channels(model)
        if channels is not None and channels != constants.NUM_MODALITIES:
            raise EvaluationError(
                f"model {path}: takes {channels} input channels, the data has "
                f"{constants.NUM_MODALITIES} ({', '.join(constants.MODALITIES)})")
        log.info("model %s: %s from %s%s", path, model.kind, model.path,
                 f", computing in {precision}" if precision else "")
        models.append(model)
    return models


def expand_model_paths(paths) -> list[str]:
    """Model paths with shell patterns expanded (``runs/ens/member_*``: the
    matches, sorted); a pattern that matches nothing is an EvaluationError."""
    expanded = []
    for path in paths:
        matches = expand_pattern(path)
        if not matches:
            raise EvaluationError(f"model {path}: the pattern matches no file or folder")
        expanded.extend(matches)
    return expanded


def _run_file(model: LoadedModel, name: str):
    """A file of the train.py model_dir a model comes from (its model_dir, the
    model_dir of its checkpoints/ or export/<n>/), parsed as JSON; None if absent."""
    p = pathlib.Path(model.path)
    if model.kind == "checkpoint" or model.raw_input:
        run_dir = p.parent.parent  # checkpoints/ckpt-N, export/N/
    else:
        run_dir = p if p.is_dir() else p.parent  # model_dir/*.keras
    try:
        return json.loads((run_dir / name).read_text())
    except (OSError, ValueError):
        return None


def training_run(model: LoadedModel) -> dict | None:
    """The train.py config.json of the run a model comes from, or None."""
    config = _run_file(model, "config.json")
    if not isinstance(config, dict) or not all(
            isinstance(config.get(k), dict) for k in ("model", "train", "data")):
        return None
    return config


def unlearned_regions(model: LoadedModel) -> dict:
    """``training.unlearned_regions`` of the last epoch in the model's
    history.json ({} without one)."""
    history = _run_file(model, "history.json")
    if not isinstance(history, list) or not history or not isinstance(history[-1], dict):
        return {}
    return training.unlearned_regions(history[-1])


def member_warnings(models: list[LoadedModel]) -> list[str]:
    """Warnings for an ensemble whose members are not distinct: the same file
    twice, or two runs with the same seed, network and data split (the same
    initial weights and data order: an average of near copies, not the
    paper's ensemble of models trained from scratch); and for a model whose
    training history shows a region it has not learned."""
    warnings, seen_paths, seen_runs = [], {}, {}
    for model in models:
        real = os.path.realpath(model.path)
        if real in seen_paths:
            warnings.append(f"models {seen_paths[real]} and {model.path} are the same file")
            continue
        seen_paths[real] = model.path
        unlearned = unlearned_regions(model)
        if unlearned:
            warnings.append(
                f"model {model.path} has not learned {' and '.join(unlearned)}: training Dice "
                f"{', '.join(f'{d:.3f}' for d in unlearned.values())} in its last epoch (a "
                f"channel saturated early in training); leave it out of the ensemble")
        run = training_run(model)
        if run is None:
            continue
        key = json.dumps([run["train"].get("seed"), run["data"].get("fold"),
                          run["train"].get("num_train_cases"), run["model"]], sort_keys=True)
        if key in seen_runs:
            warnings.append(
                f"models {seen_runs[key]} and {model.path} were trained with the same seed "
                f"{run['train'].get('seed')} on the same data split (fold "
                f"{run['data'].get('fold')}): the same initial weights and data order; train "
                f"ensemble members with train.py --member=K")
        else:
            seen_runs[key] = model.path
    return warnings


def run_protocol(config: EvalConfig, models: list[LoadedModel],
                 et_label: tuple[int, str] | None = None) -> dict:
    """``inference.protocol`` of an evaluation: what produced its scores;
    with ``et_label`` (``et_label_for_data``), the ET label written and why."""
    regions = sorted({m.region(config.crop_to_brain) for m in models})
    protocol = inference.protocol(
        region=regions[0] if len(regions) == 1 else "mixed: " + ", ".join(regions),
        tta=config.tta, ensemble_size=sum(m.networks() for m in models),
        threshold=config.threshold, et_min_voxels=config.et_min_voxels)
    if et_label is not None:
        protocol["et_label"], protocol["et_label_source"] = et_label
    return protocol


# ------------------------------------------------------------------- cases
@dataclasses.dataclass
class EvalCase:
    """One case in its ORIGINAL grid.

    image: [D, H, W, 4] float32 RAW intensities (``constants.MODALITIES`` order);
    label: [D, H, W] uint8 in the 2017-2021 values (ET = 4), or None (unlabelled);
    affine: 4x4; spacing: voxel size in mm along D, H, W; reference: the NIfTI
    path whose header the prediction copies (None: a header is made from the affine).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    spacing: tuple
    reference: str | None
    source: str


@dataclasses.dataclass
class SkippedCase:
    """A case ``open_cases`` was asked to skip (``skip``) and did not read:
    one an interrupted evaluation has done."""

    case_id: str
    source: str


def spacing_from_affine(affine) -> tuple[float, float, float]:
    """Voxel size in mm along the array axes: the column norms of the affine's 3x3 part."""
    affine = np.asarray(affine, np.float64)
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


def is_tfrecord_dir(data) -> bool:
    """A converter output folder: manifest.json there, written by the converter or
    beside shards (a NIfTI folder may hold an unrelated manifest.json)."""
    path = os.path.join(str(data), manifest_lib.MANIFEST)
    if not os.path.isfile(path):
        return False
    if any(name.endswith(features.SHARD_SUFFIX) for name in os.listdir(str(data))):
        return True
    try:
        with open(path) as f:
            return "converter_version" in json.load(f)
    except (OSError, ValueError, TypeError):
        return True  # unreadable: read_manifest says why


def _tfrecord_manifest(data: str, fold: int | None):
    """(manifest, its shards of ``fold`` (all when None)) of a converter output folder."""
    try:
        manifest = manifest_lib.read_manifest(data)  # validated: version, keys, shards there
    except ValueError as e:
        raise EvaluationError(f"data {data}: {_one_line(e)}") from None
    if fold is None:
        return manifest, manifest["shards"]
    folds = manifest["options"]["folds"]
    if not 0 <= fold < folds:
        raise EvaluationError(f"fold must be in [0, {folds}) for {data}, got {fold}")
    return manifest, [s for s in manifest["shards"] if s["fold"] == fold]


def _tfrecord_source(data: str, fold: int | None):
    """(files, number of cases, has_labels) of a converter output folder."""
    return _tfrecord_shards(data, fold)[:3]


def _tfrecord_shards(data: str, fold: int | None):
    """(files, number of cases, has_labels, {file: its case ids}) of a converter
    output folder, checked: every shard there, some case."""
    manifest, shards = _tfrecord_manifest(data, fold)
    files = [os.path.join(manifest["dir"], s["file"]) for s in shards]
    for f in files:
        if not os.path.isfile(f):
            raise EvaluationError(f"data {data}: shard {f} listed in manifest.json is missing")
    if not files:
        raise EvaluationError(f"data {data}: no shard (fold {fold})")
    count = sum(len(s["cases"]) if isinstance(s["cases"], list) else int(s["cases"])
                for s in shards)
    if count == 0:
        raise EvaluationError(f"data {data}: no case in fold {fold} (the converter skipped "
                              f"them: manifest.json's skipped)")
    cases_of = {file: s["cases"] for file, s in zip(files, shards)}
    return files, count, bool(manifest.get("has_labels", True)), cases_of


def _tfrecord_cases(files, cases_of: dict, skip=frozenset()) -> Iterator[EvalCase | SkippedCase]:
    def decode(serialized):
        ex = features.parse_raw(serialized)
        image, label = features.decode_volumes(ex)
        return {"case_id": ex["case_id"], "image": image, "label": label,
                "has_label": ex["has_label"], "box_start": ex["box_start"],
                "original_shape": ex["original_shape"], "affine": ex["affine"]}

    for file in files:  # one file at a time: an error names that file (and the case)
        listed = cases_of.get(file)
        source = f"TFRecord {os.path.basename(file)}"
        if isinstance(listed, list) and listed and set(listed) <= set(skip):
            yield from (SkippedCase(case_id, source) for case_id in listed)  # not read
            continue
        yield from _tfrecord_file_cases(file, decode, listed, skip)


def _tfrecord_file_cases(file: str, decode, listed, skip) -> Iterator[EvalCase | SkippedCase]:
    it = iter(tf.data.TFRecordDataset(file, features.COMPRESSION).map(decode))
    index = 0
    while True:
        try:
            ex = next(it)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            raise EvaluationError(str(shard_error(file, index, listed, e))) from None
        index += 1
        case_id = ex["case_id"].numpy().decode()
        source = f"TFRecord {os.path.basename(file)}"
        if case_id in skip:
            yield SkippedCase(case_id, source)
            continue
        shape, start = ex["original_shape"].numpy(), ex["box_start"].numpy()
        affine = ex["affine"].numpy()
        label = None
        if bool(ex["has_label"].numpy()):
            label = volume.paste_crop(ex["label"].numpy(), shape, start)
        yield EvalCase(
            case_id=case_id, image=volume.paste_crop(ex["image"].numpy(), shape, start),
            label=label, affine=affine, spacing=spacing_from_affine(affine),
            reference=None, source=source)


def _nifti_cases(cases, require_label: bool, skip=frozenset()) -> Iterator[EvalCase | SkippedCase]:
    for case in cases:
        if case.case_id in skip:
            yield SkippedCase(case.case_id, case.folder)  # not read
            continue
        loaded = convert.load_case(case, require_label)  # BadCaseError: one line, case and file
        ref = case.images[constants.MODALITIES[0]]
        label = None
        if loaded.label is not None:
            label = volume.paste_crop(loaded.label, loaded.original_shape, loaded.box_start)
        yield EvalCase(
            case_id=case.case_id,
            image=volume.paste_crop(loaded.image.astype(np.float32), loaded.original_shape,
                                    loaded.box_start),
            label=label, affine=loaded.affine,
            spacing=tuple(float(z) for z in nib.load(ref).header.get_zooms()[:3]),
            reference=ref, source=case.folder)


def _find_nifti_cases(data: str) -> list:
    try:
        return layouts.find_cases(data)
    except (ValueError, FileNotFoundError) as e:
        raise EvaluationError(f"data {data}: {_one_line(e)}") from None


def open_cases(data: str, fold: int | None = None, skip=frozenset()):
    """(iterable of EvalCase, number of cases, has_labels) for a TFRecord or NIfTI folder.

    Cheap checks run now (manifest, shards present, every modality file
    present); the volumes are read lazily, one case at a time. A case whose
    id is in ``skip`` comes as a SkippedCase, unread where its id is known
    without reading it (NIfTI cases; every case of a shard skipped).
    """
    if not os.path.isdir(data):
        raise EvaluationError(f"data {data}: not a folder")
    if is_tfrecord_dir(data):
        files, count, has_labels, cases_of = _tfrecord_shards(data, fold)
        log.info("data: %d TFRecord shard(s), %d case(s), %s, from %s", len(files), count,
                 "labelled" if has_labels else "unlabelled", data)
        return _tfrecord_cases(files, cases_of, frozenset(skip)), count, has_labels
    if fold is not None:
        raise EvaluationError(f"fold {fold} given but data {data} is not a TFRecord folder "
                              f"(no converter manifest.json)")
    if os.path.isfile(os.path.join(data, manifest_lib.MANIFEST)):
        log.warning("data %s: its manifest.json is not the converter's (no converter_version, "
                    "no shards): reading the folder as NIfTI cases", data)
    cases = _find_nifti_cases(data)
    has_labels = any(c.label is not None for c in cases)
    for case in cases:
        convert.check_files(case, has_labels)  # a missing modality: one line, before any work
    log.info("data: %d NIfTI case(s), %s, from %s", len(cases),
             "labelled" if has_labels else "unlabelled", data)
    return _nifti_cases(cases, has_labels, frozenset(skip)), len(cases), has_labels


def et_label_for_data(data: str, fold: int | None = None) -> tuple[int, str]:
    """(ET label, why) that the cases of ``data`` (of ``fold``) are named for:
    3 when every case has the BraTS 2023 naming (``layouts.NAMING_2023``,
    from manifest.json's cases or the NIfTI files' names), 4 when every case
    has the 2018-2021 naming or the manifest does not record it. A mix is an
    EvaluationError (choose with ``EvalConfig.et_label``)."""
    if not os.path.isdir(data):
        raise EvaluationError(f"data {data}: not a folder")
    if is_tfrecord_dir(data):
        manifest, _ = _tfrecord_manifest(data, fold)
        namings = [c.get("naming") for c in manifest["cases"] if fold is None or c["fold"] == fold]
    else:
        namings = [c.naming for c in _find_nifti_cases(data)]
    found = collections.Counter(namings)
    if found.get(layouts.NAMING_2023) and len(found) > 1:
        raise EvaluationError(
            f"data {data}: {found[layouts.NAMING_2023]} case(s) named as BraTS 2023, "
            f"{len(namings) - found[layouts.NAMING_2023]} not: pass --et_label=3 (BraTS 2023) "
            f"or --et_label=4 (2017-2021)")
    if found.get(layouts.NAMING_2023):
        return constants.LABEL_ET_2023, "the data's BraTS 2023 naming"
    if found.get(layouts.NAMING_2018) == len(namings):
        return constants.LABEL_ET, "the data's BraTS 2018-2021 naming"
    return constants.LABEL_ET, "the default (the data's naming is not recorded)"


# ----------------------------------------------------------------- outputs
def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_dir(config: EvalConfig, model_paths=None) -> None:
    """Refuses an output_dir that is / is inside / holds an input, or a non-empty
    folder without ``overwrite`` (and with it, one not written by evaluate).
    ``model_paths``: the models with their patterns expanded (default: config.models)."""
    out = config.output_dir
    models = config.models if model_paths is None else model_paths
    for name, path in [("data", config.data)] + [("model", m) for m in models]:
        if os.path.exists(path) and (_inside(out, path) or _inside(path, out)):
            raise EvaluationError(f"output_dir {out} is, is inside or contains the {name} "
                                  f"input {path}: choose another folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise EvaluationError(f"output_dir {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if not config.overwrite:
            raise EvaluationError(f"output_dir {out} is not empty (pass --overwrite to replace "
                                  f"an earlier evaluation)")
        if not os.path.isfile(os.path.join(out, RUN_JSON)):
            raise EvaluationError(f"output_dir {out} is not empty and holds no {RUN_JSON} of an "
                                  f"earlier evaluation: refusing to overwrite it")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise EvaluationError(f"output_dir {out}: parent folder {parent} does not exist")


SPACING_ATOL = 1e-3  # mm: BraTS volumes are resampled to 1 mm isotropic voxels

# An evaluation writes into <output_dir>.partial beside output_dir, renamed to
# output_dir once every case is done; until then it holds RESUME_JSON (what it
# is an evaluation of) and CASES_DONE/<case_id>.json (one per finished case),
# from which the same command, run again after an interruption, resumes.
STAGING_SUFFIX = ".partial"
RESUME_JSON = "resume.json"
CASES_DONE = "cases_done"


def staging_dir(output_dir) -> pathlib.Path:
    """Where an evaluation into ``output_dir`` writes until it is complete:
    ``<output_dir>.partial``, beside it."""
    out = pathlib.Path(output_dir)
    if out.name in ("", ".", ".."):
        out = pathlib.Path(os.path.abspath(output_dir))
    return out.with_name(out.name + STAGING_SUFFIX)


def _remove_stale_staging(out: pathlib.Path) -> None:
    """Removes the hidden temporaries that an evaluation into ``out``, killed
    midway, left beside it and that nothing resumes from: the staging folders
    of earlier versions (``.<name>.tmp-<random>``, holding nothing but
    evaluate's outputs) and those of a staging folder killed while it was
    made; other folders are left alone."""
    ours = {PREDICTIONS, PROBABILITIES, FIGURES, PER_CASE_CSV, SUMMARY_CSV, SUMMARY_JSON,
            RUN_JSON}
    for path in stale_temporaries(out, directory=True):
        names = {n for n in os.listdir(path) if not n.startswith(".")}  # .tmp files too
        if PREDICTIONS in names and names <= ours:
            remove_path(path)
            log.info("removed %s, left by an interrupted evaluation", path)
    for path in stale_temporaries(staging_dir(out), directory=True):
        if set(os.listdir(path)) <= {RESUME_JSON, CASES_DONE, PREDICTIONS, PROBABILITIES, FIGURES}:
            remove_path(path)


def _files_of(path) -> list:
    """[name, bytes, mtime in ns] of a file, of every file under a folder, or
    of the files of a checkpoint prefix: what tells whether it changed."""
    path = pathlib.Path(path)
    if path.is_file():
        base, files = path.parent, [path]
    elif path.is_dir():
        base, files = path, sorted(pathlib.Path(folder) / name
                                   for folder, _, names in os.walk(path, followlinks=True)
                                   for name in names)
    else:
        base, files = path.parent, sorted(pathlib.Path(p) for p in
                                          glob.glob(glob.escape(str(path)) + ".*"))
    stats = []
    for file in files:
        st = file.stat()
        stats.append([str(file.relative_to(base)), st.st_size, st.st_mtime_ns])
    return stats


def _resume_key(config: EvalConfig, models: list[LoadedModel], protocol: dict) -> dict:
    """What the staging folder of an evaluation is an evaluation of: the
    models' and the data's files (names, sizes, times), the fold, the
    protocol and what is written per case. A rerun resumes only where this
    is the same (JSON types: as read back)."""
    model_files = []
    for model in models:
        files = _files_of(model.path)
        if model.kind == "checkpoint":  # its architecture comes from config.json
            files += _files_of(pathlib.Path(model.path).parent.parent / "config.json")
        model_files.append({"path": os.path.realpath(model.path), "files": files})
    return json.loads(json.dumps({
        "models": model_files,
        "data": {"path": os.path.realpath(config.data), "fold": config.fold,
                 "files": _files_of(config.data)},
        "protocol": protocol,
        "outputs": {k: getattr(config, k) for k in ("precision", "hd95_mode",
                                                    "save_probabilities", "figures")},
    }))


def _read_json(path):
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None


def _evaluate_case(case: EvalCase, models: list[LoadedModel], config: EvalConfig,
                   et_label: int, staging: pathlib.Path) -> dict:
    """Predicts, scores and writes one case into ``staging``; returns its
    record: case_id, metrics (None without labels), spacing, files written."""
    probs = ensemble_probabilities(models, case.image, config.tta, config.crop_to_brain)
    labels = inference.probabilities_to_labels(probs, config.threshold, et_label)
    labels = volume.et_to_necrosis(labels, config.et_min_voxels, et_label)
    written = [f"{PREDICTIONS}/{case.case_id}.nii.gz"]
    inference.write_prediction_nifti(labels, _reference_for(case), staging / written[-1],
                                     case_id=case.case_id, et_label=et_label)
    if config.save_probabilities:
        written.append(f"{PROBABILITIES}/{case.case_id}_probabilities.nii.gz")
        _write_probabilities(probs, case, staging / written[-1])
    truth = scores = None
    if case.label is not None:
        truth = case.label.copy()
        truth[truth == constants.LABEL_ET] = et_label  # the project's ET (4) -> the output's
        scores = metrics.case_metrics(labels, truth, case.spacing, et_label, config.hd95_mode)
    if config.figures:
        rgb = figures.case_figure(case.image[..., constants.MODALITIES.index("t1ce")],
                                  case.affine, truth, labels, et_label=et_label,
                                  title=case.case_id)
        written.append(f"{FIGURES}/{case.case_id}.png")
        figures.write_png(rgb, staging / written[-1])
    return {"case_id": case.case_id, "metrics": scores,
            "spacing": [float(z) for z in case.spacing], "written": written}


def _columns():
    return ["case_id"] + [f"{region}_{m}" for region in constants.REGIONS for m in metrics.METRICS]


def per_case_rows(results: dict) -> list[dict]:
    """{case_id: case_metrics} -> CSV rows (case_id, then <region>_<metric>)."""
    rows = []
    for case_id, scores in results.items():
        row = {"case_id": case_id}
        for region in constants.REGIONS:
            for m in metrics.METRICS:
                row[f"{region}_{m}"] = scores[region][m]
        rows.append(row)
    return rows


def _csv_text(header, rows) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(float(v)) if isinstance(v, (float, np.floating)) else v)
                         for k, v in row.items()})
    return buffer.getvalue()


def summary_rows(summary: dict) -> list[dict]:
    """summarize() -> rows (statistic, <region>_<metric>...), as the BraTS server's table."""
    rows = []
    for stat in metrics.STATISTICS:
        row = {"statistic": stat}
        for region in constants.REGIONS:
            for m in metrics.METRICS:
                row[f"{region}_{m}"] = summary[region][m][stat]
        rows.append(row)
    return rows


def _write_probabilities(probs: np.ndarray, case: EvalCase, path: pathlib.Path) -> None:
    img = nib.Nifti1Image(np.asarray(probs, np.float32), case.affine)  # [D, H, W, 3]: WT, TC, ET
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))


def _reference_for(case: EvalCase):
    if case.reference is not None:
        return case.reference
    header = nib.Nifti1Header()
    header.set_data_shape(case.image.shape[:3])
    header.set_zooms(case.spacing)
    return case.affine, header


def _one_line_summary(summary: dict | None, n: int, seconds: float, out: str,
                      protocol: dict) -> str:
    how = inference.describe_protocol(protocol)
    if summary is None:
        return (f"evaluated {n} case(s) without labels in {seconds:.0f} s ({how}): "
                f"predictions in {out}")
    parts = [f"{r} Dice {summary[r]['dice']['mean']:.4f} HD95 {summary[r]['hd95']['mean']:.2f} mm"
             for r in constants.REGIONS]
    return f"{n} case(s) in {seconds:.0f} s ({how}): " + " | ".join(parts) + f" -> {out}"


def _model_record(model: LoadedModel) -> dict:
    run = training_run(model) or {}
    return {"path": model.path, "kind": model.kind, "precision": model.precision(),
            "networks": model.networks(), "seed": run.get("train", {}).get("seed"),
            "member": run.get("data", {}).get("member")}


def _resumable_cases(staging: pathlib.Path, key: dict) -> dict | None:
    """{case_id: record} of the cases that an interrupted evaluation with the
    same ``key`` has done in ``staging`` (their files there); None when there
    is nothing to resume: no staging folder, or one of another evaluation
    (said so: ``_make_staging`` replaces it). A folder of that name that is
    not an evaluation's staging folder is an EvaluationError. Reads only."""
    if not os.path.lexists(staging):
        return None
    recorded = _read_json(staging / RESUME_JSON) if staging.is_dir() else None
    if staging.is_symlink() or not isinstance(recorded, dict):
        raise EvaluationError(f"{staging} exists and is not the staging folder of an "
                              f"interrupted evaluation (no {RESUME_JSON}): move it away or "
                              f"choose another output_dir")
    if recorded != key:
        differ = [name for name in key if recorded.get(name) != key[name]] or ["versions"]
        log.warning("starting over: %s holds an interrupted evaluation whose %s differ from "
                    "this one's (nothing to resume there); it is replaced", staging,
                    " and ".join(differ))
        return None
    done = {}
    for path in sorted((staging / CASES_DONE).glob("*.json")):
        record = _read_json(path)
        if (isinstance(record, dict) and isinstance(record.get("written"), list)
                and all((staging / name).is_file() for name in record["written"])):
            done[record["case_id"]] = record
    log.info("resuming the interrupted evaluation in %s: %d case(s) done there are kept, the "
             "others evaluated now", staging, len(done))
    return done


def _make_staging(staging: pathlib.Path, key: dict, config: EvalConfig) -> None:
    """A new staging folder for ``key`` (replacing an earlier evaluation's)."""
    if os.path.lexists(staging):
        remove_path(staging)  # checked by _resumable_cases: an evaluation's, of another key
    with atomic_path(staging, directory=True) as tmp:
        for name, wanted in [(CASES_DONE, True), (PREDICTIONS, True),
                             (PROBABILITIES, config.save_probabilities),
                             (FIGURES, config.figures)]:
            if wanted:
                (tmp / name).mkdir()
        (tmp / RESUME_JSON).write_text(json.dumps(key, indent=1))
    log.info("writing into %s, renamed to %s once every case is done (if interrupted, the "
             "same command resumes there)", staging, config.output_dir)


def evaluate(config: EvalConfig, models: list[LoadedModel] | None = None,
             cases: Iterable[EvalCase] | None = None, num_cases: int | None = None) -> dict:
    """Predicts every case, scores it, and writes the outputs of EVALUATION.md (§1, §4).

    Inputs are checked before any inference (models load and take 4 channels;
    output_dir is not an input and is empty or an earlier evaluation; every
    modality file present). Everything is written into ``staging_dir``
    (``<output_dir>.partial``, named in the log) and renamed to output_dir at
    the end. An error removes what this run wrote there (the folder, when
    this run made it): nothing is left. An interruption (Ctrl-C, a kill)
    leaves it, and the same evaluation run again resumes there at the first
    case not done: when the models' and the data's files (names, sizes,
    times), the fold, the protocol and the outputs per case are the same;
    otherwise it starts over and says so.

    Args:
      config: EvalConfig.
      models, cases, num_cases: for library use, already loaded models
        (``load_models``) and cases (``open_cases``; num_cases sizes the progress
        bar); by default from config.
    Returns: {"summary": summarize() or None, "per_case": {case_id: case_metrics},
      "line": the one-line summary, "written": [paths relative to output_dir]}.
    Raises: EvaluationError or data_pipeline.convert.BadCaseError, one line.
    """
    model_paths = expand_model_paths(config.models) if models is None else None
    check_output_dir(config, model_paths)
    out = pathlib.Path(config.output_dir)
    _remove_stale_staging(out)
    if models is None:
        models = load_models(model_paths, config.precision)
    warnings = member_warnings(models)
    for warning in warnings:
        log.warning("%s", warning)
    if config.et_label is None:
        et_label, source = et_label_for_data(config.data, config.fold)
    else:
        et_label, source = config.et_label, "--et_label"
    log.info("ET written as %d: %s", et_label, source)
    protocol = run_protocol(config, models, (et_label, source))
    log.info("protocol: %s", inference.describe_protocol(protocol))
    staging = staging_dir(out)
    key = _resume_key(config, models, protocol)
    done = _resumable_cases(staging, key)
    if cases is None:
        cases, num_cases, _ = open_cases(config.data, config.fold, skip=set(done or ()))
    created = done is None
    if created:
        _make_staging(staging, key, config)
        done = {}
    start = time.monotonic()
    per_case: dict = {}
    written: list[str] = []
    mine: list[str] = []  # what this run wrote into the staging folder
    seen: set = set()
    other_spacing: dict = {}  # case_id -> spacing, for cases not on a 1 mm grid
    n = resumed = 0  # cases done, of them done by an interrupted run (tqdm may not count)
    try:
        bar = tqdm.tqdm(total=num_cases, unit="case", disable=not config.progress,
                        desc="evaluate", dynamic_ncols=True)
        with bar:
            for case in cases:
                if case.case_id in seen:
                    raise EvaluationError(f"case {case.case_id}: found twice in {config.data}")
                seen.add(case.case_id)
                record = done.get(case.case_id)
                if record is None:
                    if isinstance(case, SkippedCase):
                        raise EvaluationError(f"case {case.case_id}: skipped, but no record of "
                                              f"it in {staging / CASES_DONE}")
                    record = _evaluate_case(case, models, config, et_label, staging)
                    mine += record["written"]
                    name = f"{CASES_DONE}/{case.case_id}.json"
                    write_text_atomic(staging / name, json.dumps(record))
                    mine.append(name)
                    log.debug("case %s from %s: done", case.case_id, case.source)
                else:
                    resumed += 1
                written += record["written"]
                if record["metrics"] is not None:
                    per_case[case.case_id] = record["metrics"]
                if not np.allclose(record["spacing"], 1.0, rtol=0, atol=SPACING_ATOL):
                    other_spacing[case.case_id] = [round(float(z), 4) for z in record["spacing"]]
                bar.update(1)
                n += 1
                if per_case.get(case.case_id):
                    s = per_case[case.case_id]
                    bar.set_postfix_str(" ".join(f"{r} {s[r]['dice']:.3f}"
                                                 for r in constants.REGIONS))
        if n == 0:
            raise EvaluationError(f"data {config.data}: no case")
        summary = None
        if per_case:
            if len(per_case) != n:
                raise EvaluationError(f"data {config.data}: {n - len(per_case)} case(s) "
                                      f"without labels among labelled ones")
            summary = metrics.summarize(per_case)
            mine += [PER_CASE_CSV, SUMMARY_CSV, SUMMARY_JSON]
            write_text_atomic(staging / PER_CASE_CSV,
                              _csv_text(_columns(), per_case_rows(per_case)))
            write_text_atomic(staging / SUMMARY_CSV,
                              _csv_text(["statistic"] + _columns()[1:], summary_rows(summary)))
            write_text_atomic(staging / SUMMARY_JSON, json.dumps(
                {"num_cases": n, "protocol": protocol, "statistics": list(metrics.STATISTICS),
                 "summary": summary},
                indent=1))
            written += [PER_CASE_CSV, SUMMARY_CSV, SUMMARY_JSON]
        seconds = time.monotonic() - start
        line = _one_line_summary(summary, n, seconds, str(out), protocol)
        run = {"config": dataclasses.asdict(config), "protocol": protocol,
               "models": [_model_record(m) for m in models], "warnings": warnings,
               "num_cases": n, "resumed_cases": resumed, "has_labels": bool(per_case),
               "seconds": round(seconds, 1), "spacing_not_1mm": other_spacing,
               "summary_line": line, "written": sorted(written)}
        mine.append(RUN_JSON)
        write_text_atomic(staging / RUN_JSON, json.dumps(run, indent=1))
        written.append(RUN_JSON)
        # complete: the staging folder's own records go, then it becomes output_dir
        remove_path(staging / CASES_DONE)
        remove_path(staging / RESUME_JSON)
        replace_folder(staging, out)
    except KeyboardInterrupt:
        log.warning("interrupted: the %d case(s) done are kept in %s; the same command resumes "
                    "there", len(done) + n - resumed, staging)
        raise
    except BaseException:
        if created:
            remove_path(staging)
        else:  # an earlier run's staging folder: only what this run added goes
            for name in mine:
                remove_path(staging / name)
        raise
    if other_spacing:
        case_id, spacing = next(iter(other_spacing.items()))
        log.warning("%d of %d case(s) have a voxel spacing other than 1 mm (e.g. %s: %s mm): "
                    "their HD95 and volumes are in mm of that grid, not comparable with "
                    "BraTS's 1 mm results; listed in %s", len(other_spacing), n, case_id,
                    " x ".join(f"{z:g}" for z in spacing), out / RUN_JSON)
    kinds = collections.Counter(name.split("/")[0] for name in written)
    log.info("read %d case(s) from %s%s; wrote to %s: %s", n, config.data,
             f" ({resumed} of them done by the interrupted run)" if resumed else "", out,
             ", ".join(f"{k}/ ({v})" if k in (PREDICTIONS, PROBABILITIES, FIGURES) else k
                       for k, v in sorted(kinds.items())))
    return {"summary": summary, "per_case": per_case, "line": line, "written": sorted(written)}
