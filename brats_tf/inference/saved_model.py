"""The segmentation network (no VAE) as a SavedModel for TF Serving (§3.1, §3.7, §4).

``export_saved_model`` writes ``<export_dir>/<version>/`` (saved_model.pb,
variables/, ``METADATA_FILE``), the model_name/version layout that
``tensorflow_model_server --model_base_path=<export_dir>`` watches, under a
hidden temporary name renamed when complete. Its signatures
(``BratsServingModule``) take raw intensities and run the whole of
``predict_volume``'s pipeline in the graph, then the label map, the
optional ET post-processing and the protocol. Several models (an ensemble,
§4) export as one SavedModel whose network output is the mean of theirs.
The command is ``python -m brats_tf.export``.
"""

from __future__ import annotations

import json
import pathlib

import tensorflow as tf

import brats_tf.inference.protocol_record as protocol_record
from brats_tf.inference.labels import et_to_necrosis_tf, probabilities_to_labels_tf
from brats_tf.inference.predict import (
    as_inference_model,
    model_probabilities,
    padding_multiple,
    predict_tta_loop_tf,
    volume_probabilities_tf,
)
from brats_tf.model import build_inference_model, model_precision
from brats_tf.saved_model_names import INPUT_NAME, METADATA_FILE, SIGNATURES
from data_pipeline import constants, volume
from data_pipeline.checks import positive_int
from data_pipeline.io_utils import atomic_path, remove_path, stale_temporaries


class BratsServingModule(tf.Module):
    """tf.Module holding the inference model(s) and the two serving functions.

    ``serving_default(image)`` / ``serving_tta(image)``: image float32
    [B, D, H, W, 4] raw intensities (``constants.MODALITIES`` order), any D, H,
    W; return {"probabilities": float32 [B, D, H, W, 3] (``constants.REGIONS``),
    "labels": uint8 [B, D, H, W], "protocol": string [B]}. In the graph:
    per-channel normalisation over non-zero voxels, the crop to the brain's
    box (the union over the batch; off with ``crop_to_brain=False``), zero
    padding to a multiple of ``multiple`` (symmetric, odd voxel at the end),
    the encoder + segmentation decoder (``serving_tta``: the mean over the 8
    mirror flips), crop back, paste into the full volume (probability 0
    outside the box); labels at p > ``threshold`` with the paper's nesting,
    then ``et_min_voxels``' post-processing (0: none); the protocol as JSON.
    """

    def __init__(
        self,
        inference_models,
        et_label: int = constants.LABEL_ET,
        threshold: float = 0.5,
        multiple: int = constants.SPATIAL_DIVISOR,
        crop_to_brain: bool = True,
        et_min_voxels: int = 0,
    ):
        super().__init__(name="brats_serving")
        self.models = list(inference_models)
        self._et_label = et_label
        self._threshold = threshold
        self._multiple = multiple
        self._crop_to_brain = crop_to_brain
        self._et_min_voxels = et_min_voxels
        spec = tf.TensorSpec(
            [None, None, None, None, constants.NUM_MODALITIES], tf.float32, name=INPUT_NAME
        )
        # One traced network function (the mean over the ensemble), called once
        # (plain) or inside the TTA while_loop: the SavedModel holds one copy.
        self._segment = tf.function(self._mean_probabilities, input_signature=[spec])
        self.serving_default = tf.function(
            lambda image: self._serve(image, False), input_signature=[spec]
        )
        self.serving_tta = tf.function(
            lambda image: self._serve(image, True), input_signature=[spec]
        )

    def _serve(self, image: tf.Tensor, tta: bool) -> dict:
        def predict(x):
            if tta:
                probs = predict_tta_loop_tf(self._segment, x)
            else:
                probs = self._segment(x)
            return tf.ensure_shape(probs, [None, None, None, None, constants.NUM_REGIONS])

        # the same pipeline as inference.predict_volume
        probs = volume_probabilities_tf(
            predict,
            image,
            crop_to_brain=self._crop_to_brain,
            multiple=self._multiple,
            pad_mode="symmetric",
        )
        labels = probabilities_to_labels_tf(probs, self._threshold, self._et_label)
        labels = et_to_necrosis_tf(labels, self._et_min_voxels, self._et_label)
        protocol = tf.fill(tf.shape(image)[:1], json.dumps(self.protocol(tta), sort_keys=True))
        return {
            "probabilities": tf.identity(probs, name="probabilities"),
            "labels": tf.identity(labels, name="labels"),
            "protocol": tf.identity(protocol, name="protocol"),
        }

    def _mean_probabilities(self, x: tf.Tensor) -> tf.Tensor:
        total = None
        for model in self.models:
            probs = tf.cast(model_probabilities(model, x), tf.float32)
            total = probs if total is None else total + probs
        return total if len(self.models) == 1 else total / len(self.models)

    def protocol(self, tta: bool) -> dict:
        """``inference.protocol`` of a signature (``tta``: serving_tta)."""
        return protocol_record.protocol(
            protocol_record.region_name(self._crop_to_brain),
            tta,
            len(self.models),
            self._threshold,
            self._et_min_voxels,
            self._multiple,
        )


