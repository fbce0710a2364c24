"""Export the segmentation network (no VAE) as a SavedModel for TF Serving.

Layout: ``<export_dir>/<version>/`` (saved_model.pb, variables/, assets.extra/
brats_tf.json), the model_name/version layout that ``tensorflow_model_server
--model_base_path=<export_dir>`` watches. The version is written under a hidden
temporary name in ``export_dir`` (``.<version>.tmp-<random>``: not a number, so
TF Serving ignores it) and renamed when complete; the temporaries of that
version left by an export killed midway are removed first.

Signatures (§3.1, §3.7, §4):

* ``serving_default``: input ``image`` float32 [B, D, H, W, 4], RAW intensities,
  channels in ``constants.MODALITIES`` order (t1, t1ce, t2, flair), any spatial
  size. In the graph: per-channel normalisation over non-zero voxels
  (``inference.normalize_nonzero_tf``), the crop to the brain's box
  (``inference.brain_box_tf``, the union over the batch; off with
  ``crop_to_brain=False``), zero padding to a multiple of 8 (symmetric, odd
  voxel at the end), the encoder + segmentation decoder, crop back, paste
  into the full volume (probability 0 outside the box). Outputs:
    - ``probabilities`` float32 [B, D, H, W, 3], sigmoid probabilities of
      WT, TC, ET (``constants.REGIONS``);
    - ``labels`` uint8 [B, D, H, W], the BraTS label map (0, 1, 2, 4; or 3 for
      ET with ``et_label=3``), thresholded at p > 0.5 with the paper's nesting,
      then the optional post-processing (``et_min_voxels``: a case's ET below
      that many voxels becomes necrosis; 0, the default, leaves it);
    - ``protocol`` string [B], JSON: how the labels were made
      (``inference.protocol``: region, padding, TTA, ensemble size, threshold,
      post-processing), which the client writes beside each prediction.
* ``serving_tta``: the same with test-time augmentation, the mean of the
  probabilities over the 8 mirror flips (8x the compute).

Several models (an ensemble, §4) export as one SavedModel whose network
output is the mean of theirs.

The network computes in the model's precision, or in ``precision`` /
``--precision`` (``mixed_float16`` for GPU serving of a float32-trained
model, ``mixed_bfloat16`` for CPUs with AMX); inputs and outputs stay float32.

Command line::

    python -m brats_tf.export --model=runs/x/model.keras --export_dir=/abs/export/brats
    python -m brats_tf.export --model='runs/ens/member_*/model.keras' --export_dir=/abs/export/ens
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys

import tensorflow as tf

from data_pipeline import constants, volume
from brats_tf import inference as inf
from data_pipeline.io_utils import atomic_path, expand_pattern, remove_path, stale_temporaries
from brats_tf.model import (PRECISIONS, build_inference_model, check_precision,
                            config_from_model, model_precision)

INPUT_NAME = "image"
SIGNATURES = ("serving_default", "serving_tta")
METADATA_FILE = "assets.extra/brats_tf.json"


class BratsServingModule(tf.Module):
    """tf.Module holding the inference model(s) and the two serving functions.

    ``serving_default(image)`` / ``serving_tta(image)``: image float32
    [B, D, H, W, 4] raw intensities (``constants.MODALITIES`` order), any D, H,
    W; return {"probabilities": float32 [B, D, H, W, 3] (``constants.REGIONS``),
    "labels": uint8 [B, D, H, W], "protocol": string [B]}.
    """

    def __init__(self, inference_models, et_label: int = constants.LABEL_ET,
                 threshold: float = 0.5, multiple: int = constants.SPATIAL_DIVISOR,
                 crop_to_brain: bool = True, et_min_voxels: int = 0):
        super().__init__(name="brats_serving")
        self.models = list(inference_models)
        self._et_label = et_label
        self._threshold = threshold
        self._multiple = multiple
        self._crop_to_brain = crop_to_brain
        self._et_min_voxels = et_min_voxels
        spec = tf.TensorSpec([None, None, None, None, constants.NUM_MODALITIES], tf.float32,
                             name=INPUT_NAME)
        # One traced network function (the mean over the ensemble), called once
        # (plain) or inside the TTA while_loop: the SavedModel holds one copy.
        self._segment = tf.function(self._mean_probabilities, input_signature=[spec])
        self.serving_default = tf.function(lambda image: self._serve(image, False),
                                           input_signature=[spec])
        self.serving_tta = tf.function(lambda image: self._serve(image, True),
                                       input_signature=[spec])

    def _serve(self, image: tf.Tensor, tta: bool) -> dict:
        def predict(x):
            if tta:
                probs = inf.predict_tta_loop_tf(self._segment, x)
            else:
                probs = self._segment(x)
            return tf.ensure_shape(probs, [None, None, None, None, constants.NUM_REGIONS])

        # the same pipeline as inference.predict_volume
        probs = inf.volume_probabilities_tf(predict, image, crop_to_brain=self._crop_to_brain,
                                            multiple=self._multiple, pad_mode="symmetric")
        labels = inf.probabilities_to_labels_tf(probs, self._threshold, self._et_label)
        labels = inf.et_to_necrosis_tf(labels, self._et_min_voxels, self._et_label)
        protocol = tf.fill(tf.shape(image)[:1], json.dumps(self.protocol(tta), sort_keys=True))
        return {"probabilities": tf.identity(probs, name="probabilities"),
                "labels": tf.identity(labels, name="labels"),
                "protocol": tf.identity(protocol, name="protocol")}

    def _mean_probabilities(self, x: tf.Tensor) -> tf.Tensor:
        total = None
        for model in self.models:
            probs = tf.cast(inf.model_probabilities(model, x), tf.float32)
            total = probs if total is None else total + probs
        return total if len(self.models) == 1 else total / len(self.models)

    def protocol(self, tta: bool) -> dict:
        """``inference.protocol`` of a signature (``tta``: serving_tta)."""
        return inf.protocol(inf.region_name(self._crop_to_brain), tta, len(self.models),
                            self._threshold, self._et_min_voxels, self._multiple)


def _check_version(version) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer, got {version!r}")
    return version


def export_saved_model(training_model, export_dir, version: int = 1,
                       et_label: int = constants.LABEL_ET, threshold: float = 0.5,
                       overwrite: bool = False, crop_to_brain: bool = True,
                       precision: str | None = None, et_min_voxels: int = 0) -> pathlib.Path:
    """Writes ``<export_dir>/<version>/`` with the signatures of the module docstring.

    Args:
      training_model: a model from ``model.build_model`` (the VAE is dropped)
        or ``model.build_inference_model``, e.g. loaded from a .keras file; or
        a list of them, an ensemble (the mean of their probabilities).
      export_dir: the model's base path for TF Serving (created if missing).
      version: the version sub-directory (a positive integer).
      et_label: label written for ET in ``labels`` (4; 3 for BraTS 2023).
      threshold: region threshold of ``labels`` (p > threshold).
      overwrite: replace an existing non-empty version directory.
      crop_to_brain: run the network on the brain's bounding box only
        (``volume.brain_box``; 2.6x fewer voxels on BraTS); False runs the
        whole padded volume, as the paper does.
      precision: the Keras dtype policy the served network computes in
        (``model.PRECISIONS``); None: the model's own. E.g. ``mixed_float16``
        to serve a float32-trained model on a GPU, ``mixed_bfloat16`` on a
        CPU with AMX. The signatures' inputs and outputs stay float32.
      et_min_voxels: post-processing of ``labels`` (``volume.et_to_necrosis``;
        0: none, the paper).
    Returns: the version directory.
    """
    version = _check_version(version)
    et_label = volume.check_et_label(et_label)
    threshold = volume.check_threshold(threshold)
    et_min_voxels = volume.check_et_min_voxels(et_min_voxels)
    members = list(training_model) if isinstance(training_model, (list, tuple)) else [
        training_model]
    if not members:
        raise ValueError("no model to export")
    export_dir = pathlib.Path(export_dir)
    if export_dir.exists() and not export_dir.is_dir():
        raise NotADirectoryError(f"export_dir {export_dir} exists and is not a directory")
    target = export_dir / str(version)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{target} exists and is not empty (pass overwrite=True / --overwrite, or "
            f"another --version)"
        )
    models = []
    for model in members:
        model = inf.as_inference_model(model)
        if precision is not None:
            model = build_inference_model(model, precision=precision)
        channels = model.inputs[0].shape[-1]
        if channels != constants.NUM_MODALITIES:
            raise ValueError(
                f"model {model.name!r} takes {channels} input channels, the serving signature "
                f"{constants.NUM_MODALITIES} ({', '.join(constants.MODALITIES)})"
            )
        models.append(model)
    precisions = sorted({model_precision(m) for m in models})
    if len(precisions) > 1:
        raise ValueError(f"the ensemble's models compute in different precisions {precisions}: "
                         f"export them with one --precision")
    # 8 for the paper's 4 levels; an ensemble pads to what each of its networks needs
    multiple = math.lcm(*(config_from_model(m).spatial_divisor for m in models))
    module = BratsServingModule(models, et_label, threshold, multiple, bool(crop_to_brain),
                                et_min_voxels)
    export_dir.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(target, directory=True):  # of an export killed midway
        remove_path(stale)
    with atomic_path(target, directory=True) as tmp:  # replaces an existing version
        tf.saved_model.save(
            module, str(tmp),
            signatures={"serving_default": module.serving_default,
                        "serving_tta": module.serving_tta})
        meta = {
            "input": {"name": INPUT_NAME, "layout": "[B, D, H, W, C]",
                      "channels": list(constants.MODALITIES), "dtype": "float32",
                      "values": "raw intensities (normalised in the graph)"},
            "outputs": {"probabilities": list(constants.REGIONS), "labels": "uint8 label map",
                        "protocol": "JSON string per case: how the labels were made"},
            "et_label": et_label,
            "threshold": threshold,
            "padding": f"zeros, symmetric, to a multiple of {multiple}",
            "crop_to_brain": bool(crop_to_brain),
            "et_min_voxels": et_min_voxels,
            "precision": precisions[0],
            "signatures": list(SIGNATURES),
            "protocol": module.protocol(tta=False),
            "protocol_serving_tta": module.protocol(tta=True),
        }
        (tmp / "assets.extra").mkdir(exist_ok=True)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return target


# ---------------------------------------------------------------- command line
@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What ``python -m brats_tf.export`` does; built from its flags."""

    model: str  # a .keras file, or several (comma separated, shell patterns allowed)
    export_dir: str
    version: int = 1
    et_label: int = constants.LABEL_ET
    threshold: float = 0.5
    overwrite: bool = False
    crop_to_brain: bool = True
    precision: str | None = None
    et_min_voxels: int = 0

    def __post_init__(self):
        if not self.model:
            raise ValueError("--model is required (path to a .keras file)")
        volume.check_et_min_voxels(self.et_min_voxels)
        if not self.export_dir:
            raise ValueError("--export_dir is required")
        _check_version(self.version)
        volume.check_et_label(self.et_label)
        volume.check_threshold(self.threshold)
        check_precision(self.precision)


