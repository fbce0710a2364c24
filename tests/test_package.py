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
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return out.strip().splitlines()[-1]


def test_importing_brats_tf_sets_no_environment_variable():
    """The library chooses nothing from the environment and changes none of it
    (numerics must not depend on which module was imported first)."""
    code = (
        "import os\n"
        "before = dict(os.environ)\n"
        "import brats_tf, brats_tf.model, brats_tf.training, brats_tf.evaluation\n"
        "print(before == dict(os.environ))\n"
    )
    assert _run(code, None) == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="x86 Linux wheels")
@pytest.mark.parametrize("entry", ["train", "evaluate"])
def test_entry_points_turn_onednn_on_and_respect_the_user(entry):
    """train.py and evaluate.py run oneDNN's CPU kernels on every x86 CPU
    (TensorFlow's default is on only for some), unless the environment says
    otherwise."""
    code = (
        f"import runpy, sys\n"
        f"sys.argv = ['{entry}.py']\n"
        f"runpy.run_path('{entry}.py', run_name='not_main')\n"
        f"import tensorflow\n"
        f"from tensorflow.python.util import _pywrap_util_port\n"
        f"print(_pywrap_util_port.IsMklEnabled())\n"
    )
    assert _run(code, None) == "True"
    assert _run(code, "0") == "False"


# ------------------------------------------------------------------ layering
# The layers, bottom to top, are folders (WORKSPACE.md, "Layers"): a module's
# layer is the deepest folder below that holds it, so a new module is placed by
# where it is saved, not by a list of names. A module imports from its own
# layer and the ones below, never above. A module of brats_tf/ run with
# ``python -m`` (it has a ``__main__`` block) is a command, at the top with
# train.py and evaluate.py.
LAYERS = (
    "data_pipeline",  # BraTS data: constants, NumPy volumes, manifest, converter, tf.data
    "brats_tf",  # the paper's model: layers, model, losses, metrics, schedules, figures
    "brats_tf/inference",  # volume -> probabilities -> labels -> NIfTI; the SavedModel
    "brats_tf/training",  # the train step, Trainer, validation, the final save
    "brats_tf/evaluation",  # models and ensembles scored on cases: evaluate.py's engine
    ".",  # commands: train.py, evaluate.py, serving/, benchmarks/, brats_tf's __main__s
)
TOP = len(LAYERS) - 1
PKG = pathlib.Path(ROOT)
SOURCES = ("brats_tf", "data_pipeline", "serving", "benchmarks", "train.py", "evaluate.py")


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
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_import_parsing_sees_every_form(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text(
        "import a.b as c\nfrom d import e\nfrom . import f\n"
        "from .g import h\ndef late():\n    import i\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path)
    assert imported_modules(pkg / "mod.py") == {
        "a.b",
        "d",
        "d.e",
        "pkg",
        "pkg.f",
        "pkg.g",
        "pkg.g.h",
        "i",
    }


def _sources() -> list:
    files = []
    for name in SOURCES:
        path = PKG / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def _is_command(path: pathlib.Path) -> bool:
    return 'if __name__ == "__main__":' in path.read_text()


def layer_of(path: pathlib.Path) -> int:
    """The index in LAYERS of the deepest layer folder holding ``path``."""
    rel = path.relative_to(PKG)
    if rel.parts[0] == "brats_tf" and len(rel.parts) == 2 and _is_command(path):
        return TOP
    best = TOP
    for i, folder in enumerate(LAYERS[:-1]):
        if rel.parts[: len(pathlib.Path(folder).parts)] == pathlib.Path(folder).parts:
            if best == TOP or len(pathlib.Path(folder).parts) >= len(
                pathlib.Path(LAYERS[best]).parts
            ):
                best = i
    return best


def _module_files() -> dict:
    """Module name -> file, for every module of the repository's sources."""
    return {_module_name(f): f for f in _sources()}


def _edges() -> list:
    """(importer, imported) module pairs among the repository's own modules."""
    modules = _module_files()
    edges = []
    for name, path in modules.items():
        for imported in imported_modules(path):
            if imported in modules and imported != name:
                edges.append((name, imported))
    return sorted(set(edges))


def test_layers_are_folders_that_exist():
    for folder in LAYERS:
        assert (PKG / folder).is_dir(), folder
    assert layer_of(PKG / "data_pipeline" / "volume.py") == 0
    assert layer_of(PKG / "brats_tf" / "model.py") == 1
    assert layer_of(PKG / "train.py") == TOP
    assert layer_of(PKG / "serving" / "client.py") == TOP


def test_no_module_imports_a_layer_above_its_own():
    modules = _module_files()
    upward = [
        f"{a} (layer {LAYERS[layer_of(modules[a])]}) imports {b} "
        f"(layer {LAYERS[layer_of(modules[b])]})"
        for a, b in _edges()
        if layer_of(modules[b]) > layer_of(modules[a])
    ]
    assert not upward, "\n".join(upward)


def test_module_imports_have_no_cycle():
    """The module graph is a DAG, so each module can be read after the ones it
    imports (a package's __init__ and its own modules excepted)."""
    graph = {}
    for a, b in _edges():
        if not (b.startswith(a + ".") or a.startswith(b + ".")):
            graph.setdefault(a, set()).add(b)
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_packages_import_in_one_direction():
    """Folder level: data_pipeline imports nothing of brats_tf; the library
    imports no command, no benchmark and no test; benchmarks import no test code."""

    def imports_of(folder):
        return {n for f in sorted((PKG / folder).rglob("*.py")) for n in imported_modules(f)}

    def hits(names, prefixes):
        return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))

    assert hits(imports_of("data_pipeline"), ["brats_tf", "serving", "train", "evaluate"]) == []
    library = imports_of("data_pipeline") | imports_of("brats_tf")
    assert hits(library, ["train", "evaluate", "serving", "benchmarks", "tests"]) == []
    assert hits(imports_of("benchmarks"), ["tests"]) == []


def test_volume_imports_only_numpy_constants_and_checks():
    names = imported_modules(PKG / "data_pipeline" / "volume.py")
    allowed = (
        "__future__",
        "typing",
        "collections.abc",
        "numpy",
        "data_pipeline.constants",
        "data_pipeline.checks",
    )
    assert not [
        n
        for n in names
        if n != "data_pipeline" and not any(n == a or n.startswith(a + ".") for a in allowed)
    ]


# ------------------------------------------------------------------ sizes
MAX_MODULE_LINES = 400  # a module of the library: one concept
MAX_FUNCTION_LINES = 60  # a function: one step (benchmarks, scripts of measurements, excepted)


def test_library_modules_stay_short():
    long = {
        str(f.relative_to(PKG)): n
        for folder in ("brats_tf", "data_pipeline")
        for f in sorted((PKG / folder).rglob("*.py"))
        if (n := len(f.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, long


def test_functions_stay_short():
    files = [f for f in _sources() if f.relative_to(PKG).parts[0] != "benchmarks"]
    files += sorted((PKG / "tests").glob("*.py"))
    long = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{f.relative_to(PKG)}::{node.name}"] = n
    assert not long, long