def _members(training_model) -> list:
    """The models to export: ``training_model`` itself, or the members of a list."""
    members = (
        list(training_model) if isinstance(training_model, (list, tuple)) else [training_model]
    )
    if not members:
        raise ValueError("no model to export")
    return members


def _version_dir(export_dir, version: int, overwrite: bool) -> pathlib.Path:
    """``<export_dir>/<version>``, refused when it holds files and not ``overwrite``."""
    export_dir = pathlib.Path(export_dir)
    if export_dir.exists() and not export_dir.is_dir():
        raise NotADirectoryError(f"export_dir {export_dir} exists and is not a directory")
    target = export_dir / str(version)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{target} exists and is not empty (pass overwrite=True / --overwrite, or "
            f"another --version)"
        )
    return target


def _serving_models(members: list, precision: str | None) -> tuple[list, str]:
    """Each member's inference model (in ``precision`` when given), checked to
    take the 4 modalities; with the one precision they all compute in."""
    models = []
    for model in members:
        model = as_inference_model(model)
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
        raise ValueError(
            f"the ensemble's models compute in different precisions {precisions}: "
            f"export them with one --precision"
        )
    return models, precisions[0]


def _metadata(
    module: BratsServingModule,
    et_label: int,
    threshold: float,
    multiple: int,
    crop_to_brain: bool,
    et_min_voxels: int,
    precision: str,
) -> dict:
    """``METADATA_FILE``'s content: the signatures' input, outputs and protocol."""
    return {
        "input": {
            "name": INPUT_NAME,
            "layout": "[B, D, H, W, C]",
            "channels": list(constants.MODALITIES),
            "dtype": "float32",
            "values": "raw intensities (normalised in the graph)",
        },
        "outputs": {
            "probabilities": list(constants.REGIONS),
            "labels": "uint8 label map",
            "protocol": "JSON string per case: how the labels were made",
        },
        "et_label": et_label,
        "threshold": threshold,
        "padding": f"zeros, symmetric, to a multiple of {multiple}",
        "crop_to_brain": crop_to_brain,
        "et_min_voxels": et_min_voxels,
        "precision": precision,
        "signatures": list(SIGNATURES),
        "protocol": module.protocol(tta=False),
        "protocol_serving_tta": module.protocol(tta=True),
    }


def _write_version(module: BratsServingModule, target: pathlib.Path, meta: dict) -> None:
    """Saves ``module`` and its metadata as ``target`` under a temporary name,
    renamed when complete (replacing an existing version); first removes the
    temporaries of that version left by an export killed midway."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(target, directory=True):
        remove_path(stale)
    with atomic_path(target, directory=True) as tmp:
        tf.saved_model.save(
            module,
            str(tmp),
            signatures={
                "serving_default": module.serving_default,
                "serving_tta": module.serving_tta,
            },
        )
        (tmp / "assets.extra").mkdir(exist_ok=True)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def export_saved_model(
    training_model,
    export_dir,
    version: int = 1,
    et_label: int = constants.LABEL_ET,
    threshold: float = 0.5,
    overwrite: bool = False,
    crop_to_brain: bool = True,
    precision: str | None = None,
    et_min_voxels: int = 0,
) -> pathlib.Path:
    """Writes ``<export_dir>/<version>/`` with ``BratsServingModule``'s signatures.

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
        (``config.PRECISIONS``); None: the model's own. E.g. ``mixed_float16``
        to serve a float32-trained model on a GPU, ``mixed_bfloat16`` on a
        CPU with AMX. The signatures' inputs and outputs stay float32.
      et_min_voxels: post-processing of ``labels`` (``volume.et_to_necrosis``;
        0: none, the paper).
    Returns: the version directory.
    """
    version = positive_int("version", version)
    et_label = volume.check_et_label(et_label)
    threshold = volume.check_threshold(threshold)
    et_min_voxels = volume.check_et_min_voxels(et_min_voxels)
    members = _members(training_model)
    target = _version_dir(export_dir, version, overwrite)
    models, served_precision = _serving_models(members, precision)
    multiple = padding_multiple(models)  # as evaluate.py pads: the same predictions
    module = BratsServingModule(
        models, et_label, threshold, multiple, bool(crop_to_brain), et_min_voxels
    )
    meta = _metadata(
        module, et_label, threshold, multiple, bool(crop_to_brain), et_min_voxels, served_precision
    )
    _write_version(module, target, meta)
    return target
