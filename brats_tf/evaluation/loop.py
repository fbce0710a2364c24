"""The evaluate loop (evaluate.py, §4): models on every case, the cases'
outputs written into a staging folder, the tables and evaluation.json at the
end, and the staging folder renamed to the output folder; an interrupted
evaluation resumes where it stopped (EVALUATION.md)."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import pathlib
import time
from collections.abc import Iterable

import numpy as np
import tqdm

from brats_tf import inference, metrics
from brats_tf.evaluation.cases import EvalCase, SkippedCase, et_label_for_data, open_cases
from brats_tf.evaluation.config import (
    FIGURES,
    PREDICTIONS,
    PROBABILITIES,
    RUN_JSON,
    EvalConfig,
    EvaluationError,
)
from brats_tf.evaluation.members import member_warnings, model_record
from brats_tf.evaluation.models import LoadedModel, expand_model_paths, load_models
from brats_tf.evaluation.one_case import evaluate_case
from brats_tf.evaluation.output_folder import (
    CASES_DONE,
    RESUME_JSON,
    check_output_dir,
    make_staging,
    remove_stale_staging,
    resumable_cases,
    resume_key,
    staging_dir,
)
from brats_tf.evaluation.report import TABLES, one_line_summary, write_tables
from data_pipeline import constants
from data_pipeline.io_utils import remove_path, replace_folder, write_text_atomic

log = logging.getLogger("brats_tf.evaluation")

SPACING_ATOL = 1e-3  # mm: BraTS volumes are resampled to 1 mm isotropic voxels


def run_protocol(
    config: EvalConfig, models: list[LoadedModel], et_label: tuple[int, str] | None = None
) -> dict:
    """``inference.protocol`` of an evaluation: what produced its scores;
    with ``et_label`` (``et_label_for_data``), the ET label written and why."""
    regions = sorted({m.region(config.crop_to_brain) for m in models})
    protocol = inference.protocol(
        region=regions[0] if len(regions) == 1 else "mixed: " + ", ".join(regions),
        tta=config.tta,
        ensemble_size=sum(m.networks() for m in models),
        threshold=config.threshold,
        et_min_voxels=config.et_min_voxels,
        # the same for every model but in an ensemble of networks of different
        # depths, where the Keras models pad to their least common multiple
        multiple=math.lcm(*(m.padding_multiple() for m in models)),
    )
    if et_label is not None:
        protocol["et_label"], protocol["et_label_source"] = et_label
    return protocol


@dataclasses.dataclass
class _Run:
    """One evaluation as it goes: what it evaluates, and what it has done."""

    config: EvalConfig
    models: list
    warnings: list
    et_label: int
    protocol: dict
    out: pathlib.Path
    staging: pathlib.Path
    key: dict  # what the staging folder is an evaluation of (output_folder.resume_key)
    done: dict | None  # case_id -> record, by an interrupted run (None: nothing to resume)
    created: bool = False  # this run made the staging folder
    per_case: dict = dataclasses.field(default_factory=dict)
    written: list = dataclasses.field(default_factory=list)
    mine: list = dataclasses.field(default_factory=list)  # what this run wrote into staging
    other_spacing: dict = dataclasses.field(default_factory=dict)  # case_id -> spacing not 1 mm
    n: int = 0  # cases done
    resumed: int = 0  # of them, done by an interrupted run (tqdm may not count)


def evaluate(
    config: EvalConfig,
    models: list[LoadedModel] | None = None,
    cases: Iterable[EvalCase] | None = None,
    num_cases: int | None = None,
) -> dict:
    """Predicts every case, scores it, and writes the outputs of EVALUATION.md (§1, §4).

    Inputs are checked before any inference (models load and take 4 channels;
    output_dir is not an input and is empty or an earlier evaluation; every
    modality file present). Everything is written into ``staging_dir``
    (``<output_dir>.partial``, named in the log) and renamed to output_dir at
    the end. An error removes what this run wrote there (the folder, when
    this run made it): nothing is left. An interruption (Ctrl-C, a kill)
    leaves it, and the same evaluation run again resumes there at the first
    case not done: when the models' and the data's files (names, sizes,
    times), the fold, the protocol and the outputs per case are the same;
    otherwise it starts over and says so.

    Args:
      config: EvalConfig.
      models, cases, num_cases: for library use, already loaded models
        (``load_models``) and cases (``open_cases``; num_cases sizes the progress
        bar); by default from config.
    Returns: {"summary": summarize() or None, "per_case": {case_id: case_metrics},
      "line": the one-line summary, "written": [paths relative to output_dir]}.
    Raises: EvaluationError or data_pipeline.cases.BadCaseError, one line.
    """
    run = _start(config, models)
    if cases is None:
        cases, num_cases, _ = open_cases(config.data, config.fold, skip=set(run.done or ()))
    _open_staging(run)
    start = time.monotonic()
    try:
        _evaluate_cases(run, cases, num_cases)
        summary = _write_tables(run)
        line = _write_run_record(run, summary, time.monotonic() - start)
        _complete(run)
    except KeyboardInterrupt:
        log.warning(
            "interrupted: the %d case(s) done are kept in %s; the same command resumes there",
            len(run.done) + run.n - run.resumed,
            run.staging,
        )
        raise
    except BaseException:
        _discard(run)
        raise
    _log_outputs(run)
    return {
        "summary": summary,
        "per_case": run.per_case,
        "line": line,
        "written": sorted(run.written),
    }


def _start(config: EvalConfig, models: list[LoadedModel] | None) -> _Run:
    """Checks the inputs and the output folder, loads the models (unless
    given), warns of members that are not distinct, chooses the ET label and
    the protocol, and finds what an interrupted run of the same evaluation
    has done. Writes nothing (stale temporaries beside output_dir go)."""
    model_paths = expand_model_paths(config.models) if models is None else None
    check_output_dir(config, model_paths)
    out = pathlib.Path(config.output_dir)
    remove_stale_staging(out)
    if models is None:
        models = load_models(model_paths, config.precision)
    warnings = member_warnings(models)
    for warning in warnings:
        log.warning("%s", warning)
    if config.et_label is None:
        et_label, source = et_label_for_data(config.data, config.fold)
    else:
        et_label, source = config.et_label, "--et_label"
    log.info("ET written as %d: %s", et_label, source)
    protocol = run_protocol(config, models, (et_label, source))
    log.info("protocol: %s", inference.describe_protocol(protocol))
    staging = staging_dir(out)
    key = resume_key(config, models, protocol)
    return _Run(
        config,
        models,
        warnings,
        et_label,
        protocol,
        out,
        staging,
        key,
        done=resumable_cases(staging, key),
    )


def _open_staging(run: _Run) -> None:
    """A new staging folder, unless the run resumes an interrupted one's."""
    run.created = run.done is None
    if run.created:
        make_staging(run.staging, run.key, run.config)
        run.done = {}


