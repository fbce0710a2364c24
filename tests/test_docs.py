"""The docs show only commands the code accepts, link only to files that exist, and name
only files and code that exist.

Every `--flag` that a command line in the Markdown docs passes to train.py,
evaluate.py, `python -m data_pipeline.<module>`, `python -m brats_tf.export`,
`python -m brats_tf.postprocess` or `python -m serving.client` must be one of
that program's absl flags, read from its own `--helpfull` (each program runs
once, in a subprocess, all at once).
Command lines come from fenced code blocks (backslash continuations joined)
and from inline code spans. Every relative Markdown link must point to an
existing file, and an anchor in it to one of that file's headings. Every
file, folder and Python name in an inline code span must exist (the rules:
"Names of code in the docs" below). The pages of docs/history/ record the code
of their dates: only their links are checked.
"""

from __future__ import annotations

import ast
import concurrent.futures
import fnmatch
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The hand-written docs (benchmarks/RESULTS.md and benchmarks/history/ are generated).
DOCS = sorted(
    [
        ROOT / "README.md",
        ROOT / "WORKSPACE.md",
        *(p for p in (ROOT / "docs").rglob("*.md") if "history" not in p.relative_to(ROOT).parts),
        ROOT / "benchmarks" / "gpu.md",
        ROOT / "data_pipeline" / "README.md",
        *(ROOT / "brats_tf").glob("*.md"),
    ]
)
# The record of earlier dates: its links must work, its commands and names are of its date.
HISTORY_DOCS = sorted((ROOT / "docs" / "history").glob("*.md"))

SCRIPTS = ("train.py", "evaluate.py")
MODULES = re.compile(
    r"^(data_pipeline\.\w+|brats_tf\.export|brats_tf\.postprocess|"
    r"serving\.client)$"
)
SHELL_BREAKS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>&1"}
README_LIMIT_BYTES = 10 * 1024


def _inline_spans(prose: list[tuple[int, str]]):
    """(line number, code span) of inline code in consecutive prose lines; a span may
    continue on the next line, never across a blank line."""
    if not prose:
        return
    first, text = prose[0][0], "\n".join(line for _, line in prose)
    for match in re.finditer(r"`((?:[^`\n]|\n(?![ \t]*\n))+)`", text):
        yield first + text.count("\n", 0, match.start()), match.group(1).replace("\n", " ")


def _code_lines(text: str):
    """(line number, logical command line) of fenced code blocks and inline code spans."""
    fenced = False
    pending, start = "", 0
    prose: list[tuple[int, str]] = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            if not fenced:
                yield from _inline_spans(prose)
                prose = []
            fenced = not fenced
            pending = ""
            continue
        if not fenced:
            prose.append((number, line))
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    yield from _inline_spans(prose)


def _program(tokens: list[str], i: int) -> str | None:
    token = tokens[i]
    if os.path.basename(token) in SCRIPTS:
        return os.path.basename(token)
    if token == "-m" and i + 1 < len(tokens) and MODULES.match(tokens[i + 1]):
        return tokens[i + 1]
    return None


def _commands(text: str):
    """(line number, program, [flag names]) for each command line that runs a program."""
    for number, line in _code_lines(text):
        if not any(s in line for s in SCRIPTS) and "-m " not in line:
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: Python, not a shell line
            tokens = line.split()
        for i in range(len(tokens)):
            program = _program(tokens, i)
            if program is None:
                continue
            names = []
            for token in tokens[i + 1 :]:
                if token in SHELL_BREAKS:
                    break
                token = token.lstrip("[(")
                if token.startswith("--") and len(token) > 2:
                    names.append(re.split(r"[=\])`,]", token[2:], maxsplit=1)[0])
            yield number, program, names
            break


def _shown_flags() -> dict[str, list[tuple[str, int, str]]]:
    """program -> [(doc, line, flag name)] over all docs."""
    shown: dict[str, list[tuple[str, int, str]]] = {}
    for doc in DOCS:
        for number, program, names in _commands(doc.read_text(encoding="utf-8")):
            entries = shown.setdefault(program, [])
            entries.extend((str(doc.relative_to(ROOT)), number, name) for name in names)
    return shown


