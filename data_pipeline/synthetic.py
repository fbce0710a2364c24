"""Synthetic BraTS-like cases, written in the BraTS 2018 layout and naming.

Real BraTS data sits behind a registration; these cases let everything run out
of the box. Each case is a skull-stripped, brain-shaped head (zero outside the
brain) with white matter, grey matter and CSF (outer rim and two ventricles), a
smooth multiplicative bias field and Gaussian noise; a tumour of random
position, size and irregular shape: edema (2) around a tumour core made of an
enhancing rim (4) around a necrotic core (1), in BraTS-like proportions
(HGG: core ~1/3 of the whole tumour, necrosis ~1/3 of the core, the rim at
least 1/5 of it). LGG-like cases have a non-enhancing core (label 1 only, no
4). Contrasts follow real scans: edema bright on T2 and FLAIR, enhancing rim
bright on T1ce, necrotic core dark on T1 and T1ce, CSF bright on T2 and dark
on FLAIR.

    python -m data_pipeline.synthetic --output_dir data/synthetic --num_cases 20
    python -m data_pipeline.synthetic --output_dir /tmp/full --num_cases 4 --shape 240,240,155

Writes <output_dir>/{HGG,LGG}/Brats18_SYN_<n>_1/Brats18_SYN_<n>_1_{t1,t1ce,t2,flair,seg}.nii.gz:
int16 images, uint8 labels in {0, 1, 2, 4}, 1 mm isotropic affine. Deterministic
for a seed (case n uses seed (seed, n), whatever num_cases).
"""

import os

import nibabel as nib
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from data_pipeline.checks import int_flag_list
from data_pipeline.constants import LABEL_BACKGROUND, LABEL_ED, LABEL_ET, LABEL_NCR_NET, MODALITIES
from data_pipeline.io_utils import atomic_path

DEFAULT_SHAPE = (96, 96, 64)  # CPU demo; BraTS is data_pipeline.constants.BRATS_SHAPE

# Tissue classes of the synthetic head, in the intensity table's row order.
_BACKGROUND, _CSF, _GM, _WM, _EDEMA, _NECROSIS, _ENHANCING = range(7)
# Mean intensity (arbitrary units, ~1 = brightest) of each class, per modality.
# Columns follow the rows above: background, CSF, GM, WM, edema, necrosis, enhancing.
_CONTRAST = {
    "t1": (0.0, 0.25, 0.55, 0.75, 0.45, 0.22, 0.50),
    "t1ce": (0.0, 0.25, 0.55, 0.72, 0.47, 0.18, 1.00),
    "t2": (0.0, 1.00, 0.60, 0.40, 0.85, 0.95, 0.65),
    "flair": (0.0, 0.15, 0.55, 0.45, 0.95, 0.50, 0.70),
}
_NOISE_STD = 0.03  # relative to the brightest class
_CASE_ID = "Brats18_SYN_{:04d}_1"
_MAX_TUMOUR_DRAWS = 20
_MIN_PART_VOXELS = 8
# HGG: the enhancing rim holds at least this share of the tumour core, so
# every HGG case has a complete rim (BraTS-like: necrosis ~1/3 of the core).
# Real cases with a tiny ET exist; at the demo's 96 x 96 x 64 a rim of a few
# voxels is noise, not something the demo network can be asked to find.
_MIN_ET_SHARE_OF_CORE = 0.2


def _smooth_field(shape, rng, cells=5):
    """A smooth random field (std ~1) on `shape`: Gaussian bumps on a coarse
    cells^3 grid, interpolated separably (cheap for 240x240x155)."""
    coarse = rng.normal(size=(cells,) * 3)
    weights = []
    for n in shape:
        x = np.linspace(0.0, cells - 1.0, n)[:, None]
        w = np.exp(-0.5 * ((x - np.arange(cells)[None, :]) / 0.8) ** 2)
        weights.append((w / w.sum(axis=1, keepdims=True)).astype(np.float32))
    field = np.einsum("ia,abc->ibc", weights[0], coarse.astype(np.float32))
    field = np.einsum("jb,ibc->ijc", weights[1], field)
    field = np.einsum("kc,ijc->ijk", weights[2], field)
    return field / (field.std() + 1e-6)


def _grid(shape, centre, radii):
    """Per-axis normalised coordinates (x - centre) / radius, broadcastable."""
    axes = []
    for axis, (n, c, r) in enumerate(zip(shape, centre, radii)):
        a = (np.arange(n, dtype=np.float32) - c) / r
        axes.append(a.reshape([-1 if i == axis else 1 for i in range(3)]))
    return axes


