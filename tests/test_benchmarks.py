"""benchmarks/run_all.py's table: each figure checked against its target
(no timing here: the figures are made up, the verdicts are what is tested)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _step(crop, fraction, rss, levels=0):
    return {
        "crop": crop,
        "init_filters": 32,
        "precision": "float32",
        "recompute_levels": levels,
        "sec_per_step": 1.0,
        "gflops": 100.0,
        "fraction_of_matmul": fraction,
        "matmul_gflops": 300.0,
        "peak_rss_gib": rss,
        "device": "CPU",
    }


def _inference(seconds, rss, tta=False):
    return {
        "path": "keras",
        "crop_to_brain": True,
        "tta": tta,
        "input": "240x240x155x4",
        "network_input": "136x184x136",
        "seconds": seconds,
        "first_call_s": seconds + 1,
        "peak_rss_gib": rss,
        "device": "CPU",
    }


def _render(tmp_path, results, row_prefix):
    """run_all.py --render_only over ``results`` (and tmp_path/gpu_runs, if
    any); returns RESULTS.md and the target column of its rows that start
    with ``row_prefix`` (the header row left out)."""
    (tmp_path / "results.json").write_text(json.dumps(results))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run_all.py"),
            "--render_only",
            f"--out_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "RESULTS.md").read_text()
    verdicts = [
        line.rsplit("|", 2)[1].strip()
        for line in table.splitlines()
        if line.startswith(row_prefix) and not line.startswith("| benchmark")
    ]
    return table, verdicts


def test_render_only_marks_each_target(tmp_path):
    results = {
        "machine": "test machine",
        "date": "2026-01-01",
        "steps": [
            _step("64x64x64", 0.65, 2.0),
            _step("160x192x128", 0.649, 16.0),
            _step("160x192x128", 0.5, 7.4, levels=1),  # 7.4 GiB = 7.95 GB
            _step("160x192x128", 0.5, 7.5, levels=2),
        ],  # 7.5 GiB = 8.05 GB
        "inference": [
            _inference(15.0, 3.7),
            _inference(15.1, 1.0),
            _inference(1.0, 3.8),
            _inference(99.0, 99.0, tta=True),
        ],
        "input_pipeline": {
            "crop": "160x192x128",
            "case_shape": "240x240x155",
            "train_cases_per_s": 3.9,
            "train_cached_cases_per_s": 9.0,
        },
    }
    table, verdicts = _render(tmp_path, results, "| ")
    assert verdicts[:9] == [
        "≥ 65% of matmul: met",
        "≥ 65% of matmul: NOT met",
        "peak ≤ 8 GB: met",
        "peak ≤ 8 GB: NOT met",
        "≤ 15 s and ≤ 4 GB: met",
        "≤ 15 s and ≤ 4 GB: NOT met",
        "≤ 15 s and ≤ 4 GB: NOT met",
        "—",
        "≥ 4 cases/s: NOT met",
    ]
    assert "not measured" in table  # no GPU rows in the results: marked, not invented
    assert json.loads((tmp_path / "results.json").read_text()) == results  # input untouched
    # A row in another precision says which; float32 (and older rows) do not.
    results["inference"] = [
        _inference(4.0, 3.0),
        {**_inference(4.0, 3.0), "precision": "mixed_bfloat16"},
    ]
    table, _ = _render(tmp_path, results, "| ")
    rows = [line for line in table.splitlines() if line.startswith("| inference")]
    assert ["mixed_bfloat16" in row for row in rows] == [False, True]


_PARSE_CHECK = """
from absl import app
from benchmarks.full_volume_inference import _parse
assert _parse("keras:crop", "float32") == {
    "path": "keras", "crop_to_brain": True, "tta": False, "precision": "float32"}
assert _parse("saved_model:full:tta@mixed_bfloat16", "float32") == {
    "path": "saved_model", "crop_to_brain": False, "tta": True, "precision": "mixed_bfloat16"}
for bad in ("keras:crop@bf16", "keras:box", "tf:crop", "keras:crop:tta:x"):
    try:
        _parse(bad, "float32")
    except app.UsageError as e:
        assert repr(bad) in str(e), e
    else:
        raise AssertionError(f"{bad!r} was accepted")