def model_files(spec: str) -> list[pathlib.Path]:
    """--model's .keras files: a comma list, shell patterns expanded (sorted)."""
    paths = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        matches = expand_pattern(item)
        if not matches:
            raise FileNotFoundError(f"model pattern {item} matches no file")
        paths.extend(pathlib.Path(m) for m in matches)
    if not paths:
        raise ValueError(f"--model={spec!r} names no file")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        if path.suffix != ".keras":
            raise ValueError(f"model file must be a .keras file, got {path}")
    return paths


def run(config: ExportConfig) -> pathlib.Path:
    """Loads the .keras model(s) and exports them; errors are raised with one-line messages."""
    import keras

    paths = model_files(config.model)
    target = pathlib.Path(config.export_dir) / str(config.version)
    if target.exists() and any(target.iterdir()) and not config.overwrite:
        raise FileExistsError(f"{target} exists and is not empty (use --overwrite or another "
                              f"--version)")
    models = []
    for path in paths:
        try:
            models.append(keras.saving.load_model(path, compile=False))
        except Exception as e:  # noqa: BLE001  Keras raises many types for a bad file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot load model {path}: {first}") from None
    return export_saved_model(models, config.export_dir, config.version, config.et_label,
                              config.threshold, config.overwrite, config.crop_to_brain,
                              config.precision, config.et_min_voxels)