def _tumour(shape, rng, centre, radii, brain, lgg):
    """Nested masks (edema, core, necrosis) of a random lumpy tumour in the brain."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    t_centre = centre + direction * rng.uniform(0.15, 0.55) * radii
    t_radius = rng.uniform(0.28, 0.45) * radii.mean() * (0.8 if lgg else 1.0)
    tx, ty, tz = _grid(shape, t_centre, t_radius * rng.uniform(0.75, 1.3, 3))
    d = np.sqrt(tx * tx + ty * ty + tz * tz)
    # Lumpy boundaries: fields that vary on a scale of a few voxels at any size.
    cells = max(6, int(round(min(shape) / 8)))
    edema = brain & (d + 0.22 * _smooth_field(shape, rng, cells) < 1.0)
    core_radius = rng.uniform(0.62, 0.82)
    core = edema & (d + 0.15 * _smooth_field(shape, rng, cells) < core_radius)
    necrosis = core & (
        d + 0.1 * _smooth_field(shape, rng, cells) < core_radius * rng.uniform(0.55, 0.8)
    )
    return edema, core, necrosis


def _brain(shape, rng):
    """An ellipsoid brain (BraTS brains span ~140 x 170 x 135 of 240 x 240 x
    155) with a wobbly surface: (centre, radii, normalised radius r, brain
    mask r < 1)."""
    size = np.array(shape, dtype=np.float32)
    centre = size / 2 + rng.uniform(-0.02, 0.02, 3) * size
    radii = size * np.array([0.29, 0.36, 0.43]) * rng.uniform(0.92, 1.05, 3)
    x, y, z = _grid(shape, centre, radii)
    r = np.sqrt(x * x + y * y + z * z)
    r += 0.04 * _smooth_field(shape, rng, cells=6)
    return centre, radii, r, r < 1.0


def _tissues(shape, rng, centre, radii, r, brain):
    """Tissue classes (uint8): CSF at the surface, a cortical grey matter
    shell with a wobbly inner boundary, white matter inside, two ventricles."""
    tissue = np.where(brain, _WM, _BACKGROUND).astype(np.uint8)
    tissue[brain & (r > 0.80 + 0.06 * _smooth_field(shape, rng))] = _GM
    tissue[brain & (r > 0.965)] = _CSF
    for side in (-1.0, 1.0):
        vx, vy, vz = _grid(
            shape,
            centre + np.array([side * 0.08, -0.05, 0.05]) * radii * 2,
            radii * np.array([0.07, 0.28, 0.16]),
        )
        tissue[brain & (vx * vx + vy * vy + vz * vz < 1.0)] = _CSF
    return tissue


def _visible_tumour(shape, rng, centre, radii, brain, lgg):
    """A deformed ball at a random place well inside the brain; drawn again
    (same rng stream, so still deterministic) until every one of its parts
    is visible, which small volumes or the brain's edge can prevent.
    Returns its masks (edema, core, necrosis)."""
    for _ in range(_MAX_TUMOUR_DRAWS):
        edema, core, necrosis = _tumour(shape, rng, centre, radii, brain, lgg)
        parts = (edema & ~core, necrosis, core & ~necrosis) if not lgg else (edema & ~core, core)
        rim_ok = lgg or (core & ~necrosis).sum() >= _MIN_ET_SHARE_OF_CORE * core.sum()
        if min(p.sum() for p in parts) >= _MIN_PART_VOXELS and rim_ok:
            break
    return edema, core, necrosis


def _paint_tumour(tissue, edema, core, necrosis, lgg):
    """The label map of the tumour; paints its tissue classes into `tissue`."""
    label = np.full(tissue.shape, LABEL_BACKGROUND, dtype=np.uint8)
    label[edema] = LABEL_ED
    if lgg:
        label[core] = LABEL_NCR_NET  # non-enhancing core only
        tissue[edema] = _EDEMA
        tissue[core] = _NECROSIS
    else:
        label[core] = LABEL_ET
        label[necrosis] = LABEL_NCR_NET
        tissue[edema] = _EDEMA
        tissue[core] = _ENHANCING
        tissue[necrosis] = _NECROSIS
    return label


def _images(shape, rng, tissue, brain):
    """{modality: int16 image}: each class's contrast (jittered per case)
    times a smooth bias field, plus noise, at a scanner-like scale; zero
    outside the brain."""
    bias = np.exp(0.08 * _smooth_field(shape, rng, cells=3)).astype(np.float32)
    images = {}
    for modality in MODALITIES:
        means = np.array(_CONTRAST[modality], dtype=np.float32)
        means[1:] *= rng.uniform(0.95, 1.05, 6).astype(np.float32)  # per-case contrast jitter
        value = means[tissue] * bias
        value += rng.normal(0.0, _NOISE_STD, shape).astype(np.float32)
        gain = rng.uniform(600.0, 1400.0)  # scanner-like arbitrary scale per modality
        value = np.clip(np.rint(value * gain), 1, 32767)  # >= 1: inside the brain is non-zero
        images[modality] = np.where(brain, value, 0).astype(np.int16)
    return images


def make_case(shape=DEFAULT_SHAPE, seed=0, lgg=False):
    """One synthetic case as arrays.

    Args:
      shape: (D, H, W) voxels (1 mm each).
      seed: int or sequence of ints for np.random.default_rng.
      lgg: True for an LGG-like case (no enhancing tumour, smaller edema).

    Returns:
      (images, label): images maps each name in MODALITIES to an int16 [D, H, W]
      array, zero outside the brain; label is uint8 [D, H, W] with values in
      {0, 1, 2, 4} (no 4 when lgg).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be 3 sizes >= 16, got {shape}")
    rng = np.random.default_rng(seed)  # one stream, drawn from in the order of the steps
    centre, radii, r, brain = _brain(shape, rng)
    tissue = _tissues(shape, rng, centre, radii, r, brain)
    edema, core, necrosis = _visible_tumour(shape, rng, centre, radii, brain, lgg)
    label = _paint_tumour(tissue, edema, core, necrosis, lgg)
    return _images(shape, rng, tissue, brain), label


