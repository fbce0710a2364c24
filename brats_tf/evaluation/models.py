"""The models of an evaluation: ``load_model`` (a .keras file, a SavedModel,
a train.py model_dir or a checkpoint) and ensembles (§4: the mean of the
models' probabilities)."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
import zipfile

import keras
import numpy as np
import tensorflow as tf

from brats_tf import inference
from brats_tf.config import ModelConfig
from brats_tf.evaluation.config import EvaluationError
from brats_tf.inference import METADATA_FILE

# (brats_tf.model imports brats_tf.layers and brats_tf.recompute: their layers are
# registered for loading .keras files)
from brats_tf.model import build_inference_model, build_model, model_precision
from data_pipeline import constants
from data_pipeline.checks import one_line
from data_pipeline.io_utils import expand_pattern

log = logging.getLogger("brats_tf.evaluation")


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

    def padding_multiple(self) -> int:
        """What this model pads a volume to a multiple of (``inference.padding_multiple``;
        a SavedModel: as its metadata says, 8 when it does not)."""
        if not self.raw_input:
            return inference.padding_multiple([self.model])
        found = re.search(r"multiple of (\d+)", str(self.saved_metadata().get("padding", "")))
        return int(found[1]) if found else constants.SPATIAL_DIVISOR

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
        return inference.predict_volume(
            self.model, image, tta=tta, normalize=True, crop_to_brain=crop_to_brain
        )


def _load_keras(path: pathlib.Path, precision: str | None = None):
    if not zipfile.is_zipfile(path):  # Keras would say "File not found" of a file that is there
        raise EvaluationError(
            f"model {path}: not a valid .keras file (not a zip archive: truncated or corrupt?)"
        )
    try:
        model = keras.saving.load_model(str(path), compile=False)
    except Exception as e:  # Keras raises many types for a bad file
        raise EvaluationError(f"model {path}: cannot load: {one_line(e)}") from None
    model = inference.as_inference_model(model)
    if precision is not None and isinstance(model, keras.Model):
        model = build_inference_model(model, precision=precision)
    return model


def _load_checkpoint(prefix: str, config_json: pathlib.Path, precision: str | None = None):
    """The inference model from a tf.train.Checkpoint (keys model/optimizer/epoch/rng)
    and the ``model`` part of train.py's config.json."""
    if not config_json.is_file():
        raise EvaluationError(
            f"model {prefix}: no config.json beside the checkpoints (expected {config_json})"
        )
    try:
        fields = json.loads(config_json.read_text())["model"]
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        model = build_model(ModelConfig(**fields))
        status = tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
        status.assert_existing_objects_matched()
    except Exception as e:  # one line for whatever Keras raises
        raise EvaluationError(
            f"model {prefix}: cannot restore the checkpoint with {config_json}: {one_line(e)}"
        ) from None
    return build_inference_model(model, precision=precision)


def _load_saved_model(p: pathlib.Path, precision: str | None):
    """A SavedModel folder, with both serving signatures; EvaluationError."""
    try:
        loaded = tf.saved_model.load(str(p))
    except Exception as e:  # one line for whatever Keras raises
        raise EvaluationError(f"model {p}: cannot load SavedModel: {one_line(e)}") from None
    if precision is not None:
        raise EvaluationError(
            f"model {p}: a SavedModel computes in the precision it was exported with "
            f"(brats_tf.export --precision); --precision={precision} applies to .keras "
            f"files, model_dirs and checkpoints"
        )
    missing = [s for s in ("serving_default", "serving_tta") if s not in loaded.signatures]
    if missing:
        raise EvaluationError(
            f"model {p}: SavedModel lacks the signature(s) {missing} "
            f"(export it with brats_tf.export)"
        )
    return loaded


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
        return LoadedModel(text, "saved_model", _load_saved_model(p, precision), True)
    if p.is_dir():
        for name in ("segmenter.keras", "model.keras"):
            if (p / name).is_file():
                return LoadedModel(str(p / name), "keras", _load_keras(p / name, precision), False)
        ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        latest = tf.train.latest_checkpoint(str(ckpt_dir))
        if latest:
            return LoadedModel(
                latest,
                "checkpoint",
                _load_checkpoint(latest, ckpt_dir.parent / "config.json", precision),
                False,
            )
        raise EvaluationError(
            f"model {p}: not a model: no saved_model.pb, segmenter.keras, "
            f"model.keras or checkpoints/ inside"
        )
    if pathlib.Path(text + ".index").is_file():
        return LoadedModel(
            text,
            "checkpoint",
            _load_checkpoint(text, p.parent.parent / "config.json", precision),
            False,
        )
    if not p.exists():
        raise EvaluationError(f"model {p}: no such file or directory")
    raise EvaluationError(f"model {p}: not a .keras file, SavedModel, model_dir or checkpoint")


def ensemble_probabilities(
    models: list[LoadedModel], image: np.ndarray, tta: bool = False, crop_to_brain: bool = True
) -> np.ndarray:
    """Mean of the models' probabilities (§4) on one RAW case [D, H, W, 4] -> [D, H, W, 3].

    The Keras models share one normalisation and padding (``predict_volume`` with
    the list); each SavedModel normalises inside its signature.
    """
    keras_models = [m.model for m in models if not m.raw_input]
    total = None
    if keras_models:
        total = inference.predict_volume(
            keras_models, image, tta=tta, crop_to_brain=crop_to_brain
        ) * len(keras_models)
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
                f"{constants.NUM_MODALITIES} ({', '.join(constants.MODALITIES)})"
            )
        log.info(
            "model %s: %s from %s%s",
            path,
            model.kind,
            model.path,
            f", computing in {precision}" if precision else "",
        )
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
