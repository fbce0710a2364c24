"""brats_tf/inference/: labels, the graph versions of the volume functions (padding, brain
box, normalisation) against NumPy's, TTA / ensemble, NIfTI output."""

import itertools
import os
import stat

import keras
import nibabel as nib
import numpy as np
import oracles
import pytest
import tensorflow as tf
from test_volume import PAD_CASES, make_image, numpy_reference_normalize

from brats_tf import inference as I
from brats_tf.config import ModelConfig
from brats_tf.inference.predict import _GRAPH_FNS
from brats_tf.model import build_inference_model, build_model
from data_pipeline import constants as C
from data_pipeline import volume as V

WT, TC, ET = (C.REGIONS.index(r) for r in ("WT", "TC", "ET"))


# ------------------------------------------------------------------- labels
# (p_WT, p_TC, p_ET) -> label with et_label=4 (the paper's order: ET, TC, WT).
PROB_CASES = [
    ((0.9, 0.9, 0.9), C.LABEL_ET),
    ((0.9, 0.9, 0.1), C.LABEL_NCR_NET),
    ((0.9, 0.1, 0.1), C.LABEL_ED),
    ((0.1, 0.1, 0.1), C.LABEL_BACKGROUND),
    ((0.1, 0.1, 0.9), C.LABEL_ET),  # ET implies TC implies WT
    ((0.1, 0.9, 0.1), C.LABEL_NCR_NET),
    ((0.5, 0.5, 0.5), C.LABEL_BACKGROUND),  # strictly greater than the threshold
    ((0.51, 0.2, 0.2), C.LABEL_ED),
]


@pytest.mark.parametrize("et_label", [C.LABEL_ET, C.LABEL_ET_2023])
def test_probabilities_to_labels_hand_made(et_label):
    probs = np.zeros((len(PROB_CASES), 3), np.float32)
    for i, (p, _) in enumerate(PROB_CASES):
        probs[i, [WT, TC, ET]] = p
    expected = [et_label if lab == C.LABEL_ET else lab for _, lab in PROB_CASES]
    labels = I.probabilities_to_labels(probs, et_label=et_label)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, expected)
    tf_labels = I.probabilities_to_labels_tf(tf.constant(probs), et_label=et_label)
    assert tf_labels.dtype == tf.uint8
    np.testing.assert_array_equal(tf_labels.numpy(), expected)


def test_probabilities_to_labels_threshold_and_checks():
    probs = np.array([[0.7, 0.7, 0.7]])
    assert I.probabilities_to_labels(probs, threshold=0.8)[0] == C.LABEL_BACKGROUND
    with pytest.raises(ValueError, match="threshold"):
        I.probabilities_to_labels(probs, threshold=1.5)
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        I.probabilities_to_labels(np.zeros((5, 2)))


@pytest.mark.parametrize("et_label", [C.LABEL_ET, C.LABEL_ET_2023])
def test_label_region_round_trip(et_label):
    rng = np.random.default_rng(0)
    values = [C.LABEL_BACKGROUND, C.LABEL_NCR_NET, C.LABEL_ED, et_label]
    labels = rng.choice(values, size=(6, 5, 7)).astype(np.uint8)
    probs = V.labels_to_regions(labels, et_label).astype(np.float32)
    np.testing.assert_array_equal(I.probabilities_to_labels(probs, et_label=et_label), labels)


# ------------------------------------------------------------------- padding
@pytest.mark.parametrize("shape, mode, expected_pads", PAD_CASES)
def test_pad_to_multiple_tf_equals_numpy(shape, mode, expected_pads):
    rng = np.random.default_rng(1)
    volume = rng.normal(size=shape + (2,)).astype(np.float32) + 10.0  # no zeros inside
    padded, pads = oracles.pad_to_multiple(volume, 8, mode)
    tf_padded, tf_pads = I.pad_to_multiple_tf(tf.constant(volume[None]), 8, mode)
    np.testing.assert_array_equal(tf_pads.numpy(), expected_pads)
    np.testing.assert_array_equal(tf_padded.numpy()[0], padded)
    np.testing.assert_array_equal(I.crop_back_tf(tf_padded, tf_pads).numpy()[0], volume)


