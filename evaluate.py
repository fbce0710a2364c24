"""Evaluates trained models on BraTS data the way the BraTS challenge does (paper §4).

    python evaluate.py --model=runs/b18 --data=data/brats18 --fold=0 --output_dir=eval/b18_f0
    python evaluate.py --model='runs/ens/member_*' --tta --data=/data/BraTS2018_Validation \
        --output_dir=eval/val_ens           # ensemble + TTA on an unlabelled NIfTI set

--model: a comma list, shell patterns allowed (quoted; several models = an
ensemble, the mean of the probabilities; members with the same seed and data
split are warned of); each a train.py model_dir (segmenter.keras, else model.keras, else the latest
checkpoint + config.json), a .keras file, a SavedModel folder (export/<n>/),
or a checkpoint prefix. --data: the converter's TFRecord folder
(manifest.json; --fold=k: only fold k's shards) or a folder of BraTS NIfTI
cases (2018-2023 layouts; without seg files: predictions only).

Writes into --output_dir (refused when it is / is inside / contains an input,
or is not empty without --overwrite): predictions/<case_id>.nii.gz (uint8 labels,
ET as 4 or, for BraTS 2023 data, 3 (--et_label); the original grid, affine and
header), probabilities/ (--save_probabilities), figures/<case_id>.png,
per_case.csv, summary.csv, summary.json, evaluation.json. summary.json and
evaluation.json record the protocol: region (brain box or whole volume),
padding, TTA, ensemble size, threshold, post-processing, ET label. Everything
is written into <output_dir>.partial first and renamed when every case is
done; killed, the same command again resumes there at the first case not
done. See brats_tf/EVALUATION.md.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # oneDNN on every x86 CPU, as train.py

from absl import app, flags

from brats_tf.config import PRECISIONS
from data_pipeline.checks import one_line

FLAGS = flags.FLAGS

flags.DEFINE_list(
    "model",
    None,
    "Model path(s), comma separated, shell patterns allowed "
    "(several: an ensemble): a model_dir, a .keras file, a SavedModel folder or a "
    "checkpoint prefix.",
)
flags.DEFINE_string(
    "data", None, "A TFRecord folder with manifest.json, or a folder of BraTS NIfTI cases."
)
flags.DEFINE_string(
    "output_dir",
    None,
    "Where everything is written (first into "
    "<output_dir>.partial beside it, renamed when complete; an interrupted run "
    "resumes there); not an input folder.",
)
flags.DEFINE_integer(
    "fold",
    None,
    "TFRecords only: evaluate this fold's shards (the validation "
    "fold of train.py --fold); default all.",
    lower_bound=0,
)
flags.DEFINE_boolean("tta", False, "Test-time augmentation: mean of the 8 mirror flips (§4).")
flags.DEFINE_boolean(
    "crop_to_brain",
    True,
    "Run Keras models on the brain's bounding box "
    "(2.6x fewer voxels on BraTS); false: the whole padded volume (the paper). "
    "A SavedModel does what it was exported with.",
)
flags.DEFINE_enum(
    "precision",
    "saved",
    ["saved", *PRECISIONS],
    "Precision the network computes in: 'saved' (as the model was saved or "
    "trained), or a Keras dtype policy: mixed_bfloat16 is ~2x faster on CPUs "
    "with AMX (Sapphire Rapids and later), mixed_float16 is for GPUs. .keras "
    "files, model_dirs and checkpoints only; a SavedModel computes as exported.",
)
flags.DEFINE_enum(
    "et_label",
    "auto",
    ["auto", "4", "3"],
    "Enhancing tumour label in the "
    "written predictions: 4 (BraTS 2017-2021) or 3 (BraTS 2023+); 'auto': as "
    "the data's cases are named (3 for BraTS 2023 names, from manifest.json or "
    "the NIfTI files, else 4). The protocol records which, and why.",
)
flags.DEFINE_float(
    "threshold",
    0.5,
    "A voxel is in a region when p > threshold.",
    lower_bound=0.0,
    upper_bound=0.999999,
)
flags.DEFINE_integer(
    "et_min_voxels",
    0,
    "Post-processing, not the paper's (0: off): a case "
    "whose predicted ET has fewer voxels gets necrosis (label 1) there. Choose "
    "it on training folds: python -m brats_tf.postprocess.",
    lower_bound=0,
)
flags.DEFINE_enum(
    "hd95_mode",
    "pooled",
    ["pooled", "max_directed"],
    "HD95: 95th percentile of both directions' surface distances pooled (MedPy), "
    "or the max of the two directed 95th percentiles (MONAI).",
)
flags.DEFINE_boolean(
    "save_probabilities",
    False,
    "Also write the WT/TC/ET probabilities (float32 NIfTI, 3 components).",
)
flags.DEFINE_boolean("figures", True, "Write a PNG per case (T1ce, truth and prediction).")
flags.DEFINE_boolean("overwrite", False, "Replace an output_dir written by an earlier run.")
flags.DEFINE_boolean("progress", True, "Show a progress bar.")

log = logging.getLogger("evaluate")


def check_before_tensorflow() -> None:
    """The checks that need no TensorFlow, run before it is imported (a
    user waits a fraction of a second for a bad folder, not TensorFlow's
    start-up): the required flags, and the data folder as the evaluation
    would find it (``data_pipeline.data_folder``). ValueError, one line."""
    from data_pipeline.data_folder import checked_source

    for name in ("model", "data", "output_dir"):
        if not FLAGS[name].value:
            raise ValueError(f"--{name} is required")
    checked_source(FLAGS.data, FLAGS.fold)


def config_from_flags():
    """FLAGS -> a frozen EvalConfig (ValueError quoting the bad value)."""
    from brats_tf.evaluation import EvalConfig

    return EvalConfig(
        models=tuple(FLAGS.model),
        data=FLAGS.data,
        output_dir=FLAGS.output_dir,
        fold=FLAGS.fold,
        tta=FLAGS.tta,
        et_label=None if FLAGS.et_label == "auto" else int(FLAGS.et_label),
        threshold=FLAGS.threshold,
        et_min_voxels=FLAGS.et_min_voxels,
        crop_to_brain=FLAGS.crop_to_brain,
        precision=None if FLAGS.precision == "saved" else FLAGS.precision,
        hd95_mode=FLAGS.hd95_mode,
        save_probabilities=FLAGS.save_probabilities,
        figures=FLAGS.figures,
        overwrite=FLAGS.overwrite,
        progress=FLAGS.progress,
    )


def main(argv):
    if len(argv) > 1:
        sys.exit(f"evaluate.py: error: unexpected arguments: {' '.join(argv[1:])}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    try:
        check_before_tensorflow()
        config = config_from_flags()
    except (ValueError, OSError) as e:  # BadCaseError included
        sys.exit(f"evaluate.py: error: {one_line(e)}")
    log.info("configuration: %s", config)
    from brats_tf import evaluation

    try:
        result = evaluation.evaluate(config)
    except (ValueError, OSError) as e:  # EvaluationError and BadCaseError included
        sys.exit(f"evaluate.py: error: {one_line(e)}")
    print(result["line"])


if __name__ == "__main__":
    app.run(main)
