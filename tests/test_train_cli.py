"""train.py end to end on a small synthetic TFRecord dataset: smoke run, bad flags,
kill -9 and resume."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from importtime import imported_modules
from tiny_data import synthetic_tfrecords

pytestmark = pytest.mark.heavy  # tests/conftest.py: scheduled first

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return str(synthetic_tfrecords(root, 6, (48, 48, 40), folds=3))


def _train_cmd(args):
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        f"--flagfile={os.path.join(ROOT, 'configs', 'smoke.flags')}",
    ] + args


def train(args, timeout=400):
    return subprocess.run(
        _train_cmd(args), capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT
    )


def start_train(args, log_path):
    """train.py in the background, its stderr to ``log_path``; ``finish`` waits
    for it. Two runs side by side take less wall time on two cores than one
    after the other: much of a short run is single-threaded Python (imports,
    tracing)."""
    log = open(log_path, "w")
    proc = subprocess.Popen(
        _train_cmd(args), stdout=subprocess.DEVNULL, stderr=log, text=True, env=ENV, cwd=ROOT
    )
    proc.log_path = log_path
    log.close()  # the child holds its own descriptor
    return proc


def finish(proc, timeout=400):
    """Waits for a ``start_train`` run (killed on timeout or error); its stderr
    becomes ``proc.stderr``."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc.stderr = open(proc.log_path).read()
    return proc


def test_smoke_run_writes_checkpoints_history_flags_and_export(data_dir, tmp_path):
    model_dir = tmp_path / "run"
    proc = train([f"--data_dir={data_dir}", f"--model_dir={model_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = json.loads((model_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"loss", "dice", "l2", "kl", "lr", "dice_WT", "val_dice_WT", "val_dice_ET"} <= set(
        history[0]
    )
    assert history[1]["lr"] == pytest.approx(1e-4 * 0.5**0.9)
    flags_text = (model_dir / "flags.txt").read_text()
    assert "--crop=32,32,32" in flags_text and f"--data_dir={data_dir}" in flags_text
    config = json.loads((model_dir / "config.json").read_text())
    assert config["train"]["num_train_cases"] == 4  # 6 cases, fold 0 of 3 held out
    assert config["runtime"]["inter_op_threads"] == "tensorflow default"
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-2")
    assert list((model_dir / "logs" / "train").glob("events.out.tfevents.*"))
    # The SavedModel serves a raw volume of a size not divisible by 8.
    loaded = tf.saved_model.load(str(model_dir / "export" / "1"))
    volume = np.random.default_rng(0).normal(size=(1, 20, 28, 13, 4)).astype(np.float32)
    out = loaded.signatures["serving_default"](tf.constant(volume))
    assert out["probabilities"].shape == (1, 20, 28, 13, 3)
    assert (model_dir / "model.keras").exists() and (model_dir / "segmenter.keras").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--epochs=-1"], "flag --epochs=-1"),
        (["--crop=32,32,30"], "must be divisible by 4"),  # the VAE of 2 levels
        (["--strategy=tpu"], "flag --strategy=tpu"),
        (["--data_dir=/nonexistent/brats"], "--data_dir=/nonexistent/brats: no manifest.json"),
        (["--fold=9"], "--fold=9"),
        (["--crop=32,x,32"], "--crop must be integers"),
        (["--strategy=multi_worker"], "TF_CONFIG"),
        (["--recompute", "--recompute_levels=3"], r"recompute_levels must be an integer in [0, 2]"),
        (
            ["--precision=mixed_bfloat16", "--crop=16,32,32", "--blocks_down=1,1,1,1"]
            + ["--blocks_up=1,1,1"],
            "crop depth of 16",
        ),
    ],
)
def test_bad_flags_fail_at_start_with_one_line(data_dir, tmp_path, args, message):
    """One line, nothing written, and before TensorFlow is imported (a user
    waits a fraction of a second for it, not TensorFlow's start-up)."""
    model_dir = tmp_path / "bad"
    cmd = _train_cmd([f"--data_dir={data_dir}", f"--model_dir={model_dir}"] + args)
    cmd.insert(1, "-Ximporttime")  # every module imported, one line each, to stderr
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    prefixes = ("train.py: error:", "FATAL Flags parsing error")
    errors = [line for line in lines if line.startswith(prefixes)]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not model_dir.exists()
    imported = imported_modules(proc.stderr)
    assert "absl.flags" in imported and "tensorflow" not in imported