def write_case(case_dir, case_id, images, label, affine=None):
    """Writes one case's NIfTI files in BraTS 2018 naming; returns the case dir."""
    affine = np.eye(4) if affine is None else affine
    os.makedirs(case_dir, exist_ok=True)
    arrays = dict(images, seg=label)
    for suffix, array in arrays.items():
        path = os.path.join(case_dir, f"{case_id}_{suffix}.nii.gz")
        img = nib.Nifti1Image(array, affine)
        img.header.set_xyzt_units("mm", "sec")
        with atomic_path(path, suffix=".nii.gz") as tmp:  # no half-written file at `path`
            nib.save(img, str(tmp))
    return case_dir


def write_synthetic_dataset(
    output_dir, num_cases, shape=DEFAULT_SHAPE, seed=0, lgg_fraction=0.25, progress=True
):
    """Writes `num_cases` synthetic cases under output_dir/{HGG,LGG}/.

    Case n (0-based) is LGG-like when its own random draw is below lgg_fraction,
    and uses seed (seed, n), so a case does not depend on num_cases.

    Returns:
      The list of case folders, in case order.
    """
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    if not 0.0 <= lgg_fraction <= 1.0:
        raise ValueError(f"lgg_fraction must be in [0, 1], got {lgg_fraction}")
    logging.info(
        "writing %d synthetic cases of shape %s (seed %d) to %s",
        num_cases,
        tuple(shape),
        seed,
        output_dir,
    )
    dirs = []
    for n in tqdm(range(num_cases), desc="synthetic cases", unit="case", disable=not progress):
        lgg = np.random.default_rng((seed, n, 1)).uniform() < lgg_fraction
        images, label = make_case(shape, seed=(seed, n), lgg=lgg)
        case_id = _CASE_ID.format(n)
        case_dir = os.path.join(output_dir, "LGG" if lgg else "HGG", case_id)
        dirs.append(write_case(case_dir, case_id, images, label))
    logging.info("wrote %d cases to %s", len(dirs), output_dir)
    return dirs


FLAGS = flags.FLAGS


def define_flags():
    """The command line's flags (defined here, not at import, so that library
    users can import several entry-point modules)."""
    flags.DEFINE_string(
        "output_dir", None, "Folder to write the cases into (HGG/ and LGG/ inside)."
    )
    flags.DEFINE_integer("num_cases", 20, "Number of cases.", lower_bound=1)
    flags.DEFINE_list(
        "shape",
        [str(s) for s in DEFAULT_SHAPE],
        "Volume size D,H,W in voxels; the real BraTS size is 240,240,155.",
    )
    flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same cases.")
    flags.DEFINE_float(
        "lgg_fraction",
        0.25,
        "Expected fraction of LGG-like cases (no enhancing tumour).",
        lower_bound=0.0,
        upper_bound=1.0,
    )
    flags.mark_flag_as_required("output_dir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        shape = int_flag_list("shape", FLAGS.shape, count=3, minimum=16)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    logging.info(
        "flags: %s",
        {
            name: FLAGS[name].value
            for name in ("output_dir", "num_cases", "shape", "seed", "lgg_fraction")
        },
    )
    write_synthetic_dataset(
        FLAGS.output_dir, FLAGS.num_cases, shape, FLAGS.seed, FLAGS.lgg_fraction
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