def _evaluate_cases(run: _Run, cases: Iterable[EvalCase], num_cases: int | None) -> None:
    """Every case, each once: evaluated now or resumed, with a progress bar."""
    seen: set = set()
    bar = tqdm.tqdm(
        total=num_cases,
        unit="case",
        disable=not run.config.progress,
        desc="evaluate",
        dynamic_ncols=True,
    )
    with bar:
        for case in cases:
            if case.case_id in seen:
                raise EvaluationError(f"case {case.case_id}: found twice in {run.config.data}")
            seen.add(case.case_id)
            record = _case_record(run, case)
            run.written += record["written"]
            if record["metrics"] is not None:
                run.per_case[case.case_id] = record["metrics"]
            if not np.allclose(record["spacing"], 1.0, rtol=0, atol=SPACING_ATOL):
                run.other_spacing[case.case_id] = [round(float(z), 4) for z in record["spacing"]]
            bar.update(1)
            run.n += 1
            if run.per_case.get(case.case_id):
                s = run.per_case[case.case_id]
                bar.set_postfix_str(" ".join(f"{r} {s[r]['dice']:.3f}" for r in constants.REGIONS))
    if run.n == 0:
        raise EvaluationError(f"data {run.config.data}: no case")


def _case_record(run: _Run, case: EvalCase | SkippedCase) -> dict:
    """The record of one case: the interrupted run's, or made now (predicted,
    scored and written into the staging folder, and recorded in CASES_DONE)."""
    record = run.done.get(case.case_id)
    if record is not None:
        run.resumed += 1
        return record
    if isinstance(case, SkippedCase):
        raise EvaluationError(
            f"case {case.case_id}: skipped, but no record of it in {run.staging / CASES_DONE}"
        )
    record = evaluate_case(case, run.models, run.config, run.et_label, run.staging)
    run.mine += record["written"]
    name = f"{CASES_DONE}/{case.case_id}.json"
    write_text_atomic(run.staging / name, json.dumps(record))
    run.mine.append(name)
    log.debug("case %s from %s: done", case.case_id, case.source)
    return record