def test_recompute_run_records_its_levels(data_dir, tmp_path):
    """--recompute trains, and config.json records the levels recomputed
    (default: every level; smoke.flags' network has 2) and its one inter-op
    thread on one device."""
    model_dir = tmp_path / "run"
    proc = train(
        [
            f"--data_dir={data_dir}",
            f"--model_dir={model_dir}",
            "--recompute",
            "--epochs=1",
            "--steps_per_epoch=1",
            "--noexport",
            "--fold=-1",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model"]["recompute_levels"] == len(config["model"]["blocks_down"]) == 2
    assert config["runtime"]["inter_op_threads"] == 1


def test_ensemble_members_train_with_their_own_seed_and_folder(data_dir, tmp_path):
    """--member=K: seed --seed + K into model_dir/member_K. The runs are
    deterministic (smoke.flags), so equal seeds would give equal weights."""
    common = [
        f"--data_dir={data_dir}",
        f"--model_dir={tmp_path / 'ens'}",
        "--seed=5",
        "--epochs=1",
        "--steps_per_epoch=1",
        "--noexport",
        "--fold=-1",
    ]
    procs = [start_train(common + [f"--member={k}"], tmp_path / f"member{k}.log") for k in (0, 1)]
    for proc in procs:
        assert finish(proc).returncode == 0, proc.stderr[-3000:]
    members = [tmp_path / "ens" / f"member_{k}" for k in (0, 1)]
    configs = [json.loads((m / "config.json").read_text()) for m in members]
    assert [c["train"]["seed"] for c in configs] == [5, 6]
    assert [c["data"]["member"] for c in configs] == [0, 1]
    assert [c["train"]["model_dir"] for c in configs] == [str(m) for m in members]
    assert "--member=1" in (members[1] / "flags.txt").read_text()
    w0, w1 = _weights(members[0]), _weights(members[1])
    kernels = [n for n in w0 if np.ndim(w0[n]) == 5]  # 3-D convolution kernels (and Adam's)
    assert kernels and all(not np.array_equal(w0[n], w1[n]) for n in kernels)
    # member 1 again with another --seed: refused, nothing written
    before = (members[1] / "config.json").read_text()
    proc = train(common[:2] + ["--seed=7", "--member=1", "--fold=-1"], timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "seed 6 there, 8 now" in errors[0], proc.stderr[-2000:]
    assert (members[1] / "config.json").read_text() == before


def _weights(model_dir):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir / "checkpoints")))
    # Everything: weights, Adam slots and step, epoch, random-generator states.
    names = sorted(
        n for n in reader.get_variable_to_shape_map() if n != "_CHECKPOINTABLE_OBJECT_GRAPH"
    )
    return {n: reader.get_tensor(n) for n in names}


