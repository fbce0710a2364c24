"""Cross-validation of a recipe on real BraTS cases, fold by fold, with the user's commands.

    python benchmarks/real_cv.py --data_dir=real_output/tfrecord --out_dir=real_output/cv \\
        --folds=0,1,2,3,4 --record_dir=benchmarks/real_runs
    python benchmarks/real_cv.py ... -- --seed=3          # extra flags for train.py

For each fold k of the converter's split (the data's manifest.json), in
<out_dir>/fold_<k>:

1. ``train.py --flagfile=<--flagfile> --data_dir=... --fold=k`` (it resumes a
   stopped run; a finished one is left as it is), periodic validation on
   fold k as the flagfile says (``--validate_every``);
2. ``python -m brats_tf.postprocess --tta``: the ET post-processing's N chosen
   on the fold's training cases (every other fold), with TTA;
3. ``evaluate.py --fold=k``: the held-out cases as the single model, with TTA
   (the paper's 8 mirror flips), and with TTA and ET post-processing at that N.

Each step whose output is there already is skipped, so a stopped
cross-validation resumes where it was. The figures of a fold are recorded in
<record_dir>/fold_<k>.json (no image data: per-case scores, the protocol,
training time and curve, the machine) with its training curves
(fold_<k>_curves.png); <record_dir>/cv.json gathers every fold recorded so
far (per fold and mean Dice and HD95 per region and row; cv.md as a table) and
<record_dir>/heldout_vs_minutes.png draws each fold's held-out Dice against
its training minutes. Records are small and meant to be committed; the
models, predictions and TFRecords stay in --out_dir.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from data_pipeline.checks import int_flag_list
from data_pipeline.constants import REGIONS
from data_pipeline.io_utils import write_json_atomic, write_text_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("single", "tta", "tta_post")
ROW_TITLES = {
    "single": "single model",
    "tta": "single model + TTA",
    "tta_post": "single model + TTA + ET post-processing",
}

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("data_dir", None, "The converter's TFRecord folder (manifest.json).")
    flags.DEFINE_string("out_dir", None, "Models and evaluations, one folder per fold.")
    flags.DEFINE_list("folds", ["0"], "Folds to run (each: train on the others, test on it).")
    flags.DEFINE_string(
        "flagfile_recipe",
        os.path.join(ROOT, "configs", "real_cpu.flags"),
        "train.py's flagfile (the recipe).",
    )
    flags.DEFINE_string(
        "record_dir", None, "Where fold_<k>.json, cv.json and the figures go (default: <out_dir>)."
    )
    flags.DEFINE_boolean("post", True, "Also the TTA + ET post-processing row.")


def _run(args: list, log_path: str) -> float:
    """Runs a command, its output appended to log_path; seconds; exit on failure."""
    start = time.monotonic()
    print(f"$ {' '.join(str(a) for a in args)}", flush=True)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(str(a) for a in args)}\n")
        log.flush()
        rc = subprocess.call([str(a) for a in args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc:
        with open(log_path) as f:
            tail = f.read().strip().splitlines()[-1:]
        sys.exit(
            f"real_cv.py: error: exit {rc} from {args[1]} (log {log_path}): "
            f"{tail[0] if tail else ''}"
        )
    return time.monotonic() - start


def _evaluated(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "summary.json"))


def run_fold(fold: int, train_args: list[str]) -> dict:
    """Trains, chooses N, evaluates fold ``fold``; returns its record."""
    py = sys.executable
    fold_dir = os.path.join(FLAGS.out_dir, f"fold_{fold}")
    model_dir = os.path.join(fold_dir, "model")
    log_path = os.path.join(FLAGS.out_dir, f"fold_{fold}.log")
    os.makedirs(fold_dir, exist_ok=True)
    _run(
        [
            py,
            "train.py",
            f"--flagfile={FLAGS.flagfile_recipe}",
            f"--data_dir={FLAGS.data_dir}",
            f"--model_dir={model_dir}",
            f"--fold={fold}",
            "--noverbose",
            *train_args,
        ],
        log_path,
    )
    evals = {
        "single": os.path.join(fold_dir, "eval_single"),
        "tta": os.path.join(fold_dir, "eval_tta"),
    }
    common = [f"--model={model_dir}", f"--data={FLAGS.data_dir}", f"--fold={fold}", "--noprogress"]
    et_min_voxels = None
    if FLAGS.post:
        choice = os.path.join(fold_dir, "et_min_voxels_tta.json")
        if not os.path.isfile(choice):
            _run(
                [
                    py,
                    "-m",
                    "brats_tf.postprocess",
                    f"--model={model_dir}",
                    f"--data={FLAGS.data_dir}",
                    "--tta",
                    f"--output={choice}",
                    "--noprogress",
                ],
                log_path,
            )
        with open(choice) as f:
            et_min_voxels = int(json.load(f)["et_min_voxels"])
        evals["tta_post"] = os.path.join(fold_dir, f"eval_tta_et{et_min_voxels}")
    extra = {
        "single": [],
        "tta": ["--tta"],
        "tta_post": ["--tta", f"--et_min_voxels={et_min_voxels}"],
    }
    for row, folder in evals.items():
        if not _evaluated(folder):
            _run(
                [py, "evaluate.py", *common, *extra[row], f"--output_dir={folder}", "--overwrite"],
                log_path,
            )
    return fold_record(fold, model_dir, evals, et_min_voxels)


def _per_case(folder: str) -> dict:
    with open(os.path.join(folder, "per_case.csv")) as f:
        return {
            row["case_id"]: {
                r: {"dice": float(row[f"{r}_dice"]), "hd95": float(row[f"{r}_hd95"])}
                for r in REGIONS
            }
            for row in csv.DictReader(f)
        }


def fold_record(fold: int, model_dir: str, evals: dict, et_min_voxels) -> dict:
    with open(os.path.join(model_dir, "history.json")) as f:
        history = json.load(f)
    with open(os.path.join(model_dir, "flags.txt")) as f:
        train_flags = [line.strip() for line in f if line.strip()]
    minutes, curve = 0.0, []
    for h in history:
        minutes += h["seconds"] / 60.0
        point = {"epoch": h["epoch"], "training_minutes": round(minutes, 2)}
        point.update({f"train_dice_{r}": round(h[f"dice_{r}"], 4) for r in REGIONS})
        point.update(
            {
                f"heldout_dice_{r}": round(h[f"val_dice_{r}"], 4)
                for r in REGIONS
                if f"val_dice_{r}" in h
            }
        )
        curve.append(point)
    rows = {}
    for row, folder in evals.items():
        with open(os.path.join(folder, "summary.json")) as f:
            summary = json.load(f)
        rows[row] = {
            "title": ROW_TITLES[row],
            "protocol": summary["protocol"],
            "mean": {
                r: {m: summary["summary"][r][m]["mean"] for m in ("dice", "hd95")} for r in REGIONS
            },
            "per_case": _per_case(folder),
        }
    from benchmarks.machine import describe

    return {
        "fold": fold,
        "heldout_cases": sorted(rows["single"]["per_case"]),
        "train": {
            "flags": train_flags,
            "epochs": len(history),
            "training_minutes": round(minutes, 1),
            "seconds_per_epoch_median": sorted(h["seconds"] for h in history)[len(history) // 2],
            "curve": curve,
        },
        "et_min_voxels": et_min_voxels,
        "rows": rows,
        "machine": describe(),
        "date": time.strftime("%Y-%m-%d"),
    }


def read_records(record_dir: str) -> list[dict]:
    """Every fold_<k>.json in record_dir, in file-name order."""
    records = []
    for path in sorted(glob.glob(os.path.join(record_dir, "fold_*.json"))):
        with open(path) as f:
            records.append(json.load(f))
    return records


def gather(record_dir: str) -> dict:
    """cv.json: every fold_<k>.json in record_dir, per fold and over all."""
    folds = read_records(record_dir)
    result = {"folds": [f["fold"] for f in folds], "rows": {}}
    for row in ROWS:
        have = [f for f in folds if row in f["rows"]]
        if not have:
            continue
        cases = {c: v for f in have for c, v in f["rows"][row]["per_case"].items()}
        result["rows"][row] = {
            "title": ROW_TITLES[row],
            "per_fold": {str(f["fold"]): f["rows"][row]["mean"] for f in have},
            "mean_of_folds": {
                r: {
                    m: sum(f["rows"][row]["mean"][r][m] for f in have) / len(have)
                    for m in ("dice", "hd95")
                }
                for r in REGIONS
            },
            "mean_of_cases": {
                r: {m: sum(v[r][m] for v in cases.values()) / len(cases) for m in ("dice", "hd95")}
                for r in REGIONS
            },
            "num_cases": len(cases),
        }
    result["training_minutes"] = {str(f["fold"]): f["train"]["training_minutes"] for f in folds}
    return result


def markdown(cv: dict) -> str:
    """cv.json as a Markdown table: per row of the protocol, each fold's and the
    mean over folds' Dice WT / TC / ET and HD95 (mm)."""
    lines = ["| row | folds | Dice WT / TC / ET | HD95 WT / TC / ET (mm) |", "|---|---|---|---|"]
    for values in cv["rows"].values():
        cells = [(f"fold {k}", m) for k, m in values["per_fold"].items()]
        cells.append(
            (
                f"mean of {len(values['per_fold'])} fold(s), {values['num_cases']} cases",
                values["mean_of_folds"],
            )
        )
        for name, m in cells:
            dice = " / ".join(f"{m[r]['dice']:.3f}" for r in REGIONS)
            hd95 = " / ".join(f"{m[r]['hd95']:.1f}" for r in REGIONS)
            lines.append(f"| {values['title']} | {name} | {dice} | {hd95} |")
    return "\n".join(lines) + "\n"


