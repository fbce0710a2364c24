"""The tables of an evaluation: per_case.csv (a row per case), summary.csv
and summary.json (the BraTS server's statistics per region and metric, §4),
and the one-line summary that evaluate.py prints."""

from __future__ import annotations

import csv
import io
import json
import pathlib

import numpy as np

from brats_tf import inference, metrics
from brats_tf.evaluation.config import PER_CASE_CSV, SUMMARY_CSV, SUMMARY_JSON
from data_pipeline import constants
from data_pipeline.io_utils import write_text_atomic

TABLES = (PER_CASE_CSV, SUMMARY_CSV, SUMMARY_JSON)


def _columns():
    return ["case_id"] + [f"{region}_{m}" for region in constants.REGIONS for m in metrics.METRICS]


def per_case_rows(results: dict) -> list[dict]:
    """{case_id: case_metrics} -> CSV rows (case_id, then <region>_<metric>)."""
    rows = []
    for case_id, scores in results.items():
        row = {"case_id": case_id}
        for region in constants.REGIONS:
            for m in metrics.METRICS:
                row[f"{region}_{m}"] = scores[region][m]
        rows.append(row)
    return rows


def _csv_text(header, rows) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                k: (repr(float(v)) if isinstance(v, (float, np.floating)) else v)
                for k, v in row.items()
            }
        )
    return buffer.getvalue()


def summary_rows(summary: dict) -> list[dict]:
    """summarize() -> rows (statistic, <region>_<metric>...), as the BraTS server's table."""
    rows = []
    for stat in metrics.STATISTICS:
        row = {"statistic": stat}
        for region in constants.REGIONS:
            for m in metrics.METRICS:
                row[f"{region}_{m}"] = summary[region][m][stat]
        rows.append(row)
    return rows


def write_tables(
    folder: pathlib.Path, per_case: dict, summary: dict, num_cases: int, protocol: dict
) -> None:
    """Writes the ``TABLES`` of ``per_case`` ({case_id: case_metrics}) and
    its ``summary`` (``metrics.summarize``) into ``folder``."""
    write_text_atomic(folder / PER_CASE_CSV, _csv_text(_columns(), per_case_rows(per_case)))
    write_text_atomic(
        folder / SUMMARY_CSV, _csv_text(["statistic"] + _columns()[1:], summary_rows(summary))
    )
    write_text_atomic(
        folder / SUMMARY_JSON,
        json.dumps(
            {
                "num_cases": num_cases,
                "protocol": protocol,
                "statistics": list(metrics.STATISTICS),
                "summary": summary,
            },
            indent=1,
        ),
    )


def one_line_summary(summary: dict | None, n: int, seconds: float, out: str, protocol: dict) -> str:
    """What evaluate.py prints at the end: the mean Dice and HD95 per region
    (without labels: where the predictions are), the time and the protocol."""
    how = inference.describe_protocol(protocol)
    if summary is None:
        return (
            f"evaluated {n} case(s) without labels in {seconds:.0f} s ({how}): predictions in {out}"
        )
    parts = [
        f"{r} Dice {summary[r]['dice']['mean']:.4f} HD95 {summary[r]['hd95']['mean']:.2f} mm"
        for r in constants.REGIONS
    ]
    return f"{n} case(s) in {seconds:.0f} s ({how}): " + " | ".join(parts) + f" -> {out}"