def test_killed_run_resumes_and_reaches_the_uninterrupted_weights(data_dir, tmp_path):
    common = [
        f"--data_dir={data_dir}",
        "--fold=-1",
        "--epochs=4",
        "--steps_per_epoch=3",
        "--validate_every=0",
        "--noexport",
    ]
    straight = tmp_path / "straight"
    straight_proc = start_train(
        common + [f"--model_dir={straight}"],  # beside the killed run
        tmp_path / "straight.txt",
    )
    try:
        _kill_and_resume(common, tmp_path / "killed")
        finish(straight_proc)
    finally:
        if straight_proc.poll() is None:
            straight_proc.kill()
    assert straight_proc.returncode == 0, straight_proc.stderr[-3000:]
    history = json.loads((tmp_path / "killed" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    want, got = _weights(straight), _weights(tmp_path / "killed")
    assert want.keys() == got.keys() and len(want) > 50
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _kill_and_resume(common, killed):
    """kill -9 a run right after its first checkpoint, then run it again."""
    child = subprocess.Popen(
        _train_cmd([f"--model_dir={killed}"] + common),
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    try:
        while tf.train.latest_checkpoint(str(killed / "checkpoints")) is None:
            assert child.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)  # kill -9 right after the first checkpoint
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    done = tf.train.latest_checkpoint(str(killed / "checkpoints"))
    assert not done.endswith("ckpt-4"), "killed too late to test a resume"

    proc = train(common + [f"--model_dir={killed}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr


# ---------------------------------------------- the flags are the configs' fields
def _with_train_module(code: str) -> dict:
    """Runs ``code`` in a new Python with train.py loaded as module ``train``
    (its flags defined); the JSON that ``code`` prints last."""
    path = os.path.join(ROOT, "train.py")
    prologue = (
        "import dataclasses, importlib.util, json, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        f"spec = importlib.util.spec_from_file_location('train', {path!r})\n"
        "train = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(train)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", prologue + code],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _defaults(config_class) -> dict:
    return {
        f.name: list(f.default) if isinstance(f.default, tuple) else f.default
        for f in dataclasses.fields(config_class)
        if f.default is not dataclasses.MISSING
    }


def test_every_flag_default_is_the_config_default():
    """Each config field train.py's flags set takes the config's default when
    no flag is given (InputConfig's too), and the flags are defined without
    TensorFlow."""
    from brats_tf.config import LossConfig, ModelConfig, TrainConfig
    from data_pipeline.flag_fields import flag_fields
    from data_pipeline.input import InputConfig

    got = _with_train_module(
        "train.FLAGS(['train.py'])\n"
        "print(json.dumps({'tensorflow': 'tensorflow' in sys.modules, **{\n"
        "    c.__name__: train.config_values(c) for c in\n"
        "    (train.ModelConfig, train.LossConfig, train.TrainConfig, train.InputConfig)}}))\n"
    )
    assert got.pop("tensorflow") is False
    for name, like in (
        ("ModelConfig", ModelConfig),
        ("LossConfig", LossConfig),
        ("TrainConfig", TrainConfig),
        ("InputConfig", InputConfig),
    ):
        defaults = _defaults(like)
        assert got[name] and got[name] == {k: defaults[k] for k in got[name]}, name
    # train.py's flags include a flag of each of these fields
    assert set(got["TrainConfig"]) == {f.field for f in flag_fields(TrainConfig)}
    assert not {"model_dir", "num_train_cases"} & set(got["TrainConfig"])  # not flags of theirs
    assert (
        set(got["InputConfig"])
        == {"augment", "cache", "crop_from"}
        == {f.field for f in flag_fields(InputConfig)}
    )
    assert {"input_shape", "weight_decay", "head_bias_init"} <= set(got["ModelConfig"])
    assert set(got["LossConfig"]) == {"dice_weight", "l2_weight", "kl_weight"}


def test_one_list_of_precisions_strategies_and_choices():
    from brats_tf import config, export, model, training
    from brats_tf.config import TrainConfig
    from data_pipeline import constants
    from data_pipeline.flag_fields import flag_fields
    from data_pipeline.input import InputConfig

    assert model.PRECISIONS is config.PRECISIONS
    assert training.PRECISIONS is config.PRECISIONS and export.PRECISIONS is config.PRECISIONS
    choices = {f.field: f.choices for c in (TrainConfig, InputConfig) for f in flag_fields(c)}
    assert choices["precision"] is config.PRECISIONS
    assert choices["strategy"] is config.STRATEGIES
    assert choices["strategy"] == training.STRATEGIES
    assert choices["on_nonfinite"] == config.ON_NONFINITE == training.ON_NONFINITE
    assert choices["crop_from"] is constants.CROP_FROM


def test_resume_check_reads_the_config_json_of_an_earlier_run(tmp_path):
    """An earlier run's config.json names ModelConfig.weight_decay l2_weight:
    a run with the same weight decay resumes there, another one is refused
    naming the field."""
    code = (
        "model = dataclasses.asdict(train.ModelConfig(input_shape=(32, 32, 32)))\n"
        "resolved = {'model': model, 'data': {'fold': 0},\n"
        "            'train': {'seed': 0, 'num_train_cases': 4}}\n"
        "out = {}\n"
        "for name, weight in (('same', 1e-5), ('other', 2e-5)):\n"
        f"    folder = {str(tmp_path)!r} + '/' + name\n"
        "    old = dict(resolved, model={('l2_weight' if k == 'weight_decay' else k): v\n"
        "                                for k, v in model.items()})\n"
        "    old['model']['l2_weight'] = weight\n"
        "    import os; os.makedirs(folder)\n"
        "    open(folder + '/config.json', 'w').write(json.dumps(old))\n"
        "    try:\n"
        "        train.check_model_dir(folder, resolved)\n"
        "        out[name] = 'ok'\n"
        "    except ValueError as e:\n"
        "        out[name] = str(e)\n"
        "print(json.dumps(out))\n"
    )
    got = _with_train_module(code)
    assert got["same"] == "ok"
    assert "weight_decay 2e-05 there, 1e-05 now" in got["other"]