def heldout_figure(record_dir: str):
    """Held-out Dice (periodic validation) against training minutes, a line per fold."""
    from brats_tf.figures import line_panels

    records = read_records(record_dir)
    panels = []
    for r in REGIONS:
        series = []
        for rec in records:
            points = [p for p in rec["train"]["curve"] if f"heldout_dice_{r}" in p]
            series.append(
                (
                    f"FOLD {rec['fold']}",
                    [p["training_minutes"] for p in points],
                    [p[f"heldout_dice_{r}"] for p in points],
                )
            )
        panels.append((f"HELD-OUT DICE {r}", series, (0.0, 1.0)))
    return line_panels(
        panels,
        x_label="TRAINING MINUTES",
        cols=3,
        legend=["SINGLE MODEL  WHOLE VOLUME  NO TTA (TRAIN.PY --VALIDATE_EVERY)"],
    )


def main(argv):
    train_args = argv[1:]
    if not FLAGS.data_dir or not FLAGS.out_dir:
        sys.exit("real_cv.py: error: --data_dir and --out_dir are required")
    if not os.path.isfile(os.path.join(FLAGS.data_dir, "manifest.json")):
        sys.exit(f"real_cv.py: error: --data_dir={FLAGS.data_dir}: no manifest.json there")
    try:
        folds = list(int_flag_list("folds", FLAGS.folds, minimum=0))
    except ValueError as e:
        sys.exit(f"real_cv.py: error: {e}")
    record_dir = FLAGS.record_dir or FLAGS.out_dir
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    os.makedirs(record_dir, exist_ok=True)
    from brats_tf.figures import write_png

    for n, fold in enumerate(folds):
        print(f"[fold {fold}: {n + 1}/{len(folds)}]", flush=True)
        record = run_fold(fold, train_args)
        write_json_atomic(os.path.join(record_dir, f"fold_{fold}.json"), record)
        shutil.copyfile(
            os.path.join(FLAGS.out_dir, f"fold_{fold}", "model", "curves.png"),
            os.path.join(record_dir, f"fold_{fold}_curves.png"),
        )
        cv = gather(record_dir)
        write_json_atomic(os.path.join(record_dir, "cv.json"), cv)
        write_text_atomic(os.path.join(record_dir, "cv.md"), markdown(cv))
        write_png(heldout_figure(record_dir), os.path.join(record_dir, "heldout_vs_minutes.png"))
        for values in cv["rows"].values():
            print(
                f"  {values['title']} over folds {cv['folds']}: "
                + "  ".join(f"{r} {values['mean_of_folds'][r]['dice']:.3f}" for r in REGIONS),
                flush=True,
            )
    print(f"wrote {record_dir}/cv.json")


if __name__ == "__main__":
    define_flags()
    app.run(main)