# -------------------------------------------------------------- normalisation
def test_normalize_nonzero_tf_matches_numpy_per_example():
    rng = np.random.default_rng(3)
    batch = np.stack([make_image(rng), make_image(rng) * 3.0 + 7.0])
    batch[1][batch[1] == 7.0] = 0.0  # keep the zero background of the second example
    tf_out = tf.function(I.normalize_nonzero_tf)(tf.constant(batch)).numpy()
    assert not np.isnan(tf_out).any()
    for b in range(2):
        np.testing.assert_allclose(tf_out[b], numpy_reference_normalize(batch[b]), atol=1e-4)
    np.testing.assert_allclose(V.normalize_nonzero(batch), tf_out, atol=1e-4)


def test_normalize_nonzero_tf_precision_on_a_large_volume():
    """float32 sums over millions of voxels drift (7e-3 at 240x240x155); float64 does not."""
    rng = np.random.default_rng(12)
    x = rng.uniform(50, 1000, (1, 96, 96, 96, 2)).astype(np.float32)
    x[0, :20] = 0
    np.testing.assert_allclose(
        I.normalize_nonzero_tf(tf.constant(x)).numpy(), V.normalize_nonzero(x), atol=1e-6
    )


# ---------------------------------------------------------------- TTA / ensemble
W_TOY = np.array(
    [[0.5, -1.0, 0.3], [0.2, 0.4, -0.6], [-0.3, 0.1, 0.2], [0.7, 0.0, -0.2]], np.float32
)


def pointwise_model(x):
    """Flip-equivariant: the same function at every voxel."""
    return tf.sigmoid(tf.einsum("bdhwc,ck->bdhwk", x, W_TOY))


def cumsum_numpy(x):
    """Not flip-equivariant: cumulative sums along D and W."""
    y = np.einsum("bdhwc,ck->bdhwk", x, W_TOY)
    return 1.0 / (1.0 + np.exp(-(np.cumsum(y, axis=1) + 0.3 * np.cumsum(y, axis=3))))


def cumsum_model(x):
    y = tf.einsum("bdhwc,ck->bdhwk", x, W_TOY)
    return {"seg": tf.sigmoid(tf.cumsum(y, axis=1) + 0.3 * tf.cumsum(y, axis=3))}


def test_tta_of_flip_equivariant_model_equals_plain():
    image = make_image(np.random.default_rng(4), (8, 8, 16))
    plain = I.predict_volume(pointwise_model, image)
    tta = I.predict_volume(pointwise_model, image, tta=True)
    np.testing.assert_allclose(tta, plain, atol=1e-6)


def test_tta_equals_hand_computed_flip_average():
    image = make_image(np.random.default_rng(5), (8, 16, 8))
    x = V.normalize_nonzero(image)[None].astype(np.float64)
    flips = [a for r in range(4) for a in itertools.combinations((1, 2, 3), r)]
    assert len(set(flips)) == 8
    expected = np.mean(
        [np.flip(cumsum_numpy(np.flip(x, a)), a) if a else cumsum_numpy(x) for a in flips], axis=0
    )[0]
    tta = I.predict_volume(cumsum_model, image, tta=True)
    np.testing.assert_allclose(tta, expected, atol=1e-5)
    plain = I.predict_volume(cumsum_model, image)
    np.testing.assert_allclose(plain, cumsum_numpy(x)[0], atol=1e-5)
    assert np.abs(tta - plain).max() > 1e-2  # the model really is not equivariant


def test_tta_while_loop_equals_unrolled_tta():
    """The SavedModel's while_loop TTA covers the same 8 flips as the unrolled one."""
    x = tf.constant(V.normalize_nonzero(make_image(np.random.default_rng(10), (8, 8, 16)))[None])
    looped = tf.function(lambda t: I.predict_tta_loop_tf(cumsum_model, t))(x).numpy()
    unrolled = I.predict_tta_tf(cumsum_model, x, tta=True).numpy()
    np.testing.assert_allclose(looped, unrolled, atol=1e-6)
    assert np.abs(looped - cumsum_model(x)["seg"].numpy()).max() > 1e-2


