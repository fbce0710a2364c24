"""Where an evaluation writes: ``check_output_dir`` refuses an output folder
that is an input or holds something not written by evaluate; everything is
written into a staging folder beside it (``staging_dir``), renamed to it once
every case is done, and an interrupted evaluation resumes there."""

from __future__ import annotations

import glob
import json
import logging
import os
import pathlib

from brats_tf.evaluation.config import (
    FIGURES,
    PER_CASE_CSV,
    PREDICTIONS,
    PROBABILITIES,
    RUN_JSON,
    SUMMARY_CSV,
    SUMMARY_JSON,
    EvalConfig,
    EvaluationError,
)
from brats_tf.evaluation.models import LoadedModel
from data_pipeline.io_utils import atomic_path, remove_path, stale_temporaries

log = logging.getLogger("brats_tf.evaluation")

# An evaluation writes into <output_dir>.partial beside output_dir, renamed to
# output_dir once every case is done; until then it holds RESUME_JSON (what it
# is an evaluation of) and CASES_DONE/<case_id>.json (one per finished case),
# from which the same command, run again after an interruption, resumes.
STAGING_SUFFIX = ".partial"
RESUME_JSON = "resume.json"
CASES_DONE = "cases_done"


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_dir(config: EvalConfig, model_paths=None) -> None:
    """Refuses an output_dir that is / is inside / holds an input, or a non-empty
    folder without ``overwrite`` (and with it, one not written by evaluate).
    ``model_paths``: the models with their patterns expanded (default: config.models)."""
    out = config.output_dir
    models = config.models if model_paths is None else model_paths
    for name, path in [("data", config.data)] + [("model", m) for m in models]:
        if os.path.exists(path) and (_inside(out, path) or _inside(path, out)):
            raise EvaluationError(
                f"output_dir {out} is, is inside or contains the {name} "
                f"input {path}: choose another folder"
            )
    if os.path.exists(out) and not os.path.isdir(out):
        raise EvaluationError(f"output_dir {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if not config.overwrite:
            raise EvaluationError(
                f"output_dir {out} is not empty (pass --overwrite to replace an earlier evaluation)"
            )
        if not os.path.isfile(os.path.join(out, RUN_JSON)):
            raise EvaluationError(
                f"output_dir {out} is not empty and holds no {RUN_JSON} of an "
                f"earlier evaluation: refusing to overwrite it"
            )
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise EvaluationError(f"output_dir {out}: parent folder {parent} does not exist")


def staging_dir(output_dir) -> pathlib.Path:
    """Where an evaluation into ``output_dir`` writes until it is complete:
    ``<output_dir>.partial``, beside it."""
    out = pathlib.Path(output_dir)
    if out.name in ("", ".", ".."):
        out = pathlib.Path(os.path.abspath(output_dir))
    return out.with_name(out.name + STAGING_SUFFIX)


def remove_stale_staging(out: pathlib.Path) -> None:
    """Removes the hidden temporaries that an evaluation into ``out``, killed
    midway, left beside it and that nothing resumes from: the staging folders
    of earlier versions (``.<name>.tmp-<random>``, holding nothing but
    evaluate's outputs) and those of a staging folder killed while it was
    made; other folders are left alone."""
    ours = {PREDICTIONS, PROBABILITIES, FIGURES, PER_CASE_CSV, SUMMARY_CSV, SUMMARY_JSON, RUN_JSON}
    for path in stale_temporaries(out, directory=True):
        names = {n for n in os.listdir(path) if not n.startswith(".")}  # .tmp files too
        if PREDICTIONS in names and names <= ours:
            remove_path(path)
            log.info("removed %s, left by an interrupted evaluation", path)
    for path in stale_temporaries(staging_dir(out), directory=True):
        if set(os.listdir(path)) <= {RESUME_JSON, CASES_DONE, PREDICTIONS, PROBABILITIES, FIGURES}:
            remove_path(path)


def _files_of(path) -> list:
    """[name, bytes, mtime in ns] of a file, of every file under a folder, or
    of the files of a checkpoint prefix: what tells whether it changed."""
    path = pathlib.Path(path)
    if path.is_file():
        base, files = path.parent, [path]
    elif path.is_dir():
        base, files = (
            path,
            sorted(
                pathlib.Path(folder) / name
                for folder, _, names in os.walk(path, followlinks=True)
                for name in names
            ),
        )
    else:
        base, files = (
            path.parent,
            sorted(pathlib.Path(p) for p in glob.glob(glob.escape(str(path)) + ".*")),
        )
    stats = []
    for file in files:
        st = file.stat()
        stats.append([str(file.relative_to(base)), st.st_size, st.st_mtime_ns])
    return stats


def resume_key(config: EvalConfig, models: list[LoadedModel], protocol: dict) -> dict:
    """What the staging folder of an evaluation is an evaluation of: the
    models' and the data's files (names, sizes, times), the fold, the
    protocol and what is written per case. A rerun resumes only where this
    is the same (JSON types: as read back)."""
    model_files = []
    for model in models:
        files = _files_of(model.path)
        if model.kind == "checkpoint":  # its architecture comes from config.json
            files += _files_of(pathlib.Path(model.path).parent.parent / "config.json")
        model_files.append({"path": os.path.realpath(model.path), "files": files})
    return json.loads(
        json.dumps(
            {
                "models": model_files,
                "data": {
                    "path": os.path.realpath(config.data),
                    "fold": config.fold,
                    "files": _files_of(config.data),
                },
                "protocol": protocol,
                "outputs": {
                    k: getattr(config, k)
                    for k in ("precision", "hd95_mode", "save_probabilities", "figures")
                },
            }
        )
    )


def _read_json(path):
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None


def resumable_cases(staging: pathlib.Path, key: dict) -> dict | None:
    """{case_id: record} of the cases that an interrupted evaluation with the
    same ``key`` has done in ``staging`` (their files there); None when there
    is nothing to resume: no staging folder, or one of another evaluation
    (said so: ``make_staging`` replaces it). A folder of that name that is
    not an evaluation's staging folder is an EvaluationError. Reads only."""
    if not os.path.lexists(staging):
        return None
    recorded = _read_json(staging / RESUME_JSON) if staging.is_dir() else None
    if staging.is_symlink() or not isinstance(recorded, dict):
        raise EvaluationError(
            f"{staging} exists and is not the staging folder of an "
            f"interrupted evaluation (no {RESUME_JSON}): move it away or "
            f"choose another output_dir"
        )
    if recorded != key:
        differ = [name for name in key if recorded.get(name) != key[name]] or ["versions"]
        log.warning(
            "starting over: %s holds an interrupted evaluation whose %s differ from "
            "this one's (nothing to resume there); it is replaced",
            staging,
            " and ".join(differ),
        )
        return None
    done = {}
    for path in sorted((staging / CASES_DONE).glob("*.json")):
        record = _read_json(path)
        if (
            isinstance(record, dict)
            and isinstance(record.get("written"), list)
            and all((staging / name).is_file() for name in record["written"])
        ):
            done[record["case_id"]] = record
    log.info(
        "resuming the interrupted evaluation in %s: %d case(s) done there are kept, the "
        "others evaluated now",
        staging,
        len(done),
    )
    return done


def make_staging(staging: pathlib.Path, key: dict, config: EvalConfig) -> None:
    """A new staging folder for ``key`` (replacing an earlier evaluation's)."""
    if os.path.lexists(staging):
        remove_path(staging)  # checked by resumable_cases: an evaluation's, of another key
    with atomic_path(staging, directory=True) as tmp:
        for name, wanted in [
            (CASES_DONE, True),
            (PREDICTIONS, True),
            (PROBABILITIES, config.save_probabilities),
            (FIGURES, config.figures),
        ]:
            if wanted:
                (tmp / name).mkdir()
        (tmp / RESUME_JSON).write_text(json.dumps(key, indent=1))
    log.info(
        "writing into %s, renamed to %s once every case is done (if interrupted, the "
        "same command resumes there)",
        staging,
        config.output_dir,
    )