def _write_tables(run: _Run) -> dict | None:
    """The per-case and summary tables of a labelled evaluation; returns the
    summary (None without labels)."""
    if not run.per_case:
        return None
    if len(run.per_case) != run.n:
        raise EvaluationError(
            f"data {run.config.data}: {run.n - len(run.per_case)} case(s) "
            f"without labels among labelled ones"
        )
    summary = metrics.summarize(run.per_case)
    run.mine += list(TABLES)
    write_tables(run.staging, run.per_case, summary, run.n, run.protocol)
    run.written += list(TABLES)
    return summary


def _write_run_record(run: _Run, summary: dict | None, seconds: float) -> str:
    """evaluation.json: the configuration, protocol, models, warnings and what
    was written; returns the one-line summary it records."""
    line = one_line_summary(summary, run.n, seconds, str(run.out), run.protocol)
    record = {
        "config": dataclasses.asdict(run.config),
        "protocol": run.protocol,
        "models": [model_record(m) for m in run.models],
        "warnings": run.warnings,
        "num_cases": run.n,
        "resumed_cases": run.resumed,
        "has_labels": bool(run.per_case),
        "seconds": round(seconds, 1),
        "spacing_not_1mm": run.other_spacing,
        "summary_line": line,
        "written": sorted(run.written),
    }
    run.mine.append(RUN_JSON)
    write_text_atomic(run.staging / RUN_JSON, json.dumps(record, indent=1))
    run.written.append(RUN_JSON)
    return line


def _complete(run: _Run) -> None:
    """The staging folder's own records go, then it becomes output_dir."""
    remove_path(run.staging / CASES_DONE)
    remove_path(run.staging / RESUME_JSON)
    replace_folder(run.staging, run.out)


def _discard(run: _Run) -> None:
    """After an error: what this run wrote goes (the staging folder, when this
    run made it; else only what it added to an earlier run's)."""
    if run.created:
        remove_path(run.staging)
    else:
        for name in run.mine:
            remove_path(run.staging / name)


def _log_outputs(run: _Run) -> None:
    """Warns of cases not on a 1 mm grid; logs what was read and written."""
    n, out = run.n, run.out
    if run.other_spacing:
        case_id, spacing = next(iter(run.other_spacing.items()))
        log.warning(
            "%d of %d case(s) have a voxel spacing other than 1 mm (e.g. %s: %s mm): "
            "their HD95 and volumes are in mm of that grid, not comparable with "
            "BraTS's 1 mm results; listed in %s",
            len(run.other_spacing),
            n,
            case_id,
            " x ".join(f"{z:g}" for z in spacing),
            out / RUN_JSON,
        )
    kinds = collections.Counter(name.split("/")[0] for name in run.written)
    log.info(
        "read %d case(s) from %s%s; wrote to %s: %s",
        n,
        run.config.data,
        f" ({run.resumed} of them done by the interrupted run)" if run.resumed else "",
        out,
        ", ".join(
            f"{k}/ ({v})" if k in (PREDICTIONS, PROBABILITIES, FIGURES) else k
            for k, v in sorted(kinds.items())
        ),
    )
