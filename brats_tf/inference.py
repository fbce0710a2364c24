"""Full-volume inference: TTA, ensembles, label maps, NIfTI output, and the graph
(TF) versions of the volume helpers that run in the SavedModel.

Paper references: §1 (labels, nested regions WT/TC/ET,
back to a label map), §3.7 (per-channel normalisation over non-zero voxels),
§3.1 (spatial sizes divisible by 8: pad 240x240x155 to 240x240x160 and crop
back), §4 (TTA = average of the 8 mirror flips; ensemble = average of
models).

Layouts: a single case is [D, H, W, C] (D, H, W = the nibabel array axes,
C = 4 modalities in ``constants.MODALITIES`` order); a batch is [B, D, H, W, C].
Network outputs are sigmoid PROBABILITIES (not logits), [.., 3] in
``constants.REGIONS`` order (WT, TC, ET).

Conventions (the same in the TF graph here as in NumPy's ``data_pipeline.volume``,
which defines them, and against which the ``*_tf`` functions are tested):

* Padding: zeros, split symmetrically, the odd voxel at the END
  (before = total // 2, after = total - before; 155 -> 160 pads 2 before and 3
  after). Zero is the background value after ``normalize_nonzero_tf``.
  ``mode="end"`` pads only at the end.
* A voxel is in a region when its probability is STRICTLY greater than the
  threshold (0.5), as in ``metrics.RegionDice``.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import weakref
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from data_pipeline import constants, volume
from data_pipeline.io_utils import atomic_path
from brats_tf.model import build_inference_model

_WT = constants.REGIONS.index("WT")
_TC = constants.REGIONS.index("TC")
_ET = constants.REGIONS.index("ET")


# ----------------------------------------------------------------- padding
def pad_to_multiple_tf(x: tf.Tensor, multiple: int = constants.SPATIAL_DIVISOR,
                       mode: str = "symmetric"):
    """Graph version of ``volume.pad_to_multiple`` for [B, D, H, W, C] of any (dynamic) size.

    Returns (padded, pads) with pads an int32 [3, 2] tensor for ``crop_back_tf``.
    ``padded`` keeps ``x``'s static batch and channel sizes: Keras 3 runs a
    convolution whose input has no static channel count through XLA
    (``keras.src.backend.tensorflow.nn.conv``, its grouped-convolution check),
    which on this CPU made the first convolution of ``predict_volume`` take
    1.9 s instead of 0.2 s and compiled it anew for every new box size.
    """
    multiple = volume.check_multiple(multiple)
    volume.check_pad_mode(mode)
    spatial = tf.shape(x)[1:4]
    total = tf.math.floormod(-spatial, multiple)
    before = total // 2 if mode == "symmetric" else tf.zeros_like(total)
    pads = tf.stack([before, total - before], axis=1)  # [3, 2]
    zero = tf.zeros((1, 2), tf.int32)
    padded = tf.pad(x, tf.concat([zero, pads, zero], axis=0))
    return _static_batch_and_channels(padded, x), pads


def crop_back_tf(x: tf.Tensor, pads: tf.Tensor) -> tf.Tensor:
    """Graph version of ``volume.crop_back`` for [B, D, H, W, C] (or [B, D, H, W])."""
    shape = tf.shape(x)
    rank = tf.rank(x)
    begin = tf.concat([[0], pads[:, 0], tf.zeros([rank - 4], tf.int32)], axis=0)
    size = tf.concat([[-1], shape[1:4] - pads[:, 0] - pads[:, 1],
                      tf.fill([rank - 4], -1)], axis=0)
    return _static_batch_and_channels(tf.slice(x, begin, size), x)


def _static_batch_and_channels(out: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """``out`` (a spatial crop or pad of ``x``) with ``x``'s static batch and
    channel sizes, which tf.slice with -1 sizes and tf.pad lose."""
    if x.shape.rank is not None:
        out.set_shape(x.shape[:1].concatenate([None] * 3).concatenate(x.shape[4:]))
    return out


# ------------------------------------------------------------ brain box
def brain_box_tf(x: tf.Tensor, multiple: int = constants.SPATIAL_DIVISOR,
                 margin: int = 0) -> tuple[tf.Tensor, tf.Tensor]:
    """Graph version of ``volume.brain_box`` for [B, D, H, W, C]: one box for the batch
    (the union of the cases' boxes). Returns (start, size), int32 [3] each."""
    multiple = volume.check_multiple(multiple)
    mask = tf.reduce_any(tf.not_equal(x, 0), axis=[0, 4])  # [D, H, W]
    spatial = tf.shape(mask)
    starts, sizes = [], []
    for axis in range(3):
        n = spatial[axis]
        others = [a for a in range(3) if a != axis]
        hits = tf.cast(tf.where(tf.reduce_any(mask, axis=others))[:, 0], tf.int32)
        found = tf.size(hits) > 0
        lo = tf.where(found, tf.maximum(tf.reduce_min(tf.concat([hits, [n]], 0)) - margin, 0), 0)
        hi = tf.where(found, tf.minimum(tf.reduce_max(tf.concat([hits, [-1]], 0)) + 1 + margin,
                                        n), n)
        want = tf.minimum((hi - lo + multiple - 1) // multiple * multiple, n)
        starts.append(tf.clip_by_value(lo - (want - (hi - lo)) // 2, 0, n - want))
        sizes.append(want)
    return tf.stack(starts), tf.stack(sizes)


def crop_box_tf(x: tf.Tensor, start: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """x[:, start:start + size, :] for [B, D, H, W, C]."""
    out = tf.slice(x, tf.concat([[0], start, [0]], 0), tf.concat([[-1], size, [-1]], 0))
    return _static_batch_and_channels(out, x)


def paste_box_tf(x: tf.Tensor, start: tf.Tensor, full_spatial: tf.Tensor) -> tf.Tensor:
    """Inverse of ``crop_box_tf``: zero-pads [B, d, h, w, C] back to [B, D, H, W, C]."""
    after = full_spatial - start - tf.shape(x)[1:4]
    pads = tf.concat([tf.zeros((1, 2), tf.int32), tf.stack([start, after], axis=1),
                      tf.zeros((1, 2), tf.int32)], axis=0)
    return _static_batch_and_channels(tf.pad(x, pads), x)


# ----------------------------------------------------------- normalisation
def normalize_nonzero_tf(image: tf.Tensor) -> tf.Tensor:
    """Graph version of ``volume.normalize_nonzero`` for [B, D, H, W, C]; float32 out.

    The statistics are accumulated in float64: a float32 sum over the ~3.5 M
    brain voxels of a BraTS channel drifts (measured: normalised values off by
    7e-3 at 240x240x155, 4e-5 at 64^3), float64 keeps them within 1e-6 of
    NumPy. Two passes (mean, then mean squared deviation); ``divide_no_nan``
    and a std of 1 where it is 0, so an all-zero or constant channel gives no NaN.
    """
    x = tf.cast(image, tf.float64)
    axes = (1, 2, 3)
    mask = tf.not_equal(x, 0.0)
    maskf = tf.cast(mask, tf.float64)
    count = tf.reduce_sum(maskf, axis=axes, keepdims=True)
    mean = tf.math.divide_no_nan(tf.reduce_sum(x, axis=axes, keepdims=True), count)
    centred = (x - mean) * maskf
    var = tf.math.divide_no_nan(tf.reduce_sum(tf.square(centred), axis=axes, keepdims=True),
                                count)
    std = tf.sqrt(var)
    std = tf.where(std > 0.0, std, tf.ones_like(std))
    return tf.cast(centred / std, tf.float32)


# ----------------------------------------------------------------- predict
FLIP_AXES = tuple(
    combo for r in range(4) for combo in itertools.combinations((1, 2, 3), r)
)  # the 8 mirror flips of [B, D, H, W, C]: (), (1,), ..., (1, 2, 3)


def model_probabilities(model, x: tf.Tensor) -> tf.Tensor:
    """Calls a model on [B, D, H, W, C]; returns its [B, D, H, W, 3] probabilities.

    A Keras model is called with ``training=False`` (no dropout); a dict output
    gives its ``"seg"`` entry. Cast to float32 (mixed precision).
    """
    out = model(x, training=False) if isinstance(model, keras.Model) else model(x)
    if isinstance(out, dict):
        if "seg" not in out:
            raise ValueError(f"model output dict has no 'seg' key: {sorted(out)}")
        out = out["seg"]
    return tf.cast(out, tf.float32)


def predict_tta_tf(model: Callable, x: tf.Tensor, tta: bool = False) -> tf.Tensor:
    """Probabilities of ``model`` on [B, D, H, W, C] (sizes already divisible by 8).

    With ``tta`` the mean of the sigmoid outputs over the 8 axis-flip
    combinations (flip the input, predict, flip the output back) (§4).
    """
    if not tta:
        return model_probabilities(model, x)
    total = None
    for axes in FLIP_AXES:
        xf = tf.reverse(x, axis=list(axes)) if axes else x
        y = model_probabilities(model, xf)
        y = tf.reverse(y, axis=list(axes)) if axes else y
        total = y if total is None else total + y
    return total / float(len(FLIP_AXES))


def _flip_if(x: tf.Tensor, flip: tf.Tensor, axis: int) -> tf.Tensor:
    return tf.cond(flip, lambda: tf.reverse(x, axis=[axis]), lambda: x)


def predict_tta_loop_tf(model: Callable, x: tf.Tensor) -> tf.Tensor:
    """``predict_tta_tf(model, x, tta=True)`` as a ``tf.while_loop`` over the 8 flips.

    For graphs (the SavedModel): the network appears once in the graph, the
    flips run one after another, so peak memory is that of one prediction
    (independent unrolled calls may run concurrently) and the graph is small.
    Flip i mirrors axis 1 if bit 0 of i is set, axis 2 for bit 1, axis 3 for bit 2.
    """
    out_shape = tf.concat([tf.shape(x)[:4], [constants.NUM_REGIONS]], axis=0)

    def flip(t, i):
        for bit, axis in enumerate((1, 2, 3)):
            t = _flip_if(t, tf.equal(tf.bitwise.bitwise_and(i, 1 << bit), 1 << bit), axis)
        return t

    def body(i, total):
        y = model_probabilities(model, flip(x, i))
        return i + 1, total + flip(y, i)

    _, total = tf.while_loop(
        lambda i, _: i < len(FLIP_AXES), body,
        (tf.constant(0), tf.zeros(out_shape, tf.float32)),
        shape_invariants=(tf.TensorShape([]), tf.TensorShape([None] * 4 + [None])),
        parallel_iterations=1,  # else up to 10 flips' activations are alive at once
    )
    return total / float(len(FLIP_AXES))


def as_inference_model(model):
    """A Keras training model (fixed crop, VAE) becomes its any-size inference model.

    Models without a fixed input shape (``build_inference_model``'s) and plain
    callables are returned unchanged.
    """
    if isinstance(model, keras.Model):
        names = {layer.name for layer in model.layers}
        fixed = any(s is not None for s in model.inputs[0].shape[1:4])
        if "InitConv" in names and (fixed or "Vend" in names):
            return build_inference_model(model)
    return model


_GRAPH_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def volume_probabilities_tf(predict: Callable, x: tf.Tensor, normalize: bool = True,
                            crop_to_brain: bool = True,
                            multiple: int = constants.SPATIAL_DIVISOR,
                            pad_mode: str = "symmetric", margin: int = 0) -> tf.Tensor:
    """``predict_volume``'s whole pipeline in TF ops, for [B, D, H, W, C] raw cases.

    Normalise (``normalize_nonzero_tf``), crop to the brain's box
    (``brain_box_tf``; one box for the batch), pad to ``multiple``, ``predict``
    (a callable [B, d, h, w, C] -> [B, d, h, w, 3] probabilities), crop the
    padding back, paste the box into a zero volume. Returns float32
    [B, D, H, W, 3]. The SavedModel's signatures and ``predict_volume`` share it.
    """
    x, placement = prepare_volume_tf(x, normalize, crop_to_brain, multiple, pad_mode, margin)
    return place_back_tf(predict(x), placement)


def prepare_volume_tf(x: tf.Tensor, normalize: bool = True, crop_to_brain: bool = True,
                      multiple: int = constants.SPATIAL_DIVISOR, pad_mode: str = "symmetric",
                      margin: int = 0):
    """``volume_probabilities_tf`` before the network: raw [B, D, H, W, C] ->
    (the network's input, its placement for ``place_back_tf``)."""
    full = tf.shape(x)[1:4]
    x = normalize_nonzero_tf(x) if normalize else tf.cast(x, tf.float32)
    start = None
    if crop_to_brain:
        start, size = brain_box_tf(x, multiple, margin)
        x = crop_box_tf(x, start, size)
    x, pads = pad_to_multiple_tf(x, multiple, pad_mode)
    return x, (pads, start, full)


def place_back_tf(probs: tf.Tensor, placement) -> tf.Tensor:
    """``volume_probabilities_tf`` after the network: crop the padding back and
    paste the box into a zero volume (``prepare_volume_tf``'s placement); float32."""
    pads, start, full = placement
    probs = crop_back_tf(tf.cast(probs, tf.float32), pads)
    return probs if start is None else paste_box_tf(probs, start, full)


def _volume_fn(model, tta: bool, channels: int, **options) -> Callable:
    """``volume_probabilities_tf`` for ``model`` (TTA-averaged with ``tta``): a
    tf.function for a Keras model, cached per (model, tta, options); other
    callables run it eagerly as they are.

    Run as a graph, each activation is freed as soon as its last consumer has
    run; a Keras functional model called eagerly keeps every layer's output
    until the call returns (at 240 x 240 x 160 x 32 one is 1.2 GB). The
    normalisation, box, padding and paste run in the graph too (on the GPU
    when there is one): in NumPy they took 1.6 s per BraTS case, 9x the
    network's time on an H200. TTA runs the flips in a ``tf.while_loop``
    (``predict_tta_loop_tf``). The input signature leaves the sizes unknown:
    cases of different sizes share one trace, and it avoids a TensorFlow 2.21
    bug: with static sizes, oneDNN's graph rewrite folds the constant
    ``tf.pad`` into the first 3x3x3 'same' convolution and drops that
    convolution's own padding (30 x 36 x 21 padded to 32 x 40 x 24 came out of
    the convolution as 30 x 38 x 22; ``tests/test_inference.py``).
    """
    if not isinstance(model, keras.Model):
        return lambda x: volume_probabilities_tf(
            lambda t: predict_tta_tf(model, t, tta=tta), x, **options)
    fns = _GRAPH_FNS.setdefault(model, {})
    key = (tta, channels) + tuple(sorted(options.items()))
    if key not in fns:
        ref = weakref.ref(model)  # the cache must not keep the model alive
        if tta:  # the 8 flips one after another: the memory of one prediction
            predict = lambda t: predict_tta_loop_tf(ref(), t)  # noqa: E731
        else:
            predict = lambda t: model_probabilities(ref(), t)  # noqa: E731
        spec = tf.TensorSpec([None, None, None, None, channels], tf.float32)
        fns[key] = tf.function(lambda x: volume_probabilities_tf(predict, x, **options),
                               input_signature=[spec])
    return fns[key]


def predict_volume(models, image: np.ndarray, tta: bool = False, normalize: bool = True,
                   multiple: int = constants.SPATIAL_DIVISOR,
                   pad_mode: str = "symmetric", crop_to_brain: bool = True,
                   margin: int = 0) -> np.ndarray:
    """Full-volume segmentation probabilities of one case (§3.7, "Network", §4).

    Normalises (``volume.normalize_nonzero``'s statistics, in TF float64; pass
    ``normalize=False`` for an image that is already normalised), crops to
    the brain's box (``volume.brain_box``; ``crop_to_brain=False`` runs the whole
    volume as the paper does), zero-pads to a multiple of 8, predicts, crops
    back; voxels outside the box get probability 0. ``tta``: mean over the 8
    mirror flips. ``models`` a list: ensemble, the mean of the models'
    (TTA-averaged) probabilities. All of it runs in TF
    (``volume_probabilities_tf``), as one graph per Keras model.

    Args:
      models: a Keras model from ``build_model``/``build_inference_model`` (a
        training model is converted with ``as_inference_model``), any callable
        [B, D, H, W, C] -> [B, D, H, W, 3] or {"seg": ...}, or a list of them.
      image: [D, H, W, C] raw intensities, C in ``constants.MODALITIES`` order.
      margin: voxels of background kept around the brain's bounding box.
    Returns: [D, H, W, 3] float32 probabilities (channels ``constants.REGIONS``).
    """
    if not isinstance(models, (list, tuple)):
        models = [models]
    if not models:
        raise ValueError("models is empty: give at least one model")
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(f"image must be one case [D, H, W, C], got shape {image.shape}")
    multiple = volume.check_multiple(multiple)
    volume.check_pad_mode(pad_mode, "pad_mode")
    margin = volume.check_margin(margin)
    if normalize:
        volume.check_raw_image(image)  # the statistics are float64 in the graph
    batch = tf.convert_to_tensor(image[None].astype(np.float32, copy=False))
    options = dict(normalize=bool(normalize), crop_to_brain=bool(crop_to_brain),
                   multiple=multiple, pad_mode=pad_mode, margin=margin)
    total = None
    for model in models:
        model = as_inference_model(model)  # held here: the cache only refers to it weakly
        y = _volume_fn(model, tta, image.shape[-1], **options)(batch).numpy()[0]
        total = y if total is None else total + y
    return np.ascontiguousarray(total / len(models), dtype=np.float32)


# ------------------------------------------------------------------ labels
def probabilities_to_labels(probs: np.ndarray, threshold: float = 0.5,
                            et_label: int = constants.LABEL_ET) -> np.ndarray:
    """Region probabilities [..., 3] (WT, TC, ET) -> BraTS label map [...] uint8 (§1).

    Each channel is thresholded (p > threshold). Nesting is enforced by the
    paper's order: ET -> ``et_label`` (4, or 3 for BraTS 2023); else TC -> 1
    (NCR/NET); else WT -> 2 (ED); else 0. So an ET voxel is labelled ET even
    where the TC or WT channel is below threshold (ET implies TC implies WT).
    """
    probs = np.asarray(probs)
    if probs.ndim < 1 or probs.shape[-1] != constants.NUM_REGIONS:
        raise ValueError(
            f"probs must be [..., {constants.NUM_REGIONS}] ({', '.join(constants.REGIONS)}), "
            f"got shape {probs.shape}"
        )
    threshold, et_label = volume.check_threshold(threshold), volume.check_et_label(et_label)
    on = probs > threshold
    labels = np.full(probs.shape[:-1], constants.LABEL_BACKGROUND, np.uint8)
    labels[on[..., _WT]] = constants.LABEL_ED
    labels[on[..., _TC]] = constants.LABEL_NCR_NET
    labels[on[..., _ET]] = et_label
    return labels


def probabilities_to_labels_tf(probs: tf.Tensor, threshold: float = 0.5,
                               et_label: int = constants.LABEL_ET) -> tf.Tensor:
    """Graph version of ``probabilities_to_labels``: [..., 3] -> [...] uint8."""
    threshold, et_label = volume.check_threshold(threshold), volume.check_et_label(et_label)
    on = tf.cast(probs, tf.float32) > threshold

    def fill(value):
        return tf.fill(tf.shape(on)[:-1], tf.constant(value, tf.uint8))

    labels = tf.where(on[..., _WT], fill(constants.LABEL_ED), fill(constants.LABEL_BACKGROUND))
    labels = tf.where(on[..., _TC], fill(constants.LABEL_NCR_NET), labels)
    return tf.where(on[..., _ET], fill(et_label), labels)


def et_to_necrosis_tf(labels: tf.Tensor, et_min_voxels: int,
                      et_label: int = constants.LABEL_ET) -> tf.Tensor:
    """Graph version of ``volume.et_to_necrosis`` for a batch [B, D, H, W] of
    label maps: each case's ET count against ``et_min_voxels`` (0: unchanged)."""
    et_min_voxels = volume.check_et_min_voxels(et_min_voxels)
    et_label = volume.check_et_label(et_label)
    if et_min_voxels == 0:
        return labels
    et = tf.equal(labels, tf.constant(et_label, labels.dtype))
    count = tf.reduce_sum(tf.cast(et, tf.int64), axis=[1, 2, 3])
    small = tf.reshape(count < et_min_voxels, [-1, 1, 1, 1])
    necrosis = tf.fill(tf.shape(labels), tf.constant(constants.LABEL_NCR_NET, labels.dtype))
    return tf.where(et & small, necrosis, labels)


# --------------------------------------------------------------- protocol
def region_name(crop_to_brain: bool) -> str:
    """The protocol's name of what the network ran on: 'brain_box' or 'whole_volume'."""
    return "brain_box" if crop_to_brain else "whole_volume"


def protocol(region: str, tta: bool, ensemble_size: int = 1, threshold: float = 0.5,
             et_min_voxels: int = 0, multiple: int = constants.SPATIAL_DIVISOR) -> dict:
    """How a prediction was made, as evaluation.json, summary.json, the
    SavedModel's metadata and the client's output record it. ``region``:
    ``region_name(crop_to_brain)``, or what an evaluation of several models ran on.

    The paper's protocol (§4): the whole volume zero-padded to a multiple of 8
    (240 x 240 x 155 -> 240 x 240 x 160), one model or an ensemble of 10 with
    or without the 8 mirror flips, p > 0.5, no post-processing.
    """
    et_min_voxels = volume.check_et_min_voxels(et_min_voxels)
    return {
        "region": region,
        "padding": f"zeros to a multiple of {int(multiple)}, split evenly (odd voxel after)",
        "tta": "8 mirror flips" if tta else "none",
        "ensemble_size": int(ensemble_size),
        "threshold": float(threshold),
        "post_processing": volume.describe_et_to_necrosis(et_min_voxels),
        "et_min_voxels": et_min_voxels,
    }


def describe_protocol(p: dict) -> str:
    """``protocol``'s dict as one line, e.g. 'whole volume, TTA, 1 model, p > 0.5'."""
    parts = ["brain box" if p["region"] == "brain_box" else
             "whole volume" if p["region"] == "whole_volume" else str(p["region"]),
             "TTA (8 flips)" if p["tta"] != "none" else "no TTA",
             f"{p['ensemble_size']} model{'s' if p['ensemble_size'] != 1 else ''}",
             f"p > {p['threshold']:g}"]
    if p["et_min_voxels"]:
        parts.append(f"ET < {p['et_min_voxels']} voxels -> NCR")
    if "et_label" in p:  # an evaluation's: the label its predictions give ET
        parts.append(f"ET as {p['et_label']}")
    return ", ".join(parts)


# ----------------------------------------------------------- NIfTI output
def _reference(reference):
    """(shape or None, affine, header, path or None) from a path, a nibabel image or
    (affine, header)."""
    import nibabel as nib

    if isinstance(reference, (str, os.PathLike)):
        path = pathlib.Path(reference)
        if not path.is_file():
            raise FileNotFoundError(f"reference NIfTI not found: {path}")
        try:
            img = nib.load(str(path))
        except Exception as e:  # nibabel raises several types for bad files
            raise ValueError(f"cannot read reference NIfTI {path}: {e}") from None
        return tuple(img.shape[:3]), img.affine, img.header, path
    if hasattr(reference, "affine") and hasattr(reference, "header"):
        return tuple(reference.shape[:3]), reference.affine, reference.header, None
    if isinstance(reference, (tuple, list)) and len(reference) == 2:
        affine, header = reference
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
        shape = tuple(header.get_data_shape()[:3]) if header is not None else None
        return shape, affine, header, None
    raise ValueError(
        f"reference must be a NIfTI path, a nibabel image or (affine, header), got "
        f"{type(reference).__name__}"
    )


def write_prediction_nifti(label_map: np.ndarray, reference, output_path,
                           case_id: str | None = None, bbox_start: Sequence[int] | None = None,
                           et_label: int = constants.LABEL_ET,
                           overwrite: bool = False) -> pathlib.Path:
    """Writes a BraTS label map as uint8 NIfTI with the reference's shape, affine and header.

    Args:
      label_map: [D, H, W] integer labels (0, 1, 2, ``et_label``), or the
        labels of a crop when ``bbox_start`` is given (pasted with ``volume.paste_crop``).
      reference: the case's NIfTI path (e.g. its ``_flair.nii.gz``), a nibabel
        image, or (affine, header).
      output_path: the file to write (``.nii.gz``), or an existing directory,
        in which ``<case_id>.nii.gz`` is written.
      case_id: names the file in a directory, and the case in error messages.
      overwrite: replace an existing output file (never the reference).
    The file is written under a temporary name in the same directory and then
    renamed (``io_utils.atomic_path``), so a reader never sees half a file.
    Returns the written path.
    """
    import nibabel as nib

    shape, affine, header, ref_path = _reference(reference)
    out = pathlib.Path(output_path)
    name = case_id or (ref_path.name.split(".")[0] if ref_path else "prediction")
    if out.is_dir():
        if not case_id:
            raise ValueError(f"output_path {out} is a directory: give case_id to name the file")
        out = out / f"{case_id}.nii.gz"
    if not (out.name.endswith(".nii.gz") or out.name.endswith(".nii")):
        raise ValueError(f"case {name}: output file must end in .nii.gz or .nii, got {out}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"case {name}: output directory does not exist: {out.parent}")
    if ref_path is not None and out.resolve() == ref_path.resolve():
        raise ValueError(f"case {name}: refusing to overwrite the input file {ref_path}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"case {name}: {out} exists (pass overwrite=True to replace it)")

    labels = np.asarray(label_map)
    if bbox_start is not None:
        if shape is None:
            raise ValueError(f"case {name}: bbox_start needs a reference with a known shape")
        labels = volume.paste_crop(labels, shape, bbox_start)
    if labels.ndim != 3:
        raise ValueError(f"case {name}: label map must be [D, H, W], got shape {labels.shape}")
    if shape is not None and labels.shape != shape:
        raise ValueError(
            f"case {name}: label map shape {labels.shape} != reference shape {shape}"
        )
    volume.labels_to_regions(labels, et_label)  # checks the values
    labels = labels.astype(np.uint8)

    hdr = header.copy() if header is not None else nib.Nifti1Header()
    if not isinstance(hdr, nib.Nifti1Header):
        hdr = nib.Nifti1Header.from_header(hdr)
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(1.0, 0.0)  # labels are stored as is, never rescaled
    img = nib.Nifti1Image(labels, affine, header=hdr)
    # ".nii.gz" ending so nibabel compresses; a hidden name a directory watcher skips.
    with atomic_path(out, suffix=".nii.gz" if out.name.endswith(".nii.gz") else ".nii") as tmp:
        nib.save(img, str(tmp))
    return out

