"""Where an evaluated model comes from: the train.py run that made it (its
config.json and history.json), and warnings for ensemble members that are
not distinct or have not learned a region (§4: models trained from scratch)."""

from __future__ import annotations

import json
import os
import pathlib

from brats_tf import training
from brats_tf.evaluation.models import LoadedModel


def _run_file(model: LoadedModel, name: str):
    """A file of the train.py model_dir a model comes from (its model_dir, the
    model_dir of its checkpoints/ or export/<n>/), parsed as JSON; None if absent."""
    p = pathlib.Path(model.path)
    if model.kind == "checkpoint" or model.raw_input:
        run_dir = p.parent.parent  # checkpoints/ckpt-N, export/N/
    else:
        run_dir = p if p.is_dir() else p.parent  # model_dir/*.keras
    try:
        return json.loads((run_dir / name).read_text())
    except (OSError, ValueError):
        return None


def training_run(model: LoadedModel) -> dict | None:
    """The train.py config.json of the run a model comes from, or None."""
    config = _run_file(model, "config.json")
    if not isinstance(config, dict) or not all(
        isinstance(config.get(k), dict) for k in ("model", "train", "data")
    ):
        return None
    return config


def unlearned_regions(model: LoadedModel) -> dict:
    """``training.unlearned_regions`` of the last epoch in the model's
    history.json ({} without one)."""
    history = _run_file(model, "history.json")
    if not isinstance(history, list) or not history or not isinstance(history[-1], dict):
        return {}
    return training.unlearned_regions(history[-1])


def member_warnings(models: list[LoadedModel]) -> list[str]:
    """Warnings for an ensemble whose members are not distinct: the same file
    twice, or two runs with the same seed, network and data split (the same
    initial weights and data order: an average of near copies, not the
    paper's ensemble of models trained from scratch); and for a model whose
    training history shows a region it has not learned."""
    warnings, seen_paths, seen_runs = [], {}, {}
    for model in models:
        real = os.path.realpath(model.path)
        if real in seen_paths:
            warnings.append(f"models {seen_paths[real]} and {model.path} are the same file")
            continue
        seen_paths[real] = model.path
        unlearned = unlearned_regions(model)
        if unlearned:
            warnings.append(
                f"model {model.path} has not learned {' and '.join(unlearned)}: training Dice "
                f"{', '.join(f'{d:.3f}' for d in unlearned.values())} in its last epoch (a "
                f"channel saturated early in training); leave it out of the ensemble"
            )
        run = training_run(model)
        if run is None:
            continue
        key = json.dumps(
            [
                run["train"].get("seed"),
                run["data"].get("fold"),
                run["train"].get("num_train_cases"),
                run["model"],
            ],
            sort_keys=True,
        )
        if key in seen_runs:
            warnings.append(
                f"models {seen_runs[key]} and {model.path} were trained with the same seed "
                f"{run['train'].get('seed')} on the same data split (fold "
                f"{run['data'].get('fold')}): the same initial weights and data order; train "
                f"ensemble members with train.py --member=K"
            )
        else:
            seen_runs[key] = model.path
    return warnings


def model_record(model: LoadedModel) -> dict:
    """What evaluation.json records of a model: its path, kind, precision,
    networks, and the seed and member of its training run."""
    run = training_run(model) or {}
    return {
        "path": model.path,
        "kind": model.kind,
        "precision": model.precision(),
        "networks": model.networks(),
        "seed": run.get("train", {}).get("seed"),
        "member": run.get("data", {}).get("member"),
    }
