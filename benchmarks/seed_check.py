"""Does every seed learn every region? train.py's first epochs, seed by seed.

    python benchmarks/seed_check.py --out_dir=/tmp/seeds_demo --seeds=0-9 --epochs_watched=4 \\
        -- --flagfile=configs/demo.flags --data_dir=demo_output/tfrecord
    python benchmarks/seed_check.py --out_dir=/tmp/seeds_real --seeds=0-4 --epochs_watched=4 \\
        -- --flagfile=configs/real_cpu.flags --data_dir=real_output/tfrecord

Everything after ``--`` goes to train.py as it is (the recipe under test,
its data and options); this tool adds ``--seed=K --model_dir=<out_dir>/seed_K
--noexport --noverbose``. Each seed runs train.py in its own process with the
full recipe (the learning-rate schedule of the flagfile's --epochs), and is
stopped once its history.json holds --epochs_watched epochs: a sigmoid that
saturates does so in the first steps and never recovers (docs/demo_runs.md,
"The ensemble"), so the first epochs tell. A seed has learned a region when
that region's training Dice (history.json's dice_<region>, the mean over the
epoch's crops, thresholded at 0.5) in the last watched epoch is at least
brats_tf.training.UNLEARNED_DICE (0.1), train.py's own warning threshold.

A rerun reuses a seed whose folder already holds enough epochs (and resumes
one that was stopped early: train.py resumes from its checkpoint). Writes
<out_dir>/seed_check.json: per seed, the per-epoch history and the verdict;
and prints a table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from data_pipeline.constants import REGIONS
from data_pipeline.io_utils import write_json_atomic

UNLEARNED_DICE = 0.1  # brats_tf.training.UNLEARNED_DICE (tested equal; no TensorFlow import)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("out_dir", None, "One model_dir per seed, and seed_check.json.")
    flags.DEFINE_string("seeds", "0-4", "Seeds: a range A-B (inclusive) or a comma list.")
    flags.DEFINE_integer(
        "epochs_watched", 4, "Epochs of each seed's run before it is stopped.", lower_bound=1
    )
    flags.DEFINE_float(
        "timeout_s",
        3600.0,
        "Per seed: stop waiting after this many seconds (recorded as a timeout).",
        lower_bound=1.0,
    )


def parse_seeds(text: str) -> list[int]:
    """'0-9' -> [0, ..., 9]; '0,3,4' -> [0, 3, 4]; ValueError quoting the text."""
    try:
        if "-" in text.strip("-"):
            first, last = (int(v) for v in text.split("-"))
            if last < first:
                raise ValueError
            return list(range(first, last + 1))
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds must be A-B or a comma list of integers, got {text!r}") from None


def read_history(model_dir: str) -> list[dict]:
    path = os.path.join(model_dir, "history.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # not yet written (or being replaced): none so far
        return []


def verdict(history: list[dict], threshold: float = UNLEARNED_DICE) -> dict:
    """{"learned": bool, "unlearned": [regions], "last": {region: Dice}} from the
    last epoch of ``history``."""
    last = {r: float(history[-1][f"dice_{r}"]) for r in REGIONS} if history else {}
    unlearned = [r for r in REGIONS if not history or last[r] < threshold]
    return {"learned": not unlearned, "unlearned": unlearned, "last": last}


def run_seed(seed: int, out_dir: str, train_args: list[str], epochs: int, timeout_s: float) -> dict:
    """train.py for one seed until its history holds ``epochs`` epochs (or it ends)."""
    model_dir = os.path.join(out_dir, f"seed_{seed}")
    history = read_history(model_dir)
    log_path = os.path.join(out_dir, f"seed_{seed}.log")
    start = time.monotonic()
    status = "reused"
    if len(history) < epochs:
        cmd = [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            *train_args,
            f"--seed={seed}",
            f"--model_dir={model_dir}",
            "--noexport",
            "--noverbose",
        ]
        with open(log_path, "a") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            status = "watched"
            while proc.poll() is None:
                if len(read_history(model_dir)) >= epochs:
                    proc.terminate()
                    break
                if time.monotonic() - start > timeout_s:
                    proc.terminate()
                    status = "timeout"
                    break
                time.sleep(2.0)
            rc = proc.wait()
        history = read_history(model_dir)
        if status == "watched" and len(history) < epochs:
            status = f"train.py exited {rc} after {len(history)} epochs (see {log_path})"
    history = history[:epochs]
    return {
        "seed": seed,
        "model_dir": model_dir,
        "status": status,
        "wall_s": round(time.monotonic() - start, 1),
        "history": history,
        **verdict(history),
    }


def table(results: list[dict]) -> str:
    head = "| seed | " + " | ".join(f"{r} Dice per epoch" for r in REGIONS) + " | learned |"
    rows = [head, "|" + "---|" * (len(REGIONS) + 2)]
    for res in results:
        cells = [" ".join(f"{h[f'dice_{r}']:.2f}" for h in res["history"]) for r in REGIONS]
        mark = "yes" if res["learned"] else "NO: " + ", ".join(res["unlearned"])
        rows.append(f"| {res['seed']} | " + " | ".join(cells) + f" | {mark} |")
    return "\n".join(rows)


def main(argv):
    train_args = argv[1:]
    if not FLAGS.out_dir:
        sys.exit("seed_check.py: error: --out_dir is required")
    if not train_args:
        sys.exit(
            "seed_check.py: error: give train.py's flags after --, e.g. "
            "-- --flagfile=configs/demo.flags --data_dir=demo_output/tfrecord"
        )
    try:
        seeds = parse_seeds(FLAGS.seeds)
    except ValueError as e:
        sys.exit(f"seed_check.py: error: {e}")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    results = []
    for n, seed in enumerate(seeds):
        res = run_seed(seed, FLAGS.out_dir, train_args, FLAGS.epochs_watched, FLAGS.timeout_s)
        results.append(res)
        print(
            f"[{n + 1}/{len(seeds)}] seed {seed}: {res['status']}, "
            f"{'learned' if res['learned'] else 'NOT learned: ' + ', '.join(res['unlearned'])}"
            f" ({res['wall_s']:.0f} s)",
            flush=True,
        )
        write_json_atomic(
            os.path.join(FLAGS.out_dir, "seed_check.json"),
            {
                "train_args": train_args,
                "epochs_watched": FLAGS.epochs_watched,
                "threshold": UNLEARNED_DICE,
                "results": results,
                "learned": sum(r["learned"] for r in results),
                "seeds": len(results),
            },
        )
    print(table(results))
    print(f"{sum(r['learned'] for r in results)}/{len(results)} seeds learned every region")


if __name__ == "__main__":
    define_flags()
    app.run(main)