print("ok")
"""


def test_inference_configs_take_a_precision():
    # In a subprocess: the benchmark's absl flags would clash with evaluate.py's.
    proc = subprocess.run(
        [sys.executable, "-c", _PARSE_CHECK], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0 and proc.stdout.split() == ["ok"], proc.stderr[-2000:]


def _gpu_step(sec, peak, levels=0, cap=None):
    """A mixed_float16 training step row measured on a GPU."""
    return {
        **_step("160x192x128", 0.5, 3.0, levels),
        "precision": "mixed_float16",
        "sec_per_step": sec,
        "gpu_peak_gib": peak,
        "gpu_memory_limit_mb": cap,
    }


def _gpu_infer(sec, tta=False):
    """A mixed_float16 inference row measured on a GPU."""
    return {**_inference(sec, 5.0, tta), "precision": "mixed_float16", "gpu_peak_gib": 2.0}


def _write_gpu_runs(gpu):
    """An H100 run near each target (a.json) and an H200 run (b.json) in gpu."""
    step, infer = _gpu_step, _gpu_infer
    for name, gpu_name, runs in [
        (
            "a.json",
            "NVIDIA H100 80GB HBM3",
            [
                step(0.25, 12.0),
                step(0.26, 12.0),
                step(0.3, 14.9, 2, 16000),
                step(0.3, 15.0, 2, 16000),
                infer(0.1),
                infer(0.11),
                infer(0.5, tta=True),
            ],
        ),
        ("b.json", "NVIDIA H200", [step(0.1, 12.0)]),
    ]:
        (gpu / name).write_text(
            json.dumps({"gpu": gpu_name, "date": "2026-01-02", "results": runs})
        )


def _write_breakdown_run(gpu):
    """b.json: an H100 inference run with full_volume_inference.py --breakdown's parts."""
    parts = {
        "host_tensor_s": 0.02,
        "to_device_s": 0.01,
        "preprocess_s": 0.005,
        "network_s": 0.04,
        "postprocess_s": 0.003,
        "sum_s": 0.078,
    }
    (gpu / "b.json").write_text(
        json.dumps(
            {
                "gpu": "NVIDIA H100 80GB HBM3",
                "date": "2026-01-02",
                "results": [{**_gpu_infer(0.09), "parts": parts}],
            }
        )
    )


def test_gpu_runs_are_rows_with_the_h100_targets(tmp_path):
    """GPU runs (benchmarks/gpu_runs/*.json) become rows; the targets (step
    <= 0.25 s, inference <= 0.1 s, recompute under a GPU memory cap within
    16 GB) are judged for an H100 only."""
    results = {
        "machine": "test machine",
        "date": "2026-01-01",
        "steps": [],
        "inference": [],
        "input_pipeline": {
            "crop": "160x192x128",
            "case_shape": "240x240x155",
            "train_cases_per_s": 5.0,
            "train_cached_cases_per_s": 9.0,
        },
    }
    gpu = tmp_path / "gpu_runs"
    gpu.mkdir()
    _write_gpu_runs(gpu)
    table, verdicts = _render(tmp_path, results, "| GPU")
    assert verdicts == [
        "≤ 0.25 s: met",
        "≤ 0.25 s: NOT met",
        "trains within 16 GB: met",
        "trains within 16 GB: NOT met",
        "≤ 0.1 s: met",
        "≤ 0.1 s: NOT met",
        "—",
        "— (the targets are for an H100)",
    ]
    assert "not measured" not in table and "measured 2026-01-02" in table
    # full_volume_inference.py --breakdown: the parts timed apart.
    _write_breakdown_run(gpu)
    table, _ = _render(tmp_path, results, "| GPU")
    assert "apart: host copies 0.030, pre 0.005, network 0.040, post 0.003 s" in table


def test_memory_profile_without_xprof_fails_in_one_line():
    """profile_step.py --memory needs xprof (not a requirement): a one-line
    error that says how to get it, before TensorFlow starts."""
    code = (
        "import runpy, sys\n"
        "sys.modules['xprof'] = None\n"  # makes `import xprof` fail, installed or not
        "sys.argv = ['profile_step.py', '--memory']\n"
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'profile_step.py')!r}, "
        "run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "profile_step.py: --memory needs the profiler's converter: pip install xprof"
    )