def test_predict_volume_pads_crops_and_ensembles():
    image = make_image(np.random.default_rng(6), (5, 11, 3))
    seen = []

    def recording(x):
        seen.append(tuple(x.shape))
        return pointwise_model(x)

    x = V.normalize_nonzero(image)[None]
    single = I.predict_volume(recording, image)
    assert seen == [(1, 8, 16, 8, 4)]
    assert single.shape == (5, 11, 3, 3) and single.dtype == np.float32
    # crop aligned with pad: the pointwise model's output at the same voxel
    np.testing.assert_allclose(single, pointwise_model(x).numpy()[0], atol=1e-6)

    def shifted(x):
        return tf.sigmoid(tf.einsum("bdhwc,ck->bdhwk", x, W_TOY) + 1.0)

    both = I.predict_volume([pointwise_model, shifted], image)
    np.testing.assert_allclose(both, 0.5 * (single + shifted(x).numpy()[0]), atol=1e-6)
    with pytest.raises(ValueError, match="models is empty"):
        I.predict_volume([], image)
    with pytest.raises(ValueError, match=r"\(5, 11, 3\)"):
        I.predict_volume(pointwise_model, image[..., 0])


def test_predict_volume_casts_any_real_dtype_like_float32():
    """int16 (BraTS NIfTI data) and float64 cases go to TensorFlow as float32:
    the same probabilities as the float32 case, and the caller's array is untouched."""
    image = np.rint(make_image(np.random.default_rng(16), (5, 11, 3)))
    want = I.predict_volume(cumsum_model, image.astype(np.float32))
    for dtype in (np.int16, np.float64):
        case = image.astype(dtype)
        before = case.copy()
        np.testing.assert_array_equal(I.predict_volume(cumsum_model, case), want, err_msg=dtype)
        np.testing.assert_array_equal(case, before)


def test_predict_volume_with_tiny_training_model():
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(input_shape=(32, 32, 32), init_filters=8, latent_dim=16))
    image = make_image(np.random.default_rng(7), (9, 12, 7))
    probs = I.predict_volume(model, image)  # the VAE model is converted
    padded, pads = oracles.pad_to_multiple(V.normalize_nonzero(image))
    infer = build_inference_model(model)
    expected = oracles.crop_back(infer(padded[None], training=False)["seg"].numpy()[0], pads)
    assert probs.shape == (9, 12, 7, 3)
    np.testing.assert_allclose(probs, expected, atol=1e-5)


# --------------------------------------------------------------------- NIfTI
AFFINE = np.array([[-1.0, 0, 0, 90], [0, -1.0, 0, 126], [0, 0, 2.5, -72], [0, 0, 0, 1]])


@pytest.fixture
def reference(tmp_path):
    data = np.random.default_rng(8).uniform(0, 500, (6, 7, 5)).astype(np.int16)
    img = nib.Nifti1Image(data, AFFINE)
    img.set_qform(AFFINE, 1)
    img.set_sform(AFFINE, 1)
    img.header["descrip"] = b"BraTS reference"
    img.header.set_xyzt_units("mm", "sec")
    path = tmp_path / "Brats18_X_1_flair.nii.gz"
    nib.save(img, path)
    return path


def hand_labels(shape=(6, 7, 5)):
    labels = np.zeros(shape, np.uint8)
    labels[1:4, 2:5, 1:3] = C.LABEL_ED
    labels[2:3, 3:4, 1:3] = C.LABEL_NCR_NET
    labels[2, 3, 2] = C.LABEL_ET
    return labels


def test_write_prediction_nifti_keeps_reference_geometry(reference, tmp_path):
    out_dir = tmp_path / "pred"
    out_dir.mkdir()
    labels = hand_labels()
    path = I.write_prediction_nifti(
        labels.astype(np.int64), reference, out_dir, case_id="Brats18_X_1"
    )
    assert path == out_dir / "Brats18_X_1.nii.gz"
    assert sorted(p.name for p in out_dir.iterdir()) == ["Brats18_X_1.nii.gz"]  # no temp left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    ref, out = nib.load(reference), nib.load(path)
    assert out.shape == ref.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), labels)
    np.testing.assert_allclose(out.affine, ref.affine)
    for key in (
        "qform_code",
        "sform_code",
        "pixdim",
        "srow_x",
        "srow_y",
        "srow_z",
        "descrip",
        "xyzt_units",
        "quatern_b",
        "quatern_c",
        "quatern_d",
    ):
        np.testing.assert_array_equal(out.header[key], ref.header[key], err_msg=key)