SHOWN = _shown_flags()


def _help_command(program: str) -> list[str]:
    if program in SCRIPTS:
        return [sys.executable, program, "--helpfull"]
    return [sys.executable, "-m", program, "--helpfull"]


def _defined_flags(program: str) -> set[str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        _help_command(program), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    names = set()
    for match in re.finditer(r"^\s+--(\[no\])?([A-Za-z0-9_]+)", result.stdout, re.MULTILINE):
        names.add(match.group(2))
        if match.group(1):  # a boolean: --name and --noname
            names.add("no" + match.group(2))
    if "flagfile" not in names:
        raise AssertionError(
            f"{program} --helpfull listed no flags (exit {result.returncode}):\n"
            f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return names


@pytest.fixture(scope="module")
def defined_flags() -> dict[str, set[str]]:
    """program -> its flag names, every program's --helpfull run side by side."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(SHOWN) or 1) as pool:
        return dict(zip(SHOWN, pool.map(_defined_flags, SHOWN)))


def test_the_docs_show_commands_of_every_entry_point():
    for program in ("train.py", "evaluate.py", "data_pipeline.convert", "serving.client"):
        assert program in SHOWN, f"no command line for {program} found in {DOCS}"


@pytest.mark.parametrize("program", sorted(SHOWN))
def test_every_flag_shown_in_the_docs_exists(program, defined_flags):
    unknown = [
        f"{doc}:{line}: --{name}"
        for doc, line, name in SHOWN[program]
        if name not in defined_flags[program]
    ]
    assert not unknown, f"flags that {program} does not define:\n" + "\n".join(unknown)


def test_command_parsing_joins_continuations_and_reads_inline_code():
    text = (
        "```bash\nTF_CONFIG='{\"a\": 1}' \\\n  python train.py --flagfile=x \\\n"
        "  --model_dir=y  # --not_a_flag\n```\n"
        "Then `python -m brats_tf.export --model=m.keras [--overwrite]` and "
        "`evaluate.py --tta`; `--recompute` alone is no command; `train.py\n"
        "--epochs=3 --noexport` spans two lines.\n"
    )
    assert list(_commands(text)) == [
        (2, "train.py", ["flagfile", "model_dir"]),
        (6, "brats_tf.export", ["model", "overwrite"]),
        (6, "evaluate.py", ["tta"]),
        (6, "train.py", ["epochs", "noexport"]),
    ]


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.MULTILINE)}


def _links(path: pathlib.Path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    for match in re.finditer(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        yield match.group(1)


def test_slug_matches_githubs_anchors():
    assert _slug("The README's figure") == "the-readmes-figure"
    assert _slug("Smaller GPUs, less memory") == "smaller-gpus-less-memory"
    assert _slug("`make demo` runs") == "make-demo-runs"


@pytest.mark.parametrize("doc", DOCS + HISTORY_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc):
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{doc.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_readme_stays_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT_BYTES, f"README.md is {size} bytes; move details to docs/"


# --- Names of code in the docs -------------------------------------------------------
#
# Every file, folder and Python name that a doc names in an inline code span must exist:
#
# - `brats_tf/model.py`, `benchmarks/gpu_runs/`, `configs/demo.flags`: a path whose first
#   part is one of the repository's own folders or files (TOP_LEVEL; user paths such as
#   `runs/b18` or `demo_output/` are not checked). `*`, `{a,b}` and `<placeholder>` match
#   as shell patterns.
# - `path::name`: `name` is defined in that file: a top-level function, class or
#   assigned constant, or `Class.method` / `Class.ATTRIBUTE`; for a test file
#   `tests/test_x.py::test_y` a test, where `test_prefix_*` matches as a pattern.
# - A bare file name, `layers.py::GroupNorm` or `INFERENCE.md`, is looked for in the folder
#   of the last path named before it in the same table cell (in prose: the same
#   paragraph), then in the doc's own folder, then at the repository's root.
# - A bare test name, `test_paper_outputs`, is a test of the last test file named before it
#   in the same table cell or paragraph, or, when none is, of any tests/test_*.py.
# - A dotted name that starts with a package, `brats_tf.training.Trainer`, or with one of
#   its modules, `volume.brain_box`, `numerics_check.BOUNDS`: the module exists and
#   defines (or imports, a package's re-export) the name. A last part that is a file
#   extension (`brats_tf.json`, `config.json`) makes it a file name, and a call on a short
#   name (`model.summary()`) an expression on a variable: neither is checked.
#
# Checked: DOCS and benchmarks/*.md. docs/history/ and benchmarks/history/ record what was
# measured with the code of their date: their names are not checked (docs/history's links are).

TOP_LEVEL = (
    "brats_tf",
    "data_pipeline",
    "serving",
    "benchmarks",
    "tests",
    "configs",
    "docs",
    "train.py",
    "evaluate.py",
    "Makefile",
    "requirements.txt",
    "README.md",
    "WORKSPACE.md",
    "CITATION.cff",
    "LICENSE",
    "pytest.ini",
)
PACKAGES = ("brats_tf", "data_pipeline", "serving", "benchmarks")
FILE_EXTENSIONS = {
    "py",
    "md",
    "json",
    "keras",
    "txt",
    "png",
    "csv",
    "gz",
    "nii",
    "flags",
    "pb",
    "cff",
    "ini",
    "tfrecord",
    "partial",
    "tmp",
    "html",
    "yaml",
}

NAMED_DOCS = sorted({*DOCS, *(ROOT / "benchmarks").glob("*.md")})

_PATH_SPAN = re.compile(
    r"^(?P<path>[\w.*<>{},/-]+?)(?:::(?P<name>[\w.*]+)(?:\[[^\]]*\])?"
    r"(?:\(.*\))?)?$"
)
_DOTTED = re.compile(r"^(?P<dotted>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(.*\))?$")
_TEST_NAME = re.compile(r"^test_[\w*]+(?:\[[^\]]*\])?$")


def _python_names(path: pathlib.Path, imports: bool = False) -> set[str]:
    """Names defined in a Python file: functions, classes, assigned constants, and
    `Class.member` for what a class body defines; with `imports`, imported names too."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()

    def targets(node) -> list[str]:
        if isinstance(node, ast.Name):
            return [node.id]
        if isinstance(node, (ast.Tuple, ast.List)):
            return [n for elt in node.elts for n in targets(elt)]
        return []

    def visit(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(prefix + node.name)
            elif isinstance(node, ast.ClassDef):
                names.add(prefix + node.name)
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, ast.Assign):
                names.update(prefix + n for t in node.targets for n in targets(t))
            elif isinstance(node, ast.AnnAssign):
                names.update(prefix + n for n in targets(node.target))
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and imports and not prefix:
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(node, block, []), prefix)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body, prefix)

    visit(tree.body, "")
    return names


