"""Full-volume inference: normalisation, padding, TTA, ensembles, label maps, NIfTI output.

Paper references (PAPER.md): §1 "Task and data" (labels, nested regions WT/TC/ET,
back to a label map), §3.7 (per-channel normalisation over non-zero voxels),
"Network" (spatial sizes divisible by 8: pad 240x240x155 to 240x240x160 and crop
back), §4 "Results" (TTA = average of the 8 mirror flips; ensemble = average of
models).

Layouts: a single case is [D, H, W, C] (D, H, W = the nibabel array axes,
C = 4 modalities in ``constants.MODALITIES`` order); a batch is [B, D, H, W, C].
Network outputs are sigmoid PROBABILITIES (not logits), [.., 3] in
``constants.REGIONS`` order (WT, TC, ET).

Conventions (the same in NumPy and in the TF graph of the SavedModel):

* Padding: zeros, split symmetrically, the odd voxel at the END
  (before = total // 2, after = total - before; 155 -> 160 pads 2 before and 3
  after). Zero is the background value after ``normalize_nonzero``. ``mode="end"``
  pads only at the end.
* A voxel is in a region when its probability is STRICTLY greater than the
  threshold (0.5), as in ``metrics.RegionDice``.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import pathlib
import tempfile
import weakref
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from brats_tf import constants

PAD_MODES = ("symmetric", "end")
_WT = constants.REGIONS.index("WT")
_TC = constants.REGIONS.index("TC")
_ET = constants.REGIONS.index("ET")
ET_LABELS = (constants.LABEL_ET, constants.LABEL_ET_2023)


# ------------------------------------------------------------- host tensor
# TensorFlow's CPU build requires its tensors' buffers to be aligned to this
# (EIGEN_MAX_ALIGN_BYTES): a kernel given an unaligned buffer aborts the process.
TF_ALIGN_BYTES = 64
_ZERO_COPY_MIN_BYTES = 1 << 20
# Copies of at least this size run in threads (NumPy releases the GIL while it
# copies): one thread copies a 4 x 240 x 240 x 155 float32 case at ~4 GB/s.
_PARALLEL_COPY_MIN_BYTES = 8 << 20
_PARALLEL_COPY_MAX_THREADS = 8


def _aligned_empty(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + TF_ALIGN_BYTES, np.uint8)
    offset = (-raw.ctypes.data) % TF_ALIGN_BYTES
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _copy_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, _PARALLEL_COPY_MAX_THREADS))


def _parallel_copyto(dst: np.ndarray, src: np.ndarray, threads: int) -> None:
    """``np.copyto(dst, src, casting="unsafe")`` in up to ``threads`` slabs
    along the first axis long enough to split (any layout of ``src``)."""
    axis = next((i for i, n in enumerate(dst.shape) if n >= threads), int(np.argmax(dst.shape)))
    parts = min(threads, dst.shape[axis])
    if parts <= 1:
        np.copyto(dst, src, casting="unsafe")
        return
    edges = np.linspace(0, dst.shape[axis], parts + 1).astype(int)
    slabs = [(slice(None),) * axis + (slice(lo, hi),) for lo, hi in zip(edges[:-1], edges[1:])]
    with concurrent.futures.ThreadPoolExecutor(parts) as pool:
        # list(): re-raises a slab's error here.
        list(pool.map(lambda s: np.copyto(dst[s], src[s], casting="unsafe"), slabs))


def host_tensor(array, dtype=np.float32) -> tf.Tensor:
    """``array`` as a host (CPU) ``tf.Tensor`` of ``dtype``, for large volumes.

    ``tf.constant`` of a 4 x 240 x 240 x 155 float32 case copies it at ~1-2.5
    GB/s (60 ms on a Xeon, 170 ms on an AMD EPYC here: half of a whole GPU
    inference call). This hands the buffer to TensorFlow through DLPack
    instead: no copy when ``array`` already is C-contiguous, writeable,
    ``dtype`` and 64-byte aligned; otherwise one NumPy copy (cast included)
    into a 64-byte aligned buffer (~5x faster than TensorFlow's; from 8 MiB
    in up to 8 threads: a BraTS case 31 -> 25 ms on 2 cores here). Without a
    copy the tensor SHARES ``array``'s memory while it lives: do not write to
    ``array`` before the tensor is used (the functions of this package use it
    at once and drop it). Arrays under 1 MiB take ``tf.constant``.
    """
    a = np.asarray(array)
    dtype = np.dtype(dtype)
    if a.nbytes < _ZERO_COPY_MIN_BYTES:
        with tf.device("CPU:0"):
            return tf.constant(a.astype(dtype, copy=False))
    if (a.dtype != dtype or not a.flags.c_contiguous or not a.flags.writeable
            or a.ctypes.data % TF_ALIGN_BYTES):
        aligned = _aligned_empty(a.shape, dtype)
        threads = _copy_threads() if a.nbytes >= _PARALLEL_COPY_MIN_BYTES else 1
        _parallel_copyto(aligned, a, threads)
        a = aligned
    return tf.experimental.dlpack.from_dlpack(a.__dlpack__())


# ----------------------------------------------------------------- padding
def _check_multiple(multiple) -> int:
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    return int(multiple)


def _check_pad_mode(mode: str, name: str = "mode") -> str:
    if mode not in PAD_MODES:
        raise ValueError(f"{name} must be one of {PAD_MODES}, got {mode!r}")
    return mode


def _check_margin(margin) -> int:
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
        raise ValueError(f"margin must be an integer >= 0, got {margin!r}")
    return int(margin)


def _spatial_axes(ndim: int, spatial_axes) -> tuple[int, int, int]:
    if spatial_axes is None:
        if ndim in (3, 4):  # [D, H, W] or [D, H, W, C]
            return (0, 1, 2)
        if ndim == 5:  # [B, D, H, W, C]
            return (1, 2, 3)
        raise ValueError(
            f"expected a [D, H, W], [D, H, W, C] or [B, D, H, W, C] array, got {ndim} dims"
        )
    axes = tuple(int(a) for a in spatial_axes)
    if len(axes) != 3 or any(not 0 <= a < ndim for a in axes):
        raise ValueError(f"spatial_axes must be 3 axes of a {ndim}-d array, got {spatial_axes!r}")
    return axes


def padding_for(spatial_shape: Sequence[int], multiple: int = constants.SPATIAL_DIVISOR,
                mode: str = "symmetric") -> tuple[tuple[int, int], ...]:
    """(before, after) zero padding per spatial axis to reach a multiple of ``multiple``."""
    multiple = _check_multiple(multiple)
    _check_pad_mode(mode)
    pads = []
    for n in spatial_shape:
        if int(n) < 1:
            raise ValueError(f"spatial sizes must be positive, got {tuple(spatial_shape)}")
        total = -int(n) % multiple
        before = total // 2 if mode == "symmetric" else 0
        pads.append((before, total - before))
    return tuple(pads)


def pad_to_multiple(volume: np.ndarray, multiple: int = constants.SPATIAL_DIVISOR,
                    mode: str = "symmetric", spatial_axes=None):
    """Zero-pads the spatial axes of ``volume`` up to multiples of ``multiple``.

    Args:
      volume: [D, H, W], [D, H, W, C] or [B, D, H, W, C] (or any array with
        ``spatial_axes`` given).
      multiple: 8 for this network (three stride-2 stages, PAPER.md "Network").
      mode: "symmetric" (odd voxel at the end) or "end" (all padding at the end).
    Returns:
      (padded, pads): pads is ((before, after),) * 3, for ``crop_back``.
    """
    volume = np.asarray(volume)
    axes = _spatial_axes(volume.ndim, spatial_axes)
    pads = padding_for([volume.shape[a] for a in axes], multiple, mode)
    width = [(0, 0)] * volume.ndim
    for a, p in zip(axes, pads):
        width[a] = p
    return np.pad(volume, width), pads


def crop_back(padded: np.ndarray, pads, spatial_axes=None) -> np.ndarray:
    """Inverse of ``pad_to_multiple``: removes ``pads`` from the spatial axes (a view)."""
    padded = np.asarray(padded)
    axes = _spatial_axes(padded.ndim, spatial_axes)
    pads = tuple(tuple(int(v) for v in p) for p in pads)
    if len(pads) != 3 or any(len(p) != 2 or min(p) < 0 for p in pads):
        raise ValueError(f"pads must be 3 (before, after) pairs >= 0, got {pads!r}")
    index = [slice(None)] * padded.ndim
    for a, (before, after) in zip(axes, pads):
        if before + after >= padded.shape[a]:
            raise ValueError(f"pads {pads} do not fit the array's shape {padded.shape}")
        index[a] = slice(before, padded.shape[a] - after)
    return padded[tuple(index)]


def pad_to_multiple_tf(x: tf.Tensor, multiple: int = constants.SPATIAL_DIVISOR,
                       mode: str = "symmetric"):
    """Graph version of ``pad_to_multiple`` for [B, D, H, W, C] of any (dynamic) size.

    Returns (padded, pads) with pads an int32 [3, 2] tensor for ``crop_back_tf``.
    ``padded`` keeps ``x``'s static batch and channel sizes: Keras 3 runs a
    convolution whose input has no static channel count through XLA
    (``keras.src.backend.tensorflow.nn.conv``, its grouped-convolution check),
    which on this CPU made the first convolution of ``predict_volume`` take
    1.9 s instead of 0.2 s and compiled it anew for every new box size.
    """
    multiple = _check_multiple(multiple)
    _check_pad_mode(mode)
    spatial = tf.shape(x)[1:4]
    total = tf.math.floormod(-spatial, multiple)
    before = total // 2 if mode == "symmetric" else tf.zeros_like(total)
    pads = tf.stack([before, total - before], axis=1)  # [3, 2]
    zero = tf.zeros((1, 2), tf.int32)
    padded = tf.pad(x, tf.concat([zero, pads, zero], axis=0))
    return _static_batch_and_channels(padded, x), pads


def crop_back_tf(x: tf.Tensor, pads: tf.Tensor) -> tf.Tensor:
    """Graph version of ``crop_back`` for [B, D, H, W, C] (or [B, D, H, W])."""
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
def brain_box(image: np.ndarray, multiple: int = constants.SPATIAL_DIVISOR,
              margin: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The box the network runs on when inference crops to the brain.

    BraTS images are skull-stripped: outside the brain every modality is 0,
    and nothing there can be tumour. The box is the bounding box of the voxels
    that are non-zero in any channel, grown by ``margin`` voxels on each side,
    then grown (centred, shifted to stay inside the volume) to a multiple of
    ``multiple`` where the volume allows; an axis that cannot hold the
    rounded size keeps its full length (``pad_to_multiple`` pads it). An
    all-zero image gives the whole volume. 240 x 240 x 155 BraTS cases give
    about 144 x 176 x 144: 2.6x fewer voxels than 240 x 240 x 160.

    Args:
      image: [D, H, W, C] (or [D, H, W]) array.
    Returns:
      (start, size): per spatial axis; the box is ``image[start:start + size]``.
    """
    multiple = _check_multiple(multiple)
    _check_margin(margin)
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be [D, H, W] or [D, H, W, C], got shape {image.shape}")
    mask = image != 0
    if image.ndim == 4:
        mask = mask.any(axis=-1)
    start, size = [], []
    for axis in range(3):
        n = mask.shape[axis]
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hits.size == 0:
            lo, hi = 0, n
        else:
            lo, hi = max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, n)
        want = min(-(-(hi - lo) // multiple) * multiple, n)
        begin = min(max(lo - (want - (hi - lo)) // 2, 0), n - want)
        start.append(begin)
        size.append(want)
    return tuple(start), tuple(size)


def brain_box_tf(x: tf.Tensor, multiple: int = constants.SPATIAL_DIVISOR,
                 margin: int = 0) -> tuple[tf.Tensor, tf.Tensor]:
    """Graph version of ``brain_box`` for [B, D, H, W, C]: one box for the batch
    (the union of the cases' boxes). Returns (start, size), int32 [3] each."""
    multiple = _check_multiple(multiple)
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
def _check_raw_image(image: np.ndarray) -> None:
    """ValueError unless ``image`` is real-valued and finite."""
    if not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
        raise ValueError(f"expected a real-valued image, got dtype {image.dtype}")
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        raise ValueError("image contains NaN or infinite values")


def normalize_nonzero(image: np.ndarray) -> np.ndarray:
    """Per channel zero mean / unit std over that channel's NON-ZERO voxels (§3.7).

    The semantics of MONAI ``NormalizeIntensity(nonzero=True, channel_wise=True)``:
    for each channel (and each example of a batch) the mean and the population
    std (ddof=0) are computed over the voxels where that channel is non-zero;
    those voxels become (x - mean) / std, zero voxels stay exactly 0. A channel
    with a constant non-zero part (std 0) is only shifted (divided by 1); an
    all-zero channel stays all zero.

    Args:
      image: [D, H, W, C] or [B, D, H, W, C], channels last, raw intensities.
    Returns: float32 array of the same shape (a new array; the input is untouched).
    """
    image = np.asarray(image)
    if image.ndim not in (4, 5):
        raise ValueError(f"expected [D, H, W, C] or [B, D, H, W, C], got shape {image.shape}")
    _check_raw_image(image)
    x = image.astype(np.float64)
    axes = (0, 1, 2) if image.ndim == 4 else (1, 2, 3)
    mask = x != 0
    count = mask.sum(axis=axes, keepdims=True)
    safe = np.maximum(count, 1)
    mean = np.where(mask, x, 0).sum(axis=axes, keepdims=True) / safe
    var = np.where(mask, (x - mean) ** 2, 0).sum(axis=axes, keepdims=True) / safe
    std = np.sqrt(var)
    std = np.where(std > 0, std, 1.0)
    return np.where(mask, (x - mean) / std, 0.0).astype(np.float32)


def normalize_nonzero_tf(image: tf.Tensor) -> tf.Tensor:
    """Graph version of ``normalize_nonzero`` for [B, D, H, W, C]; float32 out.

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
    from brats_tf.model import build_inference_model

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

    Normalises (``normalize_nonzero``'s statistics, in TF float64; pass
    ``normalize=False`` for an image that is already normalised), crops to
    the brain's box (``brain_box``; ``crop_to_brain=False`` runs the whole
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
    multiple = _check_multiple(multiple)
    _check_pad_mode(pad_mode, "pad_mode")
    margin = _check_margin(margin)
    if normalize:
        _check_raw_image(image)  # the statistics are float64 in the graph
    batch = host_tensor(image[None])
    options = dict(normalize=bool(normalize), crop_to_brain=bool(crop_to_brain),
                   multiple=multiple, pad_mode=pad_mode, margin=margin)
    total = None
    for model in models:
        model = as_inference_model(model)  # held here: the cache only refers to it weakly
        y = _volume_fn(model, tta, image.shape[-1], **options)(batch).numpy()[0]
        total = y if total is None else total + y
    return np.ascontiguousarray(total / len(models), dtype=np.float32)


# ------------------------------------------------------------------ labels
def check_et_label(et_label) -> int:
    """The ET label value: 4 (BraTS 2017-2021) or 3 (BraTS 2023+); else ValueError."""
    if et_label not in ET_LABELS:
        raise ValueError(
            f"et_label must be {constants.LABEL_ET} (BraTS 2017-2021) or "
            f"{constants.LABEL_ET_2023} (BraTS 2023+), got {et_label!r}"
        )
    return int(et_label)


def check_threshold(threshold) -> float:
    """A region threshold in [0, 1); else ValueError quoting it."""
    try:
        ok = 0.0 <= float(threshold) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    return float(threshold)


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
    threshold, et_label = check_threshold(threshold), check_et_label(et_label)
    on = probs > threshold
    labels = np.full(probs.shape[:-1], constants.LABEL_BACKGROUND, np.uint8)
    labels[on[..., _WT]] = constants.LABEL_ED
    labels[on[..., _TC]] = constants.LABEL_NCR_NET
    labels[on[..., _ET]] = et_label
    return labels


def probabilities_to_labels_tf(probs: tf.Tensor, threshold: float = 0.5,
                               et_label: int = constants.LABEL_ET) -> tf.Tensor:
    """Graph version of ``probabilities_to_labels``: [..., 3] -> [...] uint8."""
    threshold, et_label = check_threshold(threshold), check_et_label(et_label)
    on = tf.cast(probs, tf.float32) > threshold

    def fill(value):
        return tf.fill(tf.shape(on)[:-1], tf.constant(value, tf.uint8))

    labels = tf.where(on[..., _WT], fill(constants.LABEL_ED), fill(constants.LABEL_BACKGROUND))
    labels = tf.where(on[..., _TC], fill(constants.LABEL_NCR_NET), labels)
    return tf.where(on[..., _ET], fill(et_label), labels)


def labels_to_regions(label_map: np.ndarray, et_label: int = constants.LABEL_ET) -> np.ndarray:
    """BraTS label map [...] -> boolean region masks [..., 3] (WT, TC, ET) (§1).

    WT = {1, 2, ET}, TC = {1, ET}, ET = {ET} with ET = ``et_label`` (4; 3 for
    BraTS 2023). Any other value (e.g. a 3 in a BraTS 2018 map) is an error.
    """
    et_label = check_et_label(et_label)
    label_map = np.asarray(label_map)
    if not np.issubdtype(label_map.dtype, np.integer):
        rounded = np.rint(label_map)
        if not np.issubdtype(label_map.dtype, np.floating) or np.any(rounded != label_map):
            raise ValueError(f"label map must hold integers, got dtype {label_map.dtype}")
        label_map = rounded.astype(np.int64)
    allowed = {constants.LABEL_BACKGROUND, constants.LABEL_NCR_NET, constants.LABEL_ED, et_label}
    found = set(np.unique(label_map).tolist())
    if not found <= allowed:
        raise ValueError(
            f"label map has values {sorted(found - allowed)} outside {sorted(allowed)} "
            f"(et_label={et_label})"
        )
    masks = []
    for region in constants.REGIONS:
        values = [et_label if v == constants.LABEL_ET else v
                  for v in constants.REGION_LABELS[region]]
        masks.append(np.isin(label_map, values))
    return np.stack(masks, axis=-1)


# ----------------------------------------------------------- NIfTI output
def paste_crop(sub_volume: np.ndarray, full_shape: Sequence[int], start: Sequence[int],
               fill=0) -> np.ndarray:
    """Pastes a prediction made on a cropped sub-volume back into the original grid.

    Args:
      sub_volume: [d, h, w, ...] prediction (labels or probabilities) of the
        crop ``original[start[0]:start[0]+d, start[1]:start[1]+h, start[2]:start[2]+w]``.
      full_shape: (D, H, W) of the original volume.
      start: the crop's bounding-box offsets (i, j, k) in the original grid.
      fill: the value outside the box (0 = background).
    Returns: [D, H, W, ...] array of ``sub_volume``'s dtype.
    """
    sub_volume = np.asarray(sub_volume)
    full_shape, start = tuple(int(n) for n in full_shape), tuple(int(s) for s in start)
    if len(full_shape) != 3 or len(start) != 3 or sub_volume.ndim < 3:
        raise ValueError(
            f"need a [d, h, w, ...] sub-volume, a (D, H, W) shape and (i, j, k) offsets; got "
            f"shapes {sub_volume.shape}, {full_shape} and start {start}"
        )
    end = tuple(s + n for s, n in zip(start, sub_volume.shape[:3]))
    if any(s < 0 for s in start) or any(e > n for e, n in zip(end, full_shape)):
        raise ValueError(
            f"box start {start} + size {sub_volume.shape[:3]} does not fit in {full_shape}"
        )
    full = np.full(full_shape + sub_volume.shape[3:], fill, dtype=sub_volume.dtype)
    full[start[0]:end[0], start[1]:end[1], start[2]:end[2]] = sub_volume
    return full


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
        labels of a crop when ``bbox_start`` is given (pasted with ``paste_crop``).
      reference: the case's NIfTI path (e.g. its ``_flair.nii.gz``), a nibabel
        image, or (affine, header).
      output_path: the file to write (``.nii.gz``), or an existing directory,
        in which ``<case_id>.nii.gz`` is written.
      case_id: names the file in a directory, and the case in error messages.
      overwrite: replace an existing output file (never the reference).
    The file is written under a temporary name in the same directory and then
    renamed, so a reader never sees half a file. Returns the written path.
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
        labels = paste_crop(labels, shape, bbox_start)
    if labels.ndim != 3:
        raise ValueError(f"case {name}: label map must be [D, H, W], got shape {labels.shape}")
    if shape is not None and labels.shape != shape:
        raise ValueError(
            f"case {name}: label map shape {labels.shape} != reference shape {shape}"
        )
    labels_to_regions(labels, et_label)  # checks the values
    labels = labels.astype(np.uint8)

    hdr = header.copy() if header is not None else nib.Nifti1Header()
    if not isinstance(hdr, nib.Nifti1Header):
        hdr = nib.Nifti1Header.from_header(hdr)
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(1.0, 0.0)  # labels are stored as is, never rescaled
    img = nib.Nifti1Image(labels, affine, header=hdr)
    # ".nii.gz" ending so nibabel compresses; a hidden name a directory watcher skips.
    suffix = ".nii.gz" if out.name.endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".tmp{suffix}", dir=out.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from others
        os.replace(tmp, out)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return out