def test_write_prediction_nifti_pastes_crop(reference, tmp_path):
    full = hand_labels()
    crop = full[1:4, 2:5, 1:3]
    path = I.write_prediction_nifti(crop, reference, tmp_path / "case.nii.gz", bbox_start=(1, 2, 1))
    np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj), full)
    # affine + header as a tuple reference
    ref = nib.load(reference)
    path2 = I.write_prediction_nifti(full, (ref.affine, ref.header), tmp_path / "c2.nii.gz")
    np.testing.assert_allclose(nib.load(path2).affine, AFFINE)


def test_write_prediction_nifti_errors(reference, tmp_path):
    labels = hand_labels()
    with pytest.raises(ValueError, match="refusing to overwrite the input"):
        I.write_prediction_nifti(labels, reference, reference, overwrite=True)
    with pytest.raises(ValueError, match=r"case Brats18_X_1: label map shape \(6, 7, 4\)"):
        I.write_prediction_nifti(
            labels[..., :4], reference, tmp_path / "a.nii.gz", case_id="Brats18_X_1"
        )
    bad = labels.copy()
    bad[0, 0, 0] = 3
    with pytest.raises(ValueError, match=r"\[3\]"):
        I.write_prediction_nifti(bad, reference, tmp_path / "b.nii.gz")
    out = tmp_path / "c.nii.gz"
    I.write_prediction_nifti(labels, reference, out)
    with pytest.raises(FileExistsError, match="c.nii.gz exists"):
        I.write_prediction_nifti(labels, reference, out)
    I.write_prediction_nifti(np.zeros_like(labels), reference, out, overwrite=True)
    assert np.asanyarray(nib.load(out).dataobj).max() == 0
    with pytest.raises(FileNotFoundError, match="missing_flair"):
        I.write_prediction_nifti(labels, tmp_path / "missing_flair.nii.gz", tmp_path / "d.nii.gz")
    assert not (tmp_path / "a.nii.gz").exists() and not (tmp_path / "b.nii.gz").exists()


# ------------------------------------------------------------------ brain box
def _box_image(shape, lo, hi, channel=2):
    image = np.zeros(shape + (4,), np.float32)
    image[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2], channel] = 7.0
    return image


@pytest.mark.parametrize(
    "shape,lo,hi,margin,start,size",
    [
        # bbox 10..29 (20) -> 24 centred: start 10 - 2 = 8
        ((40, 40, 40), (10, 10, 10), (30, 30, 30), 0, (8, 8, 8), (24, 24, 24)),
        # exactly multiples: unchanged; with margin 2, 6..26 (20) -> 24 from 4,
        # 6..42 (36) -> 40 from 4, 6..18 (12) -> 16 from 4
        ((40, 48, 40), (8, 8, 8), (24, 40, 16), 0, (8, 8, 8), (16, 32, 8)),
        ((40, 48, 40), (8, 8, 8), (24, 40, 16), 2, (4, 4, 4), (24, 40, 16)),
        # at the border: shifted to stay inside
        ((40, 40, 40), (0, 35, 0), (3, 40, 40), 0, (0, 32, 0), (8, 8, 40)),
        # an axis of 155 that cannot hold 160: the whole axis (padded later)
        ((16, 16, 155), (4, 4, 0), (12, 12, 155), 0, (4, 4, 0), (8, 8, 155)),
        # 1-voxel brain
        ((16, 16, 16), (5, 5, 5), (6, 6, 6), 0, (2, 2, 2), (8, 8, 8)),
    ],
)
def test_brain_box_hand_computed(shape, lo, hi, margin, start, size):
    image = _box_image(shape, lo, hi)
    assert V.brain_box(image, 8, margin) == (start, size)
    got = [tuple(t.numpy()) for t in I.brain_box_tf(tf.constant(image[None]), 8, margin)]
    assert got == [start, size]


