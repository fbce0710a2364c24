"""Runs every benchmark and writes one table: benchmarks/results.json and
benchmarks/RESULTS.md (docs/performance.md quotes the latter).

  make bench                                    # = python benchmarks/run_all.py
  python benchmarks/run_all.py --quick          # 64^3 step + inference + input only

Each benchmark runs as its own process (its own peak memory) one after the
other; run it on an otherwise idle machine, as the figures are wall-clock
times. The targets are checked and printed as met / NOT met; GPU rows come
from the JSONs of runs on GPU machines (benchmarks/gpu_runs/, see
benchmarks/gpu.md) and are otherwise left "not measured".
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from benchmarks.machine import cpu_has_bf16, describe
from data_pipeline.io_utils import write_json_atomic, write_text_atomic

FLAGS = flags.FLAGS
flags.DEFINE_boolean("quick", False, "Skip the paper-crop training steps (~4 min each).")
flags.DEFINE_boolean(
    "render_only",
    False,
    "Only re-make RESULTS.md from out_dir/results.json "
    "(e.g. after adding GPU rows to it by hand from benchmarks/gpu.md runs).",
)
flags.DEFINE_string(
    "out_dir", os.path.dirname(os.path.abspath(__file__)), "Where results.json and RESULTS.md go."
)
flags.DEFINE_string(
    "readme",
    None,
    "The README whose speed table (between its markers) is "
    "made anew; default: the README.md beside out_dir (the repository's).",
)
flags.DEFINE_string(
    "gpu_dir",
    None,
    "GPU runs (model_step.py / full_volume_inference.py JSON, "
    "each with a 'gpu' name added) to add to the table; default: "
    "out_dir/gpu_runs (benchmarks/gpu.md).",
)

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = {
    "step_fraction_of_matmul": 0.65,
    "recompute_peak_gib": 8.0 * 1e9 / 2**30,  # 8 GB
    "inference_seconds": 15.0,
    "inference_peak_gib": 4.0 * 1e9 / 2**30,  # 4 GB
    "input_cases_per_s": 4.0,
    "gpu_step_seconds": 0.25,  # one H100, mixed_float16, paper crop
    "gpu_inference_seconds": 0.1,
    "gpu_memory_gib": 16.0 * 1e9 / 2**30,  # 16 GB
}


def _run(script: str, *args: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [sys.executable, os.path.join(HERE, script), f"--json_out={out}", *args]
        print("$", " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, check=False)
        if proc.returncode:
            sys.exit(f"run_all: {script} {' '.join(args)} failed with exit code {proc.returncode}")
        with open(out) as f:
            return json.load(f)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def measure() -> dict:
    """Runs every benchmark; returns the results.json content."""
    steps = []
    steps += _run("model_step.py", "--crops=64,64,64", "--steps=5")["results"]
    if not FLAGS.quick:
        steps += _run("model_step.py", "--crops=160,192,128", "--steps=2")["results"]
        for extra in (["--recompute_levels=1"], ["--recompute_levels=2"], ["--recompute_levels=4"]):
            steps += _run("model_step.py", "--crops=160,192,128", "--steps=1", *extra)["results"]
    inference = _run("full_volume_inference.py")["results"]
    if cpu_has_bf16():  # AMX / AVX512-BF16: the bfloat16 inference of evaluate.py --precision
        inference += _run(
            "full_volume_inference.py",
            "--configs=keras:crop@mixed_bfloat16,saved_model:crop@mixed_bfloat16",
        )["results"]
    pipeline = _run("input_pipeline.py", "--epochs=3")
    return {
        "machine": describe(),
        "date": datetime.date.today().isoformat(),
        "steps": steps,
        "inference": inference,
        "input_pipeline": pipeline,
    }


def load_gpu_runs(gpu_dir: str) -> list[dict]:
    """The GPU runs' JSON files in gpu_dir (none: an empty list), by name."""
    if not os.path.isdir(gpu_dir):
        return []
    runs = []
    for name in sorted(os.listdir(gpu_dir)):
        if name.endswith(".json"):
            with open(os.path.join(gpu_dir, name)) as f:
                runs.append(json.load(f))
    return runs