def define_flags():
    """Defines this entry point's flags (only when run as a program: no global side effect)."""
    from absl import flags

    flags.DEFINE_string("model", None, "Path to the trained model (.keras); several, comma "
                        "separated or a quoted shell pattern: one SavedModel of their ensemble.")
    flags.DEFINE_string("export_dir", None,
                        "Model base path for TF Serving; the version directory goes inside.")
    flags.DEFINE_integer("version", 1, "Version sub-directory (TF Serving serves the highest).",
                         lower_bound=1)
    flags.DEFINE_enum("et_label", str(constants.LABEL_ET),
                      [str(constants.LABEL_ET), str(constants.LABEL_ET_2023)],
                      "Label value of enhancing tumour in the 'labels' output "
                      "(4: BraTS 2017-2021, 3: BraTS 2023+).")
    flags.DEFINE_float("threshold", 0.5, "Region threshold for 'labels' (p > threshold).",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_bool("overwrite", False, "Replace an existing, non-empty version directory.")
    flags.DEFINE_integer("et_min_voxels", 0, "Post-processing of 'labels', not the paper's (0: "
                         "off): a case whose predicted ET has fewer voxels gets necrosis (label "
                         "1) there (python -m brats_tf.postprocess chooses it).", lower_bound=0)
    flags.DEFINE_bool("crop_to_brain", True,
                      "Run the network on the brain's bounding box (2.6x fewer voxels on "
                      "BraTS); false: the whole padded volume, as the paper.")
    flags.DEFINE_enum("precision", "saved", ["saved", *PRECISIONS],
                      "Precision the served network computes in: 'saved' (the model's own) or "
                      "a Keras dtype policy: mixed_float16 for GPUs (~150x slower on a CPU), "
                      "mixed_bfloat16 for CPUs with AMX (~2x faster there).")
    return flags.FLAGS


def main(argv):
    from absl import flags as absl_flags
    from absl import logging

    if len(argv) > 1:
        sys.exit(f"brats_tf.export: error: unexpected arguments {argv[1:]}")
    flags = absl_flags.FLAGS
    try:
        config = ExportConfig(model=flags.model, export_dir=flags.export_dir,
                              version=flags.version, et_label=int(flags.et_label),
                              threshold=flags.threshold, overwrite=flags.overwrite,
                              crop_to_brain=flags.crop_to_brain,
                              precision=None if flags.precision == "saved" else flags.precision,
                              et_min_voxels=flags.et_min_voxels)
        logging.info("export config: %s", config)
        target = run(config)
    except (OSError, ValueError) as e:
        sys.exit(f"brats_tf.export: error: {e}")
    print(f"exported {target} (signatures: {', '.join(SIGNATURES)})")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