def test_brain_box_empty_image_is_the_whole_volume():
    image = np.zeros((9, 10, 11, 4), np.float32)
    assert V.brain_box(image) == ((0, 0, 0), (9, 10, 11))
    got = [tuple(t.numpy()) for t in I.brain_box_tf(tf.constant(image[None]))]
    assert got == [(0, 0, 0), (9, 10, 11)]
    with pytest.raises(ValueError, match="margin"):
        V.brain_box(image, margin=-1)


def test_brain_box_numpy_and_graph_agree_on_random_masks():
    rng = np.random.default_rng(11)
    for _ in range(25):
        shape = tuple(int(n) for n in rng.integers(5, 40, 3))
        lo = [int(rng.integers(0, n)) for n in shape]
        hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, shape)]
        image = _box_image(shape, lo, hi, channel=int(rng.integers(0, 4)))
        margin = int(rng.integers(0, 4))
        start, size = V.brain_box(image, 8, margin)
        for s, n, a, b, d in zip(start, size, lo, hi, shape):
            assert 0 <= s and s + n <= d  # inside the volume
            assert s <= max(a - margin, 0) and s + n >= min(b + margin, d)  # holds the brain
            assert n % 8 == 0 or n == d  # a multiple of 8 where the volume allows
        got = [tuple(t.numpy()) for t in I.brain_box_tf(tf.constant(image[None]), 8, margin)]
        assert got == [start, size]


def test_brain_box_tf_takes_the_union_over_the_batch():
    a = _box_image((32, 32, 32), (2, 2, 2), (5, 5, 5))
    b = _box_image((32, 32, 32), (20, 20, 20), (30, 30, 30))
    start, size = I.brain_box_tf(tf.constant(np.stack([a, b])))
    assert V.brain_box(a + b) == (tuple(start.numpy()), tuple(size.numpy()))


def test_predict_volume_crops_to_the_brain_and_pastes_back():
    rng = np.random.default_rng(12)
    image = np.zeros((20, 24, 13, 4), np.float32)
    image[5:15, 3:20, 2:10] = rng.uniform(50, 900, (10, 17, 8, 4))
    seen = []

    def recording(x):
        seen.append(tuple(x.shape))
        return cumsum_model(x)

    probs = I.predict_volume(recording, image)
    start, size = V.brain_box(image)
    assert seen == [(1,) + size + (4,)] and size == (16, 24, 8)
    x = V.normalize_nonzero(image)
    sub = x[
        start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]
    ]
    expected = np.zeros((20, 24, 13, 3), np.float32)
    expected[
        start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]
    ] = cumsum_numpy(sub[None].astype(np.float64))[0]
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    # the paper's way: the whole volume, padded to 24 x 24 x 16
    seen.clear()
    whole = I.predict_volume(recording, image, crop_to_brain=False)
    assert seen == [(1, 24, 24, 16, 4)]
    padded, pads = oracles.pad_to_multiple(x)
    np.testing.assert_allclose(
        whole, oracles.crop_back(cumsum_numpy(padded[None].astype(np.float64))[0], pads), atol=1e-5
    )


def test_predict_volume_runs_a_keras_model_as_one_cached_graph():
    keras.utils.set_random_seed(0)
    model = build_inference_model(
        build_model(ModelConfig(input_shape=(16, 16, 16), init_filters=8, latent_dim=4))
    )
    rng = np.random.default_rng(13)
    first = I.predict_volume(model, make_image(rng, (8, 16, 8)))
    (fn,) = _GRAPH_FNS[model].values()
    I.predict_volume(model, make_image(rng, (16, 8, 8)))  # another size: same function
    assert list(_GRAPH_FNS[model].values()) == [fn]
    assert fn.experimental_get_tracing_count() <= 2  # a relaxed (None-size) trace at most
    assert first.shape == (8, 16, 8, 3)


