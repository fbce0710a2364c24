"""The package's layering (which module may import which), and what importing
brats_tf and running its entry points do to the environment."""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, setting: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return out.strip().splitlines()[-1]


def test_importing_brats_tf_sets_no_environment_variable():
    """The library chooses nothing from the environment and changes none of it
    (numerics must not depend on which module was imported first)."""
    code = ("import os\n"
            "before = dict(os.environ)\n"
            "import brats_tf, brats_tf.model, brats_tf.training, brats_tf.evaluation\n"
            "print(before == dict(os.environ))\n")
    assert _run(code, None) == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="x86 Linux wheels")
@pytest.mark.parametrize("entry", ["train", "evaluate"])
def test_entry_points_turn_onednn_on_and_respect_the_user(entry):
    """train.py and evaluate.py run oneDNN's CPU kernels on every x86 CPU
    (TensorFlow's default is on only for some), unless the environment says
    otherwise."""
    code = (f"import runpy, sys\n"
            f"sys.argv = ['{entry}.py']\n"
            f"runpy.run_path('{entry}.py', run_name='not_main')\n"
            f"import tensorflow\n"
            f"from tensorflow.python.util import _pywrap_util_port\n"
            f"print(_pywrap_util_port.IsMklEnabled())\n")
    assert _run(code, None) == "True"
    assert _run(code, "0") == "False"


# ------------------------------------------------------------------ layering
# model core <- data (data_pipeline) <- training / inference <- evaluation <- apps
# (train.py, evaluate.py, serving/). A module may import from its own layer and
# the ones below it. Modules are listed by name: one that does not exist (yet,
# or any more) is skipped.
CORE = ("constants", "config", "layers", "recompute", "model", "losses", "volume", "io_utils",
        "schedules", "flops")
ABOVE_CORE = ("data_pipeline", "brats_tf.training", "brats_tf.inference",
              "brats_tf.evaluation", "brats_tf.export", "brats_tf.postprocess", "serving",
              "train", "evaluate")
ABOVE_DATA = ("brats_tf.training", "brats_tf.inference", "brats_tf.evaluation",
              "brats_tf.export", "brats_tf.postprocess", "serving", "train", "evaluate")
PKG = pathlib.Path(ROOT)


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path) -> set:
    """Every module ``path`` imports, at the top or inside a function: for
    ``from a.b import c`` both ``a.b`` and ``a.b.c`` (c may be a module)."""
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the module's package
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _violations(path: pathlib.Path, forbidden) -> list:
    return sorted(name for name in imported_modules(path)
                  if any(name == f or name.startswith(f + ".") for f in forbidden))


def test_import_parsing_sees_every_form(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text("import a.b as c\nfrom d import e\nfrom . import f\n"
                                "from .g import h\ndef late():\n    import i\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path)
    assert imported_modules(pkg / "mod.py") == {"a.b", "d", "d.e", "pkg", "pkg.f", "pkg.g",
                                                "pkg.g.h", "i"}


def test_core_imports_nothing_above_it():
    found = [name for name in CORE if (PKG / "brats_tf" / f"{name}.py").is_file()]
    assert {"constants", "volume", "io_utils"} <= set(found)
    bad = {name: _violations(PKG / "brats_tf" / f"{name}.py", ABOVE_CORE) for name in found}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_volume_imports_only_numpy_and_constants():
    names = imported_modules(PKG / "brats_tf" / "volume.py")
    allowed = ("__future__", "typing", "numpy", "brats_tf.constants")
    assert not [n for n in names
                if n != "brats_tf" and not any(n == a or n.startswith(a + ".") for a in allowed)]


def test_metrics_imports_nothing_above_the_core():
    """brats_tf.training imports the metrics: they sit below it, with the core."""
    assert _violations(PKG / "brats_tf" / "metrics.py", ABOVE_CORE) == []


def test_data_pipeline_imports_no_inference_training_evaluation_export_or_app():
    files = sorted((PKG / "data_pipeline").rglob("*.py"))
    assert len(files) >= 7
    bad = {str(f.relative_to(PKG)): _violations(f, ABOVE_DATA) for f in files}
    assert not {k: v for k, v in bad.items() if v}, bad