def _gpu_rows(runs: list[dict]) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Table rows of the GPU runs (the targets are for one H100), and notes."""
    rows, notes = [], []
    for run in runs:
        gpu = run["gpu"]
        h100 = "H100" in gpu
        note = ""
        if run.get("note"):
            notes.append(f"{'*' * (len(notes) + 1)} {run['note']}")
            note = " " + "\\*" * len(notes)
        for r in run["results"]:
            if "sec_per_step" in r:
                cap = r.get("gpu_memory_limit_mb")
                name = (
                    f"GPU {gpu}: training step {r['crop']}, width {r['init_filters']}, "
                    f"{r['precision']}"
                    + (", XLA" if r.get("jit_compile") else "")
                    + (
                        f", recompute {r['recompute_levels']} level(s)"
                        if r["recompute_levels"]
                        else ""
                    )
                    + (f", memory capped at {cap} MB" if cap else "")
                )
                result = f"{r['sec_per_step']:.3f} s/step (GPU peak {r['gpu_peak_gib']:.1f} GiB)"
                target = "— (the targets are for an H100)"
                if h100 and cap:  # TensorFlow's cap is in MiB; 16 GB cards hold ~16000
                    target = "trains within 16 GB: " + _met(
                        r["gpu_peak_gib"] <= TARGETS["gpu_memory_gib"]
                    )
                elif h100:
                    target = f"≤ {TARGETS['gpu_step_seconds']} s: " + _met(
                        r["sec_per_step"] <= TARGETS["gpu_step_seconds"]
                    )
            else:
                name = (
                    f"GPU {gpu}: inference {r['input']}, {r['path']}, "
                    f"{'brain box' if r['crop_to_brain'] else 'whole volume'} "
                    f"({r['network_input']}), {r['precision']}"
                    f"{', TTA 8 flips' if r['tta'] else ''}"
                )
                result = (
                    f"{r['seconds']:.3f} s/case (first call {r['first_call_s']:.1f} s; "
                    f"GPU peak {r['gpu_peak_gib']:.1f} GiB)"
                )
                if r.get("seconds_aligned_input") is not None:  # in runs recorded until 2026-11
                    result += (
                        f"; from 64-byte aligned memory (no host copy) "
                        f"{r['seconds_aligned_input']:.3f} s"
                    )
                if r.get("parts"):  # full_volume_inference.py --breakdown
                    p = r["parts"]
                    result += (
                        f"; apart: host copies {p['host_tensor_s'] + p['to_device_s']:.3f}"
                        f", pre {p['preprocess_s']:.3f}, network {p['network_s']:.3f}, "
                        f"post {p['postprocess_s']:.3f} s"
                    )
                target = "— (the targets are for an H100)"
                if h100 and not r["tta"]:
                    target = f"≤ {TARGETS['gpu_inference_seconds']} s: " + _met(
                        r["seconds"] <= TARGETS["gpu_inference_seconds"]
                    )
                elif h100:
                    target = "—"
            rows.append((name + note, result, f"{r['peak_rss_gib']:.1f} GiB", target))
    return rows, notes


def render(results: dict, gpu_runs: list[dict] | None = None) -> str:
    """The Markdown table of results.json, each row with its target."""
    rows = []
    for r in results["steps"]:
        if r["recompute_levels"]:  # recomputation is extra work, not counted in the FLOPs
            target = f"peak ≤ 8 GB: {_met(r['peak_rss_gib'] <= TARGETS['recompute_peak_gib'])}"
        else:
            target = (
                f"≥ {TARGETS['step_fraction_of_matmul']:.0%} of matmul: "
                f"{_met(r['fraction_of_matmul'] >= TARGETS['step_fraction_of_matmul'])}"
            )
        rows.append(
            (
                f"training step {r['crop']}, width {r['init_filters']}, {r['precision']}"
                + (f", recompute {r['recompute_levels']} level(s)" if r["recompute_levels"] else "")
                # in runs recorded until 2026-11 (the option is gone)
                + (", system allocator" if r.get("system_allocator") else ""),
                f"{r['sec_per_step']:.2f} s/step, {r['gflops']:.0f} GFLOP/s = "
                f"{100 * r['fraction_of_matmul']:.1f}% of matmul "
                f"({r['matmul_gflops']:.0f}"
                + (
                    f"; against the product at the start "
                    f"{100 * r['fraction_of_start_matmul']:.0f}% of "
                    f"{r['start_matmul_gflops']:.0f}"
                    if r.get("fraction_of_start_matmul") is not None
                    else ""
                )
                + (
                    f"; NumPy's {r['numpy_matmul_gflops']:.0f}: "
                    f"{100 * r['gflops'] / r['numpy_matmul_gflops']:.0f}%)"
                    if r.get("numpy_matmul_gflops")
                    else ")"
                ),
                f"{r['peak_rss_gib']:.1f} GiB",
                target,
            )
        )
    for r in results["inference"]:
        name = (
            f"inference {r['input']}, {r['path']}, "
            f"{'brain box' if r['crop_to_brain'] else 'whole volume'} "
            f"({r['network_input']}){', TTA 8 flips' if r['tta'] else ''}"
            + (f", {r['precision']}" if r.get("precision", "float32") != "float32" else "")
        )
        target = "—"
        if not r["tta"]:
            ok = (
                r["seconds"] <= TARGETS["inference_seconds"]
                and r["peak_rss_gib"] <= TARGETS["inference_peak_gib"]
            )
            target = f"≤ 15 s and ≤ 4 GB: {_met(ok)}"
        rows.append(
            (
                name,
                f"{r['seconds']:.1f} s/case (first call {r['first_call_s']:.1f} s)",
                f"{r['peak_rss_gib']:.1f} GiB",
                target,
            )
        )
    pipeline = results["input_pipeline"]
    rows.append(
        (
            f"input pipeline, {pipeline['crop']} crops of {pipeline['case_shape']} + augmentation",
            f"{pipeline['train_cases_per_s']:.1f} cases/s "
            f"({pipeline['train_cached_cases_per_s']:.1f} cached)",
            "—",
            f"≥ 4 cases/s: {_met(pipeline['train_cases_per_s'] >= 4)}",
        )
    )

    gpu_rows, gpu_notes = _gpu_rows(gpu_runs or [])
    rows += gpu_rows
    if not gpu_runs and not any(
        r.get("device", "CPU") != "CPU" for r in results["steps"] + results["inference"]
    ):
        why = "not measured: no GPU runs in gpu_runs/ (benchmarks/gpu.md)"
        rows += [
            (
                "GPU: training step 160x192x128, width 32, mixed_float16, one H100",
                why,
                "—",
                "≤ 0.25 s",
            ),
            ("GPU: full-volume inference, one H100", why, "—", "≤ 0.1 s"),
            ("GPU: paper config + recompute within 16 GB of GPU memory", why, "—", "fits"),
        ]
    lines = [
        f"Measured {results['date']} on {results['machine']} (`python benchmarks/run_all.py`).",
        "",
        "| benchmark | result | peak RSS | target |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    if gpu_runs:
        dates = ", ".join(sorted({run["date"] for run in gpu_runs}))
        lines += [
            "",
            f"GPU rows: measured {dates} on GPU machines (16 CPU cores; "
            f"{gpu_runs[0].get('software', 'TensorFlow')}); each run's JSON and "
            f"command is in benchmarks/gpu_runs/, how in benchmarks/gpu.md. Peak RSS "
            f"there is the host process's.",
        ]
        for n in gpu_notes:
            lines += ["", n.replace("*", "\\*", n.index(" "))]
    if any(r.get("fraction_of_start_matmul") is not None for r in results["steps"]):
        lines += [
            "",
            "Training steps: each step's GFLOP/s against the float32 matrix product "
            "timed just before or just after it, whichever was faster; the median "
            "over the steps (benchmarks/model_step.py), and against the product "
            "timed once at the start.",
        ]
    for note in results.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


README_BEGIN = "<!-- speed table: made by benchmarks/run_all.py from results.json and gpu_runs/ -->"
README_END = "<!-- end of the speed table -->"


def speed_table(results: dict, gpu_runs: list[dict] | None = None) -> str:
    """README's speed table: the paper crop's float32 training step and the
    SavedModel's brain-box inference of one case on the CPU of results.json,
    each GPU run's mixed_float16 step and inference, and the paper's V100."""

    def cpu_step():
        for r in results["steps"]:
            if (
                r["crop"] == "160x192x128"
                and not r["recompute_levels"]
                and r["precision"] == "float32"
                and not r.get("system_allocator")
            ):
                return (
                    f"{r['sec_per_step']:.1f} s ({100 * r['fraction_of_matmul']:.0f}% of "
                    f"the matrix product)"
                )
        return "not measured"

    def inference(rows, digits):
        found = {
            r.get("precision", "float32"): r["seconds"]
            for r in rows
            if r["path"] == "saved_model" and r["crop_to_brain"] and not r["tta"]
        }
        text = f"{found['float32']:.{digits}f} s" if "float32" in found else ""
        low = [
            f"{p.split('_')[1]}: {s:.{digits}f} s"
            for p, s in sorted(found.items())
            if p != "float32"
        ]
        return text + (f" ({', '.join(low)})" if low else "") or "not measured"

    lines = [
        "| machine, date | training step | inference of one case |",
        "|---|---|---|",
        f"| {results['machine']}, float32, {results['date']} | {cpu_step()} | "
        f"{inference(results['inference'], 1)} |",
    ]
    by_gpu: dict[str, list] = {}
    for run in sorted(gpu_runs or [], key=lambda run: run["date"]):  # the latest last
        by_gpu.setdefault(run["gpu"], []).extend((run["date"], r) for r in run["results"])
    for gpu, measured in by_gpu.items():
        latest = {}  # kind -> (date, text), the latest measurement of each kind
        for date, r in measured:
            if "sec_per_step" in r:
                if r["recompute_levels"] or r.get("gpu_memory_limit_mb"):
                    continue
                kind = "xla" if r.get("jit_compile") else "step"
                text = f"{r['sec_per_step']:.3f} s"
            elif r["path"] == "saved_model" and r["crop_to_brain"] and not r["tta"]:
                kind, text = "inference", f"{r['seconds']:.3f} s"
            else:
                continue
            latest[kind] = (date, text)
        step = "; ".join(
            ([latest["step"][1]] if "step" in latest else [])
            + ([f"with XLA {latest['xla'][1]}"] if "xla" in latest else [])
        )
        dates = sorted({date for date, _ in latest.values()})
        lines.append(
            f"| {gpu}, mixed_float16, {', '.join(dates)} | {step or '—'} | "
            f"{latest['inference'][1] if 'inference' in latest else '—'} |"
        )
    lines.append("| the paper: NVIDIA V100 | 1.9 s | 0.4 s |")
    return "\n".join(lines) + "\n"


def update_readme(path: str, table: str) -> bool:
    """Replaces the speed table between README_BEGIN and README_END in
    ``path``; False (nothing written) where the markers are missing."""
    with open(path) as f:
        text = f.read()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        return False
    write_text_atomic(path, text[: begin + len(README_BEGIN)] + "\n" + table + text[end:])
    return True


def main(argv):
    del argv
    json_path = os.path.join(FLAGS.out_dir, "results.json")
    if FLAGS.render_only:
        with open(json_path) as f:
            results = json.load(f)
    else:
        results = measure()
        os.makedirs(FLAGS.out_dir, exist_ok=True)
        write_json_atomic(json_path, results)
    table = render(results, load_gpu_runs(FLAGS.gpu_dir or os.path.join(FLAGS.out_dir, "gpu_runs")))
    write_text_atomic(os.path.join(FLAGS.out_dir, "RESULTS.md"), table)
    print(table)
    print(f"wrote {json_path} and RESULTS.md")
    # The README beside out_dir (the repository's, for benchmarks/), if any.
    readme = FLAGS.readme or os.path.join(
        os.path.dirname(os.path.abspath(FLAGS.out_dir)), "README.md"
    )
    gpu_runs = load_gpu_runs(FLAGS.gpu_dir or os.path.join(FLAGS.out_dir, "gpu_runs"))
    if os.path.isfile(readme) and update_readme(readme, speed_table(results, gpu_runs)):
        print(f"updated the speed table in {readme}")


if __name__ == "__main__":
    app.run(main)