def _module_file(parts: list[str]) -> pathlib.Path | None:
    """The file of module `a.b.c` (a module file or a package's __init__.py)."""
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _module_stems() -> dict[str, list[str]]:
    """Short module name -> its dotted name, for every module of the packages."""
    stems: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).iterdir():
            if path.suffix == ".py" and path.stem != "__init__":
                stems.setdefault(path.stem, []).append(f"{package}.{path.stem}")
            elif path.is_dir() and (path / "__init__.py").is_file():
                stems.setdefault(path.name, []).append(f"{package}.{path.name}")
    return {stem: dotted for stem, dotted in stems.items() if len(dotted) == 1}


def _pattern(path: str) -> list[str]:
    """Shell patterns for a doc's path: `{a,b}` expanded, `<placeholder>` as `*`."""
    path = re.sub(r"<[^>]*>", "*", path)
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [
        p
        for alt in match.group(1).split(",")
        for p in _pattern(path[: match.start()] + alt + path[match.end() :])
    ]


def _existing(path: str) -> list[pathlib.Path]:
    found = []
    for pattern in _pattern(path.rstrip("/")):
        if any(c in pattern for c in "*?["):
            found.extend(sorted(ROOT.glob(pattern)))
        elif (ROOT / pattern).exists():
            found.append(ROOT / pattern)
    return found