def test_paired_fraction_compares_each_step_with_its_neighbouring_product():
    """model_step.py's ratio: step i against the faster of the products timed
    just before and after it, then the median over steps (hand-computed)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.machine import paired_fraction

    # 600 GFLOP a step; steps of 6, 5 and 10 s (100, 120, 60 GFLOP/s); the
    # products around them 150|120, 120|100, 100|200 -> references 150, 120, 200
    fraction, reference = paired_fraction([6.0, 5.0, 10.0], [150.0, 120.0, 100.0, 200.0], 600e9)
    assert fraction == pytest.approx(100 / 150)  # median of 0.667, 1.0, 0.3
    assert reference == pytest.approx(150.0)  # median of 150, 120, 200
    with pytest.raises(ValueError, match="3 steps need 4 probes, got 3"):
        paired_fraction([6.0, 5.0, 10.0], [150.0, 120.0, 100.0], 600e9)


def test_profile_counts_ops_not_the_enclosing_function():
    """profile_step.py's key for each host event of the trace: the op type
    (or op name and type), and nothing for the tf.function call itself,
    whose event name has a space before its type (it was counted as an op
    until 2026-11-27, a third of the printed total) or for executor markers."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.machine import op_event_key

    conv = "model/EncoderBlock3_0_1/conv1_1/BiasAdd:_MklNativeFusedConv3D"
    assert op_event_key(conv) == "_MklNativeFusedConv3D"
    assert op_event_key(conv, by_name=True) == (
        "model/EncoderBlock3_0_1/conv1_1/BiasAdd (_MklNativeFusedConv3D)"
    )
    assert op_event_key("stack_160:Pack") == "Pack"
    for not_an_op in (
        "__inference_train_function_123: __inference_step_45780",
        "__inference_step_45780:__inference_step_45780",
        "ExecutorState::Process",
        "$ThreadpoolListener::Record",
        "SessionRun:Run",
        "no colon",
        "trailing:",
    ):
        assert op_event_key(not_an_op) is None, not_an_op
        assert op_event_key(not_an_op, by_name=True) is None, not_an_op


def test_step_rows_give_both_references(tmp_path):
    """A step measured against the neighbouring products (model_step.py since
    2026-11-27) is judged on that ratio, and its row also gives the ratio
    to the product timed at the start; older rows render as before."""
    paired = {
        **_step("64x64x64", 0.65, 2.0),
        "fraction_of_start_matmul": 0.76,
        "start_matmul_gflops": 129.0,
    }
    results = {
        "machine": "test machine",
        "date": "2026-01-01",
        "steps": [paired, _step("64x64x64", 0.64, 2.0)],
        "inference": [],
        "input_pipeline": {
            "crop": "160x192x128",
            "case_shape": "240x240x155",
            "train_cases_per_s": 4.0,
            "train_cached_cases_per_s": 9.0,
        },
    }
    table, verdicts = _render(tmp_path, results, "| training step")
    assert verdicts == ["≥ 65% of matmul: met", "≥ 65% of matmul: NOT met"]
    rows = [line for line in table.splitlines() if line.startswith("| training step")]
    assert "65.0% of matmul (300; against the product at the start 76% of 129)" in rows[0]
    assert "at the start" not in rows[1]
    assert "timed just before or just after it" in table


def test_readme_speed_table_is_made_from_the_results(tmp_path):
    """README's speed table is run_all.py's rendering of results.json and the
    GPU runs, between two markers: --render_only rewrites it there (and only
    there), and the repository's README holds exactly what it renders."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import run_all

    results = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    runs = run_all.load_gpu_runs(str(ROOT / "benchmarks" / "gpu_runs"))
    table = run_all.speed_table(results, runs)
    readme = (ROOT / "README.md").read_text()
    assert f"{run_all.README_BEGIN}\n{table}{run_all.README_END}" in readme
    lines = table.splitlines()
    assert lines[0] == "| machine, date | training step | inference of one case |"
    assert lines[-1] == "| the paper: NVIDIA V100 | 1.9 s | 0.4 s |"
    step = next(
        r
        for r in results["steps"]
        if r["crop"] == "160x192x128"
        and not r["recompute_levels"]
        and not r.get("system_allocator")
    )
    assert f"{step['sec_per_step']:.1f} s" in lines[2] and results["date"] in lines[2]
    # In a README beside another out_dir: only the text between the markers changes.
    out = tmp_path / "bench"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(results))
    (tmp_path / "README.md").write_text(
        f"before\n{run_all.README_BEGIN}\nold\n{run_all.README_END}\nafter\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run_all.py"),
            "--render_only",
            f"--out_dir={out}",
            "--gpu_dir=/nonexistent",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "README.md").read_text() == (
        f"before\n{run_all.README_BEGIN}\n{run_all.speed_table(results, [])}"
        f"{run_all.README_END}\nafter\n"
    )
    assert not run_all.update_readme(str(out / "results.json"), "x")  # no markers: untouched
