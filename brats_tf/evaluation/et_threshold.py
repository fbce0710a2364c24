"""The ET post-processing's volume threshold N (not the paper's; off by
default): a predicted ET below N voxels becomes necrosis
(``volume.et_to_necrosis``), and N is chosen on training folds.

Each case of the folds (``training_folds``: by default every fold but the
models' validation folds) is predicted once with the protocol it will be
evaluated with (``collect``); every candidate N is then scored by the mean
ET Dice over the cases under BraTS's empty-mask rule (``score``), and the
best wins (``choose``; ties: the smallest N). The command, and why N is
chosen so: ``python -m brats_tf.postprocess`` (brats_tf/postprocess.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tqdm

from brats_tf import inference, metrics
from brats_tf.evaluation.cases import open_cases
from brats_tf.evaluation.config import EvaluationError
from brats_tf.evaluation.members import training_run
from brats_tf.evaluation.models import ensemble_probabilities
from data_pipeline import constants, volume

DEFAULT_CANDIDATES = (0, 25, 50, 100, 200, 300, 400, 500, 750, 1000, 1500, 2000)


@dataclasses.dataclass(frozen=True)
class CaseET:
    """One case's ET as predicted without post-processing, and its truth."""

    case_id: str
    fold: int | None
    predicted_voxels: int  # predicted ET voxels
    dice: float  # ET Dice of that prediction (BraTS empty-mask rule)
    truth_voxels: int  # ET voxels of the ground truth


def score(cases, et_min_voxels: int) -> tuple[float, int]:
    """(mean ET Dice, cases changed) with ``et_min_voxels``: a case whose
    prediction has fewer ET voxels loses them, and scores 1 if its truth has no
    ET, else 0 (``metrics.dice`` of an empty prediction)."""
    et_min_voxels = volume.check_et_min_voxels(et_min_voxels)
    values, changed = [], 0
    for case in cases:
        if 0 < case.predicted_voxels < et_min_voxels:
            values.append(1.0 if case.truth_voxels == 0 else 0.0)
            changed += 1
        else:
            values.append(case.dice)
    if not values:
        raise ValueError("no case to score")
    return float(np.mean(values)), changed


def choose(cases, candidates=DEFAULT_CANDIDATES) -> tuple[int, list[dict]]:
    """(the best N, the table of every candidate) for ``cases`` (CaseET)."""
    candidates = sorted({volume.check_et_min_voxels(n) for n in candidates} | {0})
    table = []
    for n in candidates:
        mean, changed = score(cases, n)
        table.append({"et_min_voxels": n, "mean_et_dice": mean, "cases_changed": changed})
    best = max(table, key=lambda row: (row["mean_et_dice"], -row["et_min_voxels"]))
    return best["et_min_voxels"], table


def training_folds(models, num_folds: int, folds=None) -> list[int]:
    """The folds to choose on: ``folds`` (checked), or every fold but the
    models' validation folds. A model's validation fold in ``folds`` is an
    error, as is a model without its train.py config.json when ``folds`` is
    not given."""
    held_out = {}
    for model in models:
        run = training_run(model)
        if run is None:
            if folds is None:
                raise EvaluationError(
                    f"model {model.path}: no train.py config.json says which fold it held "
                    f"out: give --folds (folds it was trained on)"
                )
            continue
        fold = run["data"].get("fold")
        if isinstance(fold, int) and fold >= 0:
            held_out.setdefault(fold, model.path)
    if folds is None:
        folds = [k for k in range(num_folds) if k not in held_out]
    for k in folds:
        if not 0 <= k < num_folds:
            raise EvaluationError(f"fold {k}: the data has folds 0 to {num_folds - 1}")
        if k in held_out:
            raise EvaluationError(
                f"fold {k} is the held-out fold of model {held_out[k]}: "
                f"choose N on the folds it was trained on"
            )
    if not folds:
        raise EvaluationError("no fold left to choose on (every fold is a model's held-out one)")
    return sorted(set(folds))


def collect(
    models,
    data: str,
    folds,
    tta: bool,
    crop_to_brain: bool,
    threshold: float,
    progress: bool = True,
) -> list[CaseET]:
    """Predicts every case of ``folds`` once: its ET voxels, Dice and truth."""
    sources = []
    for fold in folds:
        cases, count, has_labels = open_cases(data, fold)
        if not has_labels:
            raise EvaluationError(f"data {data}: no labels, nothing to choose N with")
        sources.append((fold, cases, count))
    result = []
    with tqdm.tqdm(
        total=sum(c for _, _, c in sources),
        unit="case",
        disable=not progress,
        desc="predict",
        dynamic_ncols=True,
    ) as bar:
        for fold, cases, _ in sources:
            for case in cases:
                probs = ensemble_probabilities(models, case.image, tta, crop_to_brain)
                labels = inference.probabilities_to_labels(probs, threshold)
                predicted = labels == constants.LABEL_ET
                truth = case.label == constants.LABEL_ET
                result.append(
                    CaseET(
                        case.case_id,
                        fold,
                        int(np.count_nonzero(predicted)),
                        float(metrics.dice(predicted, truth)),
                        int(np.count_nonzero(truth)),
                    )
                )
                bar.update(1)
    return result