def _defines(files: list[pathlib.Path], name: str, imports: bool = False) -> bool:
    """Whether one of these Python files (or packages) defines `name` (a pattern for tests)."""
    name = re.sub(r"\[.*\]$", "", name)
    for path in files:
        if path.is_dir():
            path = path / "__init__.py"
        if path.suffix != ".py" or not path.is_file():
            continue
        names = _python_names(path, imports)
        if name in names or ("*" in name and fnmatch.filter(names, name)):
            return True
    return False


def _spans(text: str):
    """(line, code span, table cell or paragraph index) of the inline code outside fenced
    blocks; the index changes at every `|` between spans and at every blank line."""
    fenced, context, line_of = False, 0, []
    prose = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            prose.append("")
            line_of.append(number)
            continue
        prose.append("" if fenced else line)
        line_of.append(number)
    joined = "\n".join(prose)
    last_end = 0
    for match in re.finditer(r"`([^`\n]+)`", joined):
        between = joined[last_end : match.start()]
        if "|" in between or re.search(r"\n[ \t]*\n", between):
            context += 1
        last_end = match.end()
        yield line_of[joined.count("\n", 0, match.start())], match.group(1).strip(), context


def _check_span(doc: pathlib.Path, span: str, recent: dict) -> str | None:
    """None when the span names nothing of the repository's, or names what exists; else
    what is wrong. `recent` holds the last path and test file of the span's context."""
    dotted = _DOTTED.match(span)
    if dotted and "/" not in span and "::" not in span:
        if span.endswith(")") and span.split(".")[0] not in PACKAGES:
            return None  # `model.summary()`: an expression on a variable
        return _check_dotted(dotted.group("dotted"))
    if _TEST_NAME.match(span):
        tests = [recent["test"]] if recent.get("test") else sorted(ROOT.glob("tests/test_*.py"))
        if not _defines(tests, span):
            where = recent["test"].relative_to(ROOT) if recent.get("test") else "tests/test_*.py"
            return f"no test {span} in {where}"
        return None
    match = _PATH_SPAN.match(span)
    if not match or " " in span:
        return None
    path, name = match.group("path"), match.group("name")
    first = path.split("/")[0]
    if "/" in path or first in TOP_LEVEL:
        if first not in TOP_LEVEL:
            return None
        files = _existing(path)
    elif path.rsplit(".", 1)[-1] in {"py", "md", "flags"} and path.count(".") == 1:
        folders = [recent["folder"]] if recent.get("folder") else []
        folders += [doc.parent, ROOT]
        files = []
        for folder in folders:
            files = _existing(str((folder / path).relative_to(ROOT)) if folder != ROOT else path)
            if files and (name is None or _defines(files, name)):
                break
    else:
        return None
    if not files:
        return f"no such file or folder: {path}"
    recent["folder"] = files[0].parent if files[0].is_file() else files[0]
    if files[0].name.startswith("test_") and files[0].suffix == ".py":
        recent["test"] = files[0]
    if name is not None and not _defines(files, name):
        return f"{files[0].relative_to(ROOT)} defines no {name}"
    return None


def _check_dotted(dotted: str) -> str | None:
    parts = dotted.split(".")
    if parts[-1] in FILE_EXTENSIONS:
        return None
    if parts[0] not in PACKAGES:
        stem = _module_stems().get(parts[0])
        if stem is None:
            return None
        parts = stem[0].split(".") + parts[1:]
    for cut in range(len(parts), 0, -1):
        module = _module_file(parts[:cut])
        if module is None:
            continue
        rest = ".".join(parts[cut:])
        if not rest or _defines([module], rest):
            return None
        source = _imported_from(module, ".".join(parts[:cut]), parts[cut])
        if source is not None and source != dotted:  # a re-export: where it comes from
            return _check_dotted(".".join([source, *parts[cut + 1 :]]))
        if _defines([module], rest, imports=True):
            return None
        return f"{'.'.join(parts[:cut])} defines no {rest}"
    return f"no module {'.'.join(parts)}"