def test_predict_volume_graph_pads_like_numpy_at_sizes_not_divisible_by_8():
    """The whole pipeline runs in one graph; its padding must reach the network
    as NumPy's does. (With static sizes TF 2.21's oneDNN rewrite folds the pad
    into the first 'same' convolution and loses that convolution's padding:
    predict_volume's graph keeps the sizes unknown.)"""
    keras.utils.set_random_seed(0)
    model = build_inference_model(
        build_model(ModelConfig(input_shape=(16, 16, 16), init_filters=8, latent_dim=4))
    )
    image = make_image(np.random.default_rng(14), (13, 10, 9))
    probs = I.predict_volume(model, image, crop_to_brain=False)
    padded, pads = oracles.pad_to_multiple(V.normalize_nonzero(image))
    assert padded.shape[:3] == (16, 16, 16)
    expected = oracles.crop_back(model(padded[None], training=False)["seg"].numpy()[0], pads)
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def _xla_compiled_functions(concrete) -> list:
    """Names of the functions of ``concrete``'s graph (its library included)
    that TensorFlow must compile with XLA."""
    graph_def = concrete.graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        if function.attr["_XlaMustCompile"].b:
            return [function.signature.name]
        nodes += list(function.node_def)
    return [n.name for n in nodes if n.attr["_XlaMustCompile"].b]


@pytest.mark.parametrize("crop_to_brain,tta", [(True, False), (False, False), (True, True)])
def test_predict_volume_graph_runs_no_convolution_through_xla(crop_to_brain, tta):
    """Keras 3 compiles a convolution with XLA when its input's channel count
    is not static (its grouped-convolution check); the padding in the graph
    lost it, and the first convolution took 1.9 s instead of 0.2 s at the
    brain box of a BraTS case on the 2-core CPU (and was compiled anew for
    every box size)."""
    keras.utils.set_random_seed(0)
    model = build_inference_model(
        build_model(ModelConfig(input_shape=(16, 16, 16), init_filters=8, latent_dim=4))
    )
    image = make_image(np.random.default_rng(15), (13, 10, 9))
    I.predict_volume(model, image, crop_to_brain=crop_to_brain, tta=tta)
    (fn,) = _GRAPH_FNS[model].values()
    concrete = fn.get_concrete_function()
    graph_def = concrete.graph.as_graph_def()
    ops = {n.op for n in graph_def.node} | {
        n.op for f in graph_def.library.function for n in f.node_def
    }
    assert "Conv3D" in ops  # the network is in the graph
    assert _xla_compiled_functions(concrete) == []


def test_a_network_of_five_levels_is_padded_to_what_it_needs():
    """Table 1's four levels need a multiple of 8; five need 16. predict_volume
    (so evaluate.py and the validation during training) pads to what its
    networks need (``padding_multiple``: 8 or more, the least common multiple
    over an ensemble), as the SavedModel does, and the evaluation's protocol
    records it. Before, predict_volume padded every network to 8 and a
    five-level one failed on a volume of 20 x 28 x 13 (padded 24 x 32 x 16)."""
    from brats_tf.evaluation import EvalConfig
    from brats_tf.evaluation.loop import run_protocol
    from brats_tf.evaluation.models import LoadedModel

    def network(levels):
        cfg = ModelConfig(
            input_shape=(32, 32, 32),
            init_filters=8,
            latent_dim=8,
            blocks_down=(1,) * levels,
            blocks_up=(1,) * (levels - 1),
        )
        keras.utils.set_random_seed(levels)
        return build_inference_model(build_model(cfg))

    five, two = network(5), network(2)
    assert I.padding_multiple([five]) == 16
    assert I.padding_multiple([two]) == I.padding_multiple([]) == C.SPATIAL_DIVISOR == 8
    assert I.padding_multiple([two, five]) == 16
    assert I.padding_multiple([lambda x: x]) == 8  # not a brats_tf network: the paper's 8

    image = make_image(np.random.default_rng(5), (20, 28, 13))
    got = I.predict_volume(five, image, crop_to_brain=False)
    padded, pads = oracles.pad_to_multiple(numpy_reference_normalize(image), 16)
    assert padded.shape[:3] == (32, 32, 16)
    want = oracles.crop_back(five(padded[None], training=False)["seg"].numpy()[0], pads)
    np.testing.assert_allclose(got, want, atol=2e-5)

    loaded = [LoadedModel("five.keras", "keras", five, False)]
    assert loaded[0].padding_multiple() == 16
    config = EvalConfig(models=("five.keras",), data="data", output_dir="out")
    assert run_protocol(config, loaded)["padding"].startswith("zeros to a multiple of 16,")
