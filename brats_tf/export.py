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
import pathlib
import sys
from typing import TYPE_CHECKING

from brats_tf.config import PRECISIONS, check_precision
from brats_tf.saved_model_names import INPUT_NAME, METADATA_FILE, SIGNATURES
from data_pipeline import constants, volume
from data_pipeline.checks import positive_int
from data_pipeline.io_utils import expand_pattern

if TYPE_CHECKING:
    from brats_tf.inference.saved_model import export_saved_model


def __getattr__(name):
    """``export_saved_model``, importable from here as before, from
    brats_tf.inference.saved_model: TensorFlow is imported when it is used,
    so that the command line checks its flags and files at once."""
    if name == "export_saved_model":
        from brats_tf.inference.saved_model import export_saved_model

        return export_saved_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "INPUT_NAME",
    "SIGNATURES",
    "METADATA_FILE",
    "export_saved_model",
    "ExportConfig",
    "model_files",
    "run",
    "define_flags",
    "main",
]


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
        positive_int("version", self.version)
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
    """Loads the .keras model(s) and exports them; errors are raised with one-line
    messages, those of the files and folders before TensorFlow is imported."""
    paths = model_files(config.model)
    target = pathlib.Path(config.export_dir) / str(config.version)
    if target.exists() and any(target.iterdir()) and not config.overwrite:
        raise FileExistsError(
            f"{target} exists and is not empty (use --overwrite or another --version)"
        )
    import keras

    from brats_tf.inference.saved_model import export_saved_model

    models = []
    for path in paths:
        try:
            models.append(keras.saving.load_model(path, compile=False))
        except Exception as e:  # Keras raises many types for a bad file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot load model {path}: {first}") from None
    return export_saved_model(
        models,
        config.export_dir,
        config.version,
        config.et_label,
        config.threshold,
        config.overwrite,
        config.crop_to_brain,
        config.precision,
        config.et_min_voxels,
    )


def define_flags():
    """Defines this entry point's flags (only when run as a program: no global side effect)."""
    from absl import flags

    flags.DEFINE_string(
        "model",
        None,
        "Path to the trained model (.keras); several, comma "
        "separated or a quoted shell pattern: one SavedModel of their ensemble.",
    )
    flags.DEFINE_string(
        "export_dir", None, "Model base path for TF Serving; the version directory goes inside."
    )
    flags.DEFINE_integer(
        "version", 1, "Version sub-directory (TF Serving serves the highest).", lower_bound=1
    )
    flags.DEFINE_enum(
        "et_label",
        str(constants.LABEL_ET),
        [str(constants.LABEL_ET), str(constants.LABEL_ET_2023)],
        "Label value of enhancing tumour in the 'labels' output "
        "(4: BraTS 2017-2021, 3: BraTS 2023+).",
    )
    flags.DEFINE_float(
        "threshold",
        0.5,
        "Region threshold for 'labels' (p > threshold).",
        lower_bound=0.0,
        upper_bound=1.0,
    )
    flags.DEFINE_bool("overwrite", False, "Replace an existing, non-empty version directory.")
    flags.DEFINE_integer(
        "et_min_voxels",
        0,
        "Post-processing of 'labels', not the paper's (0: "
        "off): a case whose predicted ET has fewer voxels gets necrosis (label "
        "1) there (python -m brats_tf.postprocess chooses it).",
        lower_bound=0,
    )
    flags.DEFINE_bool(
        "crop_to_brain",
        True,
        "Run the network on the brain's bounding box (2.6x fewer voxels on "
        "BraTS); false: the whole padded volume, as the paper.",
    )
    flags.DEFINE_enum(
        "precision",
        "saved",
        ["saved", *PRECISIONS],
        "Precision the served network computes in: 'saved' (the model's own) or "
        "a Keras dtype policy: mixed_float16 for GPUs (~150x slower on a CPU), "
        "mixed_bfloat16 for CPUs with AMX (~2x faster there).",
    )
    return flags.FLAGS


def main(argv):
    from absl import flags as absl_flags
    from absl import logging

    if len(argv) > 1:
        sys.exit(f"brats_tf.export: error: unexpected arguments {argv[1:]}")
    flags = absl_flags.FLAGS
    try:
        config = ExportConfig(
            model=flags.model,
            export_dir=flags.export_dir,
            version=flags.version,
            et_label=int(flags.et_label),
            threshold=flags.threshold,
            overwrite=flags.overwrite,
            crop_to_brain=flags.crop_to_brain,
            precision=None if flags.precision == "saved" else flags.precision,
            et_min_voxels=flags.et_min_voxels,
        )
        logging.info("export config: %s", config)
        target = run(config)
    except (OSError, ValueError) as e:
        sys.exit(f"brats_tf.export: error: {e}")
    print(f"exported {target} (signatures: {', '.join(SIGNATURES)})")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