def _imported_from(module: pathlib.Path, dotted: str, name: str) -> str | None:
    """`package.module.name` that `from ... import name` in this module reads, or None."""
    package = dotted if module.name == "__init__.py" else dotted.rpartition(".")[0]
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if not isinstance(node, ast.ImportFrom):
            continue
        for alias in node.names:
            if (alias.asname or alias.name) != name:
                continue
            base = (
                package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            )
            source = ".".join(base + ([node.module] if node.module else []))
            if source.split(".")[0] in PACKAGES:
                return f"{source}.{alias.name}"
    return None


def _wrong_names(doc: pathlib.Path, text: str | None = None) -> list[str]:
    """'doc:line: `span`: what is wrong' for every wrong name in a doc."""
    text = doc.read_text(encoding="utf-8") if text is None else text
    wrong, recent, context = [], {}, None
    for number, span, span_context in _spans(text):
        if span_context != context:
            recent, context = {}, span_context
        problem = _check_span(doc, span, recent)
        if problem:
            wrong.append(f"{doc.relative_to(ROOT)}:{number}: `{span}`: {problem}")
    return wrong


@pytest.mark.parametrize("doc", NAMED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_files_and_code_exist(doc):
    wrong = _wrong_names(doc)
    assert not wrong, "names in the docs that the code does not have:\n" + "\n".join(wrong)


def test_the_name_check_finds_wrong_names_and_their_lines():
    doc = ROOT / "docs" / "fake.md"
    text = (
        "# A page\n\n"
        "Good: `brats_tf/model.py::build_model`, `brats_tf/layers.py::GroupNorm.call`,\n"
        "`tests/test_recompute.py::test_recomputed_block_*`, `brats_tf.training.Trainer`,\n"
        "`volume.brain_box`, `configs/`, `runs/b18`, `config.json`, `model.keras`.\n\n"
        "| code | test |\n|---|---|\n"
        "| `brats_tf/losses.py::kl_loss`, `layers.py::GroupNorm` "
        "| `tests/test_losses.py::test_kl_matches_paper_formula`, "
        "`test_l2_is_mean_squared_error` |\n"
        "| `brats_tf/model.py::no_such_function` | `test_no_such_test` |\n\n"
        "Bad: `brats_tf/no_such_module.py` and `tests/test_model.py::test_not_there`\n"
        "and `brats_tf/layers.py::GroupNorm.no_method`, `volume.not_defined_here`,\n"
        "`tests/test_losses.py::test_kl_*`, `test_paper_outputs`.\n"
        "```bash\n`brats_tf/in_a_fence.py` is code, not a name\n```\n"
    )
    wrong = _wrong_names(doc, text)
    assert wrong == [
        (
            "docs/fake.md:10: `brats_tf/model.py::no_such_function`: brats_tf/model.py defines "
            "no no_such_function"
        ),
        "docs/fake.md:10: `test_no_such_test`: no test test_no_such_test in tests/test_*.py",
        (
            "docs/fake.md:12: `brats_tf/no_such_module.py`: no such file or folder: "
            "brats_tf/no_such_module.py"
        ),
        (
            "docs/fake.md:12: `tests/test_model.py::test_not_there`: tests/test_model.py defines "
            "no test_not_there"
        ),
        (
            "docs/fake.md:13: `brats_tf/layers.py::GroupNorm.no_method`: brats_tf/layers.py "
            "defines no GroupNorm.no_method"
        ),
        (
            "docs/fake.md:13: `volume.not_defined_here`: data_pipeline.volume defines no "
            "not_defined_here"
        ),
        (
            "docs/fake.md:14: `test_paper_outputs`: no test test_paper_outputs in "
            "tests/test_losses.py"
        ),
    ], wrong
