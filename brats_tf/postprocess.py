"""Chooses the ET post-processing's volume threshold on training folds.

BraTS scores ET as 1 on a case without ET when nothing is predicted there, and
0 when even a few voxels are: entries after the paper (Isensee et al., BraTS
2018; nnU-Net's BraTS set-up) relabel a predicted ET below N voxels as
necrosis (label 1; TC and WT are unchanged). The paper has no post-processing,
so it is an option, off by default (``--et_min_voxels`` of evaluate.py,
brats_tf.export and serving.client; ``volume.et_to_necrosis``).

N is chosen on cases the held-out evaluation will not see: by default every
fold but the models' validation folds (their train.py config.json says which);
naming a model's validation fold is an error. Each case is predicted once with
the protocol it will be evaluated with (region, TTA, threshold); then every
candidate N is scored by the mean ET Dice over the cases (BraTS's empty-mask
rule), and the best wins (ties: the smallest N, the least change).

    python -m brats_tf.postprocess --model=runs/b18 --data=data/brats18_tfrecord \
        --tta --output=runs/b18/et_min_voxels.json

Cases a model was trained on are easier than new ones: the predictions there
have fewer false ET voxels than on unseen cases, so N chosen on them tends to
be small. Out-of-fold predictions (each fold by a model that held it out,
``--model`` of the models trained with ``--fold=k`` together with
``--folds``) give a choice closer to what the test set will see.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

from brats_tf import inference
from brats_tf.evaluation import EvaluationError, expand_model_paths, is_tfrecord_dir, load_models
from brats_tf.evaluation.et_threshold import DEFAULT_CANDIDATES, choose, collect, training_folds
from data_pipeline import volume
from data_pipeline.checks import one_line

log = logging.getLogger("brats_tf.postprocess")


def define_flags():
    """This entry point's flags (only when run as a program)."""
    from absl import flags

    flags.DEFINE_list(
        "model",
        None,
        "Model path(s) as evaluate.py --model (several: an ensemble; shell patterns allowed).",
    )
    flags.DEFINE_string("data", None, "The converter's TFRecord folder (manifest.json).")
    flags.DEFINE_list(
        "folds", None, "Folds to choose on (default: every fold but the models' validation folds)."
    )
    flags.DEFINE_boolean(
        "tta", False, "Predict with the 8 mirror flips, as the evaluation that will use N."
    )
    flags.DEFINE_boolean("crop_to_brain", True, "As evaluate.py --crop_to_brain.")
    flags.DEFINE_float(
        "threshold", 0.5, "As evaluate.py --threshold.", lower_bound=0.0, upper_bound=0.999999
    )
    flags.DEFINE_list(
        "candidates",
        [str(n) for n in DEFAULT_CANDIDATES],
        "ET volume thresholds (voxels) to try; 0 (none) is always tried.",
    )
    flags.DEFINE_string("output", None, "The JSON written (the choice, its table, every case).")
    flags.DEFINE_boolean("overwrite", False, "Replace an existing --output.")
    flags.DEFINE_boolean("progress", True, "Show a progress bar.")
    return flags.FLAGS


def _check_paths(f) -> None:
    """ValueError for a missing --model/--data/--output, --data that is not a
    converter folder, or an --output this run may not write."""
    for name in ("model", "data", "output"):
        if not f[name].value:
            raise ValueError(f"--{name} is required")
    if not is_tfrecord_dir(f.data):
        raise ValueError(
            f"--data={f.data}: not a converter output folder (manifest.json "
            f"with folds): N is chosen on training folds"
        )
    if os.path.exists(f.output) and not f.overwrite:
        raise ValueError(f"--output={f.output} exists (pass --overwrite to replace it)")
    if os.path.isdir(f.output):
        raise ValueError(f"--output={f.output} is a folder")


def main(argv):
    from absl import flags as absl_flags

    from data_pipeline.checks import int_flag_list
    from data_pipeline.io_utils import write_json_atomic
    from data_pipeline.manifest import read_manifest

    if len(argv) > 1:
        sys.exit(f"brats_tf.postprocess: error: unexpected arguments {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    f = absl_flags.FLAGS
    try:
        _check_paths(f)
        candidates = [
            volume.check_et_min_voxels(n) for n in int_flag_list("candidates", f.candidates)
        ]
        threshold = volume.check_threshold(f.threshold)
        manifest = read_manifest(f.data)
        models = load_models(expand_model_paths(f.model))
        folds = training_folds(
            models,
            manifest["options"]["folds"],
            None if f.folds is None else int_flag_list("folds", f.folds),
        )
        log.info("choosing on fold(s) %s of %s", ",".join(map(str, folds)), f.data)
        cases = collect(models, f.data, folds, f.tta, f.crop_to_brain, threshold, f.progress)
    except (EvaluationError, ValueError, OSError) as e:
        sys.exit(f"brats_tf.postprocess: error: {one_line(e)}")
    best, table = choose(cases, candidates)
    for row in table:
        chosen = "  <- chosen" if row["et_min_voxels"] == best else ""
        log.info(
            "et_min_voxels %5d: mean ET Dice %.4f (%d case(s) changed)%s",
            row["et_min_voxels"],
            row["mean_et_dice"],
            row["cases_changed"],
            chosen,
        )
    record = {
        "et_min_voxels": best,
        "chosen_on": {"data": f.data, "folds": folds, "num_cases": len(cases)},
        "models": [m.path for m in models],
        "protocol": inference.protocol(
            inference.region_name(f.crop_to_brain),
            f.tta,
            sum(m.networks() for m in models),
            threshold,
        ),
        "table": table,
        "cases": [dataclasses.asdict(c) for c in cases],
    }
    write_json_atomic(f.output, record)
    log.info("wrote %s", f.output)
    chosen = next(row for row in table if row["et_min_voxels"] == best)
    print(
        f"et_min_voxels={best} (mean ET Dice {chosen['mean_et_dice']:.4f} on {len(cases)} "
        f"case(s) of fold(s) {','.join(map(str, folds))}, {table[0]['mean_et_dice']:.4f} "
        f"without): use evaluate.py --et_min_voxels={best}"
    )


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
